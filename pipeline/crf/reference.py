"""A slow, obviously-correct permutohedral lattice and mean field (NumPy + Python loops).

Written point by point after densecrf's ``permutohedral.cpp`` with a dict as the
hash table, Python ints as keys (no overflow) and float32 scalars; used by the
tests to check the vectorised torch port on tiny images (e.g. 12 x 9 pixels).
Never use it on real images: it is ~10^4 times slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

f32 = np.float32


@dataclass
class ReferenceLattice:
    """Vertices (keys in order of first appearance), per-point vertex ids and weights, blur neighbours."""

    keys: list[tuple[int, ...]]
    offsets: np.ndarray  # int64 N x (d+1): vertex id of each simplex corner
    weights: np.ndarray  # float32 N x (d+1): barycentric weights
    neighbours: np.ndarray  # int64 (d+1) x 2 x M, -1 = missing
    dim: int

    @property
    def num_vertices(self) -> int:
        return len(self.keys)


def build_reference_lattice(features: np.ndarray) -> ReferenceLattice:
    """``features`` float32 N x d -> the lattice, one point at a time."""
    n, d = features.shape
    inv_std_dev = f32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [
        f32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std_dev)) for i in range(d)
    ]
    down = f32(1.0) / f32(d + 1)
    table: dict[tuple[int, ...], int] = {}
    keys: list[tuple[int, ...]] = []
    offsets = np.zeros((n, d + 1), dtype=np.int64)
    weights = np.zeros((n, d + 1), dtype=np.float32)
    for k in range(n):
        f = [f32(v) for v in features[k]]
        elevated = [f32(0)] * (d + 1)
        sm = f32(0)
        for j in range(d, 0, -1):
            cf = f[j - 1] * scale[j - 1]
            elevated[j] = sm - f32(j) * cf
            sm = sm + cf
        elevated[0] = sm
        rem0 = []
        total = 0
        for i in range(d + 1):
            v = float(down * elevated[i])
            r = round(v)  # Python rounds half to even, as SSE does
            rem0.append(r * (d + 1))
            total += r
        rank = [0] * (d + 1)
        for i in range(d):
            di = elevated[i] - f32(rem0[i])
            for j in range(i + 1, d + 1):
                if di < elevated[j] - f32(rem0[j]):
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        bary = [f32(0)] * (d + 2)
        for i in range(d + 1):
            v = (elevated[i] - f32(rem0[i])) * down
            bary[d - rank[i]] = bary[d - rank[i]] + v
            bary[d - rank[i] + 1] = bary[d - rank[i] + 1] - v
        bary[0] = bary[0] + (f32(1) + bary[d + 1])
        for remainder in range(d + 1):
            key = tuple(
                rem0[i]
                + (remainder if rank[i] <= d - remainder else remainder - (d + 1))
                for i in range(d)
            )
            if key not in table:
                table[key] = len(keys)
                keys.append(key)
            offsets[k, remainder] = table[key]
            weights[k, remainder] = bary[remainder]
    m = len(keys)
    neighbours = np.full((d + 1, 2, m), -1, dtype=np.int64)
    for j in range(d + 1):
        for i, key in enumerate(keys):
            n1 = [c - 1 for c in key]
            n2 = [c + 1 for c in key]
            if j < d:
                n1[j] = key[j] + d
                n2[j] = key[j] - d
            neighbours[j, 0, i] = table.get(tuple(n1), -1)
            neighbours[j, 1, i] = table.get(tuple(n2), -1)
    return ReferenceLattice(
        keys=keys, offsets=offsets, weights=weights, neighbours=neighbours, dim=d
    )


def reference_filter(lattice: ReferenceLattice, values: np.ndarray) -> np.ndarray:
    """``K @ values`` (float32 N x V) by explicit splat, blur, slice loops."""
    n, v = values.shape
    d = lattice.dim
    m = lattice.num_vertices
    grid = np.zeros((m, v), dtype=np.float32)
    for i in range(n):
        for r in range(d + 1):
            grid[lattice.offsets[i, r]] += lattice.weights[i, r] * values[i]
    for j in range(d + 1):
        new = np.zeros_like(grid)
        for i in range(m):
            n1, n2 = lattice.neighbours[j, :, i]
            a = grid[n1] if n1 >= 0 else np.zeros(v, dtype=np.float32)
            b = grid[n2] if n2 >= 0 else np.zeros(v, dtype=np.float32)
            new[i] = grid[i] + f32(0.5) * (a + b)
        grid = new
    alpha = f32(1.0) / (f32(1.0) + f32(2.0) ** f32(-d))
    out = np.zeros((n, v), dtype=np.float32)
    for i in range(n):
        for r in range(d + 1):
            out[i] += lattice.weights[i, r] * alpha * grid[lattice.offsets[i, r]]
    return out


def reference_mean_field(
    unary: np.ndarray,
    terms: list[tuple[np.ndarray, float]],
    *,
    normalization: str,
    iterations: int,
) -> np.ndarray:
    """Mean field on float32 ``unary`` L x N with ``terms`` [(features N x d, weight)] -> Q (L x N)."""

    def softmax(a: np.ndarray) -> np.ndarray:  # a: L x N
        e = np.exp(a - a.max(axis=0, keepdims=True))
        return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)

    built = []
    for features, weight in terms:
        lattice = build_reference_lattice(features)
        norm = reference_filter(
            lattice, np.ones((features.shape[0], 1), dtype=np.float32)
        )[:, 0]
        if normalization == "symmetric":
            scale = 1.0 / np.sqrt(norm + 1e-20)
        elif normalization == "none":
            scale = np.ones_like(norm)
        else:
            scale = 1.0 / (norm + 1e-20)
        built.append((lattice, weight, scale.astype(np.float32)))
    q = softmax(-unary)
    for _ in range(iterations):
        energy = -unary.copy()
        for lattice, weight, scale in built:
            x = q.T
            if normalization in ("symmetric", "before"):
                x = x * scale[:, None]
            message = reference_filter(
                lattice, np.ascontiguousarray(x, dtype=np.float32)
            )
            if normalization in ("symmetric", "after"):
                message = message * scale[:, None]
            energy += weight * message.T
        q = softmax(energy)
    return q
