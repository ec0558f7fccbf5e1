"""PASCAL VOC-format segmentation folders.

Layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG whose
pixel values are class ids, 255 = ignore) and ``ImageSets/Segmentation/<split>.txt``
(one id per line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.constants import IGNORE_LABEL

IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClass"
SPLIT_DIR = "ImageSets/Segmentation"


def read_split(root: str | Path, split: str) -> list[str]:
    path = Path(root) / SPLIT_DIR / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in (Path(root) / SPLIT_DIR).glob("*.txt"))
        raise FileNotFoundError(f"{path}: split {split!r} not found (available: {available or 'none'})")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: the split lists no image ids")
    return ids


def read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_label_png(path: str | Path) -> np.ndarray:
    """Class ids of a palette (P) or grayscale (L) label PNG, as uint8 H x W."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: a label PNG must be palette (P) or grayscale (L) mode, got {im.mode}")
        return np.asarray(im)


def write_label_png(path: str | Path, labels: np.ndarray, *, palette: list[int] | None = None) -> None:
    """Write class ids as a palette PNG (VOC colours unless ``palette`` is given)."""
    from pipeline.outputs import encode_label_png

    Path(path).write_bytes(encode_label_png(np.asarray(labels, dtype=np.uint8), palette=palette, optimize=True))


class VOCDataset:
    """Images and labels of one split of a VOC-format folder, validated on access."""

    def __init__(self, root: str | Path, *, split: str, num_classes: int | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.num_classes = num_classes
        self.ids = read_split(self.root, split)
        missing = [
            str(p)
            for i in self.ids
            for p in (self.image_path(i), self.label_path(i))
            if not p.is_file()
        ]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FileNotFoundError(f"split {split!r} lists files that do not exist: {', '.join(missing[:3])}{more}")

    def image_path(self, image_id: str) -> Path:
        return self.root / IMAGE_DIR / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.root / LABEL_DIR / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        image_id = self.ids[index]
        image = read_rgb(self.image_path(image_id))
        return image_id, image, self.read_label(image_id, size=image.shape[:2])

    def read_label(self, image_id: str, *, size: tuple[int, int] | None = None) -> np.ndarray:
        """The checked label of ``image_id``: ``size`` = its image's (height, width); class ids < num_classes."""
        path = self.label_path(image_id)
        label = read_label_png(path)
        if size is not None and label.shape != tuple(size):
            raise ValueError(
                f"{path}: label is {label.shape[1]}x{label.shape[0]} but its image is {size[1]}x{size[0]}"
            )
        if self.num_classes is not None:
            bad = np.unique(label[(label >= self.num_classes) & (label != IGNORE_LABEL)])
            if bad.size:
                raise ValueError(
                    f"{path}: class ids {bad.tolist()} are beyond num_classes={self.num_classes} "
                    f"(only 0..{self.num_classes - 1} and {IGNORE_LABEL} = ignore are allowed)"
                )
        return label
