"""Mean-field inference over prebuilt lattices (pydensecrf's ``DenseCRF::inference``).

``Q`` is float32 ``N x L`` (points x labels, the C++ memory layout). Per pairwise
term the normaliser ``norm = K @ 1`` is computed once, with the message per mode:

- symmetric: ``s = 1/sqrt(norm + 1e-20)``, ``m = s * K(s * Q)``
- after:     ``s = 1/(norm + 1e-20)``,      ``m = s * K Q``
- before:    ``m = K(s * Q)``
- none:      ``m = K Q``

then ``Q <- softmax(-U + sum_k w_k m_k)`` (Potts weights enter with a plus sign;
the self-message is included), starting from ``softmax(-U)``.

``K = alpha * S^T B S`` (splat S, blur B, slice); the scales ``s`` and the weight
``w_k`` are folded into the splat and slice weights once, so an iteration is, per
term, one weighted gather-sum for the splat, one per blur axis and one for the slice
(``Lattice``), added into the energy (float32 rounding differs from the C++ by
~1e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.crf.lattice import Lattice

_EPS = 1e-20
_MODES = ("symmetric", "after", "before", "none")


@dataclass
class Term:
    """One pairwise term ready for mean field: the lattice and its folded splat/slice weights."""

    lattice: Lattice
    weight: float
    normalization: str
    splat_weights: torch.Tensor  # corner weights * s[corner point] (symmetric/before), else as is
    slice_weights: torch.Tensor  # w * s[point] * alpha * b (symmetric/after), else w * alpha * b

    @classmethod
    def build(cls, lattice: Lattice, *, weight: float, normalization: str) -> Term:
        if normalization not in _MODES:
            raise ValueError(
                f"normalization: expected one of {_MODES}, got {normalization!r}"
            )
        scale = None
        if normalization != "none":
            ones = torch.ones(
                (lattice.num_points, 1), dtype=torch.float32, device=lattice.device
            )
            norm = lattice.filter(ones)[:, 0]
            scale = (
                1.0 / torch.sqrt(norm + _EPS)
                if normalization == "symmetric"
                else 1.0 / (norm + _EPS)
            )
        splat_weights = lattice.corner_weights
        if normalization in ("symmetric", "before"):
            splat_weights = splat_weights * scale[lattice.corner_points]
        row_scale = torch.full(
            (lattice.num_points, 1),
            float(weight),
            dtype=torch.float32,
            device=lattice.device,
        )
        if normalization in ("symmetric", "after"):
            row_scale = row_scale * scale[:, None]
        return cls(
            lattice=lattice,
            weight=weight,
            normalization=normalization,
            splat_weights=splat_weights,
            slice_weights=lattice.point_weights * row_scale,
        )

    def add_message(self, energy: torch.Tensor, q: torch.Tensor) -> None:
        """``energy += weight * message(q)``, both float32 N x L."""
        lattice = self.lattice
        values = lattice.blur(lattice.splat(q, self.splat_weights))
        energy += lattice.slice(values, self.slice_weights)

    def message(self, q: torch.Tensor) -> torch.Tensor:
        """``weight * message(q)`` alone (N x L), for tests."""
        energy = torch.zeros_like(q)
        self.add_message(energy, q)
        return energy


def mean_field(
    unary: torch.Tensor, terms: list[Term], *, iterations: int
) -> torch.Tensor:
    """Run ``iterations`` mean-field steps; ``unary`` float32 N x L energies -> marginals N x L."""
    if unary.dtype != torch.float32 or unary.ndim != 2:
        raise ValueError(
            f"unary: expected float32 N x L, got {unary.dtype} {tuple(unary.shape)}"
        )
    negative_unary = -unary
    q = torch.softmax(negative_unary, dim=1)
    for _ in range(iterations):
        energy = negative_unary.clone()
        for term in terms:
            term.add_message(energy, q)
        q = torch.softmax(energy, dim=1)
    return q
