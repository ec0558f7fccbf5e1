"""Permutohedral lattice in PyTorch: an exact port of densecrf's (Krähenbühl 2013).

Same elevation, rounding (half to even), ranking, barycentric weights, vertex
keys, blur neighbours, blur order (axis 0..d, unnormalised [1/2 1 1/2]) and slice
constant ``alpha = 1 / (1 + 2^-d)`` as pydensecrf's C++ (``permutohedral.cpp``),
in float32. Differences, all harmless to the result:

- vertices are found by sorting/unique of int64 keys instead of an int16 hash
  table, so keys never overflow (the reference silently wraps beyond +-32767);
  vertex numbering is therefore in key order, not in order of first appearance
  (key order also keeps blur reads near each other: ~20% faster on noise images);
- splat, blur and slice are weighted gather-sums (``embedding_bag``, mode "sum"),
  one fused pass each on CPU and CUDA; float32 sums are ordered differently from
  the C++ loops (~1e-7 relative).

Layout: values are ``N x V`` (points x channels, row-major), lattice values ``M x V``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
    deltas = (_blur_offsets(d, device) * stride).sum(dim=1)  # n1 = key + delta per axis
    targets = unique[None, :] + deltas[:, None]
    pos = torch.searchsorted(unique, targets)  # (d+1) x M, M = past the end
    found = unique[pos.clamp(max=m - 1)] == targets
    n1 = torch.where(found, pos, m)
    return _Vertices(
        order=order, starts=starts, inverse=inverse, neighbours=_with_mirror(n1)
    )


def _with_mirror(n1: torch.Tensor) -> torch.Tensor:
    """(d+1) x 2 x M neighbours from the n1 table alone: n2(v) = u exactly where n1(u) = v.

    n1 is injective (key -> key + delta), so one scatter per axis inverts it; "missing" (= M)
    entries land in a spare slot that is dropped.
    """
    m = n1.shape[1]
    own = torch.arange(m, device=n1.device)
    n2 = torch.full((n1.shape[0], m + 1), m, dtype=n1.dtype, device=n1.device)
    n2.scatter_(1, n1, own.expand_as(n1))
    return torch.stack([n1, n2[:, :m]], dim=1)


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
    """A built lattice: ``K x = slice(blur_d(... blur_0(splat(x))))``. Filter with ``filter(x)``.

    Every step is a weighted gather-sum (``torch.nn.functional.embedding_bag``, mode "sum"):
    one fused pass that reads the rows it sums and writes each output row once, on CPU and CUDA.

    - splat: vertex v sums its corners ``corner_points[vertex_starts[v]:vertex_starts[v+1]]``
      (points in point order, the C++ accumulation order) weighted by ``corner_weights``;
    - blur along axis j: ``v + 0.5 v[n1] + 0.5 v[n2]``, a missing neighbour replaced by the
      vertex itself with weight 0 (``blur_indices[j]``, ``blur_weights[j]``: M x 3, see
      ``_blur_operands``);
    - slice: point i sums its simplex's d+1 vertices ``point_vertices[i]`` weighted by
      ``alpha * point_weights[i]`` (the C++ SSE code folds alpha in).

    ``neighbours`` keeps the blur graph itself (int32 (d+1) x 2 x M, n1/n2 per axis, M = missing).
    """

    num_points: int
    num_vertices: int
    dim: int
    corner_points: torch.Tensor  # N(d+1): point of each corner, grouped by vertex
    corner_weights: torch.Tensor  # N(d+1): barycentric weight of each corner, same order
    vertex_starts: torch.Tensor  # M: first corner of each vertex in corner_points
    point_vertices: torch.Tensor  # N x (d+1): vertices of each point's simplex
    point_weights: torch.Tensor  # N x (d+1): their barycentric weights times alpha
    blur_indices: list[torch.Tensor]  # d+1 of M x 3: n1, n2, self (self where missing)
    blur_weights: list[torch.Tensor]  # d+1 of M x 3: 0.5, 0.5, 1 (0 where missing)
    neighbours: torch.Tensor
    alpha: float

    @property
    def device(self) -> torch.device:
        return self.neighbours.device

    def splat(
        self, values: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Lattice values (M x V) of point values (N x V); ``weights`` replace ``corner_weights``."""
        return F.embedding_bag(
            self.corner_points,
            values,
            self.vertex_starts,
            mode="sum",
            per_sample_weights=self.corner_weights if weights is None else weights,
        )

    def blur(self, values: torch.Tensor) -> torch.Tensor:
        """Blur lattice values (M x V) along axes 0..d: ``v + 0.5 (v[n1] + v[n2])``, missing = 0."""
        for indices, weights in zip(self.blur_indices, self.blur_weights):
            values = F.embedding_bag(
                indices, values, mode="sum", per_sample_weights=weights
            )
        return values

    def slice(
        self, values: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Point values (N x V) of lattice values (M x V); ``weights`` replace ``point_weights``."""
        return F.embedding_bag(
            self.point_vertices,
            values,
            mode="sum",
            per_sample_weights=self.point_weights if weights is None else weights,
        )

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """``K @ values`` for float32 ``N x V``: splat, blur axes 0..d, slice (C++ ``compute``)."""
        return self.slice(self.blur(self.splat(values)))

    def nbytes(self) -> int:
        """Bytes held by the lattice structures (not counting filter temporaries)."""
        parts = [
            self.corner_points,
            self.corner_weights,
            self.vertex_starts,
            self.point_vertices,
            self.point_weights,
            self.neighbours,
            *self.blur_indices,
            *self.blur_weights,
        ]
        return sum(part.numel() * part.element_size() for part in parts)


def _index_dtype(*sizes: int) -> torch.dtype:
    """int32 gather indices where every index fits (half the memory, a little faster), else int64."""
    return torch.int32 if max(sizes) < 2**31 - 1 else torch.int64


def _blur_operands(
    neighbours: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per axis the M x 3 gather indices and weights of ``B_j``: taps (n1, self, n2), (0.5, 1, 0.5).

    A missing neighbour is the vertex itself with weight 0, which adds exactly 0 (the C++ reads
    a zero row). The sum ``0.5 n1 + v + 0.5 n2`` rounds differently from the C++
    ``v + 0.5 (n1 + n2)`` by ~1 ulp. Rounding order matters only in the unnormalised mode,
    whose float32 result is chaotic (messages ~5e4): over the 20 photo x preset parity cases
    this order stays within 3.9e-3 of pydensecrf, the C++ order (bit-exact blur, but fused
    multiply-adds in splat and slice) reached 6.6e-3, and composing two axes into one 9-tap
    pass (~35% faster on a noise lattice) 5.3e-3, so neither is used.
    """
    m = neighbours.shape[2]
    own = torch.arange(m, device=neighbours.device)
    indices, weights = [], []
    for j in range(neighbours.shape[0]):
        n1 = neighbours[j, 0].to(torch.int64)
        n2 = neighbours[j, 1].to(torch.int64)
        indices.append(
            torch.stack(
                [torch.where(n1 < m, n1, own), own, torch.where(n2 < m, n2, own)],
                dim=1,
            )
        )
        weights.append(
            torch.stack(
                [(n1 < m) * 0.5, torch.ones(m, device=own.device), (n2 < m) * 0.5],
                dim=1,
            ).to(torch.float32)
        )
    return indices, weights


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
    vertices = found if found is not None else _vertices_rows(coords)
    m = int(vertices.neighbours.shape[2])
    neighbours = vertices.neighbours.to(torch.int32).contiguous()
    alpha = float(
        np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d))
    )
    weights = coords.weights.T.contiguous()  # N x (d+1), corner index = point * (d+1) + r
    blur_indices, blur_weights = _blur_operands(neighbours)
    index = _index_dtype(n * (d + 1), m)
    lattice = Lattice(
        num_points=n,
        num_vertices=m,
        dim=d,
        corner_points=(vertices.order // (d + 1)).to(index),
        corner_weights=weights.reshape(-1)[vertices.order],
        vertex_starts=vertices.starts[:-1].to(index),
        point_vertices=vertices.inverse.reshape(n, d + 1).to(index),
        point_weights=weights * alpha,
        blur_indices=[b.to(index) for b in blur_indices],
        blur_weights=blur_weights,
        neighbours=neighbours,
        alpha=alpha,
    )
    return lattice, coords, vertices


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
    corner_offsets = np.cumsum(
        [0] + [lat.corner_points.numel() for lat in lattices]
    ).tolist()
    total_vertices = vertex_offsets[-1]
    neighbours = []
    for lat, offset in zip(lattices, vertex_offsets):
        nb = lat.neighbours.to(torch.int64)
        neighbours.append(
            torch.where(nb == lat.num_vertices, total_vertices, nb + offset)
        )

    index = _index_dtype(corner_offsets[-1], total_vertices)

    def shifted(parts: list[torch.Tensor], offsets: list[int]) -> torch.Tensor:
        return torch.cat(
            [part.to(torch.int64) + offset for part, offset in zip(parts, offsets)]
        ).to(index)

    return Lattice(
        num_points=point_offsets[-1],
        num_vertices=total_vertices,
        dim=d,
        corner_points=shifted([lat.corner_points for lat in lattices], point_offsets),
        corner_weights=torch.cat([lat.corner_weights for lat in lattices]),
        vertex_starts=shifted([lat.vertex_starts for lat in lattices], corner_offsets),
        point_vertices=shifted([lat.point_vertices for lat in lattices], vertex_offsets),
        point_weights=torch.cat([lat.point_weights for lat in lattices]),
        blur_indices=[
            shifted([lat.blur_indices[j] for lat in lattices], vertex_offsets)
            for j in range(len(lattices[0].blur_indices))
        ],
        blur_weights=[
            torch.cat([lat.blur_weights[j] for lat in lattices])
            for j in range(len(lattices[0].blur_weights))
        ],
        neighbours=torch.cat(neighbours, dim=2).to(torch.int32).contiguous(),
        alpha=lattices[0].alpha,
    )
