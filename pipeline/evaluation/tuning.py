"""Coarse-to-fine grid search of the dense CRF's w1, sigma_alpha, sigma_beta (as in the paper).

The network runs once per image; its coarse 1/8 scores are cached (``<cache>/<id>.npy``,
fp16) and every candidate setting is scored by the mIoU of the CRF labels over all
cached images (one confusion matrix over the set). w2 and sigma_gamma stay fixed
(3 and 3), as do the iteration count and the normalisation (from ``--base``).

Search (DeepLab V1, section 4.1: "coarse-to-fine", first ranges w1 in [5, 10],
sigma_alpha in 50..100 step 10, sigma_beta in 3..10):

* round 0: the full grid ``DEFAULT_COARSE_GRID`` (3 x 6 x 4 = 72 settings);
* round r = 1..rounds: around the best setting so far, each parameter takes
  ``best - h, best, best + h`` with ``h = step / 2**r`` (``step`` = the smallest
  gap between that parameter's coarse values), i.e. 27 settings per round; values
  may leave the coarse range (the paper's LargeFOV optimum, sigma_alpha = 121, did);
  w1 stays >= 0 and the sigmas > 0. Settings already scored are not run again.

Each round is one Ray Tune run: ``tune.grid_search`` over that round's new settings
(the product of the three value lists, minus settings scored in an earlier round).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.evaluation.metrics import ConfusionMatrix

TUNED = ("w1", "sigma_alpha", "sigma_beta")
DEFAULT_COARSE_GRID: dict[str, tuple[float, ...]] = {
    "w1": (5.0, 7.5, 10.0),
    "sigma_alpha": (50.0, 60.0, 70.0, 80.0, 90.0, 100.0),
    "sigma_beta": (3.0, 5.0, 7.0, 10.0),
}
DEFAULT_ROUNDS = 2
CACHE_INDEX = "cache.json"
_LOWER_BOUND = {"w1": 0.0, "sigma_alpha": 1e-3, "sigma_beta": 1e-3}


@dataclass(frozen=True)
class Example:
    """One cached image: RGB, ground truth and the network's coarse logits (C x h x w)."""

    image_id: str
    image: np.ndarray
    label: np.ndarray
    logits: np.ndarray


@dataclass
class TuningResult:
    best: dict[str, float]
    best_miou: float
    base: dict
    trials: list[dict] = field(default_factory=list)  # {"round", "w1", "sigma_alpha", "sigma_beta", "miou"}

    def params(self):
        from pipeline.crf import CRFParams

        return CRFParams.from_mapping({**self.base, **self.best})

    def to_dict(self) -> dict:
        return {"best": self.best, "best_miou": self.best_miou, "base": self.base, "trials": self.trials}


def parse_grid(text: str) -> dict[str, tuple[float, ...]]:
    """``"w1=5,10;sigma_alpha=50,100;sigma_beta=3,10"`` -> a grid; omitted parameters keep the default grid."""
    grid = dict(DEFAULT_COARSE_GRID)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        name = name.strip()
        if not sep or name not in TUNED:
            raise ValueError(f"--coarse-grid: expected NAME=V1,V2,... with NAME in {TUNED}, got {part!r}")
        try:
            grid[name] = tuple(sorted(float(v) for v in values.split(",") if v.strip()))
        except ValueError:
            raise ValueError(f"--coarse-grid: {name}: expected numbers, got {values!r}") from None
        if not grid[name]:
            raise ValueError(f"--coarse-grid: {name}: expected at least one value")
    return grid


