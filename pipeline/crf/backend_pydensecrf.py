"""The reference backend: pydensecrf (Krähenbühl's C++; the ``pydensecrf2`` package).

Single-threaded CPU, ~1 image/s/core at 500 x 375, 21 labels, 10 iterations.
Lattice keys are int16 in the C++: inputs whose keys could overflow are
rejected before calling it (``check_int16_keys``).
"""

from __future__ import annotations

import numpy as np

from pipeline.crf.features import (
    INT16_MAX,
    CRFProblem,
    check_int16_keys,
    elevated_extent,
)
from pipeline.crf.params import CRFParams
from pipeline.failures import DataError


class CRFInputError(DataError):
    """An image this backend cannot refine correctly (a property of the image, so its row is final)."""


def _densecrf():
    import pydensecrf.densecrf as dcrf

    return dcrf


def _normalization_flag(name: str) -> int:
    dcrf = _densecrf()
    return {
        "symmetric": dcrf.NORMALIZE_SYMMETRIC,
        "after": dcrf.NORMALIZE_AFTER,
        "before": dcrf.NORMALIZE_BEFORE,
        "none": dcrf.NO_NORMALIZATION,
    }[name]


def solve_problem(problem: CRFProblem) -> np.ndarray:
    """Mean field on a generic problem (``DenseCRF`` + ``addPairwiseEnergy``) -> Q float32 L x N."""
    check_int16_keys(problem)
    dcrf = _densecrf()
    crf = dcrf.DenseCRF(problem.num_points, problem.num_labels)
    crf.setUnaryEnergy(np.array(problem.unary, dtype=np.float32, order="C"))
    flag = _normalization_flag(problem.normalization)
    for term in problem.terms:
        crf.addPairwiseEnergy(
            np.ascontiguousarray(term.features.T, dtype=np.float32),
            compat=float(term.weight),
            kernel=dcrf.DIAG_KERNEL,
            normalization=flag,
        )
    return np.array(crf.inference(problem.iterations), dtype=np.float32)


def refine_image(image: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """DeepLab's CRF with ``DenseCRF2D`` ((x, y, R, G, B) features, Potts) -> Q float32 L x N.

    ``image`` uint8 H x W x 3 C-contiguous; ``unary`` float32 L x (H*W) C-contiguous energies.
    """
    height, width = image.shape[:2]
    _check_2d_keys(height=height, width=width, params=params)
    if not image.flags.writeable:  # the Cython wrapper takes a writable memoryview
        image = image.copy()
    dcrf = _densecrf()
    crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
    crf.setUnaryEnergy(unary if unary.flags.writeable else unary.copy())
    flag = _normalization_flag(params.normalization)
    if params.w2 > 0:
        crf.addPairwiseGaussian(
            sxy=params.sigma_gamma, compat=params.w2, normalization=flag
        )
    if params.w1 > 0:
        crf.addPairwiseBilateral(
            sxy=params.sigma_alpha,
            srgb=params.sigma_beta,
            rgbim=image,
            compat=params.w1,
            normalization=flag,
        )
    return np.array(crf.inference(params.iterations), dtype=np.float32)


def _check_2d_keys(*, height: int, width: int, params: CRFParams) -> None:
    """The int16 key check for DenseCRF2D's features, from the largest feature values alone."""
    x = np.float32(width - 1)
    y = np.float32(height - 1)
    checks = []
    if params.w2 > 0:
        s = np.float32(params.sigma_gamma)
        checks.append(
            ("Gaussian (sigma_gamma)", np.array([[x / s, y / s]], dtype=np.float32))
        )
    if params.w1 > 0:
        s = np.float32(params.sigma_alpha)
        c = np.float32(255) / np.float32(params.sigma_beta)
        checks.append(
            (
                "bilateral (sigma_alpha, sigma_beta)",
                np.array([[x / s, y / s, c, c, c]], dtype=np.float32),
            )
        )
    for name, extreme in checks:
        extent = elevated_extent(extreme)
        if extent > INT16_MAX:
            raise CRFInputError(
                f"image {width} x {height}: the {name} lattice keys reach ~{extent:.0f}, beyond the int16 range "
                f"(+-{INT16_MAX}) of pydensecrf's lattice (its results would be silently wrong). "
                "Use backend='torch' (int64 keys) or larger sigmas."
            )
