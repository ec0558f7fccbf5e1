"""Permutohedral lattice in PyTorch: an exact port of densecrf's (Krähenbühl 2013).

Same elevation, rounding (half to even), ranking, barycentric weights, vertex
keys, blur neighbours, blur order (axis 0..d, unnormalised [1/2 1 1/2]) and slice
constant ``alpha = 1 / (1 + 2^-d)`` as pydensecrf's C++ (``permutohedral.cpp``),
in float32. Differences, all harmless to the result:

- vertices are found by sorting/unique of int64 keys instead of an int16 hash
  table, so keys never overflow (the reference silently wraps beyond +-32767);
  vertex numbering is therefore in key order, not in order of first appearance;
- splat, blur and slice are sparse CSR products (``S @ x``, ``B_j @ v``, ``S^T @ v``):
  one pass each, on CPU (MKL) and CUDA (cuSPARSE); float32 sums may be ordered
  differently from the C++ loops (~1e-7 relative).

Layout: values are ``N x V`` (points x channels, row-major), lattice values ``M x V``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

#: Largest product of per-coordinate key ranges that is packed into one int64.
_PACK_LIMIT = 2**62


def _scale_factors(d: int) -> list[float]:
    """E's diagonal scale as the C++ computes it (double maths, stored as float)."""
    inv_std_dev = float(np.float32(np.sqrt(2.0 / 3.0) * (d + 1)))
    return [
        float(np.float32(1.0 / np.sqrt(float((i + 2) * (i + 1))) * inv_std_dev))
        for i in range(d)
    ]


@dataclass
class SimplexCoordinates:
    """Per point, coordinate-major: the zero-coloured point ``rem0`` (float32 (d+1) x N, integer
    valued), the ``rank`` of each coordinate (int64 (d+1) x N) and the barycentric weight of
    simplex vertex r (float32 (d+1) x N, row r)."""

    rem0: torch.Tensor
    rank: torch.Tensor
    weights: torch.Tensor

    @property
    def dim(self) -> int:
        return self.rem0.shape[0] - 1

    def keys(self) -> torch.Tensor:
        """int64 N x (d+1) x d: key of vertex r of every point's simplex (C++ ``canonical`` table)."""
        d = self.dim
        r = torch.arange(d + 1, device=self.rank.device)
        rank = self.rank[:d].T[:, None, :]  # N x 1 x d
        offset = torch.where(
            rank <= (d - r)[None, :, None],
            r[None, :, None],
            (r - (d + 1))[None, :, None],
        )
        return self.rem0[:d].T.to(torch.int64)[:, None, :] + offset


def simplex_coordinates(features: torch.Tensor) -> SimplexCoordinates:
    """Elevate, round, rank and weigh every point (C++ ``Permutohedral::init``, first half).

    Works on one contiguous vector per coordinate, in the C++ order of float32 operations.
    """
    if features.dtype != torch.float32 or features.ndim != 2:
        raise ValueError(
            f"features: expected float32 N x d, got {features.dtype} {tuple(features.shape)}"
        )
    n, d = features.shape
    device = features.device
    scale = _scale_factors(d)
    inv_d1 = float(np.float32(1.0) / np.float32(d + 1))
    f = features.T.contiguous()

    # Elevate onto the plane sum(e) = 0 (suffix sums).
    elevated: list[torch.Tensor] = [torch.empty(0)] * (d + 1)
    running = torch.zeros(n, dtype=torch.float32, device=device)
    for j in range(d, 0, -1):
        cf = f[j - 1] * scale[j - 1]
        elevated[j] = running - cf * float(j)
        running = running + cf
    elevated[0] = running

    # Closest zero-coloured lattice point (round half to even, like SSE's round-to-nearest).
    rounded = [torch.round(e * inv_d1) for e in elevated]
    rem0 = [x * float(d + 1) for x in rounded]
    total = torch.stack(rounded).sum(dim=0).to(torch.int64)

    # Rank the residuals; ties: the earlier coordinate ranks lower.
    residual = [e - r0 for e, r0 in zip(elevated, rem0)]
    rank = [torch.zeros(n, dtype=torch.int64, device=device) for _ in range(d + 1)]
    for i in range(d):
        for j in range(i + 1, d + 1):
            less = residual[i] < residual[j]
            rank[i] += less
            rank[j] += ~less
    ranks = torch.stack(rank) + total
    rem0s = torch.stack(rem0)
    below = ranks < 0
    above = ranks > d
    ranks = torch.where(
        below, ranks + (d + 1), torch.where(above, ranks - (d + 1), ranks)
    )
    rem0s = torch.where(
        below, rem0s + float(d + 1), torch.where(above, rem0s - float(d + 1), rem0s)
    )

    # Barycentric weights: b[d - rank_i] += v_i, b[d - rank_i + 1] -= v_i, then wrap around.
    v = (torch.stack(elevated) - rem0s) * inv_d1
    plus = torch.zeros((d + 2, n), dtype=torch.float32, device=device).scatter_(
        0, d - ranks, v
    )
    minus = torch.zeros((d + 2, n), dtype=torch.float32, device=device).scatter_(
        0, d - ranks + 1, v
    )
    bary = plus - minus
    bary[0] = bary[0] + (bary[d + 1] + 1.0)
    return SimplexCoordinates(
        rem0=rem0s, rank=ranks, weights=bary[: d + 1].contiguous()
    )


