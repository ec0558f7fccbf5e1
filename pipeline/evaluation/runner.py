"""The evaluation's Ray Data graph: it only composes stages and adds counts on the driver.

    split ids -> from_items -> NetworkStage (actor, GPU if any) -> ScoreStage (CRF actors)
              -> per-image count arrays -> Evaluation (summed on the driver)

or, for existing masks, ``split ids -> PredictionScoreStage -> Evaluation``.

Actors are sized from the cluster's free resources (:func:`plan_placement`), so a
run always fits (fractional CPUs when fewer than two are free); ``--device cuda``
on a cluster without a GPU is refused; a run that stops making progress for
``stall_timeout_s`` fails with :class:`EvaluationStalled` instead of hanging.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.data.voc import VOCDataset
from pipeline.evaluation.scoring import CRF, NETWORK, PREDICTIONS, Evaluation
from pipeline.evaluation.stages import (
    COUNT_KEYS,
    NetworkStage,
    PredictionScoreStage,
    ScoreStage,
)
from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH

#: Seconds without progress after which a run fails (Ray Data's no-progress guard).
DEFAULT_STALL_TIMEOUT_S = 600.0
#: Used when a checkpoint's variant has no CRF preset of its own.


class EvaluationDataError(ValueError):
    """Bad input data (names the file); the run stops, since a partial set is not a score."""


class EvaluationStalled(RuntimeError):
    """The Ray Data run made no progress for the stall timeout (e.g. actors that cannot be placed)."""


def demo_model_hint(message: str, *, record) -> str:
    """``message`` plus a hint when the defaulted demo model cannot score the dataset's labels."""
    if "beyond num_classes" not in message:  # the wording of VOCDataset.__getitem__'s label check
        return message
    return (
        f"{message}; the default model is the {record.num_classes}-class demo "
        f"({', '.join(record.class_names)}): pass --weights CKPT with a model of your dataset's classes"
    )


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
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING", **kwargs)


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


@dataclass(frozen=True)
class Placement:
    """Ray resources of the evaluation's actors (see :func:`plan_placement`)."""

    use_gpu: bool
    crf_device: str
    network_cpus: float
    network_gpus: float
    crf_cpus: float
    crf_gpus: float
    crf_pool: int


def _round_down(value: float) -> float:
    return math.floor(value * 100) / 100  # Ray resolves fractional resources to 1e-4


