"""Masks -> ``masks/<id>.png``; the rows of a batch -> one committed ``segments/`` file."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.faults import inject
from pipeline.io.uris import ERROR_DATA, ERROR_STORAGE, _describe, storage_errors
from pipeline.outputs import STAGES, STATUS_OK, OutputLayout, utc_now
from pipeline.outputs.layout import segments_file_name
from pipeline.stages.common import (
    QUALITY_COLUMNS,
    RESULT_COLUMNS,
    fail,
    is_pending,
    node_id,
    to_rows,
    to_table,
)
from pipeline.training.store import TrainingStore


class WriteStage:
    """mask -> ``masks/<id>.png``; then all rows of the batch -> one committed ``segments/`` file.

    Masks are written first, the segments file last: a row is visible only once its
    mask is. A mask that cannot be written makes a ``storage`` error row (retried by
    the next run). The file's footer counts the rows that supersede an earlier
    ``storage`` error row (``retry``), for the merged statistics. Returns small per-row
    results (:data:`RESULT_COLUMNS`) for the driver's progress and summary. With
    ``training`` (``segment --training``) the batch's ok images also go to one training
    shard, committed with the segments file (:mod:`pipeline.training.store`), and
    ``lease_guard`` (:class:`pipeline.outputs.lease.LeaseGuard`) is checked before each commit.
    """

    def __init__(
        self,
        *,
        layout: OutputLayout,
        run_id: str,
        palette: Sequence[Sequence[int]] | None = None,
        crf: Mapping[str, Any] | None = None,
        metadata: Mapping[bytes, bytes] | None = None,
        training: TrainingStore | None = None,
        lease_guard: Callable[[], None] | None = None,
    ) -> None:
        self.layout, self.run_id, self.palette = layout, run_id, palette
        self.crf, self.metadata = (dict(crf) if crf else None), metadata
        self.training, self.lease_guard = training, lease_guard

    def segment_row(self, row: Mapping[str, Any], *, written_at=None) -> dict[str, Any]:
        ok = row["status"] == STATUS_OK
        return {
            "image_id": row["image_id"],
            "source_uri": row["source_uri"],
            "status": row["status"],
            "error": row.get("error"),
            "error_kind": None if ok else (row.get("error_kind") or ERROR_DATA),
            "width": row.get("width"),
            "height": row.get("height"),
            "mask_uri": row.get("mask_uri"),
            "class_pixels": row.get("class_pixels") if ok else None,
            "class_mean_confidence": row.get("class_mean_confidence") if ok else None,
            **{name: row.get(name) if ok else None for name in QUALITY_COLUMNS},
            "confidence_uri": row.get("confidence_uri") if ok else None,
            "model_sha256": row.get("model_sha256"),
            "crf": self.crf if ok else None,
            "timings": {f"{s}_s": row.get(f"t_{s}") for s in STAGES},
            "nodes": {s: row.get(f"node_{s}") for s in STAGES},
            "run_id": self.run_id,
            "written_at": written_at or utc_now(),
        }

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        for row in rows:
            start = time.perf_counter()
            row.update(node_write=node, mask_uri=None, confidence_uri=None)
            if is_pending(row):
                shape = (row["height"], row["width"])
                labels = np.frombuffer(row["mask"], dtype=np.uint8).reshape(shape)
                try:
                    if row.get("confidence") is not None:  # before the mask: a row is visible once its mask is
                        row["confidence_uri"] = self.layout.write_confidence(
                            row["image_id"], np.frombuffer(row["confidence"], dtype=np.uint8).reshape(shape))
                    row["mask_uri"] = self.layout.write_mask(row["image_id"], labels, palette=self.palette)
                except storage_errors() as exc:
                    fail(row, f"cannot write mask: {_describe(exc)}", kind=ERROR_STORAGE)
            row["t_write"] = time.perf_counter() - start
        if rows:
            name = segments_file_name([r["image_id"] for r in rows], run_id=self.run_id)
            shard = self._pending_shard(rows, name) if self.training is not None else None
            self._commit(rows, name)
            if shard is not None:  # the rows are committed: their shard becomes visible
                inject("publish", [r["source_uri"] for r in rows])
                try:
                    self.training.publish(shard)
                except FileNotFoundError as exc:  # removed from _pending/ before it was published
                    self._uncommit(rows, name, f"the training shard was removed before it was published ({exc})")
            for row in rows:
                row["segments_file"] = name
        return to_table(rows, RESULT_COLUMNS)

    def _commit(self, rows: list[dict[str, Any]], name: str) -> None:
        """The segments file ``name`` holding ``rows``: the commit point of the batch."""
        if self.lease_guard is not None:
            self.lease_guard()  # LeaseLost: another run may have taken the output over; commit nothing
        written_at = utc_now()
        retried = sum(1 for r in rows if r.get("retry"))
        self.layout.write_segments([self.segment_row(r, written_at=written_at) for r in rows],
                                   metadata=self.metadata, retried=retried, name=name)

    def _uncommit(self, rows: list[dict[str, Any]], name: str, reason: str) -> None:
        """The batch's ok rows become ``storage`` errors (the next run does them again, and shards them)."""
        for row in rows:
            if is_pending(row):
                fail(row, reason, kind=ERROR_STORAGE)
                row.update(mask_uri=None, confidence_uri=None)
        self._commit(rows, name)

    def _pending_shard(self, rows: list[dict[str, Any]], segments_file: str) -> str | None:
        """The training shard of the rows whose mask is written, under ``training/_pending/`` (steps of
        ``pipeline.training.store``); None when there are none. A shard that cannot be written makes
        those rows ``storage`` errors: the next run does them again, and no image is lost or doubled.
        Without a shard, one an earlier attempt of this task left under the same name is removed."""
        written = [r for r in rows if r.get("mask_uri")]
        if written:
            try:
                name = self.training.write_pending(segments_file, [self.training.sample(r) for r in written])
                inject("shard", [r["source_uri"] for r in written])
                return name
            except storage_errors() as exc:
                for row in written:
                    fail(row, f"cannot write the training shard: {_describe(exc)}", kind=ERROR_STORAGE)
                    row.update(mask_uri=None, confidence_uri=None)
        self.training.discard(segments_file)  # a re-run task's rows now without a shard: no stale one may stay
        return None
