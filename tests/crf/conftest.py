"""Shared inputs for the CRF tests: real photographs and DeepLab-like score maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT.parent / "shared" / "data" / "pydensecrf-examples"

#: Test image size (VOC-like) and the network's padded input / coarse score size at stride 8.
WIDTH, HEIGHT = 500, 375
PADDED = 505  # smallest 8k+1 >= 500
COARSE = (PADDED - 1) // 8 + 1  # 64


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run the CRF tests with one torch thread (restored afterwards).

    On a busy 2-core machine OpenMP's second thread makes the torch port 5-50x slower;
    one thread per process is also how CPU CRF workers are meant to run.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def examples_dir() -> Path:
    if not EXAMPLES.is_dir():
        pytest.skip(f"pydensecrf example images not found at {EXAMPLES}")
    return EXAMPLES


def read_rgb(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(examples_dir() / name) as image:
        return np.array(image.convert("RGB"))


def photo(name: str) -> np.ndarray:
    """A 500 x 375 RGB photograph made from the example images by cropping and resizing."""
    from PIL import Image

    if name == "geese":  # im1, 320 x 240, resized
        source, box = read_rgb("im1.png"), None
    elif name == "bench":  # im2, 320 x 213, cropped to 4:3 and resized
        source, box = read_rgb("im2.png"), (20, 0, 304, 213)
    elif name == "toddler":  # im3, 240 x 320 portrait: a landscape crop, resized
        source, box = read_rgb("im3.png"), (0, 100, 240, 280)
    elif name == "geese-left":  # the left half of im1, resized (a zoomed-in photo)
        source, box = read_rgb("im1.png"), (0, 0, 160, 120)
    elif name == "bench-flipped":
        source, box = read_rgb("im2.png")[:, ::-1], (0, 10, 280, 210)
    else:
        raise KeyError(name)
    image = Image.fromarray(np.ascontiguousarray(source))
    if box is not None:
        image = image.crop(box)
    return np.array(image.resize((WIDTH, HEIGHT), Image.BICUBIC))


def deeplab_like_logits(
    *,
    seed: int,
    num_classes: int = 21,
    height: int = HEIGHT,
    width: int = WIDTH,
    scale: float = 8.0,
) -> np.ndarray:
    """Random-but-smooth coarse scores (1/8 resolution) upsampled x8 with align_corners=True, cropped.

    Mirrors DeepLab's test path: scores on a (S-1)/8+1 grid for the padded S x S input,
    bilinear to S x S, crop to the image. float32 C x H x W.
    """
    padded = max(height, width)
    padded = padded + (-(padded - 1)) % 8  # smallest 8k+1 >= the largest side
    coarse_size = (padded - 1) // 8 + 1
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(
        (1, num_classes, coarse_size, coarse_size), generator=generator
    )
    coarse = (
        F.avg_pool2d(
            coarse, kernel_size=3, stride=1, padding=1, count_include_pad=False
        )
        * scale
    )
    up = F.interpolate(
        coarse, size=(padded, padded), mode="bilinear", align_corners=True
    )
    return np.ascontiguousarray(up[0, :, :height, :width].numpy(), dtype=np.float32)


def noise_image(*, seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(
        0, 256, size=(height, width, 3), dtype=np.uint8
    )


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=0) == b.argmax(axis=0)))
