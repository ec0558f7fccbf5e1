"""Input validation and edge cases of refine / refine_batch."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.crf import refine, refine_batch

BACKENDS = ["pydensecrf", "torch"]
FAST = {"preset": "largefov", "iterations": 3}


def small_inputs(height: int = 20, width: int = 30, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = [200, 30, 30]
    logits = rng.normal(scale=2.0, size=(classes, height, width)).astype(np.float32)
    return image, logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_contract(backend):
    image, logits = small_inputs()
    q = refine(image, logits, FAST, backend=backend)
    assert q.dtype == np.float32 and q.shape == logits.shape
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_routes_agree_on_small_input(backend):
    image, logits = small_inputs(seed=1)
    a = refine(image, logits, FAST, backend="pydensecrf")
    b = refine(image, logits, FAST, backend=backend)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "image_fn,logits_fn,match",
    [
        (lambda i: i.astype(np.float32), lambda l: l, "uint8"),
        (lambda i: i[:, :, 0], lambda l: l, "H x W x 3"),
        (lambda i: np.concatenate([i, i[:, :, :1]], axis=2), lambda l: l, "H x W x 3"),
        (lambda i: i[:0], lambda l: l[:, :0], "empty"),
        (lambda i: i, lambda l: l.astype(np.int32), "floating"),
        (lambda i: i, lambda l: l[:, :-1], "does not match"),
        (
            lambda i: i,
            lambda l: np.ascontiguousarray(l.transpose(1, 2, 0)),
            "transpose to C x H x W",
        ),
        (lambda i: i, lambda l: l[0], "C x H x W"),
        (lambda i: i, lambda l: l[:0], "at least one class"),
        (lambda i: i, lambda l: np.where(l > 3, np.nan, l), "NaN/inf"),
        (lambda i: i, lambda l: np.where(l > 3, np.inf, l), "NaN/inf"),
        (lambda i: i.tolist(), lambda l: l, "numpy"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_clear_value_error(backend, image_fn, logits_fn, match):
    image, logits = small_inputs()
    with pytest.raises(ValueError, match=match):
        refine(image_fn(image), logits_fn(logits), FAST, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_are_accepted(backend):
    image, logits = small_inputs(seed=2)
    expected = refine(image, logits, FAST, backend=backend)
    strided_image = np.zeros((20, 60, 3), dtype=np.uint8)
    strided_image[:, ::2] = image
    fortran_logits = np.asfortranarray(logits)
    flipped = np.ascontiguousarray(image[:, ::-1])[:, ::-1]  # a negative-stride view
    read_only = image.copy()
    read_only.flags.writeable = False  # e.g. np.asarray(PIL image)
    frozen_logits = logits.copy()
    frozen_logits.flags.writeable = False
    cases = [
        (strided_image[:, ::2], logits),
        (image, fortran_logits),
        (flipped, logits.astype(np.float64)),
        (read_only, frozen_logits),
    ]
    for img, lg in cases:
        np.testing.assert_allclose(
            refine(img, lg, FAST, backend=backend), expected, atol=1e-6
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_class_returns_ones(backend):
    image, logits = small_inputs(classes=1)
    q = refine(image, logits, FAST, backend=backend)
    assert q.shape == (1, 20, 30) and q.dtype == np.float32 and np.all(q == 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probability_unary_equals_logit_unary(backend):
    """-log softmax(z) = -z + const per pixel, and mean field is invariant to that constant."""
    image, logits = small_inputs(seed=3)
    shifted = logits - logits.max(axis=0, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=0, keepdims=True)
    assert probabilities.min() > 1e-5  # no clipping here
    a = refine(image, logits, FAST, backend=backend)
    b = refine(
        image,
        probabilities.astype(np.float32),
        FAST,
        backend=backend,
        unary="probabilities",
    )
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_probabilities_are_checked():
    image, logits = small_inputs()
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        refine(image, logits, FAST, unary="probabilities")
    with pytest.raises(ValueError, match="per-pixel sums"):
        refine(image, np.full_like(logits, 0.5), FAST, unary="probabilities")
    zeros = np.zeros_like(logits)
    zeros[0] = 1.0  # exact zeros are clipped to 1e-5, not an error
    assert np.isfinite(refine(image, zeros, FAST, unary="probabilities")).all()


def test_bad_options():
    image, logits = small_inputs()
    with pytest.raises(ValueError, match="backend"):
        refine(image, logits, backend="densecrf")
    with pytest.raises(ValueError, match="unary"):
        refine(image, logits, unary="softmax")
    with pytest.raises(ValueError, match="cpu"):
        refine(image, logits, backend="pydensecrf", device="cuda")
    with pytest.raises(ValueError, match="normalization"):
        refine(image, logits, {"normalization": "sym"})
    with pytest.raises(ValueError, match="logits arrays"):
        refine_batch([image], [logits, logits])


def test_int16_key_overflow_is_detected_for_pydensecrf_and_handled_by_torch():
    """sigma_gamma = 0.001 on a 40-pixel-wide image puts Gaussian keys near 39/0.001 * 1.7: beyond int16."""
    image, logits = small_inputs(height=12, width=40)
    params = {"preset": "largefov", "sigma_gamma": 0.001, "iterations": 3}
    with pytest.raises(ValueError, match="int16"):
        refine(image, logits, params, backend="pydensecrf")
    q = refine(image, logits, params, backend="torch")
    assert np.isfinite(q).all()
    # With such a tiny sigma every pixel is alone in its Gaussian term, so with "after"
    # normalisation (the preset's) its message is exactly Q_i, whatever the sigma: the result
    # equals that of a small sigma that does not overflow in the reference.
    small = {"preset": "largefov", "sigma_gamma": 0.05, "iterations": 3}
    np.testing.assert_allclose(
        q, refine(image, logits, small, backend="pydensecrf"), atol=1e-5
    )
