"""Segmentation metrics from one confusion matrix accumulated over a whole set.

As in the DeepLab paper (and the VOC devkit): every image adds its pixel counts
to one ``num_classes x num_classes`` matrix (rows = ground truth, columns =
prediction); IoU, mIoU and the accuracies are computed from that matrix at the
end, never averaged over images. Ground-truth pixels equal to ``IGNORE_LABEL``
(255) are not counted. A *predicted* 255 ("no prediction") on a counted pixel is
a miss for its ground-truth class: it is kept in ``missed`` (per ground-truth
class) and lowers that class's IoU and accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.constants import IGNORE_LABEL


def _check_labels(values: np.ndarray, *, num_classes: int, ignore_label: int, what: str) -> None:
    if values.size == 0:
        return
    if values.dtype.kind not in "iub":
        raise TypeError(f"{what}: expected an integer array of class ids, got dtype {values.dtype}")
    bad = (values < 0) | ((values >= num_classes) & (values != ignore_label))
    if bad.any():
        found = np.unique(values[bad])
        raise ValueError(
            f"{what}: class ids {found[:10].tolist()} are outside 0..{num_classes - 1} "
            f"(num_classes={num_classes}; {ignore_label} = ignore is the only other value allowed)"
        )


def checked_pair(
    pred: np.ndarray, gt: np.ndarray, *, num_classes: int, ignore_label: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` as arrays of the same shape holding only ids ``0..C-1`` or ``ignore_label``.

    Raises ValueError naming the side and the offending values otherwise (TypeError for
    non-integer arrays).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    _check_labels(gt, num_classes=num_classes, ignore_label=ignore_label, what="ground truth")
    _check_labels(pred, num_classes=num_classes, ignore_label=ignore_label, what="prediction")
    return pred, gt


def confusion_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    where: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of one image: ``(matrix int64 C x C, missed int64 C)``.

    ``where`` (bool H x W) restricts the count to some pixels. Raises ValueError
    naming the offending value for ids outside ``0..C-1`` other than ``ignore_label``.
    """
    pred, gt = checked_pair(pred, gt, num_classes=num_classes, ignore_label=ignore_label)
    valid = gt != ignore_label
    if where is not None:
        if where.shape != gt.shape:
            raise ValueError(f"where: shape {where.shape} differs from ground-truth shape {gt.shape}")
        valid &= where
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    no_pred = p == ignore_label
    missed = np.bincount(g[no_pred], minlength=num_classes).astype(np.int64)
    keep = ~no_pred
    flat = np.bincount(g[keep] * num_classes + p[keep], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64), missed


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den == 0 (and no warning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


class ConfusionMatrix:
    """A ``num_classes x num_classes`` int64 confusion matrix (rows = ground truth).

    >>> cm = ConfusionMatrix(2)
    >>> cm.update(np.array([[0, 1]]), np.array([[0, 0]]))
    >>> cm.pixel_accuracy()
    0.5
    """

    def __init__(self, num_classes: int, *, ignore_label: int = IGNORE_LABEL) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.missed = np.zeros(self.num_classes, dtype=np.int64)

    @classmethod
    def from_counts(
        cls, matrix: np.ndarray, missed: np.ndarray | None = None, *, ignore_label: int = IGNORE_LABEL
    ) -> ConfusionMatrix:
        """Wrap counts computed elsewhere (e.g. by ``confusion_counts`` in a Ray task)."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix: expected a square 2-D array, got shape {matrix.shape}")
        cm = cls(matrix.shape[0], ignore_label=ignore_label)
        cm.matrix += matrix.astype(np.int64)
        if missed is not None:
            cm.missed += np.asarray(missed, dtype=np.int64).reshape(cm.num_classes)
        return cm

    def update(self, pred: np.ndarray, gt: np.ndarray, *, where: np.ndarray | None = None) -> None:
        """Add one image (integer arrays of the same shape; gt == 255 is ignored)."""
        matrix, missed = confusion_counts(
            pred, gt, num_classes=self.num_classes, ignore_label=self.ignore_label, where=where
        )
        self.matrix += matrix
        self.missed += missed

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts in place; returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"merge: num_classes {other.num_classes} differs from {self.num_classes}")
        self.matrix += other.matrix
        self.missed += other.missed
        return self

    # -- metrics -----------------------------------------------------------
    @property
    def gt_pixels(self) -> np.ndarray:
        """Counted ground-truth pixels per class."""
        return self.matrix.sum(axis=1) + self.missed

    @property
    def total(self) -> int:
        return int(self.matrix.sum() + self.missed.sum())

    def iou(self) -> np.ndarray:
        """Per-class intersection over union; NaN for classes absent from both gt and prediction."""
        tp = np.diag(self.matrix)
        return _divide(tp, self.gt_pixels + self.matrix.sum(axis=0) - tp)

    def miou(self) -> float:
        """Mean IoU over the classes that occur (NaN IoUs are skipped)."""
        return _nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels (NaN when nothing was counted)."""
        total = self.total
        return float(np.trace(self.matrix) / total) if total else math.nan

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall (NaN for classes absent from the ground truth)."""
        return _divide(np.diag(self.matrix), self.gt_pixels)

    def mean_class_accuracy(self) -> float:
        return _nanmean(self.class_accuracy())

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-ready summary (NaN written as None)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names: expected {self.num_classes} names, got {len(names)}")
        return {
            "num_classes": self.num_classes,
            "pixels": self.total,
            "miou": _json_float(self.miou()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "mean_class_accuracy": _json_float(self.mean_class_accuracy()),
            "iou": {n: _json_float(v) for n, v in zip(names, self.iou())},
            "class_accuracy": {n: _json_float(v) for n, v in zip(names, self.class_accuracy())},
            "confusion_matrix": self.matrix.tolist(),
            "missed": self.missed.tolist(),
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total}, miou={self.miou():.4f})"
