"""The run report: one self-contained HTML page of what a ``segment`` output holds.

``segment`` writes ``<output>/report.html`` at the end of each run;
``deeplab-batch report OUTPUT`` rebuilds it from any output (local or object store).
The page inlines everything (CSS, SVG charts, thumbnails as ``data:`` URIs; no
script, no network) and holds:

* counts, throughput and phase times of the last run (``_run.json``) and the exact
  row totals of the whole output (merged from ``_index/`` summaries);
* per-class pixel share and images per class (``class_stats.parquet``: the merged
  aggregate, one row per class);
* seconds per image in each stage, a gallery (image, mask overlay, confidence) and
  the error rows grouped by reason, all from a **bounded sample** of rows;
* the model record and the CRF parameters.

What is read, whatever the size of the output (a 1M-row output has ~250 segments
files): one listing of ``segments/``, the index files, ``_run.json``,
``class_stats.parquet``; then at most :data:`SAMPLE_FILES` live segments files
chosen at random (seeded), of each only :data:`SAMPLE_COLUMNS` and at most
:data:`ROWS_PER_FILE` rows (row groups taken at random); then the source image and
mask of at most :data:`MAX_GALLERY_IMAGES` rows. "Least confident" and "richest in a
class" are therefore *within the sample*; the class statistics and counts are over
every row. Images that cannot be read (moved, too big, inside a tar shard or a
byte manifest) show a placeholder: the report never fails because of one image.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.constants import voc_palette
from pipeline.io.uris import (
    SECRET_FIELDS,
    filesystem_for,
    normalize_uri,
    storage_errors,
    write_bytes_atomic,
)
from pipeline.outputs.layout import (
    CLASS_STATS_FILE,
    CRF_TYPE,
    MODEL_METADATA_KEY,
    RUN_FILE,
    SEGMENT_SCHEMA,
    SEGMENTS_DIR,
    STAGES,
    STATUS_OK,
    OutputLayout,
    one_line,
)

REPORT_FILE = "report.html"
#: Segments files read for the sample (chosen at random among the live ones).
SAMPLE_FILES = 16
#: Rows read from one sampled file (its row groups in random order until this many).
ROWS_PER_FILE = 1024
#: Upper bound of the rows the report holds.
MAX_SAMPLED_ROWS = SAMPLE_FILES * ROWS_PER_FILE
#: Per-image quality scores and the confidence map's URI (null in rows of older releases).
QUALITY_COLUMNS: tuple[str, ...] = ("mean_confidence", "confident_fraction", "mean_entropy", "crf_agreement")
#: The columns read from a sampled file (never ``nodes``, ``run_id``, ``written_at``).
SAMPLE_COLUMNS: tuple[str, ...] = tuple(c for c in (
    "image_id", "source_uri", "status", "error", "error_kind", "width", "height", "mask_uri", "class_pixels",
    "class_mean_confidence", *QUALITY_COLUMNS, "confidence_uri", "model_sha256", "crf", "timings",
) if c in SEGMENT_SCHEMA.names)
DEFAULT_SEED = 0
#: Gallery sizes: a random sample, the least confident, and the richest images of each class.
GALLERY_RANDOM = 8
GALLERY_LEAST_CONFIDENT = 8
GALLERY_PER_CLASS = 2
GALLERY_MAX_CLASSES = 24
MAX_GALLERY_IMAGES = GALLERY_RANDOM + GALLERY_LEAST_CONFIDENT + GALLERY_PER_CLASS * GALLERY_MAX_CLASSES
THUMB_SIDE = 256
THUMB_QUALITY = 80
OVERLAY_ALPHA = 0.55
#: Source images and masks larger than this are not read (a placeholder is shown).
MAX_IMAGE_BYTES = 64 * 1024**2
#: Error groups shown, and example URIs per group.
ERROR_GROUPS = 20
ERROR_EXAMPLES = 3
IO_THREADS = 8
#: Block size of the reads of a sampled segments file (an object store's read-ahead otherwise fetches MBs).
READ_BLOCK_BYTES = 1024**2
_SECRET_WORDS = ("secret", "password", "token", "credential", "private_key")


# ----------------------------------------------------------------------------- reading


@dataclass
class Sample:
    """The bounded sample of segment rows the report shows."""

    table: pa.Table
    files: list[str] = field(default_factory=list)  # names read
    live_files: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it could not be read
    model: dict[str, Any] | None = None  # a sampled file's footer model record
    seed: int = DEFAULT_SEED


def _sample_schema() -> pa.Schema:
    return pa.schema([SEGMENT_SCHEMA.field(n) for n in SAMPLE_COLUMNS])


def _read_sampled_file(layout: OutputLayout, name: str, *, rows: int, seed: int):
    """``(table, model record or None)``: at most ``rows`` rows of ``SAMPLE_COLUMNS`` of one segments file."""
    schema = _sample_schema()
    fs, path = filesystem_for(layout.path(SEGMENTS_DIR, name), s3=layout.s3)
    # Ranged reads: the footer, then the chosen columns' chunks (small blocks: no read-ahead of the whole object).
    with fs.open(path, "rb", block_size=READ_BLOCK_BYTES) as f:
        parquet = pq.ParquetFile(f)
        metadata = parquet.schema_arrow.metadata or {}
        model = None
        if MODEL_METADATA_KEY in metadata:
            try:
                model = json.loads(metadata[MODEL_METADATA_KEY])
            except ValueError:
                model = None
        present = [c for c in SAMPLE_COLUMNS if c in parquet.schema_arrow.names]
        groups = list(range(parquet.num_row_groups))
        random.Random(f"{seed}:{name}").shuffle(groups)
        batches, got = [], 0
        for group in groups:
            if got >= rows:
                break
            for batch in parquet.iter_batches(batch_size=rows - got, row_groups=[group], columns=present):
                batches.append(batch)
                got += batch.num_rows
                break  # one batch of at most rows - got rows per group
    table = pa.Table.from_batches(batches) if batches else pa.table({c: [] for c in present})
    for column in SAMPLE_COLUMNS:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, schema.field(column).type))
    return table.select(list(SAMPLE_COLUMNS)).cast(schema), model


def sample_rows(layout: OutputLayout, live: Sequence[str], *, files: int = SAMPLE_FILES,
                rows_per_file: int = ROWS_PER_FILE, seed: int = DEFAULT_SEED) -> Sample:
    """At most ``files`` of the ``live`` segments files, at random (``seed``), at most ``rows_per_file`` rows each."""
    names = sorted(live)
    chosen = sorted(random.Random(seed).sample(names, min(files, len(names))))
    sample = Sample(table=_sample_schema().empty_table(), live_files=len(names), seed=seed)

    def read(name: str):
        try:
            return name, _read_sampled_file(layout, name, rows=rows_per_file, seed=seed), None
        except FileNotFoundError:  # compacted away meanwhile by a running job
            return name, None, "gone (compacted meanwhile?)"
        except (pa.ArrowException, *storage_errors()) as exc:  # damaged, or columns of an unknown type
            return name, None, one_line(f"{type(exc).__name__}: {exc}", limit=200)

    tables = []
    with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, len(chosen)))) as pool:
        for name, result, why in pool.map(read, chosen):
            if result is None:
                sample.skipped[name] = why
                continue
            table, model = result
            tables.append(table)
            sample.files.append(name)
            sample.model = sample.model or model
    if tables:
        sample.table = pa.concat_tables(tables)
    return sample


def _read_parquet_table(layout: OutputLayout, relative: str) -> tuple[pa.Table | None, dict]:
    fs, path = filesystem_for(layout.path(relative), s3=layout.s3)
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            return parquet.read(), dict(parquet.schema_arrow.metadata or {})
    except FileNotFoundError:
        return None, {}
    except (pa.ArrowException, *storage_errors()):  # damaged or unreadable: the summaries stand in
        return None, {}


# ----------------------------------------------------------------------------- per-row figures


def _matrix(column: pa.ChunkedArray | pa.Array, n_classes: int, dtype) -> np.ndarray:
    """A rows x classes array of a list column (missing rows / short lists padded with 0)."""
    out = np.zeros((len(column), n_classes), dtype=dtype)
    values = column.to_pylist()
    for i, row in enumerate(values):
        if row:
            k = min(len(row), n_classes)
            out[i, :k] = [0 if v is None else v for v in row[:k]]
    return out


def row_figures(table: pa.Table, n_classes: int) -> dict[str, np.ndarray]:
    """Per row: pixel-weighted mean confidence (NaN for errors), class fractions, pixels."""
    pixels = _matrix(table.column("class_pixels"), n_classes, np.float64)
    conf = _matrix(table.column("class_mean_confidence"), n_classes, np.float64)
    conf = np.where(np.isfinite(conf), conf, 0.0)
    total = pixels.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(total > 0, (conf * pixels).sum(axis=1) / total, np.nan)
        fractions = np.where(total[:, None] > 0, pixels / total[:, None], 0.0)
    ok = np.asarray(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False))
    confidence = np.where(ok, confidence, np.nan)
    return {"confidence": confidence, "fractions": fractions, "pixels": pixels, "ok": ok & (total > 0)}


def stage_seconds(table: pa.Table) -> dict[str, dict[str, float]]:
    """Mean, median and p95 seconds per image of each stage over the sampled ``ok`` rows."""
    ok = table.filter(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False))
    out = {}
    timings = ok.column("timings").combine_chunks() if ok.num_rows else None
    for stage in STAGES:
        if timings is None:
            continue
        values = pc.struct_field(timings, f"{stage}_s").to_numpy(zero_copy_only=False)
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            out[stage] = {"mean": float(values.mean()), "median": float(np.median(values)),
                          "p95": float(np.percentile(values, 95)), "rows": int(values.size)}
    return out


# ----------------------------------------------------------------------------- error reasons

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_URI = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_PATH = re.compile(r"(?<![\w<])(?:/[^\s:,;()\[\]]+)+")
_FILE = re.compile(r"\b[\w.-]+\.(?:jpe?g|png|bmp|tiff?|webp|gif|tar|parquet)\b(?:#\S+)?", re.IGNORECASE)
_HEX = re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", re.IGNORECASE)


def reason_pattern(reason: str | None) -> str:
    """An error reason with its particulars (URIs, paths, file names, quoted text, numbers) replaced.

    ``cannot read /data/a/x1.jpg: [Errno 2] No such file`` and the same for ``y.jpg``
    give one pattern: ``cannot read <path>: [Errno #] No such file``.
    """
    text = one_line(reason or "(no reason given)", limit=500)
    text = _URI.sub("<uri>", text)
    text = _QUOTED.sub("'…'", text)
    text = _PATH.sub("<path>", text)
    text = _FILE.sub("<file>", text)
    text = _HEX.sub("<hex>", text)
    text = _NUMBER.sub("#", text)
    return text[:240]


@dataclass
class ErrorGroup:
    pattern: str
    kind: str
    count: int
    examples: list[tuple[str, str]]  # (source_uri, reason)


def group_errors(table: pa.Table) -> list[ErrorGroup]:
    """Error rows of ``table`` grouped by (kind, :func:`reason_pattern`), most frequent first."""
    errors = table.filter(pc.fill_null(pc.not_equal(table.column("status"), STATUS_OK), True))
    groups: dict[tuple[str, str], ErrorGroup] = {}
    for uri, reason, kind in zip(errors.column("source_uri").to_pylist(), errors.column("error").to_pylist(),
                                 errors.column("error_kind").to_pylist(), strict=True):
        key = (kind or "?", reason_pattern(reason))
        group = groups.setdefault(key, ErrorGroup(pattern=key[1], kind=key[0], count=0, examples=[]))
        group.count += 1
        if len(group.examples) < ERROR_EXAMPLES:
            group.examples.append((uri or "?", one_line(reason or "", limit=300)))
    return sorted(groups.values(), key=lambda g: (-g.count, g.kind, g.pattern))


# ----------------------------------------------------------------------------- gallery


@dataclass
class GalleryItem:
    image_id: str
    source_uri: str
    mask_uri: str | None
    width: int | None
    height: int | None
    confidence: float
    classes: list[tuple[int, float, float]]  # (class id, fraction, mean confidence), largest first
    confidence_uri: str | None = None  # the confidence map (segment --confidence), if kept
    quality: dict[str, float] = field(default_factory=dict)  # the row's quality scores that are not null
    image: bytes | None = None  # JPEG thumbnails
    overlay: bytes | None = None
    confidence_map: bytes | None = None
    note: str = ""


def select_gallery(table: pa.Table, figures: Mapping[str, np.ndarray], *, class_order: Sequence[int],
                   seed: int = DEFAULT_SEED) -> list[tuple[str, str, list[int]]]:
    """``[(section id, title, row indices)]``: a random sample, the least confident, the richest per class."""
    ok_rows = np.flatnonzero(figures["ok"])
    sections: list[tuple[str, str, list[int]]] = []
    rng = random.Random(seed)
    picked = sorted(rng.sample(ok_rows.tolist(), min(GALLERY_RANDOM, ok_rows.size)))
    sections.append(("random", "A random sample", picked))
    confidence = figures["confidence"][ok_rows]
    order = ok_rows[np.lexsort((ok_rows, confidence))][:GALLERY_LEAST_CONFIDENT]
    sections.append(("least-confident", "Least confident (within the sample)", order.tolist()))
    fractions = figures["fractions"]
    shown = 0
    for class_id in class_order:
        if shown >= GALLERY_MAX_CLASSES or class_id >= fractions.shape[1]:
            break
        share = fractions[ok_rows, class_id]
        has = share > 0
        if not has.any():
            continue
        rows = ok_rows[has][np.lexsort((ok_rows[has], -share[has]))][:GALLERY_PER_CLASS]
        sections.append((f"class-{class_id}", "", rows.tolist()))
        shown += 1
    return sections


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    return buffer.getvalue()


def _read_limited(uri: str, layout: OutputLayout) -> bytes:
    fs, path = filesystem_for(uri, s3=layout.s3)
    size = fs.size(path)
    if size is not None and size > MAX_IMAGE_BYTES:
        raise ValueError(f"{size} bytes (over the report's {MAX_IMAGE_BYTES // 1024**2} MB limit)")
    return fs.cat_file(path)


def _source_thumbnail(uri: str, layout: OutputLayout) -> Image.Image:
    if "#" in uri.rsplit("/", 1)[-1]:
        raise ValueError("inside a tar shard or byte manifest: not read by the report")
    image = Image.open(io.BytesIO(_read_limited(uri, layout)))
    image.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))  # JPEG: decode at a reduced scale
    image = ImageOps.exif_transpose(image)  # the mask has the oriented size
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGBA") if "A" in image.mode or image.mode == "P" else image
    image = image.convert("RGB")
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return image


def _mask_image(item: GalleryItem, layout: OutputLayout) -> Image.Image:
    errors = []
    for uri in dict.fromkeys([layout.mask_uri(item.image_id), item.mask_uri]):  # where the output is now, first
        if not uri:
            continue
        try:
            mask = Image.open(io.BytesIO(_read_limited(uri, layout)))
            mask.load()
            return mask
        except Exception as exc:  # noqa: BLE001 - any unreadable mask is a placeholder
            errors.append(one_line(f"{type(exc).__name__}: {exc}", limit=120))
    raise ValueError("; ".join(errors) or "no mask")


def render_thumbnails(item: GalleryItem, layout: OutputLayout) -> GalleryItem:
    """Fill ``item.image``/``item.overlay`` (JPEG thumbnails); failures become ``item.note``, never exceptions."""
    notes = []
    image = None
    try:
        image = _source_thumbnail(item.source_uri, layout)
        item.image = _jpeg(image)
    except Exception as exc:  # noqa: BLE001 - a missing or odd image never fails the report
        notes.append(f"image: {one_line(f'{type(exc).__name__}: {exc}', limit=160)}")
    try:
        mask = _mask_image(item, layout)
        if image is not None:
            size = image.size
        else:
            mask_copy = mask.copy()
            mask_copy.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.NEAREST)
            size = mask_copy.size
        colours = mask.resize(size, Image.NEAREST).convert("RGB")
        item.overlay = _jpeg(Image.blend(image, colours, OVERLAY_ALPHA) if image is not None else colours)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"mask: {one_line(f'{type(exc).__name__}: {exc}', limit=160)}")
    if item.confidence_uri:
        try:
            confidence = Image.open(io.BytesIO(_read_limited(item.confidence_uri, layout)))
            confidence.draft("L", (THUMB_SIDE * 2, THUMB_SIDE * 2))
            confidence = confidence.convert("L")
            confidence.thumbnail((THUMB_SIDE, THUMB_SIDE))
            item.confidence_map = _jpeg(confidence)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"confidence map: {one_line(f'{type(exc).__name__}: {exc}', limit=160)}")
    item.note = "; ".join(notes)
    return item


# ----------------------------------------------------------------------------- the report's data


@dataclass
class ReportData:
    output: str
    generated_at: str
    run: dict[str, Any] | None
    totals: dict[str, int] | None
    index_coverage: tuple[int, int]  # (live files with a summary, live files)
    class_stats: list[dict[str, Any]]
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    sample: Sample
    stages: dict[str, dict[str, float]]
    gallery: list[tuple[str, str, list[GalleryItem]]]
    errors: list[ErrorGroup]
    sample_counts: dict[str, int]
    model: dict[str, Any] | None
    model_shas: dict[str, int]
    crfs: dict[str, int]
    quality: dict[str, tuple[float, int]] = field(default_factory=dict)  # score -> (mean over sampled ok rows, rows)


def _quality(table: pa.Table) -> dict[str, tuple[float, int]]:
    """Mean of each quality score over the sampled ok rows that carry it (rows of older releases do not)."""
    ok = table.filter(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False))
    out = {}
    for name in QUALITY_COLUMNS:
        if name not in ok.column_names:
            continue
        values = np.asarray(ok.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            out[name] = (float(values.mean()), int(values.size))
    return out


def redact(value: Any) -> Any:
    """``value`` with anything that looks like a credential replaced by ``***`` (defence in depth)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            name = str(k).lower()
            secret = name in SECRET_FIELDS or any(w in name for w in _SECRET_WORDS)
            out[k] = ("***" if v not in (None, "", "***") else v) if secret and not isinstance(v, Mapping) \
                else redact(v)
        return out
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _error_totals(summaries: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    from pipeline.outputs.index import merge_totals

    totals = merge_totals(summaries).to_dict()
    totals["error_data"] = sum(int(s["error_data"]) for s in summaries)
    totals["error_storage_rows"] = sum(int(s["error_storage"]) for s in summaries)
    totals["retried"] = sum(int(s["retried"]) for s in summaries)
    return totals


def build_report(layout: OutputLayout, *, run: Mapping[str, Any] | None = None, state=None,
                 class_stats: pa.Table | None = None, seed: int = DEFAULT_SEED, files: int = SAMPLE_FILES,
                 rows_per_file: int = ROWS_PER_FILE) -> ReportData:
    """Everything the page shows, read within the bounds above (``run``/``state``/``class_stats``: already in hand)."""
    from pipeline.outputs.index import (
        OutputState,
        OutputStateError,
        load_state,
        merge_class_stats,
    )

    if run is None:
        try:
            run = layout.read_json(RUN_FILE)
        except ValueError:  # not JSON: as if absent
            run = None
    run = dict(run) if isinstance(run, Mapping) else None
    if state is None:
        try:
            state = load_state(layout)
        except (pa.ArrowException, OutputStateError):  # a damaged index file: no totals, every listed file live
            state = OutputState(files=layout.list_files(SEGMENTS_DIR))
    live = state.live
    summaries = state.live_summaries()
    totals = _error_totals(summaries) if summaries else None
    sample = sample_rows(layout, list(live), files=max(0, min(files, SAMPLE_FILES)),
                         rows_per_file=max(0, min(rows_per_file, ROWS_PER_FILE)), seed=seed)
    stats_metadata: dict = {}
    if class_stats is None:
        class_stats, stats_metadata = _read_parquet_table(layout, CLASS_STATS_FILE)

    model = sample.model
    if model is None and MODEL_METADATA_KEY in stats_metadata:
        try:
            model = json.loads(stats_metadata[MODEL_METADATA_KEY])
        except ValueError:
            model = None
    run_model = (run or {}).get("model") or {}
    class_names = list((model or {}).get("class_names") or [])
    if class_stats is not None and class_stats.num_rows:
        class_names = class_names if len(class_names) == class_stats.num_rows else \
            [str(n) for n in class_stats.column("class_name").to_pylist()]
    n_classes = len(class_names) or int(run_model.get("num_classes") or 0)
    if not n_classes and sample.table.num_rows:
        lengths = pc.list_value_length(sample.table.column("class_pixels")).to_numpy(zero_copy_only=False)
        lengths = np.asarray([v for v in lengths if v is not None and not np.isnan(v)], dtype=int)
        n_classes = int(lengths.max()) if lengths.size else 0
    class_names = class_names or [f"class {i}" for i in range(n_classes)]
    if class_stats is None and summaries and n_classes:  # no class_stats.parquet (deleted): merge the summaries
        try:
            class_stats = merge_class_stats(summaries, class_names=class_names)
        except ValueError:
            class_stats = None
    stats_rows = class_stats.to_pylist() if class_stats is not None else []
    palette_source = (model or {}).get("palette") or []
    palette = [tuple(int(v) for v in c) for c in palette_source][:n_classes]
    palette += voc_palette(max(n_classes, 1))[len(palette):n_classes]

    table = sample.table
    figures = row_figures(table, n_classes) if n_classes else {
        "confidence": np.full(table.num_rows, np.nan), "fractions": np.zeros((table.num_rows, 0)),
        "pixels": np.zeros((table.num_rows, 0)), "ok": np.zeros(table.num_rows, bool)}
    by_images = sorted(range(n_classes), key=lambda c: (-(stats_rows[c]["images_present"] if c < len(stats_rows)
                                                        else 0), c))
    sections = select_gallery(table, figures, class_order=by_images, seed=seed)
    columns = table.select(["image_id", "source_uri", "mask_uri", "width", "height",
                            *[c for c in (*QUALITY_COLUMNS, "confidence_uri") if c in table.column_names]]).to_pydict()
    items: dict[int, GalleryItem] = {}
    for _, _, rows in sections:
        for i in rows:
            if i in items:
                continue
            share = figures["fractions"][i]
            conf_list = table.column("class_mean_confidence")[i].as_py() or []
            top = [int(c) for c in np.argsort(-share, kind="stable")[:3] if share[c] > 0]
            items[i] = GalleryItem(
                image_id=columns["image_id"][i], source_uri=columns["source_uri"][i] or "",
                mask_uri=columns["mask_uri"][i], width=columns["width"][i], height=columns["height"][i],
                confidence=float(figures["confidence"][i]),
                confidence_uri=columns["confidence_uri"][i] if "confidence_uri" in columns else None,
                quality={c: float(columns[c][i]) for c in QUALITY_COLUMNS
                         if c in columns and columns[c][i] is not None and math.isfinite(columns[c][i])},
                classes=[(c, float(share[c]), float(conf_list[c]) if c < len(conf_list) and conf_list[c] is not None
                          else math.nan) for c in top])
    with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, len(items)))) as pool:
        list(pool.map(lambda item: render_thumbnails(item, layout), items.values()))
    gallery = [(key, title or f"Richest in “{class_names[int(key.split('-')[1])]}”", [items[i] for i in rows])
               for key, title, rows in sections if rows]

    ok_count = int(np.count_nonzero(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False)
                                    .to_numpy(zero_copy_only=False)))
    shas: dict[str, int] = {}
    for value in table.column("model_sha256").to_pylist():
        if value:
            shas[value] = shas.get(value, 0) + 1
    crfs: dict[str, int] = {}
    for value in table.column("crf").to_pylist():
        key = json.dumps(value, sort_keys=True) if value else "none (CRF off, or an error row)"
        crfs[key] = crfs.get(key, 0) + 1
    return ReportData(
        output=layout.uri, generated_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        run=redact(run) if run else None, totals=totals,
        index_coverage=(len([n for n in live if n in state.summaries]), len(live)),
        class_stats=stats_rows, class_names=class_names, palette=palette, sample=sample,
        stages=stage_seconds(table), gallery=gallery, errors=group_errors(table),
        sample_counts={"rows": table.num_rows, "ok": ok_count, "error": table.num_rows - ok_count},
        model=redact(model) if model else None, model_shas=shas, crfs=crfs, quality=_quality(table),
    )