def _blur_offsets(d: int, device: torch.device) -> torch.Tensor:
    """(d+1) x d key offsets of the n1 neighbour per axis (n2 = key - offset)."""
    offsets = torch.full((d + 1, d), -1, dtype=torch.int64, device=device)
    for j in range(d):
        offsets[j, j] = d
    return offsets


@dataclass
class _Vertices:
    """Unique vertices of all N*(d+1) simplex corners, grouped by vertex.

    ``order`` lists the corner indices (point * (d+1) + r) sorted by vertex, stably (so by point
    within a vertex); ``starts`` (M + 1) are the group boundaries in ``order``; ``inverse`` the
    vertex of each corner; ``neighbours`` (d+1) x 2 x M the blur neighbours, M = missing.
    """

    order: torch.Tensor
    starts: torch.Tensor
    inverse: torch.Tensor
    neighbours: torch.Tensor


def _group_sorted(
    keys_sorted: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boundaries of equal runs in sorted keys -> (first index of each run + end, inverse, is_first)."""
    total = keys_sorted.shape[0]
    first = torch.ones(total, dtype=torch.bool, device=keys_sorted.device)
    if keys_sorted.ndim == 1:
        first[1:] = keys_sorted[1:] != keys_sorted[:-1]
    else:
        first[1:] = (keys_sorted[1:] != keys_sorted[:-1]).any(dim=1)
    run = torch.cumsum(first, dim=0) - 1
    inverse = torch.empty_like(run)
    inverse[order] = run
    starts = torch.cat(
        [
            torch.nonzero(first).flatten(),
            torch.tensor([total], device=keys_sorted.device),
        ]
    )
    return starts, inverse, first


def _vertices_packed(coords: SimplexCoordinates) -> _Vertices | None:
    """Vertices via keys packed into one int64 each and one stable sort; None if they do not fit.

    Digit c of vertex r's key is ``rem0_c + r - (d+1) [rank_c > d - r] - lo_c``; a margin of
    2d+1 on both sides keeps blur neighbours (+-d on one coordinate, +-1 on the others) inside
    their digit, so packed neighbour keys never alias another vertex.
    """
    d = coords.dim
    device = coords.rank.device
    rem0 = coords.rem0[:d].to(torch.int64)
    margin = 2 * d + 1
    lo = rem0.min(dim=1).values - margin
    hi = rem0.max(dim=1).values + margin
    radix = (hi - lo + 1).tolist()
    if float(np.prod([float(x) for x in radix])) >= _PACK_LIMIT:
        return None
    strides = [1] * d
    for c in range(d - 2, -1, -1):
        strides[c] = strides[c + 1] * radix[c + 1]
    stride = torch.tensor(strides, dtype=torch.int64, device=device)
    base = ((rem0 - lo[:, None]) * stride[:, None]).sum(dim=0)
    stride_sum = int(sum(strides))
    rank = coords.rank[:d]
    corners = []
    for r in range(d + 1):
        wrapped = ((rank > d - r).to(torch.int64) * stride[:, None]).sum(dim=0)
        corners.append(base + r * stride_sum - (d + 1) * wrapped)
    packed = torch.stack(corners, dim=1).reshape(-1)  # corner index = point * (d+1) + r
    packed_sorted, order = torch.sort(packed, stable=True)
    starts, inverse, first = _group_sorted(packed_sorted, order)
    unique = packed_sorted[first]
    m = unique.shape[0]
    deltas = (_blur_offsets(d, device) * stride).sum(dim=1)
    signed = torch.stack(
        [deltas, -deltas], dim=1
    )  # (d+1) x 2: n1 = key + delta, n2 = key - delta
    targets = unique[None, None, :] + signed[:, :, None]
    pos = torch.searchsorted(unique, targets.reshape(-1)).reshape(targets.shape)
    found = unique[pos.clamp(max=m - 1)] == targets
    neighbours = torch.where(found, pos, torch.full_like(pos, m))
    return _Vertices(order=order, starts=starts, inverse=inverse, neighbours=neighbours)


def _first_appearance_order(vertices: _Vertices) -> _Vertices:
    """Renumber vertices in order of first appearance (point by point), as the C++ hash table does.

    Neighbouring pixels then touch nearby vertex rows, which keeps the blur's row reads local.
    """
    m = int(vertices.neighbours.shape[2])
    first_corner = vertices.order[
        vertices.starts[:-1]
    ]  # stable sort: the group's smallest corner
    new_of_old = torch.empty(m + 1, dtype=torch.int64, device=first_corner.device)
    new_of_old[torch.argsort(first_corner)] = torch.arange(
        m, device=first_corner.device
    )
    new_of_old[m] = m  # "missing" stays missing
    inverse = new_of_old[vertices.inverse]
    neighbours = torch.empty_like(vertices.neighbours)
    neighbours[:, :, new_of_old[:m]] = new_of_old[vertices.neighbours]
    inverse_sorted, order = torch.sort(inverse, stable=True)
    starts, _, _ = _group_sorted(inverse_sorted, order)
    return _Vertices(order=order, starts=starts, inverse=inverse, neighbours=neighbours)


def _vertices_rows(coords: SimplexCoordinates) -> _Vertices:
    """Same as ``_vertices_packed`` with row-wise unique of explicit keys (any key range; slower)."""
    d = coords.dim
    keys = coords.keys()
    flat = keys.reshape(-1, d)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    m = unique.shape[0]
    inverse_sorted, order = torch.sort(inverse, stable=True)
    starts, _, _ = _group_sorted(inverse_sorted, order)
    offsets = _blur_offsets(d, keys.device)
    candidates = [unique]
    for j in range(d + 1):
        candidates += [unique + offsets[j], unique - offsets[j]]
    _, ids = torch.unique(torch.cat(candidates), dim=0, return_inverse=True)
    table = torch.full((int(ids.max()) + 1,), m, dtype=torch.int64, device=keys.device)
    table[ids[:m]] = torch.arange(m, device=keys.device)
    neighbours = table[ids[m:]].reshape(d + 1, 2, m)
    return _Vertices(order=order, starts=starts, inverse=inverse, neighbours=neighbours)


@dataclass
class Lattice:
    """A built lattice as sparse matrices: ``K x = alpha S^T B_d ... B_0 S x``. Filter with ``filter(x)``.

    ``neighbours`` keeps the blur graph itself (int32 (d+1) x 2 x M, n1/n2 per axis, M = missing),
    from which the blur matrices ``B_j = I + (P_n1 + P_n2) / 2`` are built.
    """

    num_points: int
    num_vertices: int
    dim: int
    splat: (
        torch.Tensor
    )  # CSR M x N, weights b; row = vertex, its corners in point order
    slice: torch.Tensor  # CSR N x M, weights alpha * b; row = point, its d+1 vertices
    blurs: list[torch.Tensor]  # d+1 CSR M x M, <= 3 entries per row
    neighbours: torch.Tensor
    alpha: float

    @property
    def device(self) -> torch.device:
        return self.neighbours.device

    def blur(self, values: torch.Tensor) -> torch.Tensor:
        """Blur lattice values (M x V) along axes 0..d: ``v + 0.5 (v[n1] + v[n2])``, missing = 0."""
        for matrix in self.blurs:
            values = torch.sparse.mm(matrix, values)
        return values

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """``K @ values`` for float32 ``N x V``: splat, blur axes 0..d, slice (C++ ``compute``)."""
        return torch.sparse.mm(
            self.slice, self.blur(torch.sparse.mm(self.splat, values))
        )

    def nbytes(self) -> int:
        """Bytes held by the lattice structures (not counting filter temporaries)."""
        total = self.neighbours.numel() * self.neighbours.element_size()
        for matrix in [self.splat, self.slice, *self.blurs]:
            for part in (matrix.crow_indices(), matrix.col_indices(), matrix.values()):
                total += part.numel() * part.element_size()
        return total


def _blur_matrices(neighbours: torch.Tensor) -> list[torch.Tensor]:
    """Per axis the M x M CSR ``I + (P_n1 + P_n2)/2`` (columns ascending, missing neighbours dropped)."""
    m = neighbours.shape[2]
    device = neighbours.device
    own = torch.arange(m, device=device)
    weights = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float32, device=device).expand(
        m, 3
    )
    matrices = []
    for j in range(neighbours.shape[0]):
        cols = torch.stack(
            [neighbours[j, 0].to(torch.int64), own, neighbours[j, 1].to(torch.int64)],
            dim=1,
        )
        cols, order = torch.sort(cols, dim=1)  # missing (= m) sort last
        vals = torch.gather(weights, 1, order)
        keep = cols < m
        crow = torch.zeros(m + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(keep.sum(dim=1), dim=0)
        matrices.append(_csr_from_parts(crow, cols[keep], vals[keep], (m, m)))
    return matrices


def _csr_from_parts(
    crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A float32 CSR matrix; int32 indices when they fit (less memory, MKL's LP64 path)."""
    small = max(shape) < 2**31 - 1 and values.numel() < 2**31 - 1
    index_dtype = torch.int32 if small else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta state"
        )
        return torch.sparse_csr_tensor(
            crow.to(index_dtype),
            cols.to(index_dtype),
            values,
            size=shape,
            dtype=torch.float32,
            device=values.device,
            check_invariants=False,
        )


