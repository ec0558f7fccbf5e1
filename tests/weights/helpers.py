"""Small random models for the weights tests."""

from __future__ import annotations

import torch

from pipeline.model import DeepLabV1, deeplab_v1

SMALL_WIDTH = 0.125  # every channel count / 8: files of ~1.3 MB instead of 82 MB


def make_small_model(variant: str, *, num_classes: int = 21, seed: int = 0) -> DeepLabV1:
    """A random width-0.125 model in eval mode, with non-zero biases (so mapping mistakes show)."""
    torch.manual_seed(seed)
    model = deeplab_v1(variant, num_classes=num_classes, width=SMALL_WIDTH)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.1)
    return model.eval()