def grid_steps(grid: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Smallest gap between each parameter's coarse values (0 for a single value: kept fixed)."""
    steps = {}
    for name in TUNED:
        values = sorted(set(grid[name]))
        steps[name] = min(np.diff(values)) if len(values) > 1 else 0.0
    return {k: float(v) for k, v in steps.items()}


def fine_grid(best: Mapping[str, float], steps: Mapping[str, float], *, round_index: int) -> dict[str, tuple[float, ...]]:
    """Round ``round_index`` >= 1: ``best - h, best, best + h`` per parameter, ``h = step / 2**round_index``."""
    grid = {}
    for name in TUNED:
        h = steps[name] / 2**round_index
        values = {best[name]} if h == 0 else {best[name] - h, best[name], best[name] + h}
        grid[name] = tuple(sorted(round(v, 6) for v in values if v >= _LOWER_BOUND[name]))
    return grid


def crf_miou(examples: Sequence[Example], params, *, num_classes: int, backend: str = "pydensecrf", device: str = "cpu") -> float:
    """mIoU of the CRF labels over ``examples`` (one confusion matrix over the set)."""
    import torch

    from pipeline.crf import refine
    from pipeline.preprocess import upsample_logits

    cm = ConfusionMatrix(num_classes)
    for ex in examples:
        height, width = ex.label.shape
        full = upsample_logits(torch.from_numpy(np.asarray(ex.logits, dtype=np.float32)), height=height, width=width)
        q = refine(np.array(ex.image, dtype=np.uint8, order="C"), full.numpy(), params, backend=backend, device=device)
        cm.update(np.asarray(q).argmax(axis=0), ex.label)
    return cm.miou()


def _key(config: Mapping[str, float]) -> tuple[float, ...]:
    return tuple(round(float(config[name]), 6) for name in TUNED)


def _trial(config: dict, *, examples, base: dict, num_classes: int, backend: str, device: str) -> None:
    """One Ray Tune trial: the mIoU of one setting."""
    from ray import tune

    from pipeline.crf import CRFParams

    setting = config["crf"]
    params = CRFParams.from_mapping({**base, **{k: float(setting[k]) for k in TUNED}})
    tune.report({"miou": crf_miou(examples, params, num_classes=num_classes, backend=backend, device=device)})


def _progress_callback(*, total: int, desc: str, enabled: bool):
    """A Ray Tune callback that advances a tqdm bar as trials finish (on the driver)."""
    from ray.tune import Callback
    from tqdm import tqdm

    class _Progress(Callback):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=desc, unit="setting", disable=not enabled)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.bar.update(1)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.bar.update(1)

        def on_experiment_end(self, trials, **info) -> None:
            self.bar.close()

    return _Progress()


def _run_settings(
    settings: Sequence[dict[str, float]],
    *,
    examples_ref,
    base: dict,
    num_classes: int,
    backend: str,
    device: str,
    storage: Path,
    name: str,
    cpus_per_trial: float,
    progress: bool,
) -> list[tuple[dict, float]]:
    from ray import tune

    trainable = tune.with_parameters(
        _trial, examples=examples_ref, base=base, num_classes=num_classes, backend=backend, device=device
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": 1 if device.startswith("cuda") else 0}),
        param_space={"crf": tune.grid_search([dict(s) for s in settings])},
        tune_config=tune.TuneConfig(metric="miou", mode="max", reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            verbose=0,
            callbacks=[_progress_callback(total=len(settings), desc=name, enabled=progress)],
        ),
    )
    results = tuner.fit()
    out = []
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"CRF tuning trial {result.config} failed: {result.error}")
        out.append(({k: float(result.config["crf"][k]) for k in TUNED}, float(result.metrics["miou"])))
    return out


def search(
    examples: Sequence[Example],
    *,
    num_classes: int,
    coarse_grid: Mapping[str, Sequence[float]] = DEFAULT_COARSE_GRID,
    rounds: int = DEFAULT_ROUNDS,
    base="largefov",
    backend: str = "pydensecrf",
    device: str = "cpu",
    storage: str | Path = "out/tune-crf/ray_tune",
    cpus_per_trial: float = 1.0,
    progress: bool = True,
    log=print,
) -> TuningResult:
    """Coarse-to-fine grid search on Ray Tune (see the module docstring); needs Ray initialised."""
    from pipeline.crf import load_params

    if not examples:
        raise ValueError("examples: expected at least one cached image, got none")
    base_dict = {k: v for k, v in load_params(base).to_dict().items() if k not in TUNED}
    grid = {k: tuple(sorted({float(v) for v in coarse_grid[k]})) for k in TUNED}
    steps = grid_steps(grid)
    storage = Path(storage)
    examples_ref = list(examples)
    scored: dict[tuple[float, ...], float] = {}
    trials: list[dict] = []
    best: dict[str, float] | None = None
    for round_index in range(rounds + 1):
        if round_index > 0:
            grid = fine_grid(best, steps, round_index=round_index)
        combos = [dict(zip(TUNED, combo)) for combo in itertools.product(*(grid[k] for k in TUNED))]
        todo = [c for c in combos if _key(c) not in scored]
        if not todo:
            log(f"round {round_index}: nothing new to score")
            continue
        results = _run_settings(
            todo,
            examples_ref=examples_ref,
            base=base_dict,
            num_classes=num_classes,
            backend=backend,
            device=device,
            storage=storage,
            name=f"round{round_index}",
            cpus_per_trial=cpus_per_trial,
            progress=progress,
        )
        for config, miou in results:
            scored[_key(config)] = miou
            trials.append({"round": round_index, **config, "miou": None if math.isnan(miou) else miou})
        best_key = max(scored, key=lambda k: (-math.inf if math.isnan(scored[k]) else scored[k]))
        best = dict(zip(TUNED, best_key))
        log(
            f"round {round_index}: {len(results)} settings, best so far "
            + ", ".join(f"{k}={v:g}" for k, v in best.items())
            + f" (mIoU {100 * scored[best_key]:.2f})"
        )
    best_key = _key(best)
    return TuningResult(best=best, best_miou=scored[best_key], base=base_dict, trials=trials)


