"""The derived index of an output: one summary row per segments file, merged into statistics.

A *summary* holds what the job needs to know about a file without reading its
rows again: row counts by status, per-class pixel sums, images per class, the sum
of per-image class fractions, the models and CRF settings of its ``ok`` rows, the
rows that superseded an earlier ``storage`` error (``retried``), and, for a
compacted file, the files it replaces. Summaries are *mergeable*: the output's
``class_stats.parquet`` and row totals are their sums, never a loop over rows.

Summaries live in ``_index/summary-*.parquet``. They are derived and keyed by the
segments file's name and size: checking what is covered costs one listing of
``segments/`` and one read of the (few) index files. A file that is not covered
(written by a killed run, by an older release, copied in by a user) is
summarised by reading it once; a missing index is rebuilt the same way. Deleting
``_index/`` is always safe.

Liveness: a compacted file names the files it replaces (in its footer and its
summary). While a killed compaction's inputs are still present, they are not
*live*: every reader here skips them, so no row is seen twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.uris import ERROR_STORAGE, filesystem_for
from pipeline.outputs.layout import (
    retry_mask,
    CLASS_STATS_FILE,
    CLASS_STATS_SCHEMA,
    INDEX_DIR,
    REPLACES_METADATA_KEY,
    RETRIED_METADATA_KEY,
    SEGMENT_SCHEMA,
    SEGMENTS_DIR,
    STATUS_OK,
    OutputLayout,
    crf_key,
    parquet_bytes,
    write_or_explain,
)

COMPACTED_PREFIX = "compact-"
READ_THREADS = 16
#: Index files before they are merged into one.
MAX_INDEX_FILES = 8
#: The columns a summary is computed from.
SUMMARY_SOURCE_COLUMNS = ("status", "error_kind", "width", "height", "class_pixels", "model_sha256", "crf")

SUMMARY_SCHEMA = pa.schema(
    [
        ("file", pa.string()),  # name under segments/
        ("bytes", pa.int64()),  # its size when summarised (a changed size means: summarise again)
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("error_data", pa.int64()),
        ("error_storage", pa.int64()),
        ("retried", pa.int64()),  # rows that supersede an earlier storage error row
        ("num_classes", pa.int32()),  # 0 when the file has no ok row
        ("class_pixels", pa.list_(pa.int64())),
        ("class_images", pa.list_(pa.int64())),
        ("class_fraction_sum", pa.list_(pa.float64())),
        ("models", pa.list_(pa.string())),  # distinct model_sha256 of ok rows
        ("crfs", pa.list_(pa.string())),  # distinct CRF settings (crf_key) of ok rows
        ("replaces", pa.list_(pa.string())),  # files this compacted file replaces, until they are deleted
    ]
)


def summarize_table(
    table: pa.Table, *, file: str, size: int, retried: int = 0, replaces: Sequence[str] = ()
) -> dict[str, Any]:
    """The summary of a segments file's rows (columns :data:`SUMMARY_SOURCE_COLUMNS`; others ignored).

    Raises ValueError when its ``ok`` rows carry different numbers of classes.
    """
    status = table.column("status")
    ok_mask = pc.fill_null(pc.equal(status, STATUS_OK), False)
    storage = retry_mask(table)  # storage and transient errors: both wait for the next run
    rows = table.num_rows
    ok_count = int(pc.sum(ok_mask.cast(pa.int64())).as_py() or 0)
    storage_count = int(pc.sum(pc.and_(pc.invert(ok_mask), storage).cast(pa.int64())).as_py() or 0)
    ok = table.filter(ok_mask)
    pixels = images = fractions = None
    num_classes = 0
    counts = ok.column("class_pixels").combine_chunks() if ok.num_rows else None
    if counts is not None and counts.null_count < len(counts):
        valid = pc.is_valid(counts)
        sizes = np.asarray(pc.list_value_length(counts.filter(valid)).to_numpy(zero_copy_only=False))
        num_classes = int(sizes[0])
        if (sizes != num_classes).any():
            raise OutputStateError(f"segments file {file}: ok rows carry {sorted(set(sizes.tolist()))} class counts: "
                             "the output mixes models with different classes")
        matrix = np.asarray(pc.list_flatten(counts.filter(valid)).to_numpy(zero_copy_only=False),
                            dtype=np.int64).reshape(-1, num_classes)
        area = (np.asarray(ok.filter(valid).column("width").to_numpy(zero_copy_only=False), dtype=np.float64)
                * np.asarray(ok.filter(valid).column("height").to_numpy(zero_copy_only=False), dtype=np.float64))
        keep = np.isfinite(area) & (area > 0)
        pixels = matrix[keep].sum(axis=0)
        images = (matrix[keep] > 0).sum(axis=0)
        fractions = (matrix[keep] / area[keep, None]).sum(axis=0)
    models = sorted(v for v in pc.unique(ok.column("model_sha256")).to_pylist() if v) if ok.num_rows else []
    crfs = sorted({crf_key(v) for v in ok.column("crf").to_pylist()}) if ok.num_rows else []
    return {
        "file": file, "bytes": int(size), "rows": rows, "ok": ok_count,
        "error_data": rows - ok_count - storage_count, "error_storage": storage_count, "retried": int(retried),
        "num_classes": num_classes,
        "class_pixels": [] if pixels is None else pixels.tolist(),
        "class_images": [] if images is None else images.tolist(),
        "class_fraction_sum": [] if fractions is None else fractions.tolist(),
        "models": models, "crfs": crfs, "replaces": sorted(replaces),
    }


def footer_counts(metadata: Mapping[bytes, bytes] | None) -> tuple[int, list[str]]:
    """``(retried, replaces)`` from a segments file's footer (0 and [] for files of older releases)."""
    metadata = metadata or {}
    retried = int(metadata.get(RETRIED_METADATA_KEY, b"0") or 0)
    replaces = json.loads(metadata[REPLACES_METADATA_KEY]) if REPLACES_METADATA_KEY in metadata else []
    return retried, list(replaces)


