"""Which segments rows an export takes: Ray Data stages over groups of live segments files.

* :class:`DuplicateKeys`: the key and rank of every ``ok`` row (for the distributed count of
  image ids seen twice; ``pipeline.training.export``).
* :class:`SelectRows`: a group of files -> the rows to export (``ok``, one per image id, the
  filters, the split), carrying only the columns the write stage needs; rows of byte manifests
  also carry the manifest's column names, from their segments file's footer (the segment run's
  resolved configuration: ``input.bytes_column``, ``input.key_column``).

A row's *rank* decides which of two ``ok`` rows of one image is exported: the later
``written_at``, then the later file (by name), as ``pipeline.outputs.dedupe`` does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.io.sources import fetch_bytes
from pipeline.io.uris import filesystem_for, storage_errors
from pipeline.outputs.layout import (
    CONFIDENCE_DIR,
    CONFIG_METADATA_KEY,
    SEGMENTS_DIR,
    STATUS_OK,
    OutputLayout,
)
from pipeline.stages.common import to_rows
from pipeline.stages.index import ReadSegments
from pipeline.training.rules import QUALITY_FIELDS, confident_pixels, split_hash
from pipeline.training.samples import SkipImage, read_png_array, source_kind

KEY = "_key"
RANK = "_rank"
SPLIT = "split"
#: Files per rank: ties of ``written_at`` go to the later file (by its position among the live files).
FILES_PER_RANK = 1024
FETCH_THREADS = 8

#: Columns read from the segments files.
READ_COLUMNS: tuple[str, ...] = ("image_id", "source_uri", "status", "width", "height", "class_pixels",
                                 *QUALITY_FIELDS, "confidence_uri", "written_at")
#: Columns of a selected row (the write stage's input).
SELECTED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source_uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("class_pixels", pa.list_(pa.int64())), ("mean_confidence", pa.float32()), ("confident_fraction", pa.float32()),
    ("mean_entropy", pa.float32()), ("crf_agreement", pa.float32()), ("ignored_pixels", pa.int64()),
    ("confidence_uri", pa.string()), (SPLIT, pa.string()),
    # byte-manifest rows: the segment run's input.bytes_column and input.key_column (null for other rows)
    ("bytes_column", pa.string()), ("key_column", pa.string()),
])


def id_keys(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """16-byte BLAKE2b of each image id (the shuffle key of the duplicate count)."""
    return pa.array([hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest() for i in ids.to_pylist()],
                    type=pa.binary(16))


def read_ok_rows(layout: OutputLayout, files: Sequence[str], positions: Sequence[int],
                 columns: Sequence[str] = READ_COLUMNS) -> tuple[pa.Table, int]:
    """The ``ok`` rows (with a mask size and class counts) of ``files`` plus their rank; and the rows read."""
    reader = ReadSegments(layout=layout, columns=list(dict.fromkeys([*columns, "status", "width", "height",
                                                                     "class_pixels", "written_at"])))
    tables, seen = [], 0
    for name, position in zip(files, positions, strict=True):
        table = reader({"files": [[name]]})
        seen += table.num_rows
        ok = pc.and_(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False),
                     pc.and_(pc.is_valid(table.column("class_pixels")),
                             pc.and_(pc.is_valid(table.column("width")), pc.is_valid(table.column("height")))))
        table = table.filter(ok)
        written = pc.fill_null(table.column("written_at").cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        rank = written.astype(np.int64) * FILES_PER_RANK + (position % FILES_PER_RANK)
        tables.append(table.append_column(RANK, pa.array(rank, type=pa.int64())))
    if not tables:
        return pa.table({c: [] for c in [*columns, RANK]}), 0
    return pa.concat_tables(tables), seen


def manifest_columns(metadata: Mapping[bytes, bytes] | None) -> tuple[str, str]:
    """``(input.bytes_column, input.key_column)`` of the run a segments file's footer records (else the defaults)."""
    try:
        config = json.loads((metadata or {})[CONFIG_METADATA_KEY])["input"]
        return str(config["bytes_column"]), str(config["key_column"])
    except (KeyError, TypeError, ValueError):  # a file written without the configuration (older, or by hand)
        return InputConfig.bytes_column, InputConfig.key_column