def plan_placement(
    *, cpus: float, gpus: float, device: str = "auto", crf_backend: str = "pydensecrf", crf_actors: int = 0,
    with_network: bool = True,
) -> Placement:
    """Fit the network actor and the CRF/scoring actor pool into ``cpus`` free CPUs and ``gpus`` GPUs.

    ``device``: ``cuda`` needs ``gpus > 0`` (else ValueError); ``auto`` uses a GPU when
    there is one. With two or more free CPUs, a CPU network actor takes one and the
    CRF pool grows up to the rest (``crf_actors`` when > 0); with fewer, the network
    actor and one CRF actor share them (fractional CPUs), so the graph always fits.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and with_network and gpus <= 0:
        raise ValueError(
            "--device cuda: the Ray cluster has no GPU (its resources list GPU=0); "
            "use --device cpu, or --device auto to use a GPU only when there is one"
        )
    if cpus < 0.02:
        raise ValueError(f"the Ray cluster has no CPU for the evaluation (CPU={cpus:g})")
    use_gpu = with_network and (device == "cuda" or (device == "auto" and gpus > 0))
    crf_device = "cuda" if crf_backend == "torch" and use_gpu else "cpu"
    network_gpus = (0.5 if crf_device == "cuda" else 1.0) if use_gpu else 0.0
    if not with_network or use_gpu:
        network_cpus = 0.0
        crf_cpus = min(1.0, _round_down(cpus))
        spare = cpus
    elif cpus >= 2:
        network_cpus, crf_cpus, spare = 1.0, 1.0, cpus - 1
    else:  # one CPU or less: the network and one CRF actor share it
        network_cpus = crf_cpus = _round_down(cpus / 2)
        spare = crf_cpus
    if crf_device == "cuda":
        pool = 1  # one CRF actor shares the GPU with the network
    else:
        pool = crf_actors if crf_actors > 0 else max(1, int(spare // crf_cpus))
    return Placement(
        use_gpu=use_gpu,
        crf_device=crf_device,
        network_cpus=network_cpus,
        network_gpus=network_gpus,
        crf_cpus=crf_cpus,
        crf_gpus=0.5 if crf_device == "cuda" else 0.0,
        crf_pool=pool,
    )


#: Below this many free CPUs, plan on the cluster's total (other work is ending; wait for it).
_MIN_FREE_CPUS = 0.1


def cluster_placement(**kwargs) -> Placement:
    """:func:`plan_placement` for the connected Ray cluster.

    Planned on the free CPUs (so it fits beside other work now), or on the cluster's
    total when almost none are free (e.g. a previous run's actors are still being
    released): either way the actors fit the cluster and the run cannot deadlock.
    """
    import ray

    total = ray.cluster_resources()
    free = float(ray.available_resources().get("CPU", 0.0))
    cpus = free if free >= _MIN_FREE_CPUS else float(total.get("CPU", 0.0))
    return plan_placement(cpus=cpus, gpus=float(total.get("GPU", 0.0)), **kwargs)


def iter_rows(ds, *, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> Iterable[dict]:
    """``ds.iter_rows()``, failing with :class:`EvaluationStalled` after ``stall_timeout_s`` without progress."""
    from ray.data.exceptions import ExecutionTimeoutError

    ds.context.execution_no_progress_timeout_s = float(stall_timeout_s) if stall_timeout_s > 0 else -1
    try:
        yield from ds.iter_rows()
    except ExecutionTimeoutError as exc:
        raise EvaluationStalled(
            f"the evaluation made no progress for {stall_timeout_s:g} s (--stall-timeout): its actors may not "
            "fit the cluster's free resources (CPUs, GPUs) or an image takes longer than that. "
            f"Ray Data says: {str(exc).splitlines()[0]}"
        ) from None


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
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    meta: dict | None = None,
) -> EvaluationRun:
    """Run the network once per image; score it raw (``network``) and CRF-refined (``crf``)."""
    import ray

    from pipeline.crf import load_params
    from pipeline.weights import read_record

    record = read_record(weights)
    params = load_params(crf_params)
    placement = cluster_placement(device=device, crf_backend=crf_backend, crf_actors=crf_actors)
    dataset = split_ids(root, split, limit=limit, num_classes=record.num_classes)
    samples = _sample_ids(dataset.ids, num_samples)

    ds = ray.data.from_items([{"index": i} for i in range(len(dataset.ids))])
    ds = ds.map_batches(
        NetworkStage,
        fn_constructor_kwargs={
            "root": str(root), "split": split, "weights": str(weights), "device": "cuda" if placement.use_gpu else "cpu",
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=batch_size,
        num_gpus=placement.network_gpus,
        num_cpus=placement.network_cpus,
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs={
            "num_classes": record.num_classes,
            "crf_params": params,
            "crf_backend": crf_backend,
            "crf_device": placement.crf_device,
            "max_width": max_width,
            "sample_ids": samples,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=placement.crf_pool),
        batch_size=1,
        num_cpus=placement.crf_cpus,
        num_gpus=placement.crf_gpus,
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
            "placement": asdict(placement),
        },
    )
    run = EvaluationRun(evaluation=evaluation)
    rows = iter_rows(ds, stall_timeout_s=stall_timeout_s)
    rows = _progress(rows, total=len(dataset.ids), desc="evaluate", enabled=progress)
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
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    meta: dict | None = None,
) -> EvaluationRun:
    """Score masks that already exist (``predictions``: a folder or URI, see ``predictions.py``)."""
    import ray

    from pipeline.evaluation.predictions import match_predictions

    placement = cluster_placement(device="cpu", crf_actors=workers, with_network=False)
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
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=placement.crf_pool),
        batch_size=8,
        num_cpus=placement.crf_cpus,
    )
    evaluation = Evaluation(
        class_names=class_names,
        methods=(PREDICTIONS,),
        max_width=max_width,
        meta={**(meta or {}), "mode": "predictions", "data": str(root), "split": split,
              "images": len(dataset.ids), "predictions": str(predictions)},
    )
    run = EvaluationRun(evaluation=evaluation)
    rows = iter_rows(ds, stall_timeout_s=stall_timeout_s)
    rows = _progress(rows, total=len(dataset.ids), desc="evaluate", enabled=progress)
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
