"""Where everything goes under ``--output``, the segments schema, and writing files whole.

Layout::

    masks/<image_id>.png               palette PNG, the input's size after EXIF orientation
    confidence/<image_id>.png          with output.confidence: the chosen class's marginal, 8-bit (255 = 1.0)
    segments/part-<run>-<digest>.parquet   rows committed during a run (one file per write batch)
    segments/compact-<digest>.parquet  the same rows, compacted after the run (``pipeline.outputs.compaction``)
    _index/summary-*.parquet           derived: one summary row per segments file (``pipeline.outputs.index``)
    class_stats.parquet                one row per class over all segment rows (merged from the summaries)
    _run.json                          resolved configuration, counts, throughput, times

Plain Parquet under ``segments/`` (:data:`SEGMENT_SCHEMA`) is the source of truth
for what is done; everything else is derived from it. Every file appears whole or
not at all (temporary name + rename locally, one PUT on object stores). A
segments file written during a run is named after the run and the digest of the
image ids it holds, so a retried write task replaces its own file instead of adding
a second copy.

Readers see one row per image id (:func:`dedupe`): an ``ok`` row wins, else the
latest ``written_at`` (then the later file). A rerun skips every input whose row is
``ok`` or a ``data`` error; ``storage`` and ``transient`` errors (the object could not be read or the
mask not written) are retried, and the new row supersedes the old one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
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
from PIL import Image

from pipeline.constants import flat_palette
from pipeline.io.uris import (
    ERROR_DATA,
    ERROR_STORAGE,
    ERROR_TRANSIENT,
    RETRY_KINDS,
    InputError,
    S3Settings,
    _describe,
    filesystem_for,
    join_uri,
    storage_errors,
    write_bytes_atomic,
)

MASKS_DIR = "masks"
CONFIDENCE_DIR = "confidence"
SEGMENTS_DIR = "segments"
CLASS_STATS_FILE = "class_stats.parquet"
RUN_FILE = "_run.json"
INDEX_DIR = "_index"
#: Footer keys of a segments file: rows that supersede an earlier storage error; files a compacted file replaces.
RETRIED_METADATA_KEY = b"deeplab_batch.retried"
REPLACES_METADATA_KEY = b"deeplab_batch.replaces"
CONFIG_METADATA_KEY = b"deeplab_batch.config"
MODEL_METADATA_KEY = b"deeplab_batch.model"
STAGES: tuple[str, ...] = ("read", "decode", "network", "crf", "write")
STATUS_OK = "ok"
STATUS_ERROR = "error"
ERROR_KINDS: tuple[str, ...] = (ERROR_DATA, ERROR_STORAGE, ERROR_TRANSIENT)
READ_THREADS = 16  # segments files read in parallel

CRF_TYPE = pa.struct(
    [
        ("backend", pa.string()),
        ("w1", pa.float64()),
        ("sigma_alpha", pa.float64()),
        ("sigma_beta", pa.float64()),
        ("w2", pa.float64()),
        ("sigma_gamma", pa.float64()),
        ("iterations", pa.int32()),
        ("normalization", pa.string()),
        ("resolution", pa.string()),  # working resolution (crf.resolution); null in rows of older releases = full
    ]
)
TIMINGS_TYPE = pa.struct([(f"{stage}_s", pa.float64()) for stage in STAGES])
NODES_TYPE = pa.struct([(stage, pa.string()) for stage in STAGES])

#: One row per input image.
SEGMENT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),  # "ok" | "error"
        ("error", pa.string()),  # null, or a one-line reason
        ("error_kind", pa.string()),  # null, "data" (final), "storage" or "transient" (retried by the next run)
        ("width", pa.int32()),  # after EXIF orientation; null when not decoded
        ("height", pa.int32()),
        ("mask_uri", pa.string()),
        ("class_pixels", pa.list_(pa.int64())),  # one per class
        ("class_mean_confidence", pa.list_(pa.float32())),  # one per class; NaN where the class is absent
        ("mean_confidence", pa.float32()),  # mean marginal of the chosen class over the image (null: older rows)
        ("confident_fraction", pa.float32()),  # share of pixels at or above output.training.ignore_below
        ("mean_entropy", pa.float32()),  # mean entropy of the marginals (nats), at the working resolution
        ("crf_agreement", pa.float32()),  # mean IoU of the network's and the CRF's labels (1.0 without CRF)
        ("ignored_pixels", pa.int64()),  # pixels below output.training.ignore_below
        ("confidence_uri", pa.string()),  # confidence/<image_id>.png with output.confidence, else null
        ("model_sha256", pa.string()),
        ("crf", CRF_TYPE),  # parameters used, or null without CRF
        ("timings", TIMINGS_TYPE),  # seconds spent per image in each stage
        ("nodes", NODES_TYPE),  # Ray node id that ran each stage
        ("run_id", pa.string()),  # the run that wrote the row
        ("written_at", pa.timestamp("us", tz="UTC")),  # when the row was committed (latest wins)
    ]
)

CLASS_STATS_SCHEMA = pa.schema(
    [
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("pixels", pa.int64()),
        ("images_present", pa.int64()),
        ("mean_fraction", pa.float64()),  # mean over ok images of (class pixels / image pixels)
    ]
)


def one_line(text: str, *, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def encode_label_png(
    labels: np.ndarray, *, palette: Sequence[Sequence[int]] | Sequence[int] | None = None, optimize: bool = False
) -> bytes:
    """A palette PNG of a uint8 H x W label map.

    ``palette``: RGB triples (padded with VOC's colours), a flat list of up to 768
    values, or None for the VOC palette. The one PNG encoder of label maps
    (``pipeline.data.voc.write_label_png`` writes its bytes).
    """
    labels = np.asarray(labels)
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"labels: expected uint8 H x W, got {labels.dtype} with shape {labels.shape}")
    if palette is not None and len(palette) and not isinstance(palette[0], (int, np.integer)):
        flat = flat_palette([tuple(c) for c in palette])
    elif palette:
        flat = [int(v) for v in palette]
    else:
        flat = flat_palette()
    image = Image.fromarray(np.ascontiguousarray(labels), mode="L")
    image.putpalette(flat)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def segments_file_name(image_ids: Iterable[str], *, run_id: str = "") -> str:
    """``part-<run>-<digest>.parquet``: in one run, the same set of ids always gives the same name.

    A retried write task replaces its own file; another run's file never has the same
    name, so a compacted file's list of replaced files never names a later file.
    """
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()[:20]
    return f"part-{run_id}-{digest}.parquet" if run_id else f"part-{digest}.parquet"


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validate rows against :data:`SEGMENT_SCHEMA` (missing keys are null)."""
    columns = {name: [row.get(name) for row in rows] for name in SEGMENT_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SEGMENT_SCHEMA)


def parquet_bytes(table: pa.Table, *, metadata: Mapping[bytes, bytes] | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class OutputLayout:
    """Where things go under one ``--output``."""

    uri: str
    s3: S3Settings = field(default_factory=S3Settings)

    def path(self, *parts: str) -> str:
        return join_uri(self.uri, *parts)

    def mask_uri(self, image_id: str) -> str:
        return self.path(MASKS_DIR, f"{image_id}.png")

    def write(self, relative: str, data: bytes) -> str:
        uri = self.path(relative)
        fs, path = filesystem_for(uri, s3=self.s3)
        write_bytes_atomic(fs, path, data)
        return uri

    def write_mask(self, image_id: str, labels: np.ndarray, *, palette=None) -> str:
        return self.write(f"{MASKS_DIR}/{image_id}.png", encode_label_png(labels, palette=palette))

    def write_confidence(self, image_id: str, confidence: np.ndarray) -> str:
        """``confidence/<image_id>.png``: the chosen class's marginal as 8-bit grayscale (255 = 1.0)."""
        if confidence.dtype != np.uint8 or confidence.ndim != 2:
            raise ValueError(f"confidence: expected uint8 H x W, got {confidence.dtype} {confidence.shape}")
        buffer = io.BytesIO()
        Image.fromarray(confidence, mode="L").save(buffer, format="PNG")
        return self.write(f"{CONFIDENCE_DIR}/{image_id}.png", buffer.getvalue())

    def write_segments(
        self, rows: Sequence[Mapping[str, Any]], *, metadata: Mapping[bytes, bytes] | None = None, retried: int = 0,
        name: str | None = None,
    ) -> str:
        """Commit one segments file holding ``rows``; returns its URI.

        ``retried``: how many of the rows supersede an earlier ``storage`` error row (kept in the footer).
        ``name``: the file's name, by default :func:`segments_file_name` of the rows' ids and run.
        """
        table = rows_table(rows)
        if name is None:
            run_ids = {r for r in table.column("run_id").to_pylist() if r}
            name = segments_file_name(table.column("image_id").to_pylist(), run_id=min(run_ids) if run_ids else "")
        footer = {**(metadata or {}), RETRIED_METADATA_KEY: str(int(retried)).encode()}
        return self.write(f"{SEGMENTS_DIR}/{name}", parquet_bytes(table, metadata=footer))

    def list_files(self, relative: str, *, suffix: str = ".parquet") -> dict[str, int]:
        """``{name: size}`` of the visible files directly under ``relative`` (one listing, no reads)."""
        fs, path = filesystem_for(self.path(relative), s3=self.s3)
        fs.invalidate_cache(path)  # other processes write here; never trust a cached listing
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "directory" and name.endswith(suffix) and not name.startswith((".", "_")):
                out[name] = int(entry.get("size") or 0)
        return out

    def segment_files(self) -> list[str]:
        """Paths of every segments file present (compacted-away leftovers included; see ``index.live_files``)."""
        fs, path = filesystem_for(self.path(SEGMENTS_DIR), s3=self.s3)
        return [f"{path.rstrip('/')}/{name}" for name in sorted(self.list_files(SEGMENTS_DIR))]

    def read_segments(self, *, columns: Sequence[str] | None = None, deduplicated: bool = True) -> pa.Table:
        """All committed segment rows, one per image id (see :func:`dedupe`) unless ``deduplicated=False``.

        Reads every row into this process: for tests, tools and small outputs; the job
        itself never calls it (resume and statistics are distributed or merged). Files a
        compacted file replaces are left out; columns missing from older files are null.
        """
        fs, _ = filesystem_for(self.path(SEGMENTS_DIR), s3=self.s3)
        wanted = list(columns) if columns else list(SEGMENT_SCHEMA.names)
        for name in DEDUPE_COLUMNS:
            if name not in wanted:
                wanted.append(name)
        schema = pa.schema([SEGMENT_SCHEMA.field(n) for n in wanted])

        def read(path: str) -> pa.Table:
            parquet = pq.ParquetFile(pa.BufferReader(fs.cat_file(path)))
            present = [n for n in wanted if n in parquet.schema_arrow.names]
            table = parquet.read(columns=present)
            for name in wanted:
                if name not in present:
                    table = table.append_column(name, pa.nulls(table.num_rows, type=schema.field(name).type))
            return table.select(wanted).cast(schema)

        from pipeline.outputs.index import live_files

        root = self.segment_files()[0].rsplit("/", 1)[0] if self.segment_files() else ""
        files = [f"{root}/{name}" for name in sorted(live_files(self))]
        with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(files)))) as pool:
            tables = list(pool.map(read, files))  # file order kept: later files win ties
        if not tables:
            return schema.empty_table()
        table = pa.concat_tables(tables)
        return dedupe(table) if deduplicated else table

    def read_json(self, relative: str) -> dict[str, Any] | None:
        fs, path = filesystem_for(self.path(relative), s3=self.s3)
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None