def with_manifest_columns(layout: OutputLayout, name: str, table: pa.Table) -> pa.Table:
    """``table`` (rows of the segments file ``name``) + ``bytes_column``, ``key_column`` for its byte-manifest rows.

    The footer is read only when some row's source is a byte manifest (``<manifest>.parquet#<key>``).
    """
    manifest = pa.array([source_kind(uri)[0] == "manifest" for uri in table.column("source_uri").to_pylist()],
                        type=pa.bool_())
    columns: tuple[str | None, str | None] = (None, None)
    if pc.any(manifest).as_py():
        fs, path = filesystem_for(layout.path(SEGMENTS_DIR, name), s3=layout.s3)
        with fs.open(path, "rb") as f:
            columns = manifest_columns(pq.ParquetFile(f).schema_arrow.metadata)
    for column, value in zip(("bytes_column", "key_column"), columns, strict=True):
        table = table.append_column(column, pc.if_else(manifest, pa.scalar(value, pa.string()),
                                                       pa.scalar(None, pa.string())))
    return table


class DuplicateKeys:
    """``files, positions`` -> ``_key, _rank`` of their ``ok`` rows."""

    def __init__(self, *, layout: OutputLayout) -> None:
        self.layout = layout

    def __call__(self, batch) -> pa.Table:
        out = []
        for part in to_rows(batch):
            table, _ = read_ok_rows(self.layout, part["files"], part["positions"], columns=("image_id",))
            out.append(pa.table({KEY: id_keys(table.column("image_id")), RANK: table.column(RANK)}))
        return pa.concat_tables(out) if out else pa.table({KEY: pa.array([], pa.binary(16)),
                                                          RANK: pa.array([], pa.int64())})