# ----------------------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;color:#222;max-width:1180px;
padding:0 1em;line-height:1.4}
h1{font-size:1.5em;margin-bottom:0.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:0.2em}
.muted{color:#666;font-size:0.9em}
table{border-collapse:collapse;margin:0.4em 0 1em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;
vertical-align:top}th{background:#f4f4f4}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:0.6em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.card b{display:block;font-size:1.5em}.card.bad b{color:#b00020}.card.ok b{color:#1b7f3b}
.charts{display:flex;flex-wrap:wrap;gap:24px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.item{border:1px solid #ddd;border-radius:6px;padding:6px;width:358px;font-size:0.8em}.item.three{width:540px}
.pair{display:flex;gap:6px;align-items:flex-start}.pair img,.ph{width:176px;max-height:176px;object-fit:contain;
background:#f4f4f4}
.ph{height:120px;display:flex;align-items:center;justify-content:center;text-align:center;color:#888;
font-size:0.85em;padding:4px;box-sizing:border-box}
.id{font-family:ui-monospace,monospace;word-break:break-all}
.bar{display:inline-block;width:120px;height:10px;background:#eee;border-radius:5px;vertical-align:middle;
overflow:hidden}.bar span{display:block;height:100%;background:#3b7dd8}
.sw{display:inline-block;width:10px;height:10px;border:1px solid #999;vertical-align:middle;margin-right:3px}
pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.8em;max-height:360px}
code{font-size:0.9em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)) or digits == 0:
        return f"{round(float(value)):,}"
    return f"{float(value):,.{digits}f}"


def _secs(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    value = float(value)
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rgb(colour: Sequence[int]) -> str:
    r, g, b = (int(v) for v in colour[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def svg_bars(title: str, labels: Sequence[str], values: Sequence[float], *, colours: Sequence[str],
             texts: Sequence[str], width: int = 540) -> str:
    """A horizontal bar chart as inline SVG (no script, no fonts to fetch)."""
    row_h, label_w, text_w, top = 20, 130, 110, 26
    bar_w = width - label_w - text_w
    peak = max([v for v in values if math.isfinite(v)] + [0.0]) or 1.0
    height = top + row_h * len(labels) + 6
    parts = [(f'<svg role="img" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">'),
             f"<title>{_e(title)}</title>",
             f'<text x="0" y="16" font-weight="bold" font-size="13">{_e(title)}</text>']
    for i, (label, value, colour, text) in enumerate(zip(labels, values, colours, texts, strict=True)):
        y = top + i * row_h
        w = 0.0 if not math.isfinite(value) else max(0.0, value) / peak * bar_w
        short = label if len(label) <= 18 else label[:17] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_e(short)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="{row_h - 6}" fill="#f2f2f2"/>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{colour}" '
                     f'stroke="#777" stroke-width="0.5"/>')
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 14}">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _card(label: str, value: Any, cls: str = "") -> str:
    return f'<div class="card {cls}"><b>{_e(value)}</b>{_e(label)}</div>'


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _conf_bar(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f'<span class="bar"><span style="width:{100 * min(max(value, 0), 1):.0f}%"></span></span> {value:.3f}'


def _section_counts(data: ReportData) -> str:
    out = []
    run = data.run or {}
    counts = run.get("counts") or {}
    if run:
        out.append(f'<p class="muted">Last run <code>{_e(run.get("run_id", "?"))}</code>: '
                   f'{_e(run.get("started_at", "?"))} → {_e(run.get("finished_at", "?"))}, input '
                   f'<code>{_e(run.get("input", "?"))}</code>.</p>')
        cards = [_card("new", _num(counts.get("new"))), _card("ok", _num(counts.get("ok")), "ok"),
                 _card("error", _num(counts.get("error")), "bad" if counts.get("error") else ""),
                 _card("skipped (had a row)", _num(counts.get("skipped"))),
                 _card("images / s", _num(run.get("throughput_images_per_s"), 2)),
                 _card("duration", _secs(run.get("duration_s")))]
        out.append('<div class="cards">' + "".join(cards) + "</div>")
    else:
        out.append("<p>No <code>_run.json</code> under this output (it is written at the end of a run): the last "
                   "run's counts are not known.</p>")
    if data.totals:
        t = data.totals
        covered, live = data.index_coverage
        out.append(f"<p><b>Whole output</b>: {_num(t['rows'])} rows, one per image ({_num(t['ok'])} ok, "
                   f"{_num(t['error_data'])} data errors (final), {_num(t['pending_retry'])} storage/transient "
                   f'errors waiting for a retry) <span class="muted">exact, merged from the per-file summaries '
                   f"under <code>_index/</code> ({covered:,} of {live:,} live segments files covered)</span>.</p>")
    training = run.get("training")
    if training:  # segment --training: every ok row's image is in the shards once (docs/training-data.md)
        out.append(f"<p><b>Training data</b>: <code>training/</code>, {_e(training.get('format', '?'))} with "
                   f"ignore label below {_e(training.get('ignore_below', '?'))}, {_num(training.get('shards'))} "
                   f"shard(s), {_num((training.get('bytes') or 0) / 1e6, 1)} MB.</p>")
    charts = []
    phases = run.get("phases_s") or {}
    if phases:
        labels = [k.removesuffix("_s") for k in phases]
        values = [float(v or 0) for v in phases.values()]
        charts.append(svg_bars("Last run: seconds per phase", labels, values, colours=["#8a9bd1"] * len(values),
                               texts=[_secs(v) for v in values]))
    stages = [s for s in STAGES if s in data.stages]
    if stages:
        means = [data.stages[s]["mean"] for s in stages]
        charts.append(svg_bars("Seconds per image, by stage (sample mean)", stages, means,
                               colours=["#6fb58a"] * len(stages), texts=[_secs(v) for v in means]))
    if charts:
        out.append('<div class="charts">' + "".join(f"<div>{c}</div>" for c in charts) + "</div>")
    details = []
    if counts:
        details.append("<div><b>Counts of the last run</b>"
                       + _table(["count", "value"], [[_e(k), _num(v)] for k, v in counts.items()]) + "</div>")
    if stages:
        rows = [[_e(s), _secs(data.stages[s]["mean"]), _secs(data.stages[s]["median"]),
                 _secs(data.stages[s]["p95"]), _num(data.stages[s]["rows"])] for s in stages]
        details.append("<div><b>Seconds per image, by stage</b>"
                       + _table(["stage", "mean", "median", "p95", "rows"], rows)
                       + '<p class="muted">Over the sampled ok rows\' <code>timings</code> (batched stages: batch '
                         "time / batch size).</p></div>")
    if details:
        out.append('<details><summary>Tables</summary><div class="charts">' + "".join(details) + "</div></details>")
    return "".join(out)


def _section_classes(data: ReportData) -> str:
    stats = data.class_stats
    if not stats:
        return "<p>No <code>class_stats.parquet</code> and no summaries: no class statistics.</p>"
    total_pixels = sum(int(r["pixels"] or 0) for r in stats)
    ok_images = (data.totals or {}).get("ok") or 0
    names = [str(r["class_name"]) for r in stats]
    colours = [_rgb(data.palette[i]) if i < len(data.palette) else "#999999" for i in range(len(stats))]
    shares = [(int(r["pixels"] or 0) / total_pixels if total_pixels else 0.0) for r in stats]
    images = [float(r["images_present"] or 0) for r in stats]
    share_chart = svg_bars("Share of all labelled pixels", names, shares, colours=colours,
                           texts=[f"{100 * s:.2f} %" for s in shares])
    image_texts = [f"{int(v):,}" + (f" ({100 * v / ok_images:.0f} %)" if ok_images else "") for v in images]
    image_chart = svg_bars("Images in which the class appears", names, images, colours=colours, texts=image_texts)
    rows = [[f'<span class="sw" style="background:{colours[i]}"></span>{_e(names[i])}', _num(r["pixels"]),
             f"{100 * shares[i]:.2f}", _num(r["images_present"]),
             "–" if r["mean_fraction"] is None or not math.isfinite(r["mean_fraction"])
             else f"{100 * r['mean_fraction']:.2f}"] for i, r in enumerate(stats)]
    return (f'<div class="charts"><div>{share_chart}</div><div>{image_chart}</div></div>'
            + "<details><summary>Table</summary>"
            + _table(["class", "pixels", "pixel share %", "images", "mean % of an image"], rows) + "</details>"
            + f'<p class="muted">Over every ok row of the output ({_num(ok_images)} images), from '
              "<code>class_stats.parquet</code> (merged from the per-file summaries).</p>")


#: Quality scores named under each gallery item (all of them, confident_fraction too, in the sample table).
_QUALITY_LABELS = {"mean_entropy": "entropy", "crf_agreement": "CRF agreement"}


def _gallery_item(item: GalleryItem, data: ReportData) -> str:
    def panel(jpeg: bytes | None, alt: str, missing: str) -> str:
        if jpeg:
            return f'<img alt="{_e(alt)}" src="{_data_uri(jpeg)}">'
        return f'<div class="ph">{_e(missing)}</div>'

    notes = item.note.split("; ")
    image_note = next((n for n in notes if n.startswith("image:")), "image not available")
    mask_note = next((n for n in notes if n.startswith("mask:")), "mask not available")
    overlay_alt = f"{item.image_id} mask overlay" if item.image else f"{item.image_id} mask"
    panels = panel(item.image, f"{item.image_id} image", image_note) + panel(item.overlay, overlay_alt, mask_note)
    if item.confidence_uri:  # the map, where the run kept it (segment --confidence)
        map_note = next((n for n in notes if n.startswith("confidence map:")), "confidence map not available")
        panels += panel(item.confidence_map, f"{item.image_id} confidence map", map_note)
    classes = ", ".join(
        f'<span class="sw" style="background:{_rgb(data.palette[c]) if c < len(data.palette) else "#999"}"></span>'
        f"{_e(data.class_names[c] if c < len(data.class_names) else c)} {100 * share:.0f} %"
        + (f" (conf {conf:.2f})" if math.isfinite(conf) else "")
        for c, share, conf in item.classes)
    quality = " · ".join(f"{_QUALITY_LABELS[k]} {v:.2f}" for k, v in item.quality.items() if k in _QUALITY_LABELS)
    size = f"{item.width}×{item.height}" if item.width and item.height else "?"
    wide = " three" if item.confidence_uri else ""
    return (f'<div class="item{wide}"><div class="pair">{panels}</div>'
            f'<div class="id" title="{_e(item.source_uri)}">{_e(item.image_id)}</div>'
            f"<div>confidence {_conf_bar(item.confidence)} · {size} px</div><div>{classes}</div>"
            + (f'<div class="muted">{_e(quality)}</div>' if quality else "")
            + (f'<div class="muted">{_e(item.note)}</div>' if item.note and (item.image or item.overlay) else "")
            + "</div>")


def _section_gallery(data: ReportData) -> str:
    if not data.gallery:
        return "<p>No ok row in the sample: nothing to show.</p>"
    out = [('<p class="muted">Image, then its mask blended over it (the mask\'s palette), then the confidence map '
            "where the run kept one (<code>segment --confidence</code>; white = 1.0). Confidence: the pixel-weighted "
            "mean of <code>class_mean_confidence</code> by <code>class_pixels</code>, i.e. the mean confidence of the "
            "chosen class over the image. Every selection is made within the sampled rows.</p>")]
    if data.quality:
        rows = [[_e(name), f"{value:.3f}", _num(count)] for name, (value, count) in data.quality.items()]
        out.append("<details><summary>Quality scores of the sampled ok rows (means)</summary>"
                   + _table(["score", "mean", "rows"], rows) + "</details>")
    for key, title, items in data.gallery:
        out.append(f'<h3 id="g-{_e(key)}">{_e(title)}</h3><div class="gallery">'
                   + "".join(_gallery_item(i, data) for i in items) + "</div>")
    return "".join(out)


def _section_errors(data: ReportData) -> str:
    out = []
    run_counts = (data.run or {}).get("counts") or {}
    exact = []
    if run_counts:
        exact.append(f"last run: {_num(run_counts.get('error'))} error rows "
                     f"({_num(run_counts.get('error_storage'))} storage/transient, retried by the next run)")
    if data.totals:
        exact.append(f"whole output: {_num(data.totals['error_data'])} data errors (final), "
                     f"{_num(data.totals['pending_retry'])} waiting for a retry")
    if exact:
        out.append("<p><b>Exact totals</b>: " + "; ".join(_e(x) for x in exact) + ".</p>")
    unread = (data.run or {}).get("unread") or {}
    if unread:
        rows = [[f'<span class="id">{_e(u)}</span>', _e(r)] for u, r in list(unread.items())[:ERROR_EXAMPLES * 3]]
        out.append("<p>Not read in the last run (no row; the next run reads them again):</p>"
                   + _table(["shard / manifest", "reason"], rows, left=2))
    sample_errors = data.sample_counts["error"]
    if not data.errors:
        out.append(f"<p>No error row among the {_num(data.sample_counts['rows'])} sampled rows.</p>")
        return "".join(out)
    rows = []
    for group in data.errors[:ERROR_GROUPS]:
        examples = "<br>".join(f'<span class="id">{_e(uri)}</span>: {_e(reason)}' for uri, reason in group.examples)
        rows.append([f"<code>{_e(group.pattern)}</code>", _e(group.kind), _num(group.count), examples])
    more = len(data.errors) - ERROR_GROUPS
    out.append(f"<p>{_num(sample_errors)} error rows in the sample, in {len(data.errors)} groups (reasons with file "
               "names, URIs, paths and numbers replaced)" + (f"; {more} smaller groups not shown" if more > 0 else "")
               + ":</p>" + _table(["reason", "kind", "in sample", "examples"], rows, left=4))
    return "".join(out)


def _section_model(data: ReportData) -> str:
    out = []
    model = dict(data.model or {})
    run_model = (data.run or {}).get("model") or {}
    if model or run_model:
        shown = {**{k: v for k, v in run_model.items()}, **model}
        palette = shown.pop("palette", None)
        rows = []
        for key in sorted(shown):
            value = shown[key]
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            rows.append([_e(key), _e(text if len(text) <= 400 else text[:400] + "…")])
        if palette:
            rows.append(["palette", "".join(f'<span class="sw" style="background:{_rgb(c)}"></span>'
                                            for c in palette[:64])])
        out.append(_table(["field", "value"], rows, left=2))
        out.append('<p class="muted">The model record from a sampled segments file\'s footer '
                   "(<code>deeplab_batch.model</code>), with <code>_run.json</code>'s <code>model</code>.</p>")
    else:
        out.append("<p>No model record found (no segments footer, no <code>_run.json</code>).</p>")
    if data.model_shas:
        rows = [[f"<code>{_e(k)}</code>", _num(v)] for k, v in sorted(data.model_shas.items(), key=lambda x: -x[1])]
        out.append("<b>Model sha256 of the sampled rows</b>" + _table(["model_sha256", "rows"], rows, left=1))
    out.append("<h3>CRF</h3>")
    if data.crfs:
        names = [f.name for f in CRF_TYPE]
        rows = []
        for key, count in sorted(data.crfs.items(), key=lambda x: -x[1]):
            params = json.loads(key) if key.startswith("{") else None
            cells = [_e("–" if params is None or params.get(n) is None else params.get(n)) for n in names]
            rows.append([*cells, _num(count)] if params is not None else
                        [_e(key), *([""] * (len(names) - 1)), _num(count)])
        out.append("<b>CRF parameters of the sampled rows</b> (row <code>crf</code>)"
                   + _table([*names, "rows"], rows, left=1))
    config = (data.run or {}).get("config") or {}
    crf_config = {"crf": config.get("crf"), "resolved crf_params": (config.get("resolved") or {}).get("crf_params")}
    if any(v is not None for v in crf_config.values()):
        out.append("<b>CRF configuration of the last run</b> (<code>_run.json</code>)<pre>"
                   + _e(json.dumps(crf_config, indent=2, default=str)) + "</pre>")
    if config:
        out.append("<details><summary>The last run's whole configuration (secrets shown as ***)</summary><pre>"
                   + _e(json.dumps(redact(config), indent=2, default=str)) + "</pre></details>")
    return "".join(out)


def render_html(data: ReportData) -> str:
    """The page (one string; no script, no external resource)."""
    sample = data.sample
    skipped = ""
    if sample.skipped:
        skipped = " Not readable now: " + "; ".join(f"{_e(k)} ({_e(v)})" for k, v in list(sample.skipped.items())[:5])
    about = (f"<p>Counts, totals and class statistics cover <b>every</b> row (merged aggregates). Stage times, the "
             f"gallery and the error groups come from a <b>sample</b>: {len(sample.files):,} of {sample.live_files:,} "
             f"live segments files chosen at random (seed {sample.seed}), at most {ROWS_PER_FILE:,} rows of each: "
             f"{_num(data.sample_counts['rows'])} rows ({_num(data.sample_counts['ok'])} ok, "
             f"{_num(data.sample_counts['error'])} error). \"Least confident\" and \"richest\" are within this "
             f"sample. Rebuild with <code>deeplab-batch report OUTPUT --seed N</code> for another sample.{skipped}</p>")
    nav = " · ".join(f'<a href="#{k}">{t}</a>' for k, t in (("counts", "counts"), ("classes", "classes"),
                                                             ("gallery", "gallery"),
                                                             ("errors", "errors"), ("model", "model & CRF")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>deeplab-batch run report: {_e(data.output)}</title><style>{_STYLE}</style></head>
<body>
<h1>Run report</h1>
<p class="muted"><code>{_e(data.output)}</code> · generated {_e(data.generated_at)} · {nav}</p>
{about}
<h2 id="counts">Counts and time</h2>{_section_counts(data)}
<h2 id="classes">Classes found</h2>{_section_classes(data)}
<h2 id="gallery">Gallery</h2>{_section_gallery(data)}
<h2 id="errors">Errors</h2>{_section_errors(data)}
<h2 id="model">Model and CRF</h2>{_section_model(data)}
</body></html>
"""


def write_report(layout: OutputLayout, *, out: str | None = None, run: Mapping[str, Any] | None = None,
                 state=None, class_stats: pa.Table | None = None, seed: int = DEFAULT_SEED,
                 files: int = SAMPLE_FILES) -> str:
    """Build the report of ``layout``'s output and write it (default ``<output>/report.html``); returns its URI."""
    page = render_html(build_report(layout, run=run, state=state, class_stats=class_stats, seed=seed, files=files))
    target = normalize_uri(out) if out else layout.path(REPORT_FILE)
    fs, path = filesystem_for(target, s3=layout.s3)
    write_bytes_atomic(fs, path, page.encode("utf-8"))
    return target


__all__ = [
    "MAX_GALLERY_IMAGES",
    "MAX_SAMPLED_ROWS",
    "REPORT_FILE",
    "ROWS_PER_FILE",
    "SAMPLE_COLUMNS",
    "SAMPLE_FILES",
    "build_report",
    "group_errors",
    "reason_pattern",
    "render_html",
    "row_figures",
    "sample_rows",
    "write_report",
]
