"""Decoded pixels -> coarse fp16 logits at 1/8, batched and padded, on a GPU (or CPU) actor."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.devices import local_weights, resolve_device
from pipeline.io.uris import S3Settings, _describe
from pipeline.stages.common import NETWORK_COLUMNS, each_row, fail, node_id, is_pending, to_rows, to_table
from pipeline.stages.decode import pixels_of


class NetworkStage:
    """pixels -> coarse fp16 logits (C x coarse_size(H) x coarse_size(W)), batched and padded.

    Preprocessing is :func:`pipeline.inference.record_logits` (the checkpoint's
    record: input size, mean, channel order; larger images shrunk for the network,
    scores resampled to their full-size grid). A batch whose forward pass fails is
    retried one image at a time, so only the image that fails becomes an error row.
    """

    def __init__(self, *, weights: str, s3: S3Settings | None = None, device: str = "auto", threads: int = 0) -> None:
        import torch

        from pipeline.weights import load_checkpoint

        self.device = resolve_device(device)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.model, self.record = load_checkpoint(local_weights(weights, s3=s3), map_location=self.device)

    def forward(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Coarse fp16 logits for full-size RGB images (one padded forward pass)."""
        import torch

        from pipeline.inference import record_logits

        scores = record_logits(self.model, self.record, images, device=self.device, dtype=torch.float16)
        return [s.numpy() for s in scores]

    def _release(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending = [r for r in rows if is_pending(r)]
        results = each_row(lambda some: self.forward([pixels_of(r) for r in some]), pending,
                           after_failure=self._release)
        for row, scores in zip(pending, results, strict=True):
            if isinstance(scores, BaseException):
                fail(row, f"network failed: {_describe(scores)}")
            else:
                row["logits"] = scores.tobytes()
        per_image = (time.perf_counter() - start) / max(len(pending), 1)
        for row in rows:
            row.update(node_network=node, num_classes=self.record.num_classes, model_sha256=self.record.sha256)
            row["t_network"] = per_image if is_pending(row) else 0.0
        return to_table(rows, NETWORK_COLUMNS)