def scale_csr(
    matrix: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """``diag(rows) @ matrix @ diag(columns)`` for a CSR matrix (same index tensors, new values)."""
    crow, col, values = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    n_rows, n_cols = matrix.shape
    if rows is not None:
        counts = (crow[1:] - crow[:-1]).to(torch.int64)
        values = values * torch.repeat_interleave(
            rows, counts, output_size=values.shape[0]
        )
    if columns is not None:
        values = values * columns[col.to(torch.int64)]
    return _csr_from_parts(crow, col, values, (n_rows, n_cols))


def build_lattice(features: torch.Tensor) -> Lattice:
    """Build the lattice of float32 ``N x d`` features (any device). Cost: one sort of N*(d+1) keys."""
    return _build(features)[0]


def build_lattice_with_keys(features: torch.Tensor) -> tuple[Lattice, torch.Tensor]:
    """``build_lattice`` plus the int64 key (M x d) of every vertex, in vertex order (for tests)."""
    lattice, coords, vertices = _build(features)
    d = lattice.dim
    first_corner = vertices.order[vertices.starts[:-1]]
    return lattice, coords.keys().reshape(-1, d)[first_corner]


def _build(features: torch.Tensor) -> tuple[Lattice, SimplexCoordinates, _Vertices]:
    n, d = features.shape
    if n == 0:
        raise ValueError("features: expected at least one point, got N = 0")
    coords = simplex_coordinates(features)
    found = _vertices_packed(coords)
    vertices = _first_appearance_order(
        found if found is not None else _vertices_rows(coords)
    )
    m = int(vertices.neighbours.shape[2])
    device = features.device
    neighbours = vertices.neighbours.to(torch.int32).contiguous()
    alpha = float(
        np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d))
    )
    weights = coords.weights.T.reshape(-1)  # corner order: point * (d+1) + r
    # Splat: row = vertex, its corners in point order (the C++ accumulation order).
    splat = _csr_from_parts(
        vertices.starts, vertices.order // (d + 1), weights[vertices.order], (m, n)
    )
    # Slice: row = point, its d+1 vertices in ascending order, weights * alpha (C++ SSE folds alpha in).
    corner_vertex, corner_order = torch.sort(vertices.inverse.reshape(n, d + 1), dim=1)
    slice_weights = torch.gather(coords.weights.T * alpha, 1, corner_order)
    slice_crow = torch.arange(0, n * (d + 1) + 1, d + 1, device=device)
    sliced = _csr_from_parts(
        slice_crow, corner_vertex.reshape(-1), slice_weights.reshape(-1), (n, m)
    )
    lattice = Lattice(
        num_points=n,
        num_vertices=m,
        dim=d,
        splat=splat,
        slice=sliced,
        blurs=_blur_matrices(neighbours),
        neighbours=neighbours,
        alpha=alpha,
    )
    return lattice, coords, vertices


