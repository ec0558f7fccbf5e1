"""The evaluation's Ray Data graph: it only composes stages and adds counts on the driver.

    split ids -> from_items -> VOCReadStage (tasks) -> segment's NetworkStage (actors, GPU if any)
              -> ScoreStage (CRF actors) -> per-image count arrays -> Evaluation (summed on the driver)

or, for existing masks, ``split ids -> PredictionScoreStage (tasks) -> Evaluation``.

The house is segment's: the network stage (:mod:`pipeline.stages.network`), the
device rule (:func:`pipeline.devices.resolve_device`), the resource planner
(:func:`pipeline.resources.plan_resources`, fed a :class:`~pipeline.config.SegmentConfig`
built from evaluate's flags by :func:`evaluation_config`), the Ray connection and
the stall guard (:mod:`pipeline.execution`: a run that makes no progress for
``stall_timeout_s`` raises :class:`~pipeline.execution.Stalled`). Pools are planned
on the cluster's free CPUs (so they fit beside other work), else on its total;
``--device cuda`` on a cluster without a GPU, and pools that cannot be placed,
are refused before any work (:class:`~pipeline.config.ConfigError`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import ConfigError, SegmentConfig, from_mapping
from pipeline.data.voc import VOCDataset
from pipeline.evaluation.scoring import CRF, NETWORK, PREDICTIONS, Evaluation
from pipeline.evaluation.stages import (
    COUNT_KEYS,
    PredictionScoreStage,
    ScoreStage,
    VOCReadStage,
)
from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH
from pipeline.resources import ResourcePlan, plan_resources

#: Seconds without progress after which a run fails (Ray Data's no-progress guard).
DEFAULT_STALL_TIMEOUT_S = 600.0
#: GPU share of a torch CRF actor beside the network actor on the same GPU.
TORCH_CRF_GPU_SHARE = 0.5
#: Below this many free CPUs, plan on the cluster's total (other work is ending; wait for it).
_MIN_FREE_CPUS = 0.1
#: Which segment setting each evaluate flag sets (named in planning errors).
FLAG_FIELDS = {"--device": "network.device", "--crf-backend": "crf.backend", "--crf-actors": "crf.pool_size",
               "--batch-size": "network.batch_size"}


class EvaluationDataError(ValueError):
    """Bad input data (names the file); the run stops, since a partial set is not a score."""


def demo_model_hint(message: str, *, record) -> str:
    """``message`` plus a hint when the defaulted demo model cannot score the dataset's labels."""
    if "beyond num_classes" not in message:  # the wording of VOCDataset.read_label's class check
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


def evaluation_config(
    *, device: str = "auto", crf_backend: str = "pydensecrf", crf_actors: int = 0, batch_size: int = 0,
) -> SegmentConfig:
    """evaluate's flags as the :class:`SegmentConfig` that :func:`plan_resources` sizes.

    ``crf_actors`` is ``crf.pool_size`` (0 = sized from the CPUs); ``batch_size`` is
    ``network.batch_size``; a torch CRF may share the network's GPU (half each).
    """
    return from_mapping(
        {
            "network": {"device": device, "batch_size": batch_size},
            "crf": {"backend": crf_backend, "pool_size": crf_actors,
                    "num_gpus": TORCH_CRF_GPU_SHARE if crf_backend == "torch" else 0.0},
        },
        source="evaluate",
    )


def plan_evaluation(config: SegmentConfig) -> ResourcePlan:
    """:func:`plan_resources` for the connected Ray cluster, on its free CPUs (else its total).

    Planned on the free CPUs, the pools fit beside other work now; when almost none
    are free (a previous run's actors still being released) or that plan cannot be
    placed, on the cluster's total: the run then waits for the CPUs instead of
    deadlocking. A plan that fits neither is a :class:`ConfigError` naming the flags.
    """
    import ray

    from pipeline.resources import cluster_resources

    cpus, gpus, custom = cluster_resources()
    free = float(ray.available_resources().get("CPU", 0.0))
    budgets = (free, cpus) if _MIN_FREE_CPUS <= free < cpus else (cpus,)
    for budget in budgets:
        try:
            return plan_resources(config, cpus=budget, gpus=gpus, custom=custom)
        except ConfigError as exc:
            error = exc
    flags = ", ".join(f"{flag} sets {name}" for flag, name in FLAG_FIELDS.items())
    raise ConfigError(f"{error} [evaluate: {flags}]") from None


