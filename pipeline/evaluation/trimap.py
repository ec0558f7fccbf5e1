"""Boundary ("trimap") metrics: accuracy and mIoU inside bands around object boundaries.

Definition (DeepLab paper, Fig. 5, after Kohli et al.):

* **boundary pixels** B: every ground-truth pixel whose label differs from one
  of its 4-neighbours (both sides of a label edge), plus every void pixel
  (label 255 — VOC's void band along object outlines). The image border is not
  a boundary.
* **distance** d(p): Euclidean distance from pixel p to the nearest pixel of B
  (``scipy.ndimage.distance_transform_edt``); d = 0 on B itself.
* **band of width w**: the non-void pixels with d(p) <= w. Void pixels are
  never scored. An image without boundary pixels contributes nothing.

All 40 bands come from one distance transform: each pixel falls into the shell
k = ceil(d) (0..max_width), one ``bincount`` counts (shell, gt, pred) triples,
and a cumulative sum over shells gives the confusion matrix of every band.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.constants import IGNORE_LABEL
from pipeline.evaluation.metrics import ConfusionMatrix, _json_float, checked_pair

DEFAULT_MAX_WIDTH = 40


def boundary_mask(gt: np.ndarray, *, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Bool H x W: void pixels and pixels whose label differs from a 4-neighbour."""
    gt = np.asarray(gt)
    edge = gt == ignore_label
    dy = gt[1:, :] != gt[:-1, :]
    dx = gt[:, 1:] != gt[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def boundary_distance(gt: np.ndarray, *, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Euclidean distance (float64 H x W) to the nearest boundary pixel; inf if there is none."""
    edge = boundary_mask(gt, ignore_label=ignore_label)
    if not edge.any():
        return np.full(edge.shape, np.inf)
    return ndimage.distance_transform_edt(~edge)


def trimap_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    max_width: int = DEFAULT_MAX_WIDTH,
    ignore_label: int = IGNORE_LABEL,
) -> np.ndarray:
    """Per-band confusion counts of one image: int64 ``max_width x C x (C + 1)``.

    Entry ``[w - 1]`` is the confusion matrix of the band of width ``w``; the
    extra last column counts predicted ``ignore_label`` pixels (misses, as in
    ``ConfusionMatrix.missed``), so the shape is ``max_width x C x (C + 1)``.
    """
    pred, gt = checked_pair(pred, gt, num_classes=num_classes, ignore_label=ignore_label)
    c = num_classes
    dist = boundary_distance(gt, ignore_label=ignore_label)
    shell = np.ceil(dist - 1e-9)  # smallest integer w with d <= w (edt distances are sqrt of ints)
    keep = (gt != ignore_label) & (shell <= max_width)
    k = shell[keep].astype(np.int64)
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    # A predicted ignore label goes to an extra column c ("no prediction").
    p = np.where(p == ignore_label, c, p)
    flat = np.bincount((k * c + g) * (c + 1) + p, minlength=(max_width + 1) * c * (c + 1))
    shells = flat.reshape(max_width + 1, c, c + 1)
    bands = np.cumsum(shells, axis=0)[1:]  # band w = shells 0..w
    return bands.astype(np.int64)


class TrimapConfusion:
    """Confusion matrices of the bands w = 1..max_width, accumulated over a set."""

    def __init__(
        self, num_classes: int, *, max_width: int = DEFAULT_MAX_WIDTH, ignore_label: int = IGNORE_LABEL
    ) -> None:
        if int(max_width) < 1:
            raise ValueError(f"max_width: expected >= 1, got {max_width}")
        self.num_classes = int(num_classes)
        self.max_width = int(max_width)
        self.ignore_label = int(ignore_label)
        # Last column = "no prediction" (predicted ignore label), a miss for the row's class.
        self.counts = np.zeros((self.max_width, self.num_classes, self.num_classes + 1), dtype=np.int64)

    @property
    def widths(self) -> np.ndarray:
        return np.arange(1, self.max_width + 1)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.counts += trimap_counts(
            pred, gt, num_classes=self.num_classes, max_width=self.max_width, ignore_label=self.ignore_label
        )

    def add_counts(self, counts: np.ndarray) -> None:
        """Add counts computed elsewhere by ``trimap_counts`` (e.g. in a Ray task)."""
        counts = np.asarray(counts)
        if counts.shape != self.counts.shape:
            raise ValueError(f"counts: expected shape {self.counts.shape}, got {counts.shape}")
        self.counts += counts.astype(np.int64)

    def merge(self, other: TrimapConfusion) -> TrimapConfusion:
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"merge: shape {other.counts.shape} differs from {self.counts.shape}")
        self.counts += other.counts
        return self

    def band(self, width: int) -> ConfusionMatrix:
        """The confusion matrix of the band of width ``width`` (1..max_width)."""
        if not 1 <= width <= self.max_width:
            raise ValueError(f"width: expected 1..{self.max_width}, got {width}")
        counts = self.counts[width - 1]
        return ConfusionMatrix.from_counts(counts[:, :-1], counts[:, -1], ignore_label=self.ignore_label)

    def pixel_accuracy(self) -> np.ndarray:
        """float64 (max_width,): pixel accuracy per band width."""
        return np.array([self.band(w).pixel_accuracy() for w in self.widths])

    def miou(self) -> np.ndarray:
        """float64 (max_width,): mIoU per band width."""
        return np.array([self.band(w).miou() for w in self.widths])

    def pixels(self) -> np.ndarray:
        return self.counts.sum(axis=(1, 2))

    def to_dict(self) -> dict:
        """JSON-ready per-width lists (NaN written as None)."""
        return {
            "widths": self.widths.tolist(),
            "pixels": self.pixels().tolist(),
            "pixel_accuracy": [_json_float(v) for v in self.pixel_accuracy()],
            "miou": [_json_float(v) for v in self.miou()],
        }