class OutputStateError(ValueError):
    """The output's files cannot be combined: a corrupt segments file, or rows of models with other classes."""


def summarize_file(layout: OutputLayout, name: str, size: int) -> dict[str, Any]:
    """Read one segments file (only the summary's columns) and summarise it."""
    fs, path = filesystem_for(layout.path(SEGMENTS_DIR, name), s3=layout.s3)
    try:
        parquet = pq.ParquetFile(pa.BufferReader(fs.cat_file(path)))
    except pa.ArrowInvalid as exc:  # written by something else, or damaged: name it rather than crash
        raise OutputStateError(f"segments file {name}: not a readable Parquet file ({exc}); move it aside "
                               "and rerun (its images are processed again)") from exc
    present = [c for c in SUMMARY_SOURCE_COLUMNS if c in parquet.schema_arrow.names]
    table = parquet.read(columns=present)
    for column in SUMMARY_SOURCE_COLUMNS:
        if column not in present:
            table = table.append_column(column, pa.nulls(table.num_rows, SEGMENT_SCHEMA.field(column).type))
    retried, replaces = footer_counts(parquet.schema_arrow.metadata)
    return summarize_table(table, file=name, size=size, retried=retried, replaces=replaces)


def _footer_of(layout: OutputLayout, name: str) -> tuple[list[str], int]:
    """``(files it replaces, rows)`` of a compacted file, from its footer (a footer read, not its rows)."""
    fs, path = filesystem_for(layout.path(SEGMENTS_DIR, name), s3=layout.s3)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        return footer_counts(parquet.schema_arrow.metadata)[1], parquet.metadata.num_rows


