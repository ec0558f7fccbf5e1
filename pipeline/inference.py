"""Running the network on decoded images: coarse logits and labels, one place for all jobs."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.constants import MEAN_BGR, OUTPUT_STRIDE
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

    Shrunk (:func:`pipeline.resolution.shrink`: bilinear, aspect kept) when its longer
    side exceeds ``input_size``, so every batch has one fixed padded shape; channels
    pre-flipped for checkpoints trained on RGB (``prepare_batch`` turns RGB into BGR,
    so the flips cancel).
    """
    from pipeline.resolution import shrink

    return _channels(shrink(image, input_size), channel_order)


def _channels(image: np.ndarray, channel_order: str) -> np.ndarray:
    if channel_order == "RGB":
        image = image[:, :, ::-1]
    elif channel_order != "BGR":
        raise ValueError(f"channel_order: expected 'BGR' or 'RGB', got {channel_order!r}")
    return np.ascontiguousarray(image)


def tile_origins(size: int, *, tile: int, stride: int) -> list[int]:
    """First pixel of each tile along a side of ``size`` px: 0, stride, 2 stride, ... and a last one ending at or
    past ``size``. All are multiples of the output stride, so tile score maps fall on the image's coarse grid."""
    if stride <= 0 or stride % OUTPUT_STRIDE:
        raise ValueError(f"stride: expected a positive multiple of {OUTPUT_STRIDE}, got {stride}")
    if size <= tile:
        return [0]
    origins = list(range(0, size - tile, stride))
    last = -(-(size - tile) // OUTPUT_STRIDE) * OUTPUT_STRIDE  # rounded up: the last tile reaches the edge
    return [*origins, last] if last > origins[-1] else origins


def tile_stride(tile: int, overlap: float) -> int:
    """Stride between tiles of side ``tile`` overlapping by ``overlap`` of a tile (a multiple of 8, >= 8)."""
    stride = int(tile * (1.0 - overlap)) // OUTPUT_STRIDE * OUTPUT_STRIDE
    return max(OUTPUT_STRIDE, min(stride, (tile - 1) // OUTPUT_STRIDE * OUTPUT_STRIDE))


@torch.inference_mode()
def slide_logits(
    model: torch.nn.Module,
    record,
    image: np.ndarray,
    *,
    tile: int = 0,
    overlap: float = 1 / 3,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coarse scores of ``image`` at its native resolution from overlapping ``tile`` x ``tile`` crops.

    ``tile`` (8k+1, default the record's input size) and ``overlap`` (share of a tile)
    set the grid (:func:`tile_origins`); tiles at the right/bottom edge are padded as
    batches are. Each tile's 1/8 scores land on the image's coarse grid and are
    averaged where tiles overlap (mmsegmentation's "slide" inference). Memory: a
    batch of ``batch_size`` tiles plus two C x coarse(H) x coarse(W) float32 maps.
    Returns C x coarse_size(H) x coarse_size(W).
    """
    tile = int(tile or record.input_size)
    height, width = image.shape[:2]
    stride = tile_stride(tile, overlap)
    image = _channels(image, record.channel_order)
    boxes = [(y, x) for y in tile_origins(height, tile=tile, stride=stride)
             for x in tile_origins(width, tile=tile, stride=stride)]
    total = torch.zeros((record.num_classes, coarse_size(height), coarse_size(width)), dtype=torch.float32)
    count = torch.zeros((1, *total.shape[1:]), dtype=torch.float32)
    for start in range(0, len(boxes), max(1, batch_size)):
        chunk = boxes[start : start + max(1, batch_size)]
        crops = [image[y : y + tile, x : x + tile] for y, x in chunk]
        scores = coarse_logits(model, crops, input_size=tile, mean_bgr=record.mean_bgr, device=device)
        for (y, x), s in zip(chunk, scores, strict=True):
            top, left = y // OUTPUT_STRIDE, x // OUTPUT_STRIDE
            total[:, top : top + s.shape[1], left : left + s.shape[2]] += s
            count[:, top : top + s.shape[1], left : left + s.shape[2]] += 1
    if not bool((count > 0).all()):  # pragma: no cover - tile_origins covers every side
        raise RuntimeError(f"slide_logits: tiles left cells of a {width}x{height} image uncovered")
    out = total / count
    if dtype == torch.float16:  # keep out-of-range scores finite
        out = out.clamp(min=-65504.0, max=65504.0)
    return out.to(dtype).contiguous()


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
    scores are resampled (:func:`pipeline.resolution.resample_scores`) onto its own
    coarse grid. Returns C x coarse_size(H) x coarse_size(W).
    """
    from pipeline.resolution import resample_scores

    inputs = [fit_for_network(im, input_size=record.input_size, channel_order=record.channel_order) for im in images]
    scores = coarse_logits(model, inputs, input_size=record.input_size, mean_bgr=record.mean_bgr,
                           device=device, dtype=torch.float32)
    out = []
    for image, fitted, s in zip(images, inputs, scores, strict=True):
        if fitted.shape[:2] != image.shape[:2]:
            s = resample_scores(s, (coarse_size(image.shape[0]), coarse_size(image.shape[1])))
        if dtype == torch.float16:  # keep out-of-range scores finite
            s = s.clamp(min=-65504.0, max=65504.0)
        out.append(s.to(dtype).contiguous())
    return out
