"""Batched refinement with the torch backend: same results as one by one, memory budget splits."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.crf import (
    build_problem,
    estimate_bytes,
    lattice_size,
    load_params,
    refine,
    refine_batch,
    unary_energy,
)
from pipeline.crf.backend_torch import clear_cache, plan_groups, term_lattice

from .conftest import deeplab_like_logits, noise_image, photo

FAST = {"preset": "largefov", "iterations": 3}


def mixed_batch():
    rng = np.random.default_rng(0)
    images, logits = [], []
    for i, (h, w, c) in enumerate(
        [(40, 60, 5), (33, 47, 5), (40, 60, 3), (25, 25, 1), (50, 30, 5)]
    ):
        images.append(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        logits.append(deeplab_like_logits(seed=i, num_classes=c, height=h, width=w))
    return images, logits


@pytest.mark.parametrize("max_bytes", [None, 1])
def test_batch_equals_one_by_one(max_bytes):
    images, logits = mixed_batch()
    batched = refine_batch(images, logits, FAST, backend="torch", max_bytes=max_bytes)
    assert len(batched) == len(images)
    for image, scores, q in zip(images, logits, batched):
        np.testing.assert_allclose(
            q, refine(image, scores, FAST, backend="torch"), atol=2e-6
        )
        np.testing.assert_allclose(
            q, refine(image, scores, FAST, backend="pydensecrf"), atol=2e-5
        )


def test_pydensecrf_batch_is_a_loop():
    images, logits = mixed_batch()
    for image, scores, q in zip(
        images, logits, refine_batch(images, logits, FAST, backend="pydensecrf")
    ):
        np.testing.assert_array_equal(
            q, refine(image, scores, FAST, backend="pydensecrf")
        )


def test_budget_splits_groups():
    images, logits = mixed_batch()
    params = load_params(FAST)
    problems = [
        build_problem(i, unary_energy(l), params)
        for i, l in zip(images, logits)
        if l.shape[0] > 1
    ]
    assert plan_groups(problems) == [
        [0, 1],
        [2],
        [3],
    ]  # 5 classes, 3 classes, 5 classes again
    assert plan_groups(problems, max_bytes=1) == [[0], [1], [2], [3]]
    sizes = []
    for problem in problems:
        lattices = [term_lattice(t, "cpu") for t in problem.terms]
        sizes.append(
            estimate_bytes(
                num_points=problem.num_points,
                num_labels=problem.num_labels,
                lattices=lattices,
            )
        )
    assert plan_groups(problems[:2], max_bytes=sizes[0] + sizes[1]) == [[0, 1]]
    assert plan_groups(problems[:2], max_bytes=sizes[0] + sizes[1] - 1) == [[0], [1]]
    with pytest.raises(ValueError, match="max_bytes"):
        refine_batch(images, logits, FAST, max_bytes=0)


def test_noise_has_far_more_vertices_than_a_photo():
    """Lattice size depends on content; budgets are therefore computed from built lattices."""
    from PIL import Image

    clear_cache()
    small_photo = np.array(
        Image.fromarray(photo("geese")).resize((250, 188), Image.BICUBIC)
    )
    photo_sizes = lattice_size(small_photo, "largefov")
    noise_sizes = lattice_size(noise_image(seed=0, height=188, width=250), "largefov")
    assert photo_sizes["gaussian"] == noise_sizes["gaussian"]
    assert noise_sizes["bilateral"] > 10 * photo_sizes["bilateral"]
    assert lattice_size(np.full((188, 250, 3), 128, np.uint8))["bilateral"] < 200
