"""The evaluation's Ray Data graph: it only composes stages and adds counts on the driver.

    split ids -> from_items -> NetworkStage (actor, GPU if any) -> ScoreStage (CRF actors)
              -> per-image count arrays -> Evaluation (summed on the driver)

or, for existing masks, ``split ids -> PredictionScoreStage -> Evaluation``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.voc import VOCDataset
from pipeline.evaluation.scoring import CRF, NETWORK, PREDICTIONS, Evaluation
from pipeline.evaluation.stages import COUNT_KEYS, NetworkStage, PredictionScoreStage, ScoreStage
from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH


class EvaluationDataError(ValueError):
    """Bad input data (names the file); the run stops, since a partial set is not a score."""


@dataclass
class EvaluationRun:
    evaluation: Evaluation
    #: A few images' predicted label maps for the report: ``samples[image_id][method]``.
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) or start a local Ray instance, once per process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"num_cpus": num_cpus} if address is None and num_cpus else {}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)


def split_ids(root: str, split: str, *, limit: int = 0, num_classes: int | None = None) -> VOCDataset:
    """The split, checked up front (every listed file exists); ``limit`` keeps its first ids."""
    dataset = VOCDataset(root, split=split, num_classes=num_classes)
    if limit and limit < len(dataset.ids):
        dataset.ids = dataset.ids[:limit]
    return dataset


def _progress(rows: Iterable[dict], *, total: int, desc: str, enabled: bool) -> Iterable[dict]:
    from tqdm import tqdm

    return tqdm(rows, total=total, desc=desc, unit="img", disable=not enabled)


def _collect(
    rows: Iterable[dict], *, evaluation: Evaluation, methods: tuple[str, ...], samples: dict
) -> None:
    for row in rows:
        if row["error"]:
            raise EvaluationDataError(str(row["error"]))
        image_id = str(row["image_id"])
        for method in methods:
            evaluation.add(method, image_id, {k: np.asarray(row[f"{method}_{k}"]) for k in COUNT_KEYS})
            mask = np.asarray(row[f"{method}_mask"])
            if mask.size:
                samples.setdefault(image_id, {})[method] = mask


def _sample_ids(ids: list[str], num_samples: int) -> list[str]:
    if num_samples <= 0:
        return []
    step = max(1, len(ids) // num_samples)
    return ids[::step][:num_samples]


def _crf_pool_size(requested: int) -> int:
    import ray

    if requested > 0:
        return requested
    cpus = int(ray.available_resources().get("CPU", 1))
    return max(1, cpus - 1)  # leave one CPU to the network actor


def evaluate_model(
    *,
    root: str,
    split: str,
    weights: str,
    crf_params="largefov",
    crf_backend: str = "pydensecrf",
    device: str = "auto",
    limit: int = 0,
    max_width: int = DEFAULT_MAX_WIDTH,
    batch_size: int = 4,
    crf_actors: int = 0,
    num_samples: int = 4,
    progress: bool = True,
    meta: dict | None = None,
) -> EvaluationRun:
    """Run the network once per image; score it raw (``network``) and CRF-refined (``crf``)."""
    import ray

    from pipeline.crf import load_params
    from pipeline.weights import read_record

    record = read_record(weights)
    params = load_params(crf_params)
    dataset = split_ids(root, split, limit=limit, num_classes=record.num_classes)
    samples = _sample_ids(dataset.ids, num_samples)
    use_gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    crf_device = "cuda" if crf_backend == "torch" and use_gpu else "cpu"
    # The network takes the GPU; a torch CRF on the GPU shares it (one actor each, half a GPU).
    network_gpus = (0.5 if crf_device == "cuda" else 1) if use_gpu else 0

    ds = ray.data.from_items([{"index": i} for i in range(len(dataset.ids))])
    ds = ds.map_batches(
        NetworkStage,
        fn_constructor_kwargs={"root": str(root), "split": split, "weights": str(weights), "device": "cuda" if use_gpu else "cpu"},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=batch_size,
        num_gpus=network_gpus,
        num_cpus=0 if use_gpu else 1,
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs={
            "num_classes": record.num_classes,
            "crf_params": params,
            "crf_backend": crf_backend,
            "crf_device": crf_device,
            "max_width": max_width,
            "sample_ids": samples,
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=1 if crf_device == "cuda" else _crf_pool_size(crf_actors)
        ),
        batch_size=1,
        num_cpus=1,
        num_gpus=0.5 if crf_device == "cuda" else 0,
    )
    evaluation = Evaluation(
        class_names=record.class_names,
        methods=(NETWORK, CRF),
        max_width=max_width,
        meta={
            **(meta or {}),
            "mode": "model",
            "data": str(root),
            "split": split,
            "images": len(dataset.ids),
            "weights": str(weights),
            "model_sha256": record.sha256,
            "variant": record.variant,
            "crf_params": params.to_dict(),
            "crf_backend": crf_backend,
        },
    )
    run = EvaluationRun(evaluation=evaluation)
    rows = _progress(ds.iter_rows(), total=len(dataset.ids), desc="evaluate", enabled=progress)
    _collect(rows, evaluation=evaluation, methods=(NETWORK, CRF), samples=run.samples)
    return run


def evaluate_predictions(
    *,
    root: str,
    split: str,
    predictions: str,
    class_names: tuple[str, ...],
    limit: int = 0,
    max_width: int = DEFAULT_MAX_WIDTH,
    num_samples: int = 4,
    workers: int = 0,
    progress: bool = True,
    meta: dict | None = None,
) -> EvaluationRun:
    """Score masks that already exist (``predictions``: a folder or URI, see ``predictions.py``)."""
    import ray

    from pipeline.evaluation.predictions import match_predictions

    dataset = split_ids(root, split, limit=limit, num_classes=len(class_names))
    files = match_predictions(predictions, dataset.ids)
    samples = _sample_ids(dataset.ids, num_samples)
    ds = ray.data.from_items([{"index": i} for i in range(len(dataset.ids))])
    ds = ds.map_batches(
        PredictionScoreStage,
        fn_constructor_kwargs={
            "root": str(root),
            "split": split,
            "num_classes": len(class_names),
            "files": files,
            "max_width": max_width,
            "sample_ids": samples,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_crf_pool_size(workers)),
        batch_size=8,
        num_cpus=1,
    )
    evaluation = Evaluation(
        class_names=class_names,
        methods=(PREDICTIONS,),
        max_width=max_width,
        meta={**(meta or {}), "mode": "predictions", "data": str(root), "split": split,
              "images": len(dataset.ids), "predictions": str(predictions)},
    )
    run = EvaluationRun(evaluation=evaluation)
    rows = _progress(ds.iter_rows(), total=len(dataset.ids), desc="evaluate", enabled=progress)
    _collect(rows, evaluation=evaluation, methods=(PREDICTIONS,), samples=run.samples)
    return run


def evaluate_model_in_process(
    *,
    root: str,
    split: str,
    weights: str,
    crf_params="largefov",
    crf_backend: str = "pydensecrf",
    device: str = "cpu",
    limit: int = 0,
    batch_size: int = 4,
) -> EvaluationRun:
    """The same stages as :func:`evaluate_model`, run in this process without Ray.

    For small sets where starting Ray costs more than the work (the training job's
    validation, the demo model's recorded metric): the numbers are identical.
    """
    from pipeline.crf import load_params
    from pipeline.weights import read_record

    record = read_record(weights)
    dataset = split_ids(root, split, limit=limit, num_classes=record.num_classes)
    network = NetworkStage(root=str(root), split=split, weights=str(weights), device=device)
    network.dataset = dataset
    score = ScoreStage(num_classes=record.num_classes, crf_params=load_params(crf_params),
                       crf_backend=crf_backend, crf_device=device)
    evaluation = Evaluation(class_names=record.class_names, methods=(NETWORK, CRF),
                            meta={"mode": "model", "data": str(root), "split": split, "images": len(dataset.ids)})
    run = EvaluationRun(evaluation=evaluation)
    for start in range(0, len(dataset.ids), batch_size):
        scored = score(network({"index": list(range(start, min(start + batch_size, len(dataset.ids))))}))
        rows = [dict(zip(scored, values)) for values in zip(*scored.values())]
        _collect(rows, evaluation=evaluation, methods=(NETWORK, CRF), samples=run.samples)
    return run


def reference_metric(run: EvaluationRun, *, crf_params: str) -> dict:
    """The summary a checkpoint record carries: mIoU and pixel accuracy before and after the CRF."""
    scores = run.evaluation.scores
    return {
        "split": run.evaluation.meta.get("split"),
        "images": run.evaluation.num_images,
        "miou": round(float(scores[NETWORK].confusion.miou()), 4),
        "pixel_accuracy": round(float(scores[NETWORK].confusion.pixel_accuracy()), 4),
        "miou_crf": round(float(scores[CRF].confusion.miou()), 4),
        "pixel_accuracy_crf": round(float(scores[CRF].confusion.pixel_accuracy()), 4),
        "crf_params": crf_params,
    }
