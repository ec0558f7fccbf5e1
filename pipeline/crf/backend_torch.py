"""The torch backend: the exact lattice port + mean field, on CPU or CUDA, batched.

Several images are refined in one mean-field loop by stacking their lattices
block-diagonally (``concat_lattices``); softmax is per pixel, so the images do
not interact. Memory is bounded per call by ``max_bytes``: lattices are built one
image at a time, and a group is run as soon as adding the next image would
exceed the budget (an image above the budget on its own runs alone).

Lattice size depends on content: a uniform-noise 500 x 375 image has ~14x the
bilateral vertices of a photo (~870k vs ~35-65k), so budgets are in bytes from
the built lattices, never in images.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.crf.features import CRFProblem, PairwiseTerm
from pipeline.crf.lattice import Lattice, build_lattice, concat_lattices
from pipeline.crf.meanfield import Term, mean_field
from pipeline.devices import resolve_device

#: Default memory budget per mean-field group: CPU and CUDA.
DEFAULT_MAX_BYTES = {"cpu": 2 * 2**30, "cuda": 8 * 2**30}

#: Live N x L float32 arrays: numpy unary in and marginals out, device unary, -unary, Q, energy,
#: softmax and transfer temporaries.
_POINT_COPIES = 10
#: Live M x L float32 arrays while filtering (splat output, blur input/output, allocator slack).
_VERTEX_COPIES = 4
#: Transient bytes per lattice corner (N(d+1) of them) while a lattice is built: keys, sort, inverse.
_BUILD_BYTES_PER_CORNER = 64

_CACHE_SIZE = 8
_cache: OrderedDict[tuple, Lattice] = OrderedDict()
_cache_lock = threading.Lock()


def term_lattice(term: PairwiseTerm, device: torch.device) -> Lattice:
    """Build (or fetch from a small LRU cache, for terms with a ``cache_key``) one term's lattice."""
    key = None if term.cache_key is None else (term.cache_key, str(device))
    if key is not None:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    lattice = build_lattice(torch.from_numpy(term.features).to(device))
    if key is not None:
        with _cache_lock:
            _cache[key] = lattice
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return lattice


def clear_cache() -> None:
    """Drop cached position-only lattices (they depend only on image size and sigma)."""
    with _cache_lock:
        _cache.clear()


def estimate_bytes(
    *, num_points: int, num_labels: int, lattices: Sequence[Lattice]
) -> int:
    """Upper estimate of one image's share of a mean-field group's peak memory.

    ``4 L (10 N + 4 sum_k M_k)`` for the float32 values, plus per term the lattice structures
    (splat/slice gather indices and weights, the blur taps and the blur neighbours,
    ``Lattice.nbytes``), a per-point scale and the transient of building it (64 bytes per corner,
    N(d+1) corners). Calibrated against the peak RSS of one call in a fresh process
    (bench/crf.py), 500 x 375, 21 classes: photo estimate 0.33 GB vs 0.20-0.24 GB measured,
    uniform noise 0.77 GB vs 0.59-0.63 GB.
    """
    values = (
        4
        * num_labels
        * (
            _POINT_COPIES * num_points
            + _VERTEX_COPIES * sum(l.num_vertices for l in lattices)
        )
    )
    structures = sum(
        l.nbytes() + 4 * num_points + _BUILD_BYTES_PER_CORNER * num_points * (l.dim + 1)
        for l in lattices
    )
    return int(values + structures)


@dataclass
class _Built:
    index: int
    problem: CRFProblem
    lattices: list[Lattice]
    nbytes: int


def _signature(problem: CRFProblem) -> tuple:
    """Problems with equal signatures can share one mean-field loop."""
    return (
        problem.num_labels,
        problem.normalization,
        problem.iterations,
        tuple((t.features.shape[1], float(t.weight)) for t in problem.terms),
    )


def _groups(
    problems: Sequence[CRFProblem], device: torch.device, max_bytes: int
) -> Iterator[list[_Built]]:
    """Build lattices image by image, yielding groups whose estimate stays within ``max_bytes``."""
    group: list[_Built] = []
    used = 0
    for index, problem in enumerate(problems):
        lattices = [term_lattice(term, device) for term in problem.terms]
        nbytes = estimate_bytes(
            num_points=problem.num_points,
            num_labels=problem.num_labels,
            lattices=lattices,
        )
        built = _Built(index=index, problem=problem, lattices=lattices, nbytes=nbytes)
        if group and (
            used + nbytes > max_bytes
            or _signature(group[0].problem) != _signature(problem)
        ):
            yield group
            group, used = [], 0
        group.append(built)
        used += nbytes
    if group:
        yield group


def _run_group(group: list[_Built], device: torch.device) -> list[np.ndarray]:
    first = group[0].problem
    terms = []
    for k, term in enumerate(first.terms):
        lattice = concat_lattices([b.lattices[k] for b in group])
        terms.append(
            Term.build(
                lattice, weight=float(term.weight), normalization=first.normalization
            )
        )
    unary = torch.cat(
        [torch.from_numpy(b.problem.unary).to(device).T for b in group], dim=0
    ).contiguous()
    q = mean_field(unary, terms, iterations=first.iterations).T.cpu()
    out = []
    start = 0
    for b in group:
        n = b.problem.num_points
        out.append(
            np.ascontiguousarray(q[:, start : start + n].numpy(), dtype=np.float32)
        )
        start += n
    return out


def _device_and_budget(
    device: str | torch.device, max_bytes: int | None
) -> tuple[torch.device, int]:
    """The resolved device and the per-group byte budget (its default when ``max_bytes`` is None)."""
    resolved = resolve_device(device)
    budget = DEFAULT_MAX_BYTES[resolved.type] if max_bytes is None else int(max_bytes)
    if budget <= 0:
        raise ValueError(
            f"max_bytes: expected a positive number of bytes, got {max_bytes!r}"
        )
    return resolved, budget


def solve_problems(
    problems: Sequence[CRFProblem],
    *,
    device: str | torch.device = "cpu",
    max_bytes: int | None = None,
) -> list[np.ndarray]:
    """Marginals (float32 L x N each) of several problems, batched within ``max_bytes`` per group."""
    resolved, budget = _device_and_budget(device, max_bytes)
    results: list[np.ndarray | None] = [None] * len(problems)
    with torch.inference_mode():
        for group in _groups(problems, resolved, budget):
            for built, q in zip(group, _run_group(group, resolved)):
                results[built.index] = q
    return results  # type: ignore[return-value]


def plan_groups(
    problems: Sequence[CRFProblem],
    *,
    device: str | torch.device = "cpu",
    max_bytes: int | None = None,
) -> list[list[int]]:
    """The grouping ``solve_problems`` would use (indices per group), for tests and benchmarks."""
    resolved, budget = _device_and_budget(device, max_bytes)
    with torch.inference_mode():
        return [
            [b.index for b in group] for group in _groups(problems, resolved, budget)
        ]
