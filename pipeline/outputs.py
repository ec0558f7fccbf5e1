"""Everything the job writes under ``--output``, and reading it back to resume.

Layout::

    masks/<image_id>.png          palette PNG, the input's size after EXIF orientation
    segments/part-<digest>.parquet  one row per input image (SEGMENT_SCHEMA)
    class_stats.parquet           one row per class over ALL segment rows
    _run.json                     resolved configuration, counts, throughput, times

Every file appears whole or not at all (temporary name + rename locally, one PUT
on object stores). A segments file is named after the digest of the image ids
it holds, so a retried write task replaces its own file instead of adding a
second copy; the image ids found in ``segments/`` are what a rerun skips.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.constants import flat_palette
from pipeline.io.uris import S3Settings, filesystem_for, join_uri, storage_errors, write_bytes_atomic

MASKS_DIR = "masks"
SEGMENTS_DIR = "segments"
CLASS_STATS_FILE = "class_stats.parquet"
RUN_FILE = "_run.json"
CONFIG_METADATA_KEY = b"deeplab_batch.config"
MODEL_METADATA_KEY = b"deeplab_batch.model"
STAGES: tuple[str, ...] = ("read", "decode", "network", "crf", "write")
STATUS_OK = "ok"
STATUS_ERROR = "error"

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
        ("width", pa.int32()),  # after EXIF orientation; null when not decoded
        ("height", pa.int32()),
        ("mask_uri", pa.string()),
        ("class_pixels", pa.list_(pa.int64())),  # one per class
        ("class_mean_confidence", pa.list_(pa.float32())),  # one per class; NaN where the class is absent
        ("model_sha256", pa.string()),
        ("crf", CRF_TYPE),  # parameters used, or null without CRF
        ("timings", TIMINGS_TYPE),  # seconds spent per image in each stage
        ("nodes", NODES_TYPE),  # Ray node id that ran each stage
        ("run_id", pa.string()),  # the run that wrote the row
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


def mask_png(labels: np.ndarray, *, palette: Sequence[Sequence[int]] | None = None) -> bytes:
    """A palette PNG of a uint8 H x W label map (the record's palette, padded with VOC's)."""
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"labels: expected uint8 H x W, got {labels.dtype} with shape {labels.shape}")
    image = Image.fromarray(labels, mode="L")
    image.putpalette(flat_palette([tuple(c) for c in palette] if palette else None))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def segments_file_name(image_ids: Iterable[str]) -> str:
    """``part-<digest>.parquet``: the same set of ids always gives the same name (idempotent retries)."""
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()[:20]
    return f"part-{digest}.parquet"


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
    s3: S3Settings = S3Settings()

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
        return self.write(f"{MASKS_DIR}/{image_id}.png", mask_png(labels, palette=palette))

    def write_segments(self, rows: Sequence[Mapping[str, Any]], *, metadata: Mapping[bytes, bytes] | None = None) -> str:
        """Commit one segments file holding ``rows``; returns its URI."""
        table = rows_table(rows)
        name = segments_file_name(table.column("image_id").to_pylist())
        return self.write(f"{SEGMENTS_DIR}/{name}", parquet_bytes(table, metadata=metadata))

    def segment_files(self) -> list[str]:
        fs, path = filesystem_for(self.path(SEGMENTS_DIR), s3=self.s3)
        fs.invalidate_cache(path)  # other processes write here; never trust a cached listing
        try:
            found = fs.find(path)
        except FileNotFoundError:
            return []
        return sorted(p for p in found if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))

    def read_segments(self, *, columns: Sequence[str] | None = None) -> pa.Table:
        """All committed segment rows (one per image id; a duplicate keeps the ``ok`` row)."""
        fs, _ = filesystem_for(self.path(SEGMENTS_DIR), s3=self.s3)
        wanted = list(columns) if columns else SEGMENT_SCHEMA.names
        if "image_id" not in wanted:
            wanted = ["image_id", *wanted]
        if "status" not in wanted:
            wanted = [*wanted, "status"]
        tables = []
        for path in self.segment_files():
            tables.append(pq.read_table(pa.BufferReader(fs.cat_file(path)), columns=wanted))
        if not tables:
            return SEGMENT_SCHEMA.empty_table().select(wanted)
        table = pa.concat_tables([t.cast(pa.schema([SEGMENT_SCHEMA.field(n) for n in wanted])) for t in tables])
        return dedupe(table)

    def done_ids(self) -> set[str]:
        return set(self.read_segments(columns=["image_id"]).column("image_id").to_pylist())

    def read_json(self, relative: str) -> dict[str, Any] | None:
        fs, path = filesystem_for(self.path(relative), s3=self.s3)
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None


def dedupe(table: pa.Table) -> pa.Table:
    """One row per image id, preferring ``ok`` (defensive: the writer never commits duplicates)."""
    if table.num_rows == 0:
        return table
    ids = table.column("image_id").to_pylist()
    ok = [s == STATUS_OK for s in table.column("status").to_pylist()]
    best: dict[str, int] = {}
    for i, (image_id, is_ok) in enumerate(zip(ids, ok, strict=True)):
        if image_id not in best or (is_ok and not ok[best[image_id]]):
            best[image_id] = i
    if len(best) == table.num_rows:
        return table
    return table.take(sorted(best.values()))


def class_stats(table: pa.Table, *, class_names: Sequence[str]) -> pa.Table:
    """Per-class totals over the ``ok`` rows of ``table`` (needs status, width, height, class_pixels)."""
    num_classes = len(class_names)
    pixels = np.zeros(num_classes, dtype=np.int64)
    present = np.zeros(num_classes, dtype=np.int64)
    fraction_sum = np.zeros(num_classes, dtype=np.float64)
    images = 0
    status = table.column("status").to_pylist()
    widths = table.column("width").to_pylist()
    heights = table.column("height").to_pylist()
    counts = table.column("class_pixels").to_pylist()
    for st, w, h, c in zip(status, widths, heights, counts, strict=True):
        if st != STATUS_OK or c is None or len(c) != num_classes or not w or not h:
            continue
        c = np.asarray(c, dtype=np.int64)
        pixels += c
        present += c > 0
        fraction_sum += c / float(w * h)
        images += 1
    mean_fraction = fraction_sum / images if images else np.full(num_classes, math.nan)
    return pa.Table.from_pydict(
        {
            "class_id": list(range(num_classes)),
            "class_name": list(class_names),
            "pixels": pixels.tolist(),
            "images_present": present.tolist(),
            "mean_fraction": mean_fraction.tolist(),
        },
        schema=CLASS_STATS_SCHEMA,
    )


def write_class_stats(layout: OutputLayout, *, class_names: Sequence[str], metadata=None) -> pa.Table:
    """Recompute ``class_stats.parquet`` from every segment row under the output (earlier runs included)."""
    rows = layout.read_segments(columns=["status", "width", "height", "class_pixels"])
    stats = class_stats(rows, class_names=class_names)
    layout.write(CLASS_STATS_FILE, parquet_bytes(stats, metadata=metadata))
    return stats


def write_run_json(layout: OutputLayout, summary: Mapping[str, Any]) -> str:
    text = json.dumps(summary, indent=2, sort_keys=False, default=str, allow_nan=True) + "\n"
    return layout.write(RUN_FILE, text.encode("utf-8"))


def metadata_for(*, config: Mapping[str, Any], model: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Parquet key-value metadata: the resolved configuration and the model record."""
    return {
        CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True, default=str).encode("utf-8"),
        MODEL_METADATA_KEY: json.dumps(model, sort_keys=True, default=str).encode("utf-8"),
    }


__all__ = [
    "CLASS_STATS_FILE",
    "CLASS_STATS_SCHEMA",
    "CONFIG_METADATA_KEY",
    "MASKS_DIR",
    "MODEL_METADATA_KEY",
    "OutputLayout",
    "RUN_FILE",
    "SEGMENTS_DIR",
    "SEGMENT_SCHEMA",
    "STAGES",
    "class_stats",
    "dedupe",
    "mask_png",
    "metadata_for",
    "one_line",
    "rows_table",
    "segments_file_name",
    "storage_errors",
    "write_class_stats",
    "write_run_json",
]
