"""pydensecrf's own example: both backends reproduce its reference outputs out*.png.

The example script (pydensecrf/examples/inference.py, generic ``DenseCRF`` route) maps
annotation colours to labels 1..n by sorting the 24-bit colour ``R + G<<8 + B<<16``
(black = 0 = "unknown"), uses ``unary_from_labels(gt_prob=0.7, zero_unsure=True)``,
``create_pairwise_gaussian(sdims=(3, 3))`` compat 3 and
``create_pairwise_bilateral(sdims=(80, 80), schan=(13, 13, 13))`` compat 10 (both with
(y, x) feature order), symmetric normalisation, 5 iterations, and writes ``colorize[MAP]``.
out1/out2/out3 were produced from RGB-decoded images (skimage), out1-b from BGR (OpenCV):
the channel order changes both the colour->label numbering and the bilateral features.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.crf import (
    CRFProblem,
    PairwiseTerm,
    bilateral_features,
    gaussian_features,
    solve,
)

from .conftest import read_rgb

CASES = [  # image, annotation, reference output, channel order the example decoded with
    ("im1.png", "anno1.png", "out1.png", "rgb"),
    ("im1.png", "anno1-b.png", "out1-b.png", "bgr"),
    ("im2.png", "anno2.png", "out2.png", "rgb"),
    ("im3.png", "anno3.png", "out3.png", "rgb"),
]


def unary_from_labels(
    labels: np.ndarray, n_labels: int, *, gt_prob: float, zero_unsure: bool
) -> np.ndarray:
    """pydensecrf.utils.unary_from_labels, restated (float32 n_labels x N)."""
    labels = labels.reshape(-1)
    n_energy = -np.log((1.0 - gt_prob) / (n_labels - 1))
    p_energy = -np.log(gt_prob)
    unary = np.full((n_labels, labels.size), n_energy, dtype=np.float32)
    unary[labels - 1 if zero_unsure else labels, np.arange(labels.size)] = p_energy
    if zero_unsure:
        unary[:, labels == 0] = -np.log(1.0 / n_labels)
    return unary


def example_problem(
    image_name: str, anno_name: str, order: str
) -> tuple[CRFProblem, np.ndarray, tuple[int, int]]:
    image = read_rgb(image_name)
    anno = read_rgb(anno_name).astype(np.uint32)
    if order == "bgr":
        image = np.ascontiguousarray(image[:, :, ::-1])
        anno = anno[:, :, ::-1]
    packed = anno[:, :, 0] + (anno[:, :, 1] << 8) + (anno[:, :, 2] << 16)
    colors, labels = np.unique(packed, return_inverse=True)
    has_unknown = bool(colors[0] == 0)
    if has_unknown:
        colors = colors[1:]
    colorize = np.stack(
        [colors & 0xFF, (colors >> 8) & 0xFF, (colors >> 16) & 0xFF], axis=1
    ).astype(np.uint8)
    if order == "bgr":
        colorize = colorize[:, ::-1]  # back to RGB, as the PNG was written by OpenCV
    n_labels = len(colors)
    unary = unary_from_labels(
        labels.reshape(packed.shape), n_labels, gt_prob=0.7, zero_unsure=has_unknown
    )
    height, width = image.shape[:2]
    problem = CRFProblem(
        unary=unary,
        terms=(
            PairwiseTerm(
                gaussian_features(height=height, width=width, sxy=3, order="yx"), 3.0
            ),
            PairwiseTerm(bilateral_features(image, sxy=80, srgb=13, order="yx"), 10.0),
        ),
        normalization="symmetric",
        iterations=5,
    )
    return problem, colorize, (height, width)


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
@pytest.mark.parametrize(
    "image_name,anno_name,out_name,order", CASES, ids=[c[2] for c in CASES]
)
def test_reproduces_reference_output(backend, image_name, anno_name, out_name, order):
    problem, colorize, shape = example_problem(image_name, anno_name, order)
    q = solve(problem, backend=backend)
    result = colorize[q.argmax(axis=0)].reshape(*shape, 3)
    reference = read_rgb(out_name)
    differing = int(np.any(result != reference, axis=-1).sum())
    assert differing == 0, (
        f"{out_name}: {differing} pixels differ from the reference output ({backend})"
    )


def test_feature_order_matters():
    """(x, y) instead of the example's (y, x) order changes some labels: the lattice is not rotation invariant."""
    problem, _colorize, shape = example_problem("im2.png", "anno2.png", "rgb")
    image = read_rgb("im2.png")
    height, width = shape
    swapped = CRFProblem(
        unary=problem.unary,
        terms=(
            PairwiseTerm(
                gaussian_features(height=height, width=width, sxy=3, order="xy"), 3.0
            ),
            PairwiseTerm(bilateral_features(image, sxy=80, srgb=13, order="xy"), 10.0),
        ),
        normalization="symmetric",
        iterations=5,
    )
    a = solve(problem, backend="torch").argmax(axis=0)
    b = solve(swapped, backend="torch").argmax(axis=0)
    assert 0 < int((a != b).sum()) < 0.01 * a.size
