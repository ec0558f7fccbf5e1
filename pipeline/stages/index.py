"""Inputs -> index rows (``source_uri``, the readable part of the id, where the bytes are): listing, manifests, shards.

Thin callables over :mod:`pipeline.io.sources`, one unit of work per call (a page
of a listing, a batch of manifest cells, one row group); each adds what it saw to
the run's tally (``inputs``; unreadable locations).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.sources import (
    IMAGE_EXTENSIONS,
    index_files,
    index_manifest_group,
    read_manifest_group,
    resolve_manifest_uri,
    walk_prefix,
)
from pipeline.io.uris import InputError, S3Settings, _describe, storage_errors
from pipeline.stages.common import COLUMN_TYPES, INDEX_COLUMNS, to_rows, to_table
from pipeline.stages.tally import RunTally


class ListPrefixes:
    """``prefix`` -> pages of ``source_uri`` (every file under each prefix, one folder at a time)."""

    def __init__(self, *, s3: S3Settings | None = None) -> None:
        self.s3 = s3 or S3Settings()

    def __call__(self, batch):
        for row in to_rows(batch):
            for page in walk_prefix(row["prefix"], s3=self.s3):
                yield pa.table({"source_uri": pa.array(page, type=pa.string())})


class IndexFiles:
    """``source_uri`` of listed files -> index rows (tar shards: one per image member, from the headers)."""

    def __init__(
        self, *, root: str, fmt: str = "auto", extensions: Sequence[str] = IMAGE_EXTENSIONS,
        s3: S3Settings | None = None, tally: Any = None,
    ) -> None:
        self.root, self.fmt, self.extensions = root, fmt, tuple(extensions)
        self.s3, self.tally = s3 or S3Settings(), tally if tally is not None else RunTally()

    def __call__(self, batch) -> pa.Table:
        uris = [r["source_uri"] for r in to_rows(batch)]
        rows, unread = index_files(uris, root=self.root, fmt=self.fmt, extensions=self.extensions, s3=self.s3)
        for uri, reason in unread:
            self.tally.note_unread(uri, reason)
        self.tally.add(inputs=len(rows))
        return to_table(rows, INDEX_COLUMNS)


class ManifestUris:
    """``manifest_uri, row_group`` -> index rows of that row group of a URI manifest.

    Relative cells resolve against the manifest's folder. Cells with a scheme
    (``s3://...``) pass through as they are, column at a time; only local paths and
    relative cells are resolved one by one. A row group storage cannot deliver is
    noted in the tally (no rows: the next run retries it).
    """

    def __init__(self, *, s3: S3Settings | None = None, uri_column: str = "uri", tally: Any = None) -> None:
        self.s3, self.uri_column = s3 or S3Settings(), uri_column
        self.tally = tally if tally is not None else RunTally()

    def __call__(self, batch) -> pa.Table:
        return index_row_groups(batch, self.tally, self.index)

    def index(self, manifest: str, group: int) -> pa.Table:
        cells = read_manifest_group(manifest, group, [self.uri_column], s3=self.s3).column(self.uri_column)
        return index_uri_cells(cells, base=posixpath.dirname(manifest))


def index_row_groups(batch, tally: Any, index: Any) -> pa.Table:
    """``index(manifest_uri, row_group) -> table`` over the batch's row-group units, counted in ``tally``.

    A row group storage cannot deliver is noted in the tally (no rows: the next run retries it).
    """
    out = []
    for part in to_rows(batch):
        manifest, group = part["manifest_uri"], int(part["row_group"])
        try:
            out.append(index(manifest, group))
        except (InputError, KeyError, *storage_errors()) as exc:
            tally.note_unread(f"{manifest} (row group {group})", f"cannot read manifest: {_describe(exc)}")
    table = pa.concat_tables(out) if out else to_table([], INDEX_COLUMNS)
    tally.add(inputs=table.num_rows)
    return table


def index_uri_cells(cells: pa.Array | pa.ChunkedArray, *, base: str) -> pa.Table:
    """Index rows for a URI manifest's cells (empty cells skipped; relative ones against ``base``)."""
    values = pc.cast(cells, pa.string())
    keep = pc.and_(pc.is_valid(values), pc.not_equal(values, ""))
    local = pc.and_(keep, pc.invert(pc.fill_null(pc.match_substring(values, "://"), False)))
    uris = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    todo = pc.indices_nonzero(local).to_pylist()  # local paths and relative cells only
    if todo:
        resolved = [resolve_manifest_uri(cell, base=base) for cell in uris.take(todo).to_pylist()]
        mask = np.zeros(len(uris), dtype=bool)
        mask[todo] = True
        uris = pc.replace_with_mask(uris, pa.array(mask), pa.array(resolved, type=pa.string()))
    uris = uris.filter(keep)
    n = len(uris)
    columns = {name: pa.nulls(n, COLUMN_TYPES[name]) for name in INDEX_COLUMNS}
    columns["source_uri"] = uris
    columns["status"] = pa.repeat(pa.scalar("ok", pa.string()), n)
    return pa.table({name: columns[name] for name in INDEX_COLUMNS})


class IndexManifestGroups:
    """``manifest_uri, row_group`` -> index rows of that row group of a byte manifest.

    A row group storage cannot deliver is noted in the tally (no rows: the next run retries it).
    """

    def __init__(
        self, *, s3: S3Settings | None = None, bytes_column: str = "bytes", key_column: str = "key",
        tally: Any = None,
    ) -> None:
        self.s3, self.bytes_column, self.key_column = s3 or S3Settings(), bytes_column, key_column
        self.tally = tally if tally is not None else RunTally()

    def __call__(self, batch) -> pa.Table:
        return index_row_groups(batch, self.tally, self.index)

    def index(self, manifest: str, group: int) -> pa.Table:
        rows = index_manifest_group(manifest, group, s3=self.s3, bytes_column=self.bytes_column,
                                    key_column=self.key_column)
        return to_table(rows, INDEX_COLUMNS)


class ReadSegments:
    """``files`` (names under ``segments/``) -> their ``columns`` (missing ones null), one table per call."""

    def __init__(self, *, layout: Any, columns: Sequence[str]) -> None:
        self.layout, self.columns = layout, list(columns)

    def __call__(self, batch) -> pa.Table:
        import pyarrow.parquet as pq

        from pipeline.io.uris import filesystem_for
        from pipeline.outputs import SEGMENT_SCHEMA, SEGMENTS_DIR

        schema = pa.schema([SEGMENT_SCHEMA.field(c) for c in self.columns])
        tables = []
        for files in (r["files"] for r in to_rows(batch)):
            for name in files:
                fs, path = filesystem_for(self.layout.path(SEGMENTS_DIR, name), s3=self.layout.s3)
                with fs.open(path, "rb") as f:
                    parquet = pq.ParquetFile(f)
                    present = [c for c in self.columns if c in parquet.schema_arrow.names]
                    table = parquet.read(columns=present)
                for c in self.columns:
                    if c not in present:
                        table = table.append_column(c, pa.nulls(table.num_rows, schema.field(c).type))
                tables.append(table.select(self.columns).cast(schema))
        return pa.concat_tables(tables) if tables else schema.empty_table()
