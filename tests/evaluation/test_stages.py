"""Stages called directly on dict batches (no Ray), and the rules that match predicted masks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.predictions import match_predictions
from pipeline.evaluation.stages import ScoreStage


def test_score_stage_counts_errors_and_samples():
    rng = np.random.default_rng(0)
    label = np.zeros((17, 17), np.uint8)
    label[4:12, 5:13] = 1
    label[3, 3] = 255
    logits = rng.normal(size=(2, 3, 3)).astype(np.float16)
    logits[1, 1, 1] = 8.0  # the centre scores class 1
    image = np.full((17, 17, 3), 40, np.uint8)
    image[label == 1] = 200
    batch = {
        "image_id": ["a", "b"],
        "image": [image, np.zeros((0, 0, 0), np.uint8)],
        "label": [label, np.zeros((0, 0), np.uint8)],
        "logits": [logits, np.zeros((0, 0, 0), np.float16)],
        "error": ["", "b.jpg: broken"],
    }
    out = ScoreStage(num_classes=2, crf_params="largefov", max_width=4, sample_ids=["a"])(batch)
    assert out["error"] == ["", "b.jpg: broken"]
    for method in ("network", "crf"):
        assert out[f"{method}_confusion"][0].sum() == (label != 255).sum()
        assert out[f"{method}_trimap"][0].shape == (4, 2, 3)
        assert out[f"{method}_confusion"][1].sum() == 0  # the error row counts nothing
        assert out[f"{method}_mask"][0].shape == (17, 17) and out[f"{method}_mask"][1].size == 0


def test_match_predictions_rules(tmp_path):
    for name in ("a.png", "b-0123456789.png", "c-xyz.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert match_predictions(str(tmp_path), ["a", "b"]) == {"a": str(tmp_path / "a.png"), "b": str(tmp_path / "b-0123456789.png")}
    with pytest.raises(FileNotFoundError, match="no predicted mask for 1 of 2 split ids \\(c\\)"):
        match_predictions(str(tmp_path), ["a", "c"])
    (tmp_path / "a-abcdefabcd.png").write_bytes(b"")
    with pytest.raises(ValueError, match="several masks"):
        match_predictions(str(tmp_path), ["a"])
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"")
    assert match_predictions(str(tmp_path), ["a"]) == {"a": str(tmp_path / "masks" / "a.png")}  # masks/ wins
    with pytest.raises(FileNotFoundError, match="does not exist"):
        match_predictions(str(tmp_path / "nope"), ["a"])
