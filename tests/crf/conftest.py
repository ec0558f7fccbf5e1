"""Shared inputs for the CRF tests: real photographs and DeepLab-like score maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import synthetic

#: pydensecrf's example photos, annotations and outputs, kept in the repository (tests/data/README.md).
EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "pydensecrf-examples"

#: Test image size (VOC-like).
WIDTH, HEIGHT = 500, 375


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


def example_path(name: str) -> Path:
    """A file of ``tests/data/pydensecrf-examples``; a missing one fails the test (it is part of the repo)."""
    path = EXAMPLES / name
    if not path.is_file():
        pytest.fail(f"test data missing: {path} (tests/data is part of the repository; see tests/data/README.md)",
                    pytrace=False)
    return path


def read_rgb(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(example_path(name)) as image:
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
    *, seed: int, num_classes: int = 21, height: int = HEIGHT, width: int = WIDTH
) -> np.ndarray:
    """DeepLab-like scores (``pipeline.data.synthetic``) at the photos' size by default."""
    return synthetic.deeplab_like_logits(
        seed=seed, num_classes=num_classes, height=height, width=width
    )


def noise_image(*, seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return synthetic.noise_image(seed=seed, height=height, width=width)


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=0) == b.argmax(axis=0)))
