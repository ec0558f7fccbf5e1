"""Per-image quality scores and the confidence map (issue #13's groundwork), checked against direct computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.crf import load_params
from pipeline.outputs import OutputLayout
from pipeline.stages import CRFStage, DecodeStage, NetworkStage, WriteStage
from pipeline.stages.crf import logits_of, work_probabilities
from pipeline.stages.decode import pixels_of
from tests.segment.corpus import encode, shapes_image

THRESHOLD = 0.9


def _network_rows(tiny_checkpoint, images: dict[str, bytes], *, side: int | None):
    ids = sorted(images)
    n = len(ids)
    decoded = DecodeStage(max_side=side)({
        "image_id": ids, "source_uri": ids, "status": ["ok"] * n, "error": [None] * n, "error_kind": [None] * n,
        "t_read": [0.0] * n, "node_read": ["local"] * n, "data": [images[i] for i in ids]})
    return NetworkStage(weights=str(tiny_checkpoint), device="cpu", max_side=side)(decoded)


@pytest.mark.parametrize("side", [65, None])  # refined at the working resolution, and at the original size
def test_quality_scores_match_a_direct_computation(tiny_checkpoint, side):
    images = {"photo": encode(shapes_image(150, 230, seed=21), "PNG")}
    network = _network_rows(tiny_checkpoint, images, side=side)
    params = load_params("largefov")
    stage = CRFStage(params=params, ignore_below=THRESHOLD, confidence=True)
    (row,) = stage(network).to_pylist()
    assert row["status"] == "ok", row["error"]

    (source,) = network.to_pylist()
    image, scores = pixels_of(source), logits_of(source)
    (crf,) = work_probabilities([image], [scores], params)
    (net,) = work_probabilities([image], [scores])
    full = F.interpolate(torch.from_numpy(crf)[None], size=(150, 230), mode="bilinear", align_corners=False)[0]
    confidence = full.max(dim=0).values.numpy()
    assert row["mean_confidence"] == pytest.approx(float(confidence.mean()), abs=1e-5)
    # judged on the stored 8-bit value c: ignored when c / 255 < T (the rule of docs/training-data.md)
    stored_values = np.clip(np.rint(confidence * 255), 0, 255)
    assert row["ignored_pixels"] == int((stored_values / 255 < THRESHOLD).sum())
    assert abs(row["ignored_pixels"] - int((confidence < THRESHOLD).sum())) <= 0.01 * confidence.size
    assert row["confident_fraction"] == pytest.approx(1 - row["ignored_pixels"] / (150 * 230), abs=1e-6)
    entropy = -(crf * np.log(np.clip(crf, 1e-12, 1))).sum(axis=0).mean()
    assert row["mean_entropy"] == pytest.approx(float(entropy), rel=1e-4)
    a, b = crf.argmax(0), net.argmax(0)
    ious = [((a == k) & (b == k)).sum() / ((a == k) | (b == k)).sum() for k in np.union1d(a, b)]
    assert row["crf_agreement"] == pytest.approx(float(np.mean(ious)), abs=1e-6)
    stored = np.frombuffer(row["confidence"], dtype=np.uint8).reshape(150, 230)
    assert np.abs(stored.astype(np.int16) - np.rint(confidence * 255).astype(np.int16)).max() <= 1


def test_without_a_crf_the_scores_describe_the_softmax_and_agreement_is_one(tiny_checkpoint):
    network = _network_rows(tiny_checkpoint, {"a": encode(shapes_image(60, 80, seed=3), "PNG")}, side=65)
    (row,) = CRFStage(params=None, ignore_below=0.5).__call__(network).to_pylist()
    assert row["crf_agreement"] == 1.0 and 0 < row["mean_confidence"] <= 1
    assert row["confidence"] is None  # no map unless asked for


def test_the_writer_stores_the_confidence_map_and_the_scores(tiny_checkpoint, tmp_path):
    network = _network_rows(tiny_checkpoint, {"a": encode(shapes_image(90, 120, seed=4), "PNG")}, side=65)
    refined = CRFStage(params=load_params("largefov"), ignore_below=THRESHOLD, confidence=True)(network)
    layout = OutputLayout(uri=str(tmp_path / "out"))
    WriteStage(layout=layout, run_id="r1")(refined)
    (row,) = layout.read_segments().to_pylist()
    assert row["confidence_uri"].endswith(f"confidence/{row['image_id']}.png")
    with Image.open(io.BytesIO((tmp_path / "out" / "confidence" / f"{row['image_id']}.png").read_bytes())) as im:
        assert im.mode == "L" and im.size == (120, 90)
        values = np.asarray(im)
    assert row["mean_confidence"] == pytest.approx(values.mean() / 255, abs=1 / 255)
    assert row["ignored_pixels"] == int((values / 255 < THRESHOLD).sum())  # exactly the stored map's count
    for name in ("mean_confidence", "confident_fraction", "mean_entropy", "crf_agreement"):
        assert row[name] is not None