def evaluate_model(
    *,
    root: str,
    split: str,
    weights: str,
    crf_params="largefov",
    crf_backend: str = "pydensecrf",
    crf_resolution: str | int = "network",
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
    """Run the network once per image; score it raw (``network``) and CRF-refined (``crf``).

    ``crf_resolution`` is segment's ``crf.resolution`` (:mod:`pipeline.resolution`): both
    label maps are made at that working resolution and scored at the label's size.
    """
    import ray

    from pipeline.resolution import describe, max_side

    from pipeline.crf import load_params
    from pipeline.execution import configure_context, stall_guarded
    from pipeline.stages.network import NetworkStage
    from pipeline.weights import read_record

    record = read_record(weights)
    params = load_params(crf_params)
    plan = plan_evaluation(evaluation_config(device=device, crf_backend=crf_backend, crf_actors=crf_actors,
                                             batch_size=batch_size))
    dataset = split_ids(root, split, limit=limit, num_classes=record.num_classes)
    samples = _sample_ids(dataset.ids, num_samples)

    configure_context(no_progress_timeout_s=stall_timeout_s)  # before the dataset: it copies the context
    ds = ray.data.from_items([{"index": i} for i in range(len(dataset.ids))])
    side = max_side(crf_resolution, input_size=record.input_size)
    ds = ds.map_batches(
        VOCReadStage(dataset, max_side=side), batch_format="pyarrow", batch_size=plan.decode_batch_size,
        num_cpus=plan.decode_num_cpus, memory=plan.decode_memory_bytes,
    )
    ds = ds.map_batches(  # segment's network stage and sizing (pipeline.graph.work_dataset)
        NetworkStage, batch_format="pyarrow", batch_size=plan.network_batch_size,
        fn_constructor_kwargs={"weights": str(weights), "device": plan.network_device,
                               "threads": plan.network_threads, "max_side": side},
        compute=ray.data.ActorPoolStrategy(size=plan.network_pool, max_tasks_in_flight_per_actor=2),
        num_cpus=plan.network_num_cpus, num_gpus=plan.network_num_gpus,
    )
    ds = ds.map_batches(
        ScoreStage, batch_format="pyarrow", batch_size=plan.crf_batch_size,
        fn_constructor_kwargs={
            "dataset": dataset,
            "num_classes": record.num_classes,
            "crf_params": params,
            "crf_backend": crf_backend,
            "crf_device": plan.crf_device,
            "max_width": max_width,
            "sample_ids": samples,
        },
        compute=ray.data.ActorPoolStrategy(size=plan.crf_pool, max_tasks_in_flight_per_actor=2),
        num_cpus=plan.crf_num_cpus, num_gpus=plan.crf_num_gpus,
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
            "crf_resolution": describe(crf_resolution),
            "plan": plan.to_dict(),
        },
    )
    run = EvaluationRun(evaluation=evaluation)
    rows = stall_guarded(ds.iter_rows(), timeout_s=stall_timeout_s, what="the evaluation", setting="--stall-timeout")
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
    """Score masks that already exist (``predictions``: a folder or URI, see ``predictions.py``).

    No network and no CRF, so no actor pools to plan: the scoring runs as Ray tasks
    of one CPU (at most the cluster's), ``workers`` at a time when > 0.
    """
    import ray

    from pipeline.evaluation.predictions import match_predictions
    from pipeline.execution import configure_context, stall_guarded
    from pipeline.resources import cluster_resources

    cpus, _, _ = cluster_resources()
    if cpus <= 0:
        raise ValueError(f"the Ray cluster has no CPU for the evaluation (CPU={cpus:g})")
    dataset = split_ids(root, split, limit=limit, num_classes=len(class_names))
    files = match_predictions(predictions, dataset.ids)
    samples = _sample_ids(dataset.ids, num_samples)
    score = PredictionScoreStage(root=str(root), split=split, num_classes=len(class_names), files=files,
                                 max_width=max_width, sample_ids=samples)
    configure_context(no_progress_timeout_s=stall_timeout_s)
    ds = ray.data.from_items([{"index": i} for i in range(len(dataset.ids))])
    ds = ds.map_batches(score, batch_size=8, num_cpus=min(1.0, cpus), concurrency=workers or None)
    evaluation = Evaluation(
        class_names=class_names,
        methods=(PREDICTIONS,),
        max_width=max_width,
        meta={**(meta or {}), "mode": "predictions", "data": str(root), "split": split,
              "images": len(dataset.ids), "predictions": str(predictions)},
    )
    run = EvaluationRun(evaluation=evaluation)
    rows = stall_guarded(ds.iter_rows(), timeout_s=stall_timeout_s, what="the evaluation", setting="--stall-timeout")
    rows = _progress(rows, total=len(dataset.ids), desc="evaluate", enabled=progress)
    _collect(rows, evaluation=evaluation, methods=(PREDICTIONS,), samples=run.samples)
    return run


def model_rows(dataset: VOCDataset, network, indices: Iterable[int]):
    """The network rows (``NETWORK_COLUMNS``) of ``indices``, in this process: read, then segment's network
    (shrunk to the network stage's working resolution, ``network.max_side``)."""
    return network(VOCReadStage(dataset, max_side=network.max_side)({"index": list(indices)}))


def evaluate_model_in_process(
    *,
    root: str,
    split: str,
    weights: str,
    crf_params="largefov",
    crf_backend: str = "pydensecrf",
    crf_resolution: str | int = "network",
    device: str = "cpu",
    limit: int = 0,
    batch_size: int = 4,
) -> EvaluationRun:
    """The same stages as :func:`evaluate_model`, run in this process without Ray.

    For small sets where starting Ray costs more than the work (the training job's
    validation, the demo model's recorded metric): the numbers are identical.
    """
    from pipeline.crf import load_params
    from pipeline.resolution import max_side
    from pipeline.stages.network import NetworkStage
    from pipeline.weights import read_record

    record = read_record(weights)
    dataset = split_ids(root, split, limit=limit, num_classes=record.num_classes)
    network = NetworkStage(weights=str(weights), device=device,
                           max_side=max_side(crf_resolution, input_size=record.input_size))
    score = ScoreStage(dataset=dataset, num_classes=record.num_classes, crf_params=load_params(crf_params),
                       crf_backend=crf_backend, crf_device=device)
    evaluation = Evaluation(class_names=record.class_names, methods=(NETWORK, CRF),
                            meta={"mode": "model", "data": str(root), "split": split, "images": len(dataset.ids)})
    run = EvaluationRun(evaluation=evaluation)
    for start in range(0, len(dataset.ids), batch_size):
        scored = score(model_rows(dataset, network, range(start, min(start + batch_size, len(dataset.ids)))))
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
