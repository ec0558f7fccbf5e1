"""Inputs -> index rows (``source_uri``, the readable part of the id, where the bytes are): listing, manifests, shards.

Thin callables over :mod:`pipeline.io.sources`, one unit of work per call (a page
of a listing, a batch of manifest cells, one row group); each adds what it saw to
the run's tally (``inputs``; unreadable locations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.sources import (
    IMAGE_EXTENSIONS,
    index_files,
    index_manifest_group,
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
    """A batch of a URI manifest's ``uri_column`` -> index rows (relative URIs against the manifest's folder).

    ``bases``: the folder of each manifest, by the ``path`` Ray's reader gives its rows.
    Cells with a scheme (``s3://...``) pass through as they are, column at a time;
    only local paths and relative cells are resolved one by one.
    """

    def __init__(self, *, bases: dict[str, str], uri_column: str = "uri", tally: Any = None) -> None:
        self.bases, self.uri_column = dict(bases), uri_column
        self.tally = tally if tally is not None else RunTally()

    def __call__(self, batch) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
        values = pc.cast(table.column(self.uri_column), pa.string())
        keep = pc.and_(pc.is_valid(values), pc.not_equal(values, ""))
        local = pc.and_(keep, pc.invert(pc.fill_null(pc.match_substring(values, "://"), False)))
        uris = values.combine_chunks()
        todo = pc.indices_nonzero(local).to_pylist()  # local paths and relative cells only
        if todo:
            default = next(iter(self.bases.values()))
            paths = table.column("path").take(todo).to_pylist() if "path" in table.column_names \
                else [None] * len(todo)
            cells = uris.take(todo).to_pylist()
            resolved = [resolve_manifest_uri(cell, base=self.bases.get(path, default))
                        for cell, path in zip(cells, paths, strict=True)]
            mask = np.zeros(len(uris), dtype=bool)
            mask[todo] = True
            uris = pc.replace_with_mask(uris, pa.array(mask), pa.array(resolved, type=pa.string()))
        uris = uris.filter(keep)
        n = len(uris)
        columns = {name: pa.nulls(n, COLUMN_TYPES[name]) for name in INDEX_COLUMNS}
        columns["source_uri"] = uris
        columns["status"] = pa.repeat(pa.scalar("ok", pa.string()), n)
        self.tally.add(inputs=n)
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
        out = []
        for part in to_rows(batch):
            manifest, group = part["manifest_uri"], int(part["row_group"])
            try:
                rows = index_manifest_group(manifest, group, s3=self.s3, bytes_column=self.bytes_column,
                                            key_column=self.key_column)
            except (InputError, *storage_errors()) as exc:
                self.tally.note_unread(f"{manifest} (row group {group})", f"cannot read manifest: {_describe(exc)}")
                continue
            out += rows
        self.tally.add(inputs=len(out))
        return to_table(out, INDEX_COLUMNS)
