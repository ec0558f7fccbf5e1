"""Per-image counts and their accumulation over a set, per method ("network", "crf", ...).

A Ray task turns one image into plain count arrays (:func:`image_counts`); the
driver adds them into an :class:`Evaluation`, which computes every metric from
the accumulated matrices and writes the JSON / Parquet outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.constants import IGNORE_LABEL
from pipeline.evaluation.metrics import ConfusionMatrix, confusion_counts
from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH, TrimapConfusion, trimap_counts

#: The methods scored by a model run: bilinear-upsampled network output and its CRF refinement.
NETWORK, CRF, PREDICTIONS = "network", "crf", "predictions"


def image_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    max_width: int = DEFAULT_MAX_WIDTH,
    ignore_label: int = IGNORE_LABEL,
) -> dict[str, np.ndarray]:
    """Counts of one prediction: ``confusion`` (C x C), ``missed`` (C), ``trimap`` (W x C x C+1)."""
    matrix, missed = confusion_counts(pred, gt, num_classes=num_classes, ignore_label=ignore_label)
    bands = trimap_counts(pred, gt, num_classes=num_classes, max_width=max_width, ignore_label=ignore_label)
    return {"confusion": matrix, "missed": missed, "trimap": bands}


@dataclass
class MethodScores:
    """Accumulated counts of one method over the set, plus a small per-image summary."""

    num_classes: int
    max_width: int = DEFAULT_MAX_WIDTH
    confusion: ConfusionMatrix = field(init=False)
    trimap: TrimapConfusion = field(init=False)
    per_image: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.confusion = ConfusionMatrix(self.num_classes)
        self.trimap = TrimapConfusion(self.num_classes, max_width=self.max_width)

    def add(self, image_id: str, counts: dict[str, np.ndarray]) -> None:
        one = ConfusionMatrix.from_counts(counts["confusion"], counts["missed"])
        self.confusion.merge(one)
        self.trimap.add_counts(counts["trimap"])
        self.per_image.append(
            {"image_id": image_id, "pixels": one.total, "pixel_accuracy": one.pixel_accuracy(), "miou": one.miou()}
        )


class Evaluation:
    """All methods of one run: ``scores[method]`` with class names and run metadata."""

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        methods: Sequence[str],
        max_width: int = DEFAULT_MAX_WIDTH,
        meta: dict | None = None,
    ) -> None:
        self.class_names = tuple(class_names)
        self.max_width = int(max_width)
        self.scores = {m: MethodScores(len(self.class_names), max_width=self.max_width) for m in methods}
        self.meta = dict(meta or {})

    @property
    def methods(self) -> list[str]:
        return list(self.scores)

    def add(self, method: str, image_id: str, counts: dict[str, np.ndarray]) -> None:
        if method not in self.scores:
            raise KeyError(f"method: expected one of {self.methods}, got {method!r}")
        self.scores[method].add(image_id, counts)

    @property
    def num_images(self) -> int:
        return max((len(s.per_image) for s in self.scores.values()), default=0)

    # -- outputs -------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict = {"meta": self.meta, "num_images": self.num_images, "class_names": list(self.class_names)}
        out["methods"] = {}
        for method, s in self.scores.items():
            entry = s.confusion.to_dict(self.class_names)
            entry["trimap"] = s.trimap.to_dict()
            out["methods"][method] = entry
        return out

    def summary_lines(self) -> list[str]:
        lines = []
        for method, s in self.scores.items():
            t_acc, t_miou = s.trimap.pixel_accuracy(), s.trimap.miou()
            w = min(5, self.max_width)
            lines.append(
                f"{method:>11}: mIoU {100 * s.confusion.miou():6.2f}  pixel acc {100 * s.confusion.pixel_accuracy():6.2f}"
                f"  mean class acc {100 * s.confusion.mean_class_accuracy():6.2f}"
                f"  | trimap w={w}: acc {100 * t_acc[w - 1]:6.2f} mIoU {100 * t_miou[w - 1]:6.2f}"
            )
        return lines

    def metric_rows(self) -> list[dict]:
        """Long table: one row per (method, metric, class, band width)."""
        rows: list[dict] = []

        def row(method, metric, value, *, class_name=None, band_width=None):
            rows.append(
                {
                    "method": method,
                    "metric": metric,
                    "class_name": class_name,
                    "band_width": band_width,
                    "value": None if value is None or math.isnan(value) else float(value),
                }
            )

        for method, s in self.scores.items():
            cm = s.confusion
            row(method, "miou", cm.miou())
            row(method, "pixel_accuracy", cm.pixel_accuracy())
            row(method, "mean_class_accuracy", cm.mean_class_accuracy())
            for name, iou, acc in zip(self.class_names, cm.iou(), cm.class_accuracy()):
                row(method, "iou", iou, class_name=name)
                row(method, "class_accuracy", acc, class_name=name)
            for w, acc, miou in zip(s.trimap.widths, s.trimap.pixel_accuracy(), s.trimap.miou()):
                row(method, "trimap_pixel_accuracy", acc, band_width=int(w))
                row(method, "trimap_miou", miou, band_width=int(w))
        return rows

    def image_rows(self) -> list[dict]:
        return [
            {"method": method, **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}}
            for method, s in self.scores.items()
            for r in s.per_image
        ]

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``metrics.json``, ``metrics.parquet`` (long table) and ``images.parquet`` (per image)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "metrics.json", "parquet": out / "metrics.parquet", "images": out / "images.parquet"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        meta = {b"deeplab_batch.evaluation": json.dumps(self.meta).encode("utf-8")}
        metric_schema = pa.schema(
            [
                ("method", pa.string()),
                ("metric", pa.string()),
                ("class_name", pa.string()),
                ("band_width", pa.int32()),
                ("value", pa.float64()),
            ],
            metadata=meta,
        )
        pq.write_table(pa.Table.from_pylist(self.metric_rows(), schema=metric_schema), paths["parquet"])
        image_schema = pa.schema(
            [
                ("method", pa.string()),
                ("image_id", pa.string()),
                ("pixels", pa.int64()),
                ("pixel_accuracy", pa.float64()),
                ("miou", pa.float64()),
            ],
            metadata=meta,
        )
        pq.write_table(pa.Table.from_pylist(self.image_rows(), schema=image_schema), paths["images"])
        return paths

