"""Decoded pixels -> coarse fp16 logits at 1/8 (resized or slid over tiles), on a GPU (or CPU) actor."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.devices import local_weights, resolve_device
from pipeline.io.uris import S3Settings, _describe
from pipeline.faults import inject
from pipeline.stages.common import (
    NETWORK_COLUMNS, each_row, fail, failure_kind, is_pending, node_id, to_rows, to_table,
)
from pipeline.stages.decode import pixels_of, pixels_shape


class NetworkStage:
    """pixels -> coarse fp16 logits, and the image at its working resolution for the CRF.

    ``mode="resize"``: preprocessing is :func:`pipeline.inference.record_logits` (the
    checkpoint's record: input size, mean, channel order; a larger image is shrunk for
    the network). ``mode="slide"``: :func:`pipeline.inference.slide_logits` runs the
    network on overlapping ``tile_size`` tiles at native resolution (aerial, medical,
    document scans), ``tile_batch`` tiles at a time. Either way the logits cover the
    row's ``pixels`` on their coarse grid (C x coarse(h) x coarse(w)). When those
    pixels are larger than ``max_side`` (the working resolution,
    :mod:`pipeline.resolution`), image and logits are shrunk to it here, so the CRF
    stage receives a few hundred KB per row, not the native image. A batch whose
    forward pass fails is retried one image at a time, so only the image that fails
    becomes an error row.
    """

    def __init__(
        self, *, weights: str, s3: S3Settings | None = None, device: str = "auto", threads: int = 0,
        mode: str = "resize", tile_size: int = 0, tile_overlap: float = 1 / 3, tile_batch: int = 4,
        max_side: int | None = None,
    ) -> None:
        import torch

        from pipeline.weights import load_checkpoint

        if mode not in ("resize", "slide"):
            raise ValueError(f"network.mode: expected 'resize' or 'slide', got {mode!r}")
        self.mode, self.tile_size, self.tile_overlap, self.tile_batch = mode, tile_size, tile_overlap, tile_batch
        self.max_side = max_side
        self.device = resolve_device(device)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.model, self.record = load_checkpoint(local_weights(weights, s3=s3), map_location=self.device)

    def forward(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(working-resolution image, its coarse fp16 logits) of each RGB image."""
        import torch

        from pipeline.inference import record_logits, slide_logits
        from pipeline.preprocess import coarse_size
        from pipeline.resolution import resample_scores, shrink

        if self.mode == "slide":
            scores = [slide_logits(self.model, self.record, image, tile=self.tile_size, overlap=self.tile_overlap,
                                   batch_size=self.tile_batch, device=self.device) for image in images]
        else:
            scores = record_logits(self.model, self.record, images, device=self.device)
        out = []
        for image, s in zip(images, scores, strict=True):
            work = shrink(image, self.max_side)
            if work is not image:
                s = resample_scores(s, (coarse_size(work.shape[0]), coarse_size(work.shape[1])))
            out.append((work, s.clamp(min=-65504.0, max=65504.0).to(torch.float16).numpy()))
        return out

    def _forward_rows(self, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        inject("network", [r["source_uri"] for r in rows])
        return self.forward([pixels_of(r) for r in rows])

    def _release(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending = [r for r in rows if is_pending(r)]
        results = each_row(self._forward_rows, pending, after_failure=self._release)
        for row, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                fail(row, f"network failed: {_describe(result)}", kind=failure_kind(result))
                continue
            work, scores = result
            if work.shape[:2] != pixels_shape(row):
                row.update(pixels=work.tobytes(), pixels_height=work.shape[0], pixels_width=work.shape[1])
            row["logits"] = scores.tobytes()
        per_image = (time.perf_counter() - start) / max(len(pending), 1)
        for row in rows:
            row.update(node_network=node, num_classes=self.record.num_classes, model_sha256=self.record.sha256)
            row["t_network"] = per_image if is_pending(row) else 0.0
        return to_table(rows, NETWORK_COLUMNS)
