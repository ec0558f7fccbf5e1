"""Compaction: many small segments files -> few large ones, safe to kill at any point.

A run commits one small file per write batch (a kill loses at most the batches
in flight). Compaction then packs the small live files, in name order, into groups
of about ``target_rows`` rows and, per group:

1. writes ``segments/compact-<digest of the group>.parquet`` holding every row of
   the group, whole or not at all, with the group's file names in its footer
   (``deeplab_batch.replaces``) and the sum of their ``retried`` counts;
2. deletes the group's files.

A kill between 1 and 2 leaves the compacted file *and* some of its inputs: the
inputs are then not live (``pipeline.outputs.index``), so no reader here sees a
row twice, and the next compaction deletes them **before** it writes anything,
so a compacted file is never itself compacted while inputs it replaces remain.
A kill before 1 completes leaves only the inputs. Rows are never lost (the
inputs go only after the compacted file is whole) and never doubled.

The rule that keeps this true: a compacted file's summary reaches ``_index/`` (without
the list of files it replaced) only after every one of those files is deleted; a
delete that fails raises before. Until then, the file's footer is what names them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.uris import filesystem_for
from pipeline.outputs.index import (
    COMPACTED_PREFIX,
    OutputState,
    footer_counts,
    summarize_table,
)
from pipeline.outputs.layout import (
    REPLACES_METADATA_KEY,
    RETRIED_METADATA_KEY,
    SEGMENT_SCHEMA,
    SEGMENTS_DIR,
    OutputLayout,
    write_or_explain,
)

#: Rows per compacted file (a 1M-row output is then ~250 files).
DEFAULT_TARGET_ROWS = 4096
ROW_GROUP_ROWS = 1024
#: Bytes per row assumed for files not yet summarised, until a summary says otherwise.
DEFAULT_BYTES_PER_ROW = 400
THREADS = 4


def _estimated_rows(state: OutputState, name: str, bytes_per_row: float) -> int:
    summary = state.summaries.get(name)
    if summary:
        return summary["rows"]
    if name in state.footer_rows:
        return state.footer_rows[name]
    return max(1, int(state.files[name] / bytes_per_row))


def plan_groups(state: OutputState, *, target_rows: int = DEFAULT_TARGET_ROWS) -> list[list[str]]:
    """Groups of small live files (under half the target) to compact, in name order.

    A group closes once it reaches ``target_rows``; the last, smaller group is kept
    when it has two files or more. Rows of files not yet summarised are estimated
    from their size.
    """
    known = [s for s in state.summaries.values() if s["rows"] and s["bytes"]]
    bytes_per_row = (sum(s["bytes"] for s in known) / sum(s["rows"] for s in known)) if known \
        else DEFAULT_BYTES_PER_ROW
    return pack_small({n: _estimated_rows(state, n, bytes_per_row) for n in state.live}, target=target_rows)


def pack_small(sizes: Mapping[str, float], *, target: float) -> list[list[str]]:
    """Groups of the names whose size is under half of ``target``, in name order, to be merged.

    A group closes once its sizes reach ``target``; the last, smaller group is kept when
    it has two names or more. The rule of every compaction (segments files, training shards).
    """
    groups, current, total = [], [], 0.0
    for name in sorted(n for n, size in sizes.items() if size < target / 2):
        current.append(name)
        total += sizes[name]
        if total >= target:
            groups.append(current)
            current, total = [], 0.0
    if len(current) >= 2:
        groups.append(current)
    return groups


def compacted_name(names: Sequence[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(names)).encode("utf-8")).hexdigest()[:20]
    return f"{COMPACTED_PREFIX}{digest}.parquet"


def _read_whole(layout: OutputLayout, name: str) -> tuple[pa.Table, dict[bytes, bytes]]:
    fs, path = filesystem_for(layout.path(SEGMENTS_DIR, name), s3=layout.s3)
    parquet = pq.ParquetFile(pa.BufferReader(fs.cat_file(path)))
    table = parquet.read()
    for field in SEGMENT_SCHEMA:  # files of older releases may lack columns
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, type=field.type))
    return table.select(SEGMENT_SCHEMA.names).cast(SEGMENT_SCHEMA), dict(parquet.schema_arrow.metadata or {})


def compact_group(layout: OutputLayout, names: Sequence[str]) -> dict[str, Any]:
    """Write one compacted file holding every row of ``names``, then delete them; returns its summary."""
    tables, retried, footer = [], 0, {}
    for name in names:
        table, metadata = _read_whole(layout, name)
        tables.append(table)
        retried += footer_counts(metadata)[0]
        footer = footer or {k: v for k, v in metadata.items() if k.startswith(b"deeplab_batch.")}
    table = pa.concat_tables(tables)
    footer.update({RETRIED_METADATA_KEY: str(retried).encode(),
                   REPLACES_METADATA_KEY: json.dumps(sorted(names)).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(footer), sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    data = sink.getvalue().to_pybytes()
    name = compacted_name(names)
    write_or_explain(layout, f"{SEGMENTS_DIR}/{name}", data)
    summary = summarize_table(table, file=name, size=len(data), retried=retried, replaces=names)
    delete_files(layout, names)
    # The inputs are gone: the index need not carry their names (the file's footer still does,
    # for a reader that finds this file before its summary, after a kill before this point).
    return {**summary, "replaces": []}


def delete_files(layout: OutputLayout, names: Iterable[str]) -> None:
    """Delete segments files (already-missing ones are fine)."""
    fs, _ = filesystem_for(layout.path(SEGMENTS_DIR), s3=layout.s3)
    for name in names:
        _, path = filesystem_for(layout.path(SEGMENTS_DIR, name), s3=layout.s3)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def thread_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=max(1, min(THREADS, len(items)))) as pool:
        return list(pool.map(fn, items))


def compact(
    layout: OutputLayout, state: OutputState, *, target_rows: int = DEFAULT_TARGET_ROWS,
    map_fn: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Finish killed compactions, then compact the small live files; updates ``state``, returns new summaries.

    ``map_fn(fn, groups)`` runs the groups (threads by default; Ray tasks in a run).
    """
    if state.replaced:  # leftovers of a killed compaction: gone before anything new is written
        delete_files(layout, sorted(state.replaced))
        for name in state.replaced:
            state.files.pop(name, None)
            state.summaries.pop(name, None)
        state.replaced = set()
    groups = plan_groups(state, target_rows=target_rows)
    if not groups:
        return []
    summaries = (map_fn or thread_map)(lambda names: compact_group(layout, names), groups)
    for names, summary in zip(groups, summaries, strict=True):
        for name in names:
            state.files.pop(name, None)
            state.summaries.pop(name, None)
        state.files[summary["file"]] = summary["bytes"]
        state.summaries[summary["file"]] = summary
    return summaries


def ray_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``map_fn`` for :func:`compact` on a Ray cluster: one small task per group."""
    import ray

    task = ray.remote(num_cpus=0.25, max_retries=3)(fn)
    return ray.get([task.remote(item) for item in items])


__all__ = ["DEFAULT_TARGET_ROWS", "compact", "compact_group", "compacted_name", "pack_small", "plan_groups", "ray_map",
           "thread_map"]

