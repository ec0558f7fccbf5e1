"""CRFParams validation, presets and preset files."""

from __future__ import annotations

import json

import pytest

from pipeline.crf import (
    PRESET_NORMALIZATION,
    PRESETS,
    CRFParams,
    load_params,
    save_params,
)


def test_presets_are_the_authors_settings():
    table = {
        "largefov": (4, 121, 5, 3, 3),
        "deeplab": (5, 50, 3, 3, 3),
        "msc": (3, 95, 3, 3, 3),
        "msc-largefov": (4, 83, 5, 3, 3),
    }
    assert set(PRESETS) == set(table)
    for name, values in table.items():
        p = PRESETS[name]
        assert (p.w1, p.sigma_alpha, p.sigma_beta, p.w2, p.sigma_gamma) == values
        assert p.iterations == 10
        assert p.normalization == PRESET_NORMALIZATION == "after"


@pytest.mark.parametrize(
    "field,value",
    [
        ("w1", -1.0),
        ("w2", float("nan")),
        ("sigma_alpha", 0.0),
        ("sigma_beta", -5.0),
        ("sigma_gamma", 0),
        ("iterations", -1),
        ("iterations", 2.5),
        ("normalization", "NORMALIZE_AFTER"),
        ("w1", "4"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CRFParams(**{field: value})


def test_zero_weight_and_zero_iterations_are_allowed():
    p = CRFParams(w1=0, iterations=0)
    assert p.w1 == 0.0 and p.iterations == 0


def test_mapping_round_trip_and_preset_overrides():
    p = PRESETS["msc"]
    assert CRFParams.from_mapping(p.to_dict()) == p
    q = CRFParams.from_mapping(
        {"preset": "deeplab", "normalization": "symmetric", "iterations": 5}
    )
    assert (q.w1, q.sigma_alpha, q.normalization, q.iterations) == (
        5.0,
        50.0,
        "symmetric",
        5,
    )
    with pytest.raises(ValueError, match="sigma_gama"):
        CRFParams.from_mapping({"sigma_gama": 3})
    with pytest.raises(ValueError, match="preset"):
        CRFParams.from_mapping({"preset": "nope"})


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_files_round_trip(tmp_path, suffix):
    path = tmp_path / f"crf{suffix}"
    p = CRFParams(
        w1=6, sigma_alpha=70, sigma_beta=4, iterations=8, normalization="symmetric"
    )
    save_params(path, p)
    assert load_params(path) == p
    assert load_params(str(path)) == p


def test_load_params_sources(tmp_path):
    assert load_params("largefov") is PRESETS["largefov"]
    assert load_params(PRESETS["msc"]) is PRESETS["msc"]
    assert load_params({"preset": "msc", "w1": 2}).w1 == 2.0
    nested = tmp_path / "tuned.json"
    nested.write_text(json.dumps({"crf": {"preset": "largefov", "w1": 5}}))
    assert load_params(nested).w1 == 5.0
    with pytest.raises(ValueError, match="neither a preset"):
        load_params("no-such-preset")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sigma_alpha": -1}))
    with pytest.raises(ValueError, match=r"bad\.json.*sigma_alpha"):
        load_params(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("w1: [unclosed")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_params(broken)
    other = tmp_path / "params.txt"
    other.write_text("w1=3")
    with pytest.raises(ValueError, match="suffix"):
        load_params(other)
