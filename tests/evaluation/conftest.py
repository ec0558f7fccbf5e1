"""Fixtures: a tiny VOC-format shapes dataset and a tiny random model (Ray and S3: tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

NUM_VAL = 4

# Ray Tune's default console output ignores verbose=0; the legacy one honours it.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """4 val images of 48..64 px from ``pipeline.data.synthetic`` (5 classes, void band)."""
    from pipeline.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("voc"), num_train=0, num_val=NUM_VAL, seed=3, min_size=48, max_size=64)


@pytest.fixture()
def voc_copy(tiny_voc, tmp_path) -> Path:
    """A copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_voc, tmp_path / "voc"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """deeplab_v1("largefov", num_classes=5, width=0.125), random weights, padded input 65."""
    import torch

    from pipeline.data.synthetic import CLASS_NAMES
    from pipeline.model import deeplab_v1
    from pipeline.weights import ModelRecord, default_classes, save_checkpoint

    torch.manual_seed(0)
    model = deeplab_v1("largefov", num_classes=len(CLASS_NAMES), width=0.125)
    _, palette = default_classes(len(CLASS_NAMES))
    record = ModelRecord(
        variant="largefov", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, palette=palette, width=0.125, input_size=65
    )
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(path, model=model, record=record)
    return path

