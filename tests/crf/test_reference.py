"""The vectorised torch lattice against a slow, obviously-correct loop version on tiny images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.crf import (
    CRFProblem,
    PairwiseTerm,
    bilateral_features,
    gaussian_features,
    solve,
)
from pipeline.crf.lattice import (
    _vertices_packed,
    build_lattice_with_keys,
    simplex_coordinates,
)
from pipeline.crf.reference import (
    build_reference_lattice,
    reference_filter,
    reference_mean_field,
)

HEIGHT, WIDTH = 9, 12


def tiny_image(seed: int = 0) -> np.ndarray:
    """12 x 9 RGB: a smooth gradient with a bright square and some noise (repeated colours and edges)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([xs * 20, ys * 25, (xs + ys) * 10], axis=-1).astype(np.int64)
    image[2:6, 3:8] = [250, 240, 30]
    image += rng.integers(-6, 7, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


FEATURES = {
    "gaussian-sxy3": lambda: gaussian_features(height=HEIGHT, width=WIDTH, sxy=3),
    "gaussian-sxy0.7-yx": lambda: gaussian_features(
        height=HEIGHT, width=WIDTH, sxy=0.7, order="yx"
    ),
    "bilateral-sxy3-srgb5": lambda: bilateral_features(tiny_image(), sxy=3, srgb=5),
    "bilateral-largefov": lambda: bilateral_features(tiny_image(1), sxy=121, srgb=5),
    # Keys far beyond int16 (the C++ would wrap): d=2 still packs into int64, d=5 takes the row-unique path.
    "gaussian-int16-overflow": lambda: gaussian_features(
        height=HEIGHT, width=WIDTH, sxy=1e-4
    ),
    "bilateral-int16-overflow": lambda: bilateral_features(
        tiny_image(2), sxy=2e-4, srgb=1e-3
    ),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_lattice_matches_reference(name):
    features = FEATURES[name]()
    reference = build_reference_lattice(features)
    lattice, keys = build_lattice_with_keys(torch.from_numpy(features))
    d = features.shape[1]

    # Same vertices (as a set of keys) and the same count.
    assert lattice.num_vertices == reference.num_vertices
    torch_keys = [tuple(int(v) for v in row) for row in keys.tolist()]
    assert set(torch_keys) == set(reference.keys)
    to_torch = {key: i for i, key in enumerate(torch_keys)}
    ref_to_torch = np.array([to_torch[key] for key in reference.keys])

    # Same simplex corners and barycentric weights, bit for bit (same float32 operations).
    coords = simplex_coordinates(torch.from_numpy(features))
    corner_keys = coords.keys().numpy()
    for i in range(features.shape[0]):
        for r in range(d + 1):
            assert tuple(corner_keys[i, r]) == reference.keys[reference.offsets[i, r]]
    np.testing.assert_array_equal(coords.weights.T.numpy(), reference.weights)

    # Same blur neighbours (missing = -1 in the reference, = M in the port).
    m = lattice.num_vertices
    port = lattice.neighbours[:, :, :m].numpy()
    expected = np.where(
        reference.neighbours >= 0, ref_to_torch[reference.neighbours], m
    )
    np.testing.assert_array_equal(port[:, :, ref_to_torch], expected)

    # Same filter output.
    values = np.random.default_rng(3).random((features.shape[0], 4), dtype=np.float32)
    np.testing.assert_allclose(
        lattice.filter(torch.from_numpy(values)).numpy(),
        reference_filter(reference, values),
        rtol=2e-6,
        atol=1e-6,
    )


def test_packed_and_row_paths_agree():
    features = FEATURES["bilateral-sxy3-srgb5"]()
    coords = simplex_coordinates(torch.from_numpy(features))
    assert _vertices_packed(coords) is not None
    assert (
        _vertices_packed(
            simplex_coordinates(
                torch.from_numpy(FEATURES["bilateral-int16-overflow"]())
            )
        )
        is None
    )


def test_int16_overflow_case_really_overflows():
    features = FEATURES["bilateral-int16-overflow"]()
    reference = build_reference_lattice(features)
    assert max(abs(c) for key in reference.keys for c in key) > 32767


@pytest.mark.parametrize("normalization", ["symmetric", "after", "before", "none"])
def test_mean_field_matches_reference_and_pydensecrf(normalization):
    image = tiny_image()
    rng = np.random.default_rng(7)
    unary = rng.normal(scale=2.0, size=(4, HEIGHT * WIDTH)).astype(np.float32)
    terms = [
        (gaussian_features(height=HEIGHT, width=WIDTH, sxy=3), 3.0),
        (bilateral_features(image, sxy=5, srgb=13), 4.0),
    ]
    expected = reference_mean_field(
        unary, terms, normalization=normalization, iterations=5
    )
    problem = CRFProblem(
        unary=unary,
        terms=tuple(PairwiseTerm(f, w) for f, w in terms),
        normalization=normalization,
        iterations=5,
    )
    for backend in ("torch", "pydensecrf"):
        np.testing.assert_allclose(
            solve(problem, backend=backend), expected, atol=2e-5, err_msg=backend
        )
