"""Public entry points: validate inputs, build the CRF problem, dispatch to a backend.

``refine(image, logits)`` takes the uint8 H x W x 3 RGB image and the network's
upsampled scores (float C x H x W) and returns float32 C x H x W marginals;
labels are their argmax over C.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pipeline.crf.features import CRFProblem, build_problem
from pipeline.crf.params import load_params

Backend = Literal["pydensecrf", "torch"]
UnaryMode = Literal["logits", "probabilities"]

BACKENDS: tuple[str, ...] = ("pydensecrf", "torch")
UNARY_MODES: tuple[str, ...] = ("logits", "probabilities")

#: Probabilities are clipped to [PROBABILITY_CLIP, 1] before -log (as pydensecrf.utils.unary_from_softmax).
PROBABILITY_CLIP = 1e-5
#: Largest allowed |sum_c p_c - 1| per pixel with unary="probabilities".
PROBABILITY_SUM_TOLERANCE = 1e-2

ParamsLike = "str | Path | CRFParams | Mapping[str, Any]"


def _check_image(image: Any, *, name: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(  # noqa: TRY004 - the API promises ValueError for bad input
            f"{name}: expected a numpy uint8 H x W x 3 RGB array, got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected dtype uint8 (0..255 RGB), got {image.dtype}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected shape H x W x 3 (RGB), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: image is empty (shape {image.shape})")
    return np.ascontiguousarray(image)


def _check_scores(
    scores: Any, image_shape: tuple[int, ...], *, unary: str, name: str = "logits"
) -> np.ndarray:
    if not isinstance(scores, np.ndarray):
        raise ValueError(  # noqa: TRY004 - the API promises ValueError for bad input
            f"{name}: expected a numpy float array C x H x W, got {type(scores).__name__}"
        )
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(
            f"{name}: expected a floating dtype (float32), got {scores.dtype}"
        )
    height, width = image_shape[:2]
    if scores.ndim != 3:
        raise ValueError(
            f"{name}: expected shape C x H x W = C x {height} x {width}, got {scores.shape}"
        )
    if scores.shape[1:] != (height, width):
        hint = ""
        if scores.shape[:2] == (height, width):
            hint = " (looks like H x W x C: transpose to C x H x W)"
        raise ValueError(
            f"{name}: shape {scores.shape} does not match the image: expected C x {height} x {width}{hint}"
        )
    if scores.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one class, got C = 0")
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    finite = np.isfinite(scores)
    if not finite.all():
        bad = int(scores.size - np.count_nonzero(finite))
        raise ValueError(
            f"{name}: {bad} NaN/inf value(s) (of {scores.size}); expected finite scores"
        )
    if unary == "probabilities":
        low, high = float(scores.min()), float(scores.max())
        if low < 0 or high > 1 + PROBABILITY_SUM_TOLERANCE:
            raise ValueError(
                f"{name}: unary='probabilities' needs values in [0, 1], got range [{low:g}, {high:g}]"
            )
        error = float(np.abs(scores.sum(axis=0, dtype=np.float64) - 1.0).max())
        if error > PROBABILITY_SUM_TOLERANCE:
            raise ValueError(
                f"{name}: unary='probabilities' needs per-pixel sums of 1 (+-{PROBABILITY_SUM_TOLERANCE}), "
                f"got a deviation of {error:g}; pass raw scores with unary='logits'"
            )
    return scores


def unary_energy(scores: np.ndarray, *, unary: UnaryMode = "logits") -> np.ndarray:
    """Unary energies float32 C x (H*W): ``-logits`` (the authors' choice) or ``-log(clip(p, 1e-5, 1))``."""
    if unary == "logits":
        energy = -scores
    elif unary == "probabilities":
        energy = -np.log(np.clip(scores, PROBABILITY_CLIP, 1.0))
    else:
        raise ValueError(f"unary: expected one of {UNARY_MODES}, got {unary!r}")
    return np.ascontiguousarray(energy.reshape(scores.shape[0], -1), dtype=np.float32)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _prepare(
    image: Any, logits: Any, *, unary: str, index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    suffix = "" if index is None else f"[{index}]"
    image = _check_image(
        image, name=f"image{suffix}" if index is None else f"images{suffix}"
    )
    scores = _check_scores(
        logits,
        image.shape,
        unary=unary,
        name=f"logits{suffix}" if index is None else f"logits_list{suffix}",
    )
    return image, scores


def _ones(scores: np.ndarray) -> np.ndarray:
    """C = 1: the only label has marginal 1 everywhere (what mean field gives, without running it)."""
    return np.ones(scores.shape, dtype=np.float32)


def refine(
    image: np.ndarray,
    logits: np.ndarray,
    params: ParamsLike = "largefov",
    *,
    backend: Backend = "pydensecrf",
    device: str = "cpu",
    unary: UnaryMode = "logits",
) -> np.ndarray:
    """Dense-CRF marginals (float32 C x H x W) of one image.

    ``image`` uint8 H x W x 3 RGB; ``logits`` float C x H x W (the upsampled network scores, or
    probabilities with ``unary="probabilities"``); ``params`` a preset name, a JSON/YAML file,
    a mapping or ``CRFParams``. ``backend="pydensecrf"`` runs on CPU only; ``backend="torch"``
    on ``device`` ("cpu", "cuda", "cuda:1").
    """
    _check_choice(backend, BACKENDS, "backend")
    _check_choice(unary, UNARY_MODES, "unary")
    crf_params = load_params(params)
    image, scores = _prepare(image, logits, unary=unary)
    if scores.shape[0] == 1:
        return _ones(scores)
    energy = unary_energy(scores, unary=unary)
    height, width = image.shape[:2]
    if backend == "pydensecrf":
        if str(device) != "cpu":
            raise ValueError(
                f"device: backend='pydensecrf' runs on 'cpu' only, got {device!r}; use backend='torch'"
            )
        from pipeline.crf.backend_pydensecrf import refine_image

        q = refine_image(image, energy, crf_params)
    else:
        from pipeline.crf.backend_torch import solve_problems

        (q,) = solve_problems([build_problem(image, energy, crf_params)], device=device)
    return q.reshape(scores.shape[0], height, width)


def refine_batch(
    images: Sequence[np.ndarray],
    logits_list: Sequence[np.ndarray],
    params: ParamsLike = "largefov",
    *,
    backend: Backend = "torch",
    device: str = "cpu",
    unary: UnaryMode = "logits",
    max_bytes: int | None = None,
) -> list[np.ndarray]:
    """``refine`` over several images; the torch backend runs them in as few mean-field loops as
    ``max_bytes`` allows (default 2 GiB on CPU, 8 GiB on CUDA; see ``backend_torch.estimate_bytes``).
    Images may differ in size and class count (different class counts run in separate groups).
    """
    _check_choice(backend, BACKENDS, "backend")
    _check_choice(unary, UNARY_MODES, "unary")
    if len(images) != len(logits_list):
        raise ValueError(
            f"refine_batch: {len(images)} images but {len(logits_list)} logits arrays"
        )
    crf_params = load_params(params)
    prepared = [
        _prepare(image, scores, unary=unary, index=i)
        for i, (image, scores) in enumerate(zip(images, logits_list))
    ]
    if backend == "pydensecrf":
        if max_bytes is not None:
            warnings.warn(
                "refine_batch: max_bytes applies to backend='torch' only; ignored",
                stacklevel=2,
            )
        return [
            refine(
                image,
                scores,
                crf_params,
                backend="pydensecrf",
                device=device,
                unary=unary,
            )
            for image, scores in prepared
        ]
    from pipeline.crf.backend_torch import solve_problems

    results: list[np.ndarray | None] = [None] * len(prepared)
    problems: list[CRFProblem] = []
    positions: list[int] = []
    for i, (image, scores) in enumerate(prepared):
        if scores.shape[0] == 1:
            results[i] = _ones(scores)
            continue
        problems.append(
            build_problem(image, unary_energy(scores, unary=unary), crf_params)
        )
        positions.append(i)
    for i, q in zip(
        positions, solve_problems(problems, device=device, max_bytes=max_bytes)
    ):
        image, scores = prepared[i]
        results[i] = q.reshape(scores.shape)
    return results  # type: ignore[return-value]


def solve(
    problem: CRFProblem, *, backend: Backend = "pydensecrf", device: str = "cpu"
) -> np.ndarray:
    """Marginals (float32 L x N) of a generic ``CRFProblem`` (any features, e.g. pydensecrf.utils' (y, x))."""
    _check_choice(backend, BACKENDS, "backend")
    if backend == "pydensecrf":
        if str(device) != "cpu":
            raise ValueError(
                f"device: backend='pydensecrf' runs on 'cpu' only, got {device!r}"
            )
        from pipeline.crf.backend_pydensecrf import solve_problem

        return solve_problem(problem)
    from pipeline.crf.backend_torch import solve_problems

    (q,) = solve_problems([problem], device=device)
    return q


def lattice_size(
    image: np.ndarray, params: ParamsLike = "largefov", *, device: str = "cpu"
) -> dict[str, int]:
    """Vertices of each pairwise term's lattice for this image: {"gaussian": M, "bilateral": M}.

    Lattice size (and so CRF time and memory) grows with image content: a photo at 500 x 375
    has ~35-65k bilateral vertices, uniform noise ~870k.
    """
    import torch

    from pipeline.crf.lattice import build_lattice
    from pipeline.devices import resolve_device

    crf_params = load_params(params)
    image = _check_image(image)
    problem = build_problem(
        image,
        np.zeros((1, image.shape[0] * image.shape[1]), dtype=np.float32),
        crf_params,
    )
    names = (["gaussian"] if crf_params.w2 > 0 else []) + (
        ["bilateral"] if crf_params.w1 > 0 else []
    )
    resolved = resolve_device(device)
    sizes = {}
    with torch.inference_mode():
        for name, term in zip(names, problem.terms):
            sizes[name] = build_lattice(
                torch.from_numpy(term.features).to(resolved)
            ).num_vertices
    return sizes
