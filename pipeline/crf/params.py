"""Dense-CRF parameters: a validated record, the authors' presets, preset files.

One source of truth for the DeepLab V1 CRF settings (Chen et al., ICLR 2015,
grid-searched on 100 VOC val images; w2 = 3, sigma_gamma = 3 fixed):

| preset        | w1 | sigma_alpha | sigma_beta | w2 | sigma_gamma |
|---------------|----|-------------|------------|----|-------------|
| largefov      | 4  | 121         | 5          | 3  | 3           |
| deeplab       | 5  | 50          | 3          | 3  | 3           |
| msc           | 3  | 95          | 3          | 3  | 3           |
| msc-largefov  | 4  | 83          | 5          | 3  | 3           |

All presets run 10 mean-field iterations and normalise messages "after"
filtering, as the authors' CRF program did (pydensecrf's NORMALIZE_AFTER;
pydensecrf's own default, "symmetric", changes ~0.25% of labels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

Normalization = Literal["symmetric", "after", "before", "none"]

#: Message normalisation modes (pydensecrf's NORMALIZE_SYMMETRIC, _AFTER, _BEFORE, NO_NORMALIZATION).
NORMALIZATIONS: tuple[str, ...] = ("symmetric", "after", "before", "none")

#: Normalisation of every preset: the authors' code used NORMALIZE_AFTER.
PRESET_NORMALIZATION: Normalization = "after"

#: Mean-field iterations of every preset (the paper's 10).
PRESET_ITERATIONS = 10


@dataclass(frozen=True)
class CRFParams:
    """Fully connected CRF settings (DeepLab's names).

    Pairwise energy, Potts: ``w1 * exp(-|p_i-p_j|^2 / 2 sigma_alpha^2 - |I_i-I_j|^2 / 2 sigma_beta^2)
    + w2 * exp(-|p_i-p_j|^2 / 2 sigma_gamma^2)``; positions in pixels, colours in 0..255 RGB.
    A weight of 0 switches its term off.
    """

    w1: float = 4.0
    sigma_alpha: float = 121.0
    sigma_beta: float = 5.0
    w2: float = 3.0
    sigma_gamma: float = 3.0
    iterations: int = PRESET_ITERATIONS
    normalization: Normalization = PRESET_NORMALIZATION

    def __post_init__(self) -> None:
        for name in ("w1", "w2"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"CRFParams.{name}: expected a finite number >= 0, got {value!r}"
                )
            object.__setattr__(self, name, float(value))
        for name in ("sigma_alpha", "sigma_beta", "sigma_gamma"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"CRFParams.{name}: expected a finite number > 0, got {value!r}"
                )
            object.__setattr__(self, name, float(value))
        iterations = self.iterations
        if (
            isinstance(iterations, bool)
            or not isinstance(iterations, int)
            or iterations < 0
        ):
            if (
                isinstance(iterations, float)
                and iterations.is_integer()
                and iterations >= 0
            ):
                object.__setattr__(self, "iterations", int(iterations))
            else:
                raise ValueError(
                    f"CRFParams.iterations: expected an integer >= 0, got {iterations!r}"
                )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"CRFParams.normalization: expected one of {NORMALIZATIONS}, got {self.normalization!r}"
            )

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], *, source: str = "mapping"
    ) -> CRFParams:
        """Build from a flat dict; unknown keys are an error (``source`` names the file in messages).

        Missing keys take the ``largefov`` values. A ``preset`` key starts from that preset
        instead, and the other keys override it.
        """
        if not isinstance(mapping, Mapping):
            raise ValueError(  # noqa: TRY004 - the API promises ValueError for bad input
                f"{source}: expected a mapping of CRF parameters, got {type(mapping).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known - {"preset"})
        if unknown:
            raise ValueError(
                f"{source}: unknown CRF parameter(s) {unknown}; expected keys from {sorted(known)}"
            )
        base = cls()
        if "preset" in mapping:
            preset = mapping["preset"]
            if preset not in PRESETS:
                raise ValueError(
                    f"{source}: preset: expected one of {sorted(PRESETS)}, got {preset!r}"
                )
            base = PRESETS[preset]
        overrides = {key: value for key, value in mapping.items() if key != "preset"}
        try:
            return replace(base, **overrides)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON/YAML-ready dict (round-trips through ``from_mapping``)."""
        return asdict(self)


PRESETS: dict[str, CRFParams] = {
    "largefov": CRFParams(w1=4, sigma_alpha=121, sigma_beta=5, w2=3, sigma_gamma=3),
    "deeplab": CRFParams(w1=5, sigma_alpha=50, sigma_beta=3, w2=3, sigma_gamma=3),
    "msc": CRFParams(w1=3, sigma_alpha=95, sigma_beta=3, w2=3, sigma_gamma=3),
    "msc-largefov": CRFParams(w1=4, sigma_alpha=83, sigma_beta=5, w2=3, sigma_gamma=3),
}

# The authors' 4x4 and 7x7 variants were tuned like DeepLab's base model.
VARIANT_PRESETS: dict[str, str] = {
    "largefov": "largefov", "deeplab": "deeplab", "4x4": "deeplab", "7x7": "deeplab",
    "msc": "msc", "msc-largefov": "msc-largefov",
}


def default_preset(variant: str) -> str:
    """The preset name that goes with a network variant (``largefov`` for unknown variants)."""
    return VARIANT_PRESETS.get(variant, "largefov")


def load_params(name_or_path: str | Path | CRFParams | Mapping[str, Any]) -> CRFParams:
    """A preset name, a JSON/YAML file path, a mapping, or CRFParams -> CRFParams.

    A file holds one flat mapping (optionally ``preset: NAME`` plus overrides). A file
    written by tune-crf may nest it under a top-level ``crf`` key; that is accepted too.
    """
    if isinstance(name_or_path, CRFParams):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return CRFParams.from_mapping(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"CRF parameters: {str(name_or_path)!r} is neither a preset {sorted(PRESETS)} nor an existing file"
        )
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON: {error}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml  # pyyaml; safe_load never builds arbitrary objects

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from None
    else:
        raise ValueError(
            f"{path}: expected a .json, .yaml or .yml file, got suffix {path.suffix!r}"
        )
    if isinstance(data, Mapping) and set(data) == {"crf"}:
        data = data["crf"]
    return CRFParams.from_mapping(data, source=str(path))


def save_params(path: str | Path, params: CRFParams) -> None:
    """Write ``params`` as JSON or YAML (by suffix), loadable by ``load_params``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(json.dumps(params.to_dict(), indent=2) + "\n", encoding="utf-8")
    elif suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(
            yaml.safe_dump(params.to_dict(), sort_keys=False), encoding="utf-8"
        )
    else:
        raise ValueError(
            f"{path}: expected a .json, .yaml or .yml file, got suffix {path.suffix!r}"
        )
