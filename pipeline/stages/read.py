"""Index rows -> ``data`` (the image's bytes): one GET per image, a byte range per tar member,
one read of a row group's bytes column per byte-manifest row group in the batch.

An object storage cannot deliver is a ``storage`` error row (retried by the next run).
"""

from __future__ import annotations

import time
from collections import defaultdict

import pyarrow as pa

from pipeline.io.sources import fetch_bytes, read_manifest_group, split_member_uri
from pipeline.io.uris import ERROR_STORAGE, InputError, S3Settings, _describe, storage_errors
from pipeline.stages.common import READ_COLUMNS, fail, node_id, is_pending, to_rows, to_table


class ReadBytes:
    """image_id, source_uri (+ locator) -> + data."""

    def __init__(self, *, s3: S3Settings | None = None, bytes_column: str = "bytes") -> None:
        self.s3, self.bytes_column = s3 or S3Settings(), bytes_column

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
        for row in rows:
            row.update(data=None, node_read=node, t_read=0.0)
            if not is_pending(row):
                continue
            if row.get("row_group") is not None:
                groups[(row["source_uri"].split("#", 1)[0], int(row["row_group"]))].append(row)
                continue
            start = time.perf_counter()
            try:
                if row.get("byte_offset") is not None:
                    shard, _ = split_member_uri(row["source_uri"])
                    row["data"] = fetch_bytes(shard, s3=self.s3, start=int(row["byte_offset"]),
                                              size=int(row["byte_size"]))
                else:
                    row["data"] = fetch_bytes(row["source_uri"], s3=self.s3)
            except (InputError, EOFError, *storage_errors()) as exc:
                fail(row, f"cannot read: {_describe(exc)}", kind=ERROR_STORAGE)
            row["t_read"] = time.perf_counter() - start
        for (manifest, group), members in groups.items():
            self._read_group(manifest, group, members)
        return to_table(rows, READ_COLUMNS)

    def _read_group(self, manifest: str, group: int, rows: list[dict]) -> None:
        start = time.perf_counter()
        try:
            column = read_manifest_group(manifest, group, [self.bytes_column], s3=self.s3).column(self.bytes_column)
        except (InputError, KeyError, *storage_errors()) as exc:
            for row in rows:
                fail(row, f"cannot read manifest {manifest} (row group {group}): {_describe(exc)}",
                     kind=ERROR_STORAGE)
            return
        per_row = (time.perf_counter() - start) / len(rows)
        for row in rows:
            data = column[int(row["row_index"])].as_py()
            if isinstance(data, str):
                data = data.encode("latin-1")
            row["data"], row["t_read"] = data, per_row
            if data is None:
                fail(row, f"manifest column {self.bytes_column!r} is null")
