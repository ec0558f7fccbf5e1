"""Pixels + coarse logits -> mask and per-class statistics: upsample x8, dense CRF (or softmax), argmax."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.devices import resolve_device
from pipeline.io.uris import _describe
from pipeline.stages.common import CRF_COLUMNS, ROW_FAILURES, each_row, fail, node_id, is_pending, to_rows, to_table
from pipeline.stages.decode import pixels_of


def label_statistics(probs: np.ndarray) -> tuple[np.ndarray, list[int], list[float]]:
    """C x H x W probabilities -> (labels uint8 H x W, pixels per class, mean confidence per class; NaN if absent)."""
    num_classes = probs.shape[0]
    labels = probs.argmax(axis=0)
    confidence = np.take_along_axis(probs, labels[None], axis=0)[0].astype(np.float64)
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    sums = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return labels.astype(np.uint8), counts.astype(np.int64).tolist(), mean_conf.astype(np.float32).tolist()


class CRFStage:
    """pixels + coarse logits -> mask: upsample x8, crop to H x W, dense CRF (or softmax), argmax.

    ``params`` is a :class:`pipeline.crf.CRFParams` (or None for no CRF); ``backend`` is
    ``pydensecrf`` (CPU, one image at a time) or ``torch`` (``device`` cpu/cuda/auto,
    batched; a failing batch is retried per image). Images over ``max_pixels`` and
    images the CRF rejects (e.g. pydensecrf's key range on very wide images) become
    error rows.
    """

    def __init__(
        self, *, params=None, backend: str = "pydensecrf", device: str = "cpu", threads: int = 1,
        max_pixels: int | None = None,
    ) -> None:
        import torch

        from pipeline.config import DEFAULT_CRF_MAX_PIXELS

        self.params, self.backend = params, backend
        self.max_pixels = DEFAULT_CRF_MAX_PIXELS if max_pixels is None else max_pixels
        self.device = str(resolve_device(device)) if backend == "torch" else "cpu"
        if threads > 0:
            torch.set_num_threads(threads)

    def probabilities(self, images: Sequence[np.ndarray], logits: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image: upsample the coarse logits to H x W, then CRF marginals (or softmax without CRF)."""
        import torch

        from pipeline.preprocess import upsample_logits

        full = [
            upsample_logits(torch.from_numpy(scores), height=image.shape[0], width=image.shape[1]).float()
            for image, scores in zip(images, logits, strict=True)
        ]
        if self.params is None:
            return [torch.softmax(f, dim=0).numpy() for f in full]
        from pipeline.crf import refine_batch

        return refine_batch(
            list(images),  # writable copies already (pixels_of): pydensecrf fails on read-only arrays
            [np.ascontiguousarray(f.numpy()) for f in full], self.params,
            backend=self.backend, device=self.device,
        )

    def _labels(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, list[int], list[float]]]:
        probs = self.probabilities([image for image, _ in items], [scores for _, scores in items])
        return [label_statistics(p) for p in probs]

    def _release(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def __call__(self, batch) -> pa.Table:
        from pipeline.preprocess import coarse_size

        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending, items = [], []
        for row in (r for r in rows if is_pending(r)):
            pixels = int(row["height"]) * int(row["width"])
            if self.params is not None and pixels > self.max_pixels:
                fail(row, f"too large for the CRF ({row['width']}x{row['height']} = {pixels} pixels > "
                           f"crf.max_pixels {self.max_pixels})")
                continue
            try:
                c, h, w = row["num_classes"], coarse_size(row["height"]), coarse_size(row["width"])
                scores = np.frombuffer(row["logits"], dtype=np.float16).reshape(c, h, w).astype(np.float32)
                items.append((pixels_of(row), scores))
                pending.append(row)
            except ROW_FAILURES as exc:
                fail(row, f"CRF failed: {_describe(exc)}")
        results = each_row(self._labels, items, batched=self.backend == "torch", after_failure=self._release)
        done = []
        for row, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                fail(row, f"CRF failed: {_describe(result)}")
                continue
            labels, counts, confidence = result
            row.update(mask=labels.tobytes(), class_pixels=counts, class_mean_confidence=confidence)
            done.append(row)
        per_image = (time.perf_counter() - start) / max(len(done), 1)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        for row in rows:
            if not is_pending(row):
                row.update(mask=None, class_pixels=None, class_mean_confidence=None)
            row.update(node_crf=node, t_crf=per_image if is_pending(row) else 0.0, crf_rss_mb=rss_mb)
        return to_table(rows, CRF_COLUMNS)
