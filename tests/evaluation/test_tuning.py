"""tune-crf: the coarse-to-fine search against a brute-force optimum, and the job's preset file."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pipeline.crf import CRFParams, load_params
from pipeline.evaluation.tuning import (
    Example,
    crf_miou,
    fine_grid,
    grid_steps,
    parse_grid,
    search,
)
from pipeline.preprocess import coarse_size


def synthetic_problem(*, seed: int = 0, count: int = 4, size: int = 48, num_classes: int = 3) -> list[Example]:
    """Discs and rectangles in class-typical colours; unaries = noisy one-hot ground truth sampled
    at 1/8 (so bilinear upsampling blurs every boundary, which the CRF's colour term can repair)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    examples = []
    for i in range(count):
        label = np.zeros((size, size), np.uint8)
        cy, cx = rng.integers(12, size - 12, 2)
        r = rng.integers(7, 12)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        y0, x0 = rng.integers(0, size - 16, 2)
        label[y0 : y0 + rng.integers(10, 16), x0 : x0 + rng.integers(10, 16)] = 2
        colors = rng.uniform(30, 225, size=(num_classes, 3))
        image = np.clip(colors[label] + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
        rows = np.minimum(np.arange(coarse_size(size)) * 8, size - 1)
        coarse = label[np.ix_(rows, rows)]
        logits = 2.0 * np.eye(num_classes, dtype=np.float32)[coarse].transpose(2, 0, 1)
        logits += rng.normal(0, 1.0, size=logits.shape).astype(np.float32)
        examples.append(Example(image_id=f"s{i}", image=image, label=label, logits=logits.astype(np.float16)))
    return examples


def test_parse_grid_and_fine_grid():
    grid = parse_grid("w1=10,5; sigma_beta=3")
    assert grid["w1"] == (5.0, 10.0) and grid["sigma_beta"] == (3.0,)
    assert grid["sigma_alpha"] == (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)  # the default
    with pytest.raises(ValueError, match="sigma_gamma"):
        parse_grid("sigma_gamma=3")
    steps = grid_steps(grid)
    assert steps == {"w1": 5.0, "sigma_alpha": 10.0, "sigma_beta": 0.0}
    fine = fine_grid({"w1": 5.0, "sigma_alpha": 100.0, "sigma_beta": 3.0}, steps, round_index=1)
    assert fine == {"w1": (2.5, 5.0, 7.5), "sigma_alpha": (95.0, 100.0, 105.0), "sigma_beta": (3.0,)}
    assert fine_grid({"w1": 1.0, "sigma_alpha": 5.0, "sigma_beta": 3.0}, {"w1": 4, "sigma_alpha": 20, "sigma_beta": 2}, round_index=1)[
        "sigma_alpha"
    ] == (5.0, 15.0)  # sigmas stay > 0; w1 stays >= 0


def test_search_is_within_half_a_point_of_the_brute_force_best(ray_local, tmp_path):
    examples = synthetic_problem()
    coarse = {"w1": (4.0, 12.0), "sigma_alpha": (4.0, 20.0), "sigma_beta": (4.0, 20.0)}
    # Two refinement rounds halve the steps twice: the lattice they can reach inside the ranges.
    lattice = {"w1": np.arange(4, 13, 2.0), "sigma_alpha": np.arange(4, 21, 4.0), "sigma_beta": np.arange(4, 21, 4.0)}
    brute = {
        combo: crf_miou(examples, CRFParams(w1=combo[0], sigma_alpha=combo[1], sigma_beta=combo[2]), num_classes=3)
        for combo in itertools.product(*lattice.values())
    }
    best, worst = max(brute.values()), min(brute.values())
    assert best - worst > 0.05, "the synthetic problem must tell settings apart"

    result = search(examples, num_classes=3, coarse_grid=coarse, rounds=2, storage=tmp_path / "tune", progress=False, log=lambda _: None)
    assert result.best_miou >= best - 0.005, (result.best, result.best_miou, best)
    # ... and the refinement is what got it there: the coarse grid alone is further off.
    coarse_best = max(t["miou"] for t in result.trials if t["round"] == 0)
    assert coarse_best < best - 0.005
    found = CRFParams(**result.best)
    assert crf_miou(examples, found, num_classes=3) == pytest.approx(result.best_miou)
    assert len({(t["w1"], t["sigma_alpha"], t["sigma_beta"]) for t in result.trials}) == len(result.trials)
    assert {t["round"] for t in result.trials} == {0, 1, 2}


def test_tune_crf_job_writes_a_preset_that_evaluate_accepts(ray_local, tiny_voc, tiny_model, tmp_path, capsys):
    from jobs import evaluate as evaluate_job
    from jobs import tune_crf as tune_job

    out = tmp_path / "tune"
    args = ["--data", tiny_voc, "--weights", tiny_model, "--images", 2, "--out", out, "--no-progress"]
    args += ["--coarse-grid", "w1=3,6;sigma_alpha=20;sigma_beta=4", "--rounds", "1"]
    assert tune_job.main(list(map(str, args))) == 0
    preset = load_params(out / "best_crf.json")
    trials = json.loads((out / "tuning.json").read_text())
    # coarse: 2 settings; round 1: w1 in {best - 1.5, best, best + 1.5} (the others fixed), 2 of them new
    assert len(trials["trials"]) == 2 + 2
    assert {"w1": preset.w1, "sigma_alpha": preset.sigma_alpha, "sigma_beta": preset.sigma_beta} == trials["best"]
    assert (preset.w2, preset.sigma_gamma) == (3.0, 3.0)
    assert sorted(p.name for p in (out / "cache").glob("*.npy")) == ["shapes_00000.npy", "shapes_00001.npy"]

    eval_out = tmp_path / "eval"
    args = ["--data", tiny_voc, "--weights", tiny_model, "--crf-params", out / "best_crf.json"]
    args += ["--limit", 1, "--samples", 0, "--out", eval_out, "--no-progress"]
    assert evaluate_job.main(list(map(str, args))) == 0
    meta = json.loads((eval_out / "metrics.json").read_text())["meta"]
    assert meta["crf_params"] == preset.to_dict() and meta["images"] == 1
