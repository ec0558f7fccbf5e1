"""Pre- and post-processing of the network, in one place.

The released DeepLab weights expect BGR, 0..255, minus ``MEAN_BGR``; images are
padded bottom/right (with the mean, i.e. 0 after subtraction) to a fixed size
for batching. The 1/8 score map is upsampled x8 bilinearly with
``align_corners=True`` to ``(h - 1) * 8 + 1`` and cropped to the image's H x W.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.constants import MEAN_BGR, OUTPUT_STRIDE


def coarse_size(size: int) -> int:
    """Score-map side that covers ``size`` pixels: ceil((size - 1) / 8) + 1.

    Equal to the network's output side for an input of ``size`` (Caffe's ceil-mode
    pooling), e.g. 321 -> 41, 500 -> 64, 375 -> 48; crop a padded batch's scores to it.
    """
    return -(-(size - 1) // OUTPUT_STRIDE) + 1


def aligned_size(size: int) -> int:
    """Smallest 8k+1 side that holds ``size`` pixels."""
    return -(-(size - 1) // OUTPUT_STRIDE) * OUTPUT_STRIDE + 1


def check_image(image: np.ndarray, *, name: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{name}: expected uint8 H x W x 3 RGB, got {dtype} with shape {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: empty image of shape {image.shape}")


def prepare_batch(
    images: Sequence[np.ndarray],
    *,
    input_size: int | None = None,
    mean_bgr: Sequence[float] = MEAN_BGR,
) -> torch.Tensor:
    """RGB uint8 images -> float32 N x 3 x S x S network input (BGR minus mean, padded).

    ``S`` is ``input_size`` or, when None, the smallest 8k+1 side that holds the
    largest image of the batch. Images larger than ``input_size`` are an error:
    resize or tile them before (the network is fully convolutional, so a larger
    ``input_size`` also works).
    """
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty batch")
    for i, image in enumerate(images):
        check_image(image, name=f"images[{i}]")
    largest = max(max(im.shape[:2]) for im in images)
    size = aligned_size(largest) if input_size is None else int(input_size)
    if largest > size:
        raise ValueError(f"images: largest side {largest} exceeds input_size {size}; resize the image or raise input_size")
    batch = torch.zeros((len(images), 3, size, size), dtype=torch.float32)
    mean = torch.tensor(list(mean_bgr), dtype=torch.float32).view(3, 1, 1)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        bgr = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1).float()
        batch[i, :, :h, :w] = bgr - mean
    return batch


def upsample_logits(logits: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """[N x] C x h x w scores -> [N x] C x height x width (x8 bilinear, align_corners, crop)."""
    squeeze = logits.dim() == 3
    x = logits.unsqueeze(0) if squeeze else logits
    if x.dim() != 4:
        raise ValueError(f"logits: expected C x h x w or N x C x h x w, got shape {tuple(logits.shape)}")
    h, w = x.shape[-2:]
    full_h, full_w = (h - 1) * OUTPUT_STRIDE + 1, (w - 1) * OUTPUT_STRIDE + 1
    if height > full_h or width > full_w:
        raise ValueError(
            f"logits: a {h}x{w} score map covers at most {full_h}x{full_w} pixels, asked for {height}x{width}"
        )
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    up = F.interpolate(x, size=(full_h, full_w), mode="bilinear", align_corners=True)[..., :height, :width]
    return up[0] if squeeze else up