@dataclass
class OutputState:
    """What is under ``segments/`` now: the files present, their summaries where known, and which are live."""

    files: dict[str, int] = field(default_factory=dict)  # name -> size, from one listing
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> summary (present files only)
    replaced: set[str] = field(default_factory=set)  # present files a present compacted file replaces
    footer_rows: dict[str, int] = field(default_factory=dict)  # rows of compacted files not yet summarised
    index_files: list[str] = field(default_factory=list)

    @property
    def live(self) -> dict[str, int]:
        return {n: s for n, s in self.files.items() if n not in self.replaced}

    @property
    def uncovered(self) -> dict[str, int]:
        """Live files without a summary (to be read, or compacted, once)."""
        return {n: s for n, s in self.live.items() if n not in self.summaries}

    def live_summaries(self) -> list[dict[str, Any]]:
        return [self.summaries[n] for n in sorted(self.live) if n in self.summaries]


def read_index(layout: OutputLayout) -> tuple[list[dict[str, Any]], list[str]]:
    """Every summary row under ``_index/`` and the index files' names (a missing index is empty)."""
    names = sorted(layout.list_files(INDEX_DIR))
    fs, _ = filesystem_for(layout.path(INDEX_DIR), s3=layout.s3)
    rows: list[dict[str, Any]] = []
    for name in names:
        _, path = filesystem_for(layout.path(INDEX_DIR, name), s3=layout.s3)
        try:
            rows += pq.read_table(pa.BufferReader(fs.cat_file(path))).to_pylist()
        except FileNotFoundError:  # merged away by a concurrent reader's consolidation
            continue
    return rows, names


def load_state(layout: OutputLayout) -> OutputState:
    """List ``segments/``, read the index, and work out which files are live (footers of new compacted files)."""
    state = OutputState(files=layout.list_files(SEGMENTS_DIR))
    rows, state.index_files = read_index(layout)
    for row in rows:
        if state.files.get(row["file"]) == row["bytes"]:
            state.summaries[row["file"]] = row
    unknown = [n for n in state.files if n.startswith(COMPACTED_PREFIX) and n not in state.summaries]
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(unknown)))) as pool:
        footers = list(pool.map(lambda name: _footer_of(layout, name), unknown))
    state.footer_rows = {name: rows for name, (_, rows) in zip(unknown, footers, strict=True)}
    for replaces in [*(s["replaces"] for s in state.summaries.values()), *(r for r, _ in footers)]:
        state.replaced.update(r for r in replaces if r in state.files)
    return state


def live_files(layout: OutputLayout) -> dict[str, int]:
    """``{name: size}`` of the live segments files (those no compacted file replaces)."""
    return load_state(layout).live


def summarize_uncovered(layout: OutputLayout, state: OutputState) -> list[dict[str, Any]]:
    """Summarise the live files the index does not cover (read in parallel); adds them to ``state``."""
    todo = sorted(state.uncovered.items())
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(todo)))) as pool:
        new = list(pool.map(lambda item: summarize_file(layout, *item), todo))
    for summary in new:
        state.summaries[summary["file"]] = summary
    return new


def write_index(layout: OutputLayout, state: OutputState, summaries: Iterable[Mapping[str, Any]]) -> None:
    """Add ``summaries`` to the index; when it has grown past :data:`MAX_INDEX_FILES`, merge it into one file.

    Kill-safe: a new index file is written whole before older ones are deleted, and
    overlapping files hold identical rows for the same segments file.
    """
    summaries = list(summaries)
    merge = len(state.index_files) + (1 if summaries else 0) > MAX_INDEX_FILES
    if merge:
        summaries = state.live_summaries()
    if not summaries:
        return
    table = pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)
    digest = hashlib.sha1("\n".join(f"{s['file']}:{s['bytes']}" for s in summaries).encode()).hexdigest()[:20]
    name = f"summary-{digest}.parquet"
    write_or_explain(layout, f"{INDEX_DIR}/{name}", parquet_bytes(table))
    if merge:
        fs, _ = filesystem_for(layout.path(INDEX_DIR), s3=layout.s3)
        for old in state.index_files:
            if old != name:
                _, path = filesystem_for(layout.path(INDEX_DIR, old), s3=layout.s3)
                fs.rm_file(path)
        state.index_files = [name]
    else:
        state.index_files.append(name)


