"""`evaluate --predictions s3://...` against a real S3 endpoint (moto server on loopback)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from jobs import evaluate as evaluate_job
from pipeline.constants import flat_palette
from pipeline.data.voc import VOCDataset, read_label_png

pytestmark = pytest.mark.s3


def test_predictions_from_s3_masks_folder(s3_server, s3_bucket, ray_local, tiny_voc, tiny_model, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    dataset = VOCDataset(tiny_voc, split="val")
    for k, image_id in enumerate(dataset.ids):
        label = read_label_png(dataset.label_path(image_id))
        pred = np.where(label == 255, 0, label).astype(np.uint8)
        if k == 0:
            pred = np.zeros_like(pred)  # one image predicted all background
        image = Image.fromarray(pred, mode="P")
        image.putpalette(flat_palette())
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        fs.pipe_file(f"{s3_bucket}/run1/masks/{image_id}-abcdef0123456789.png", buf.getvalue())

    out = tmp_path / "out"
    args = ["--data", tiny_voc, "--predictions", f"s3://{s3_bucket}/run1/", "--weights", tiny_model, "--out", out, "--no-progress"]
    assert evaluate_job.main(list(map(str, args))) == 0
    entry = json.loads((out / "metrics.json").read_text())["methods"]["predictions"]
    first = read_label_png(dataset.label_path(dataset.ids[0]))
    wrong = int(((first != 255) & (first != 0)).sum())
    total = np.array(entry["confusion_matrix"]).sum()
    assert wrong > 0
    assert entry["pixel_accuracy"] == pytest.approx(1 - wrong / total)
