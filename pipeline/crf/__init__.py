"""Fully connected CRF refinement of DeepLab scores (Krähenbühl & Koltun 2011, as in DeepLab V1).

Two backends solve the same model: ``pydensecrf`` (the reference C++, CPU) and
``torch`` (an exact PyTorch port of its permutohedral lattice and mean field,
CPU or CUDA, batched). See docs/crf.md.

    from pipeline.crf import refine
    probs = refine(image_rgb_uint8, upsampled_logits, "largefov", backend="torch", device="cuda")
    labels = probs.argmax(axis=0)
"""

from pipeline.crf.backend_torch import DEFAULT_MAX_BYTES, estimate_bytes
from pipeline.crf.features import (
    CRFProblem,
    PairwiseTerm,
    bilateral_features,
    build_problem,
    gaussian_features,
)
from pipeline.crf.params import (
    NORMALIZATIONS,
    PRESET_NORMALIZATION,
    PRESETS,
    VARIANT_PRESETS,
    CRFParams,
    default_preset,
    load_params,
    save_params,
)
from pipeline.crf.refine import (
    BACKENDS,
    PROBABILITY_CLIP,
    UNARY_MODES,
    lattice_size,
    refine,
    refine_batch,
    solve,
    unary_energy,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_BYTES",
    "NORMALIZATIONS",
    "PRESETS",
    "PRESET_NORMALIZATION",
    "PROBABILITY_CLIP",
    "UNARY_MODES",
    "VARIANT_PRESETS",
    "CRFParams",
    "CRFProblem",
    "PairwiseTerm",
    "bilateral_features",
    "build_problem",
    "default_preset",
    "estimate_bytes",
    "gaussian_features",
    "lattice_size",
    "load_params",
    "refine",
    "refine_batch",
    "save_params",
    "solve",
    "unary_energy",
]