@dataclass(frozen=True)
class Totals:
    """Row counts of an output, merged from its summaries (one row per image: superseded rows left out)."""

    rows: int
    ok: int
    error: int
    pending_retry: int

    def to_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "ok": self.ok, "error": self.error, "pending_retry": self.pending_retry}


def merge_totals(summaries: Iterable[Mapping[str, Any]]) -> Totals:
    """Each retried row supersedes exactly one earlier storage error row of the same image."""
    rows = ok = data = storage = retried = 0
    for s in summaries:
        rows += s["rows"]
        ok += s["ok"]
        data += s["error_data"]
        storage += s["error_storage"]
        retried += s["retried"]
    pending = max(storage - retried, 0)
    return Totals(rows=rows - retried, ok=ok, error=data + pending, pending_retry=pending)


def merge_class_stats(summaries: Iterable[Mapping[str, Any]], *, class_names: Sequence[str]) -> pa.Table:
    """Per-class totals (:data:`CLASS_STATS_SCHEMA`) over the ``ok`` rows the summaries cover.

    Raises ValueError when a file's rows carry another number of classes than ``class_names``.
    """
    num_classes = len(class_names)
    pixels = np.zeros(num_classes, dtype=np.int64)
    images_present = np.zeros(num_classes, dtype=np.int64)
    fraction_sum = np.zeros(num_classes, dtype=np.float64)
    images = 0
    for s in summaries:
        if not s["num_classes"]:
            continue
        if s["num_classes"] != num_classes:
            raise OutputStateError(
                f"class_stats: segments file {s['file']} has {s['num_classes']} class counts, expected "
                f"{num_classes} ({', '.join(class_names[:4])}{', ...' if num_classes > 4 else ''}): the output "
                "mixes models with different classes"
            )
        pixels += np.asarray(s["class_pixels"], dtype=np.int64)
        images_present += np.asarray(s["class_images"], dtype=np.int64)
        fraction_sum += np.asarray(s["class_fraction_sum"], dtype=np.float64)
        images += s["ok"]
    mean_fraction = fraction_sum / images if images else np.full(num_classes, math.nan)
    return pa.Table.from_pydict(
        {
            "class_id": list(range(num_classes)),
            "class_name": list(class_names),
            "pixels": pixels.tolist(),
            "images_present": images_present.tolist(),
            "mean_fraction": mean_fraction.tolist(),
        },
        schema=CLASS_STATS_SCHEMA,
    )


def class_stats(table: pa.Table, *, class_names: Sequence[str]) -> pa.Table:
    """Per-class totals over the ``ok`` rows of one table of segment rows (a one-file merge)."""
    return merge_class_stats([summarize_table(table, file="<rows>", size=0)], class_names=class_names)


def write_class_stats(
    layout: OutputLayout, summaries: Iterable[Mapping[str, Any]], *, class_names: Sequence[str], metadata=None
) -> pa.Table:
    """``class_stats.parquet`` merged from ``summaries``.

    Raises :class:`~pipeline.io.uris.InputError` when the file cannot be written,
    ValueError when summaries carry a different number of classes.
    """
    stats = merge_class_stats(summaries, class_names=class_names)
    write_or_explain(layout, CLASS_STATS_FILE, parquet_bytes(stats, metadata=metadata))
    return stats


def prior_settings(summaries: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Distinct ``model_sha256`` and CRF settings of the ``ok`` rows, with the number of files holding each."""
    models: dict[str, int] = {}
    crfs: dict[str, int] = {}
    for s in summaries:
        for value in s["models"]:
            models[value] = models.get(value, 0) + 1
        for value in s["crfs"]:
            crfs[value] = crfs.get(value, 0) + 1
    return {"model_sha256": models, "crf": crfs}