def _concat_csr(matrices: list[torch.Tensor], col_offsets: list[int]) -> torch.Tensor:
    """Block-diagonal CSR: rows stacked, columns of block k shifted by ``col_offsets[k]``."""
    crows, cols, vals = [], [], []
    nnz = 0
    for matrix, offset in zip(matrices, col_offsets):
        crows.append(matrix.crow_indices()[:-1].to(torch.int64) + nnz)
        cols.append(matrix.col_indices().to(torch.int64) + offset)
        vals.append(matrix.values())
        nnz += matrix.values().numel()
    device = matrices[0].values().device
    crow = torch.cat(crows + [torch.tensor([nnz], dtype=torch.int64, device=device)])
    rows = sum(matrix.shape[0] for matrix in matrices)
    columns = sum(matrix.shape[1] for matrix in matrices)
    return _csr_from_parts(crow, torch.cat(cols), torch.cat(vals), (rows, columns))


def concat_lattices(lattices: list[Lattice]) -> Lattice:
    """Block-diagonal union of lattices of the same dimension (points and vertices stacked in order)."""
    if len(lattices) == 1:
        return lattices[0]
    d = lattices[0].dim
    if any(lat.dim != d for lat in lattices):
        raise ValueError(
            f"concat_lattices: dimensions differ: {[lat.dim for lat in lattices]}"
        )
    vertex_offsets = np.cumsum([0] + [lat.num_vertices for lat in lattices]).tolist()
    point_offsets = np.cumsum([0] + [lat.num_points for lat in lattices]).tolist()
    total_vertices = vertex_offsets[-1]
    neighbours = []
    for lat, offset in zip(lattices, vertex_offsets):
        nb = lat.neighbours.to(torch.int64)
        neighbours.append(
            torch.where(nb == lat.num_vertices, total_vertices, nb + offset)
        )
    return Lattice(
        num_points=point_offsets[-1],
        num_vertices=total_vertices,
        dim=d,
        splat=_concat_csr([lat.splat for lat in lattices], point_offsets),
        slice=_concat_csr([lat.slice for lat in lattices], vertex_offsets),
        blurs=[
            _concat_csr([lat.blurs[j] for lat in lattices], vertex_offsets)
            for j in range(d + 1)
        ],
        neighbours=torch.cat(neighbours, dim=2).to(torch.int32).contiguous(),
        alpha=lattices[0].alpha,
    )