DEDUPE_COLUMNS: tuple[str, ...] = ("image_id", "status", "error_kind", "written_at")


def retry_mask(table: pa.Table) -> pa.Array:
    """True for error rows the next run retries (``error_kind`` in :data:`~pipeline.io.uris.RETRY_KINDS`)."""
    return pc.fill_null(pc.is_in(table.column("error_kind"), value_set=pa.array(RETRY_KINDS)), False)


def done_mask(table: pa.Table) -> pa.Array:
    """True for rows a rerun skips: ``ok``, or an error of a kind that is not retried (``data``)."""
    storage = retry_mask(table)
    ok = pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False)
    return pc.or_(ok, pc.invert(storage))


def dedupe(table: pa.Table) -> pa.Table:
    """One row per image id, in the table's order: an ``ok`` row wins, else the latest ``written_at``.

    A rerun that retries a ``storage`` error commits a second row for that id in a
    new file; this is the view every reader (counts, class_stats, resume) uses.
    Ties (no ``written_at`` in files of older versions) go to the later row.
    """
    n = table.num_rows
    if n == 0:
        return table
    ids = table.column("image_id")
    if pc.count_distinct(ids).as_py() == n:
        return table
    ok = pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False).cast(pa.int8())
    written = table.column("written_at") if "written_at" in table.column_names else pa.nulls(n, pa.int64())
    written = pc.fill_null(written.cast(pa.int64()), np.iinfo(np.int64).min)
    keys = pa.table({"id": ids, "ok": ok, "w": written, "i": pa.array(np.arange(n))})
    order = pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("ok", "descending"),
                                             ("w", "descending"), ("i", "descending")]).to_numpy()
    sorted_ids = ids.take(pa.array(order))
    first = np.ones(n, dtype=bool)
    first[1:] = pc.not_equal(sorted_ids.slice(1), sorted_ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return table.take(pa.array(np.sort(order[first])))


def crf_key(crf: Mapping[str, Any] | None) -> str:
    """The CRF parameters of a row as a comparable string ("none" without CRF; the backend is left out)."""
    if not crf:
        return "none"
    (stored,) = pa.array([dict(crf)], type=CRF_TYPE).to_pylist()  # as a segments row holds it
    stored["resolution"] = stored.get("resolution") or "full"  # older releases refined at full resolution
    return json.dumps({k: v for k, v in stored.items() if k != "backend"}, sort_keys=True)


def write_or_explain(layout: OutputLayout, relative: str, data: bytes) -> str:
    """``layout.write`` with storage failures turned into one clear :class:`InputError`."""
    try:
        return layout.write(relative, data)
    except storage_errors() as exc:
        raise InputError(f"output {layout.path(relative)}: cannot be written ({_describe(exc)})") from exc


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_run_json(layout: OutputLayout, summary: Mapping[str, Any]) -> str:
    """``_run.json``: strict JSON (NaN written as null)."""
    text = json.dumps(json_safe(summary), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
    return write_or_explain(layout, RUN_FILE, text.encode("utf-8"))


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def metadata_for(*, config: Mapping[str, Any], model: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Parquet key-value metadata: the resolved configuration and the model record."""
    return {
        CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True, default=str).encode("utf-8"),
        MODEL_METADATA_KEY: json.dumps(model, sort_keys=True, default=str).encode("utf-8"),
    }
