"""Kernel features and the backend-independent CRF problem.

A dense CRF here is: a unary energy ``U`` (float32, L x N, N = H*W pixels in
row-major order), a list of Potts pairwise terms, each a feature matrix
(float32, N x d) with a weight, a message normalisation and an iteration count.
Both backends solve exactly this problem, so they can be compared on it.

Feature arithmetic copies pydensecrf's C++ bit for bit: float32 division of the
integer coordinate or the uint8 colour by the float32 sigma.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.crf.params import NORMALIZATIONS, CRFParams

FeatureOrder = Literal["xy", "yx"]

#: The reference stores lattice keys as int16 (C++ ``short``).
INT16_MAX = 32767


@dataclass(frozen=True, eq=False)
class PairwiseTerm:
    """One Potts term: ``weight * k(f_i, f_j)`` with features ``features`` (float32, N x d).

    ``cache_key`` marks features that depend only on the image size and sigma (position-only
    terms), so a backend may reuse their lattice across images.
    """

    features: np.ndarray
    weight: float
    cache_key: tuple | None = None


@dataclass(frozen=True, eq=False)
class CRFProblem:
    """Everything a backend needs: unary (float32, L x N), terms, normalisation, iterations."""

    unary: np.ndarray
    terms: tuple[PairwiseTerm, ...]
    normalization: str
    iterations: int

    def __post_init__(self) -> None:
        if self.unary.dtype != np.float32 or self.unary.ndim != 2:
            raise ValueError(
                f"unary: expected float32 L x N, got {self.unary.dtype} {self.unary.shape}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization: expected one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        n = self.unary.shape[1]
        for term in self.terms:
            if (
                term.features.dtype != np.float32
                or term.features.ndim != 2
                or term.features.shape[0] != n
            ):
                raise ValueError(
                    f"pairwise features: expected float32 {n} x d, got {term.features.dtype} {term.features.shape}"
                )

    @property
    def num_labels(self) -> int:
        return int(self.unary.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.unary.shape[1])


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.meshgrid(
        np.arange(height, dtype=np.float32),
        np.arange(width, dtype=np.float32),
        indexing="ij",
    )
    return xs.reshape(-1), ys.reshape(-1)


def gaussian_features(
    *, height: int, width: int, sxy: float, order: FeatureOrder = "xy"
) -> np.ndarray:
    """Position features (float32, N x 2): ``(x/sxy, y/sxy)``, DenseCRF2D's order, or (y, x) as utils."""
    xs, ys = _grid(height, width)
    s = np.float32(sxy)
    columns = (xs / s, ys / s) if order == "xy" else (ys / s, xs / s)
    return np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.float32)


def bilateral_features(
    image: np.ndarray, *, sxy: float, srgb: float, order: FeatureOrder = "xy"
) -> np.ndarray:
    """Position + colour features (float32, N x 5): ``(x/sxy, y/sxy, c0/srgb, c1/srgb, c2/srgb)``."""
    height, width = image.shape[:2]
    xs, ys = _grid(height, width)
    s = np.float32(sxy)
    c = np.float32(srgb)
    colours = image.reshape(-1, image.shape[2]).astype(np.float32) / c
    positions = (xs / s, ys / s) if order == "xy" else (ys / s, xs / s)
    return np.ascontiguousarray(
        np.concatenate([np.stack(positions, axis=1), colours], axis=1), dtype=np.float32
    )


def build_problem(
    image: np.ndarray,
    unary: np.ndarray,
    params: CRFParams,
    *,
    order: FeatureOrder = "xy",
) -> CRFProblem:
    """DeepLab's CRF on one image: Gaussian (w2, sigma_gamma) then bilateral (w1, sigma_alpha, sigma_beta).

    The term order is pydensecrf's usual one (addPairwiseGaussian, then addPairwiseBilateral).
    Zero-weight terms are dropped (they add exactly 0).
    """
    height, width = image.shape[:2]
    terms = []
    if params.w2 > 0:
        features = gaussian_features(
            height=height, width=width, sxy=params.sigma_gamma, order=order
        )
        key = ("gaussian", height, width, float(np.float32(params.sigma_gamma)), order)
        terms.append(PairwiseTerm(features, params.w2, cache_key=key))
    if params.w1 > 0:
        terms.append(
            PairwiseTerm(
                bilateral_features(
                    image, sxy=params.sigma_alpha, srgb=params.sigma_beta, order=order
                ),
                params.w1,
            )
        )
    return CRFProblem(
        unary=unary,
        terms=tuple(terms),
        normalization=params.normalization,
        iterations=params.iterations,
    )


def elevated_extent(features: np.ndarray) -> float:
    """Largest |coordinate| a lattice key of these features can reach (elevation + rounding slack).

    Keys are the elevated features rounded to multiples of d+1, moved by at most d+1 by the
    wrap-around and by at most d by the simplex vertex, so ``max|elevated| + 2(d+1)`` bounds them.
    """
    n, d = features.shape
    if n == 0:
        return 0.0
    scale = np.array(
        [
            1.0 / np.sqrt((i + 2) * (i + 1)) * np.sqrt(2.0 / 3.0) * (d + 1)
            for i in range(d)
        ],
        dtype=np.float64,
    )
    scaled = features.astype(np.float64) * scale
    # e_0 = sum of all; e_j = suffix_sum_j - j * c_{j-1}; bound every |e_j| by the suffix sums of |c|.
    suffix = np.cumsum(np.abs(scaled[:, ::-1]), axis=1)[:, ::-1]
    bound = suffix[:, 0].max()
    for j in range(1, d + 1):
        tail = suffix[:, j].max() if j < d else 0.0
        bound = max(bound, float(tail + j * np.abs(scaled[:, j - 1]).max()))
    return float(bound) + 2 * (d + 1)


def check_int16_keys(problem: CRFProblem) -> None:
    """Raise if a lattice key of ``problem`` could overflow the reference's int16 (C++ short) storage."""
    for index, term in enumerate(problem.terms):
        extent = elevated_extent(term.features)
        if extent > INT16_MAX:
            raise ValueError(
                f"pairwise term {index} (d={term.features.shape[1]}): lattice keys reach ~{extent:.0f}, beyond the "
                f"int16 range (+-{INT16_MAX}) of pydensecrf's lattice; the image is too large for this sigma. "
                "Use backend='torch' (int64 keys) or a larger sigma."
            )