def trial_resources(*, crf_backend: str = "pydensecrf", device: str = "auto", cpus_per_trial: float = 1.0) -> dict:
    """``{"cpu", "device"}`` of one trial on the connected Ray cluster, so every trial can be placed.

    The torch CRF runs on a GPU with ``device`` ``cuda`` (refused when the cluster has
    none) or ``auto`` (when it has one); ``cpus_per_trial`` is capped at the cluster's CPUs.
    """
    import ray

    cluster = ray.cluster_resources()
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if cpus <= 0:
        raise ValueError("the Ray cluster has no CPU (its resources list CPU=0)")
    crf_device = "cpu"
    if crf_backend == "torch" and device == "cuda":
        if gpus <= 0:
            raise ValueError(
                "--device cuda with --crf-backend torch: the Ray cluster has no GPU (its resources list GPU=0); "
                "use --device cpu or auto"
            )
        crf_device = "cuda"
    elif crf_backend == "torch" and device == "auto" and gpus > 0:
        crf_device = "cuda"
    return {"cpu": min(float(cpus_per_trial), cpus), "device": crf_device}


# -- the cache of network scores -----------------------------------------------


def cache_examples(
    *,
    root: str,
    split: str,
    weights: str,
    num_images: int,
    cache_dir: str | Path,
    device: str = "auto",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[Example], int]:
    """Run the network once on the first ``num_images`` ids of the split, caching coarse logits.

    Returns (examples, num_classes). The cache (``<cache_dir>/<id>.npy`` + ``cache.json``
    naming the weights' sha256) is reused when it was made by the same weights.
    """
    from tqdm import tqdm

    from pipeline.evaluation.runner import model_rows, split_ids
    from pipeline.stages.crf import logits_of
    from pipeline.outputs import STATUS_OK
    from pipeline.stages.network import NetworkStage
    from pipeline.weights import read_record

    record = read_record(weights)
    dataset = split_ids(root, split, limit=num_images, num_classes=record.num_classes)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / CACHE_INDEX
    cached: set[str] = set()
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("model_sha256") == record.sha256 and index.get("data") == str(root):
            cached = {i for i in index.get("ids", []) if (cache / f"{i}.npy").is_file()}
    todo = [i for i, image_id in enumerate(dataset.ids) if image_id not in cached]
    if todo:
        stage = NetworkStage(weights=str(weights), device=device)  # segment's network stage
        for start in tqdm(range(0, len(todo), batch_size), desc="network", unit="batch", disable=not progress):
            for row in model_rows(dataset, stage, todo[start : start + batch_size]).to_pylist():
                if row["status"] != STATUS_OK:
                    raise ValueError(row["error"])
                np.save(cache / f"{row['image_id']}.npy", logits_of(row))
                cached.add(row["image_id"])
        index_path.write_text(
            json.dumps({"model_sha256": record.sha256, "data": str(root), "ids": sorted(cached)}, indent=2),
            encoding="utf-8",
        )
    examples = []
    for index, image_id in enumerate(dataset.ids):
        _, image, label = dataset[index]
        examples.append(Example(image_id=image_id, image=image, label=label, logits=np.load(cache / f"{image_id}.npy")))
    return examples, record.num_classes


def save_result(out_dir: str | Path, result: TuningResult, *, meta: dict | None = None) -> dict[str, Path]:
    """``best_crf.json`` (a preset file for ``--crf-params``) and ``tuning.json`` (every trial)."""
    from pipeline.crf import save_params

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"preset": out / "best_crf.json", "trials": out / "tuning.json"}
    save_params(paths["preset"], result.params())
    paths["trials"].write_text(json.dumps({**result.to_dict(), "meta": meta or {}}, indent=2) + "\n", encoding="utf-8")
    return paths


__all__ = [
    "DEFAULT_COARSE_GRID",
    "Example",
    "TuningResult",
    "cache_examples",
    "crf_miou",
    "fine_grid",
    "parse_grid",
    "save_result",
    "search",
    "trial_resources",
]
