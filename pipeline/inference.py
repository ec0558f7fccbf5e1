"""Running the network on decoded images: coarse logits and labels, one place for all jobs."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.constants import MEAN_BGR
from pipeline.preprocess import coarse_size, prepare_batch, upsample_logits


def autocast_for(device: torch.device | str):
    """bf16 autocast on CUDA (the network's fast path), a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def coarse_logits(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    *,
    input_size: int | None = None,
    mean_bgr: Sequence[float] = MEAN_BGR,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Each image's 1/8 score map, C x coarse_size(H) x coarse_size(W), on the CPU in ``dtype``.

    The batch is padded to a common size (``input_size`` or the largest image's
    8k+1 side); each image's scores are cropped to the rows/columns its pixels use.
    """
    batch = prepare_batch(images, input_size=input_size, mean_bgr=mean_bgr).to(device)
    if torch.device(device).type == "cuda":
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast_for(device):
        scores = model(batch)
    scores = scores.float().cpu()
    out = []
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        out.append(scores[i, :, : coarse_size(h), : coarse_size(w)].to(dtype).contiguous())
    return out


def labels_from_logits(logits: torch.Tensor, *, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Upsample coarse logits to H x W; return (labels uint8 H x W, softmax probabilities C x H x W float32)."""
    full = upsample_logits(logits, height=height, width=width)
    probs = torch.softmax(full.float(), dim=0)
    return probs.argmax(dim=0).to(torch.uint8).numpy(), probs.numpy()
