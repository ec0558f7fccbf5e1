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
        model = model.to(memory_format=torch.channels_last)
    with autocast_for(device):
        scores = model(batch)
    scores = scores.float().cpu()
    out = []
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        out.append(scores[i, :, : coarse_size(h), : coarse_size(w)].to(dtype).contiguous())
    return out


def labels_from_logits(logits: torch.Tensor, *, height: int, width: int) -> np.ndarray:
    """Network-only labels: coarse logits upsampled to H x W, argmax as uint8 H x W."""
    return upsample_logits(logits, height=height, width=width).argmax(dim=0).to(torch.uint8).numpy()


def fit_for_network(image: np.ndarray, *, input_size: int, channel_order: str) -> np.ndarray:
    """An RGB image as the network of a checkpoint takes it.

    Shrunk (bilinear, aspect kept) when its longer side exceeds ``input_size``, so
    every batch has one fixed padded shape; channels pre-flipped for checkpoints
    trained on RGB (``prepare_batch`` turns RGB into BGR, so the flips cancel).
    """
    height, width = image.shape[:2]
    if max(height, width) > input_size:
        from PIL import Image

        scale = input_size / max(height, width)
        shape = (max(1, min(input_size, round(width * scale))), max(1, min(input_size, round(height * scale))))
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(shape, Image.BILINEAR))
    if channel_order == "RGB":
        image = image[:, :, ::-1]
    elif channel_order != "BGR":
        raise ValueError(f"channel_order: expected 'BGR' or 'RGB', got {channel_order!r}")
    return np.ascontiguousarray(image)


@torch.inference_mode()
def record_logits(
    model: torch.nn.Module,
    record,
    images: Sequence[np.ndarray],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Coarse scores of full-size RGB images, preprocessed as the checkpoint's ``record`` says.

    The one network entry point of every job (segment, evaluate, predict, train's
    validation): the batch is padded to ``record.input_size`` (mean, channel order
    from the record); an image larger than that is shrunk for the network and its
    scores are resampled (bilinear, align_corners) onto its full-size coarse grid,
    so the CRF still runs at full resolution. Returns C x coarse_size(H) x coarse_size(W).
    """
    import torch.nn.functional as F

    inputs = [fit_for_network(im, input_size=record.input_size, channel_order=record.channel_order) for im in images]
    scores = coarse_logits(model, inputs, input_size=record.input_size, mean_bgr=record.mean_bgr,
                           device=device, dtype=torch.float32)
    out = []
    for image, fitted, s in zip(images, inputs, scores, strict=True):
        if fitted.shape[:2] != image.shape[:2]:
            grid = (coarse_size(image.shape[0]), coarse_size(image.shape[1]))
            s = F.interpolate(s[None], size=grid, mode="bilinear", align_corners=True)[0]
        if dtype == torch.float16:  # keep out-of-range scores finite
            s = s.clamp(min=-65504.0, max=65504.0)
        out.append(s.to(dtype).contiguous())
    return out