class SelectRows:
    """``files, positions`` -> the rows to export (:data:`SELECTED_SCHEMA`), with the counts of what was left out.

    ``duplicates``: ``{key: winning rank}`` of the image ids with more than one ``ok`` row
    (usually empty); ``classes``: class ids that must all be present (``class_pixels > 0``);
    ``min_confident_fraction``: with ``ignore_below`` > 0, recounted from the 8-bit
    confidence map at that threshold; with 0, the row's own ``confident_fraction`` (the
    segment run's ``output.training.ignore_below``). ``tally`` receives the counts.
    """

    def __init__(
        self, *, layout: OutputLayout, duplicates: Mapping[bytes, int] | None = None, classes: Sequence[int] = (),
        ignore_below: float = 0.0, min_confident_fraction: float = 0.0, val_fraction: float = 0.0, tally: Any = None,
    ) -> None:
        self.layout, self.duplicates, self.classes = layout, dict(duplicates or {}), list(classes)
        self.ignore_below, self.min_confident_fraction = ignore_below, min_confident_fraction
        self.val_fraction, self.tally = val_fraction, tally

    def __call__(self, batch) -> pa.Table:
        counts = {"rows_read": 0, "ok": 0, "duplicates": 0, "dropped_classes": 0, "dropped_confident_fraction": 0,
                  "dropped_no_confidence_map": 0, "dropped_no_confident_fraction": 0, "dropped_unreadable": 0}
        out = []
        for part in to_rows(batch):
            for name, position in zip(part["files"], part["positions"], strict=True):
                table, seen = read_ok_rows(self.layout, [name], [position])
                counts["rows_read"] += seen
                counts["ok"] += table.num_rows
                table = self._one_per_image(table, counts)
                table = self._filter(table, counts)
                ids = table.column("image_id").to_pylist()
                splits = ["val" if self.val_fraction > 0 and split_hash(i) < self.val_fraction else "train"
                          for i in ids]
                table = table.append_column(SPLIT, pa.array(splits, type=pa.string()))
                table = with_manifest_columns(self.layout, name, table)
                out.append(table.select(SELECTED_SCHEMA.names).cast(SELECTED_SCHEMA))
        if self.tally is not None:
            self.tally.add(**counts)
        return pa.concat_tables(out) if out else SELECTED_SCHEMA.empty_table()

    def _one_per_image(self, table: pa.Table, counts: dict[str, int]) -> pa.Table:
        if not self.duplicates or not table.num_rows:
            return table
        keys = id_keys(table.column("image_id")).to_pylist()
        ranks = table.column(RANK).to_pylist()
        keep = [key not in self.duplicates or self.duplicates[key] == rank for key, rank in zip(keys, ranks,
                                                                                                  strict=True)]
        counts["duplicates"] += keep.count(False)
        return table.filter(pa.array(keep))

    def _filter(self, table: pa.Table, counts: dict[str, int]) -> pa.Table:
        if self.classes and table.num_rows:
            pixels = table.column("class_pixels").combine_chunks()
            sizes = pc.list_value_length(pixels).to_numpy(zero_copy_only=False)
            matrix = np.zeros((table.num_rows, max(self.classes) + 1), dtype=np.int64)
            flat = pc.list_flatten(pixels).to_numpy(zero_copy_only=False)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            for column in range(matrix.shape[1]):
                has = sizes > column
                matrix[has, column] = flat[starts[has] + column]
            keep = np.all(matrix[:, self.classes] > 0, axis=1)
            counts["dropped_classes"] += int((~keep).sum())
            table = table.filter(pa.array(keep))
        if self.ignore_below > 0 and table.num_rows:
            has_map = pc.is_valid(table.column("confidence_uri"))
            counts["dropped_no_confidence_map"] += int(pc.sum(pc.invert(has_map).cast(pa.int64())).as_py() or 0)
            table = table.filter(has_map)
        if self.min_confident_fraction > 0 and table.num_rows:
            if self.ignore_below > 0:
                table = self._recounted(table, counts)
            else:
                fraction = table.column("confident_fraction")
                counts["dropped_no_confident_fraction"] += fraction.null_count
                keep = pc.fill_null(pc.greater_equal(fraction, pa.scalar(self.min_confident_fraction, pa.float32())),
                                    False)
                counts["dropped_confident_fraction"] += int(pc.sum(pc.invert(keep).cast(pa.int64())).as_py() or 0) \
                    - fraction.null_count
                table = table.filter(keep)
        return table

    def _recounted(self, table: pa.Table, counts: dict[str, int]) -> pa.Table:
        """Keep rows whose confident share at ``ignore_below`` (from the 8-bit map) is >= the minimum."""
        ids = table.column("image_id").to_pylist()
        areas = (np.asarray(table.column("width").to_numpy(zero_copy_only=False), dtype=np.int64)
                 * np.asarray(table.column("height").to_numpy(zero_copy_only=False), dtype=np.int64))

        def fraction(item: tuple[str, int]) -> float | None:
            image_id, area = item
            try:
                data = fetch_bytes(self.layout.path(CONFIDENCE_DIR, f"{image_id}.png"), s3=self.layout.s3)
                return confident_pixels(read_png_array(data, what="confidence map"), self.ignore_below) / float(area)
            except (SkipImage, *storage_errors()):
                return None

        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            fractions = list(pool.map(fraction, zip(ids, areas.tolist(), strict=True)))
        keep = [f is not None and f >= self.min_confident_fraction for f in fractions]
        counts["dropped_unreadable"] += sum(f is None for f in fractions)
        counts["dropped_confident_fraction"] += sum(f is not None and f < self.min_confident_fraction
                                                    for f in fractions)
        table = table.filter(pa.array(keep, type=pa.bool_()))
        recounted = [f for f in fractions if f is not None and f >= self.min_confident_fraction]
        index = table.column_names.index("confident_fraction")
        return table.set_column(index, "confident_fraction", pa.array(recounted, type=pa.float32()))
