"""``export``: training data (WebDataset or HF Parquet) rebuilt from a ``segment`` output, as a Ray Data job.

The driver lists the output's live segments files (``pipeline.outputs.index.live_files``), reads one
footer (the class names) and merges small per-task results (counts, shard and fragment names: O(tasks),
never O(images)); every row is read, filtered and written in Ray tasks:

    groups of live segments files
      -> (more than one file) duplicate ids: ok rows' 16-byte id keys, hash-aggregated (count, latest rank)
      -> select (tasks, ``pipeline.training.select.SelectRows``): ok rows, one per image, filters, split
      -> limit (order preserved: the same output and options give the same images)
      -> write (tasks of ``images_per_task`` rows, ``pipeline.training.shards.WriteShards``): fetch,
         label, shards written whole under ``<DEST>/<split>/``; the train images' per-class pixels
         (those >= ``min_class_pixels``) as a sampling fragment under ``<DEST>/_sampling/``
    driver: merge the per-task results -> delete shards this export did not write -> ``id2label.json``
      -> ``sampling.json``: the fragments sorted by (class, image id) in Ray (:func:`write_sampling`),
         laid out as JSON text by tasks, appended piece by piece to a temporary, published whole
      -> delete ``<DEST>/_sampling/`` -> ``_export.json``

Shard names are deterministic (``shard-<split>-<digest of the task's image ids>-<n>``): a rerun
replaces the shards of the same tasks, and shards no task of the finished export wrote (an earlier
export over other rows or options) are deleted at its end, so after a completed export each image
is in exactly one shard under ``<DEST>``. ``sampling.json`` is the same bytes for the same output and
options (entries sorted by image id within each class, ``json.dumps(indent=2)``'s layout).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.uris import (
    InputError,
    S3Settings,
    _describe,
    check_writable,
    filesystem_for,
    is_local,
    join_uri,
    normalize_uri,
    storage_errors,
)
from pipeline.outputs.index import OutputStateError, load_state
from pipeline.outputs.layout import (
    CLASS_STATS_FILE,
    CONFIDENCE_DIR,
    MODEL_METADATA_KEY,
    SEGMENTS_DIR,
    OutputLayout,
    json_safe,
    utc_now,
    write_or_explain,
)
from pipeline.training.rules import (
    FORMATS,
    IGNORE_INDEX,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    SPLITS,
    id2label,
)

DEFAULT_SHARD_BYTES = 256 * 1024**2
DEFAULT_MIN_CLASS_PIXELS = 3000
DEFAULT_IMAGES_PER_TASK = 1024
#: Segments files read per select task (a compacted file holds ~4,096 rows).
FILES_PER_TASK = 4
SELECT_CPUS = 0.25
WRITE_CPUS = 1.0
ID2LABEL_FILE = "id2label.json"
SAMPLING_FILE = "sampling.json"
EXPORT_FILE = "_export.json"
MAX_EXAMPLES = 10


class ExportError(Exception):
    """An export that did not run (``exit_code`` 2: arguments, locations) or failed (1: the Ray job)."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ExportOptions:
    source: str  # a segment output
    dest: str
    format: str = "webdataset"
    ignore_below: float = 0.0
    min_confident_fraction: float = 0.0
    classes_present: tuple[str, ...] = ()
    val_fraction: float = 0.0
    limit: int = 0
    shard_bytes: int = DEFAULT_SHARD_BYTES
    min_class_pixels: int = DEFAULT_MIN_CLASS_PIXELS
    images_per_task: int = DEFAULT_IMAGES_PER_TASK
    s3: S3Settings = field(default_factory=S3Settings)
    ray_address: str = ""
    no_progress_timeout_s: float = 900.0
    verbose: bool = False

    def public(self) -> dict[str, Any]:
        """The options as ``_export.json`` records them (S3 secrets redacted)."""
        out = asdict(self)
        out["s3"] = self.s3.redacted()
        out["classes_present"] = list(self.classes_present)
        return out


def validate(options: ExportOptions) -> None:
    """Raise :class:`ExportError` (exit 2) naming the first bad option."""
    checks = [
        ("--format", options.format in FORMATS, f"one of {', '.join(FORMATS)}", options.format),
        ("--ignore-below", 0 <= options.ignore_below <= 1, "in [0, 1]", options.ignore_below),
        ("--min-confident-fraction", 0 <= options.min_confident_fraction <= 1, "in [0, 1]",
         options.min_confident_fraction),
        ("--val-fraction", 0 <= options.val_fraction < 1, "in [0, 1)", options.val_fraction),
        ("--limit", options.limit >= 0, ">= 0", options.limit),
        ("--shard-bytes", options.shard_bytes >= 1, ">= 1", options.shard_bytes),
        ("--min-class-pixels", options.min_class_pixels >= 1, ">= 1", options.min_class_pixels),
        ("--images-per-task", options.images_per_task >= 1, ">= 1", options.images_per_task),
    ]
    for name, ok, expected, got in checks:
        if not ok or (isinstance(got, float) and math.isnan(got)):
            raise ExportError(f"{name}: expected {expected}, got {got!r}")


def class_names_of(layout: OutputLayout, file: str) -> list[str]:
    """Class names from the model record in ``file``'s footer, else from ``class_stats.parquet``."""
    fs, path = filesystem_for(layout.path(SEGMENTS_DIR, file), s3=layout.s3)
    with fs.open(path, "rb") as f:
        metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
    if MODEL_METADATA_KEY in metadata:
        record = json.loads(metadata[MODEL_METADATA_KEY])
        if record.get("class_names"):
            return [str(n) for n in record["class_names"]]
    fs, path = filesystem_for(layout.path(CLASS_STATS_FILE), s3=layout.s3)
    try:
        stats = pq.read_table(pa.BufferReader(fs.cat_file(path)), columns=["class_id", "class_name"])
    except FileNotFoundError:
        raise ExportError(f"{layout.uri}: no class names (no model record in {file}'s footer and no "
                          f"{CLASS_STATS_FILE})") from None
    stats = stats.sort_by("class_id")
    return [str(n) for n in stats.column("class_name").to_pylist()]


def resolve_classes(names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Class ids of ``wanted`` (names of the model record, or ids); ExportError naming the choices."""
    ids = []
    for item in wanted:
        item = item.strip()
        if item in names:
            ids.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            ids.append(int(item))
        else:
            raise ExportError(f"--classes-present: unknown class {item!r}; the output's classes are: "
                              f"{', '.join(names)}")
    return sorted(set(ids))


def has_confidence_maps(layout: OutputLayout) -> bool:
    """Whether ``confidence/`` holds anything (one small listing: a prefix check on object stores)."""
    fs, path = filesystem_for(layout.path(CONFIDENCE_DIR), s3=layout.s3)
    if is_local(fs):
        import os

        try:
            with os.scandir(path) as entries:
                return any(e.name.endswith(".png") for e in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False
    return bool(fs.exists(path))


def _groups(files: Sequence[str]) -> list[dict[str, Any]]:
    return [{"files": list(files[i:i + FILES_PER_TASK]), "positions": list(range(i, min(i + FILES_PER_TASK,
                                                                                        len(files))))}
            for i in range(0, len(files), FILES_PER_TASK)]


def find_duplicates(layout: OutputLayout, files: Sequence[str], *, rows: int) -> dict[bytes, int]:
    """``{16-byte id key: winning rank}`` of image ids with more than one ``ok`` row (a distributed count)."""
    import ray
    from ray.data.aggregate import Count, Max

    from pipeline.graph import join_partitions
    from pipeline.training.select import KEY, RANK, DuplicateKeys

    groups = _groups(files)
    keys = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
        DuplicateKeys(layout=layout), batch_size=1, batch_format="pyarrow", num_cpus=SELECT_CPUS)
    counted = keys.groupby(KEY, num_partitions=join_partitions(rows)).aggregate(Count(), Max(RANK))

    def repeated(table: pa.Table) -> pa.Table:
        count = next(c for c in table.column_names if c.startswith("count"))
        return table.filter(pc.greater(table.column(count), 1))

    out: dict[bytes, int] = {}
    for batch in counted.map_batches(repeated, batch_format="pyarrow", num_cpus=SELECT_CPUS).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        rank = next(c for c in batch.column_names if c.startswith("max"))
        out.update(zip(batch.column(KEY).to_pylist(), batch.column(rank).to_pylist(), strict=True))
    return out


class _Merged:
    """The per-task results of the write stage, merged: counts, shard names, sampling fragment names (O(tasks))."""

    def __init__(self, num_classes: int) -> None:
        self.images = {s: 0 for s in SPLITS}
        self.skipped: dict[str, int] = {}
        self.examples: list[str] = []
        self.class_pixels = [0] * num_classes
        self.class_images = [0] * num_classes
        self.fragments: list[str] = []  # names under <DEST>/_sampling/
        self.sampling_rows = 0
        self.shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}

    def add(self, result: Mapping[str, Any]) -> None:
        for split, n in result["images"].items():
            self.images[split] = self.images.get(split, 0) + n
        for reason, n in result["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        for examples in result["examples"].values():
            self.examples += examples[: max(0, MAX_EXAMPLES - len(self.examples))]
        for i, n in enumerate(result["class_pixels"]):
            self.class_pixels[i] += n
        for i, n in enumerate(result["class_images"]):
            self.class_images[i] += n
        if result["sampling_fragment"]:
            self.fragments.append(result["sampling_fragment"])
            self.sampling_rows += result["sampling_rows"]
        for shard in result["shards"]:
            self.shards.setdefault(shard["split"], []).append(shard)


def sampling_head(merged: _Merged, *, class_names: Sequence[str], min_class_pixels: int) -> dict[str, Any]:
    """``sampling.json`` but its ``samples_with_class`` (DAFormer's rare-class sampling inputs, train split)."""
    total = sum(merged.class_pixels)
    classes = range(len(class_names))
    return {
        "split": "train",
        "images": merged.images.get("train", 0),
        "ignore_index": IGNORE_INDEX,
        "min_class_pixels": min_class_pixels,
        "class_names": {str(c): class_names[c] for c in classes},
        "class_pixels": {str(c): merged.class_pixels[c] for c in classes},
        "class_frequency": {str(c): (merged.class_pixels[c] / total if total else 0.0) for c in classes},
        "images_with_class": {str(c): merged.class_images[c] for c in classes},
    }


class ReadFragments:
    """``fragment`` (names under ``<dest>/_sampling/``) -> their rows (``pipeline.training.shards.FRAGMENT_SCHEMA``)."""

    def __init__(self, *, dest: str, s3: S3Settings) -> None:
        self.dest, self.s3 = dest, s3

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.training.shards import FRAGMENT_SCHEMA, SAMPLING_DIR

        tables = []
        for name in batch.column("fragment").to_pylist():
            uri = join_uri(self.dest, SAMPLING_DIR, name)
            fs, path = filesystem_for(uri, s3=self.s3)
            try:
                tables.append(pq.read_table(pa.BufferReader(fs.cat_file(path))).select(FRAGMENT_SCHEMA.names)
                              .cast(FRAGMENT_SCHEMA))
            except (pa.ArrowInvalid, KeyError) as exc:
                raise ValueError(f"sampling fragment {uri}: unreadable ({_describe(exc)})") from exc
        return pa.concat_tables(tables) if tables else FRAGMENT_SCHEMA.empty_table()


#: ``samples_with_class`` as ``json.dumps(..., indent=2)`` lays it out, one entry and one class at a time.
SAMPLE_ENTRY = "      [\n        {image_id},\n        {pixels}\n      ]"
ENTRIES_PER_TEXT = 10_000


def sample_entries(table: pa.Table) -> pa.Table:
    """Rows sorted by class (``class_id, image_id, pixels``) -> ``class_id, text``: each class's entries, laid out."""
    class_ids = table.column("class_id").to_numpy()
    ids, pixels = table.column("image_id").to_pylist(), table.column("pixels").to_pylist()
    starts = [0, *(np.flatnonzero(np.diff(class_ids)) + 1).tolist(), len(ids)]
    runs = list(itertools.pairwise(starts)) if ids else []
    return pa.table({
        "class_id": pa.array([int(class_ids[a]) for a, _ in runs], type=pa.int32()),
        "text": pa.array([",\n".join(SAMPLE_ENTRY.format(image_id=json.dumps(ids[i]), pixels=pixels[i])
                                     for i in range(a, b)) for a, b in runs], type=pa.large_string()),
    })


class SamplingJson:
    """``sampling.json`` written in pieces to ``out``: byte for byte what ``json.dumps(indent=2)`` gives.

    :meth:`add` takes the laid-out entries of a class (ascending class ids, a class's entries in
    one or more pieces, in order); :meth:`finish` gives the classes without entries ``[]``.
    """

    def __init__(self, out: Any, head: Mapping[str, Any], *, num_classes: int) -> None:
        self.out, self.num_classes = out, num_classes
        self.next = 0  # the next class without an item
        self.open = False  # the last item's list is open (more entries may follow)
        text = json.dumps(json_safe(head), indent=2, allow_nan=False)
        self._write(text[: -len("\n}")] + ',\n  "samples_with_class": {')

    def _write(self, text: str) -> None:
        self.out.write(text.encode("utf-8"))

    def _close(self) -> None:
        if self.open:
            self._write("\n    ]")
            self.open = False

    def _begin(self, class_id: int) -> None:
        separator = ",\n" if class_id else "\n"
        self._write(f'{separator}    "{class_id}": ')
        self.next = class_id + 1

    def add(self, class_id: int, text: str) -> None:
        if self.open and class_id == self.next - 1:
            self._write(",\n" + text)
            return
        if class_id < self.next:
            raise ValueError(f"sampling.json: entries of class {class_id} after those of class {self.next - 1}")
        self._close()
        while self.next < class_id:
            self._begin(self.next)
            self._write("[]")
        self._begin(class_id)
        self._write("[\n" + text)
        self.open = True

    def finish(self) -> None:
        self._close()
        while self.next < self.num_classes:
            self._begin(self.next)
            self._write("[]")
        self._write("\n  }\n}\n" if self.num_classes else "}\n}\n")


def write_sampling(dest: str, head: Mapping[str, Any], fragments: Sequence[str], *, rows: int, num_classes: int,
                   s3: S3Settings, timeout_s: float) -> None:
    """``<dest>/sampling.json`` from the write tasks' fragments, streamed: published whole (temporary + rename/PUT).

    The fragments' rows are sorted by ``(class_id, image_id)`` in Ray (a distributed sort; tasks
    lay the entries out as text), and the driver appends the pieces to the file in order,
    holding one piece (at most :data:`ENTRIES_PER_TEXT` entries) at a time.
    """
    from pipeline.execution import stall_guarded
    from pipeline.training.shards import ShardFile

    class Whole(ShardFile):  # a file written in pieces, published whole
        def commit(self) -> None:
            self._publish()

    out = Whole(join_uri(dest, SAMPLING_FILE), s3=s3)
    try:
        writer = SamplingJson(out.file, head, num_classes=num_classes)
        if fragments:
            import ray

            from pipeline.graph import join_partitions

            with _ray_job(range_sort=True):  # the dataset takes the settings when it is made
                blocks = max(1, min(len(fragments), join_partitions(rows)))
                ds = ray.data.from_items([{"fragment": f} for f in sorted(fragments)], override_num_blocks=blocks)
                ds = ds.map_batches(ReadFragments(dest=dest, s3=s3), batch_size=None, batch_format="pyarrow",
                                    num_cpus=SELECT_CPUS)
                ds = ds.sort(["class_id", "image_id"]).map_batches(
                    sample_entries, batch_size=ENTRIES_PER_TEXT, batch_format="pyarrow", num_cpus=SELECT_CPUS)
                batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
                for batch in stall_guarded(batches, timeout_s=timeout_s, what="sampling.json",
                                           setting="ray.no_progress_timeout_s"):
                    texts = batch.column("text")  # one piece at a time: a block may hold many
                    for i, class_id in enumerate(batch.column("class_id").to_pylist()):
                        writer.add(class_id, texts[i].as_py())
        writer.finish()
        out.commit()
    except BaseException:
        out.abort()
        raise


def remove_sampling_fragments(dest: str, *, s3: S3Settings) -> None:
    """Delete ``<dest>/_sampling/`` (this export's fragments, a killed one's) and temporaries of ``sampling.json``."""
    from pipeline.training.shards import SAMPLING_DIR

    fs, path = filesystem_for(join_uri(dest, SAMPLING_DIR), s3=s3)
    fs.invalidate_cache(path)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs, root = filesystem_for(dest, s3=s3)
    if is_local(fs):  # elsewhere the temporary is a local file, not under <dest>
        for entry in fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(f".{SAMPLING_FILE}.") and name.endswith(".tmp"):
                fs.rm_file(entry)


def remove_stale_shards(dest: str, fmt: str, written: Mapping[str, Sequence[Mapping[str, Any]]], *,
                        s3: S3Settings) -> list[str]:
    """Delete ``shard-*`` files of ``fmt`` (and temporaries) under ``<dest>/<split>/`` this export did not write."""
    removed = []
    suffix = SHARD_SUFFIX[fmt]
    for split in SPLITS:
        keep = {s["name"] for s in written.get(split, [])}
        fs, path = filesystem_for(join_uri(dest, split), s3=s3)
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            stale = name.startswith(SHARD_PREFIX) and name.endswith(suffix) and name not in keep
            leftover = name.startswith(f".{SHARD_PREFIX}") and name.endswith(".tmp")
            if stale or leftover:
                fs.rm_file(entry)
                if stale:
                    removed.append(f"{split}/{name}")
    return removed


def _write_json(dest_layout: OutputLayout, name: str, value: Any) -> None:
    text = json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"
    write_or_explain(dest_layout, name, text.encode("utf-8"))


@contextlib.contextmanager
def _ray_job(*, range_sort: bool = False) -> Iterator[None]:
    """A Ray Data job of the export: rows in order; a failure or a stall is :class:`ExportError` (exit 1).

    ``range_sort``: a sort is Ray Data's range-partitioned sort (sample, partition, merge in
    tasks), not the default shuffle's, which starts shuffle actors (seconds, even for a few rows).
    """
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    from pipeline.execution import Stalled

    context = DataContext.get_current()
    saved = context.execution_options.preserve_order, context.shuffle_strategy
    # --limit takes the same images every time; sampling.json's entries come in their sorted order
    context.execution_options.preserve_order = True
    if range_sort:
        context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    except Stalled as exc:
        raise ExportError(str(exc), exit_code=1) from exc
    except ray.exceptions.RayError as exc:
        raise ExportError(f"the export failed: {' '.join(str(exc).split())[:1500]}", exit_code=1) from exc
    finally:
        context.execution_options.preserve_order, context.shuffle_strategy = saved


def run_export(options: ExportOptions, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run one export; returns the summary written to ``<DEST>/_export.json``. Raises :class:`ExportError`."""
    validate(options)
    started, mark = utc_now(), time.perf_counter()
    source, dest = normalize_uri(options.source), normalize_uri(options.dest)
    if source.rstrip("/") == dest.rstrip("/"):
        raise ExportError("--to must differ from --from (the export writes train/, val/ and sampling.json)")
    layout = OutputLayout(uri=source, s3=options.s3)
    try:
        fs, segments = filesystem_for(layout.path(SEGMENTS_DIR), s3=options.s3)
        if not fs.exists(segments):
            raise ExportError(f"{source}: not a segment output (no {SEGMENTS_DIR}/)")
        state = load_state(layout)
        files = sorted(state.live)
        if not files:
            raise ExportError(f"{source}: no segments files under {SEGMENTS_DIR}/")
        class_names = class_names_of(layout, files[0])
        if options.ignore_below > 0 and not has_confidence_maps(layout):
            raise ExportError(
                f"--ignore-below {options.ignore_below:g} needs the confidence maps, and {source} has none "
                f"(no {CONFIDENCE_DIR}/): segment with --confidence (output.confidence: true), or export with "
                "--ignore-below 0")
    except (InputError, OutputStateError) as exc:
        raise ExportError(str(exc)) from exc
    except storage_errors() as exc:
        raise ExportError(f"{source}: cannot be read ({_describe(exc)})") from exc
    if len(class_names) > IGNORE_INDEX:
        raise ExportError(f"{source}: {len(class_names)} classes: labels are 8-bit with {IGNORE_INDEX} = ignored")
    classes = resolve_classes(class_names, options.classes_present)
    try:
        check_writable(dest, s3=options.s3)
    except InputError as exc:
        raise ExportError(str(exc)) from exc

    import ray

    from pipeline.execution import configure_context, init_ray, stall_guarded
    from pipeline.stages import RemoteTally
    from pipeline.training.select import SelectRows
    from pipeline.training.shards import WriteShards

    init_ray(options.ray_address or None, verbose=options.verbose)
    configure_context(no_progress_timeout_s=options.no_progress_timeout_s)
    tally = RemoteTally()
    merged = _Merged(len(class_names))
    try:
        rows = sum(int(state.summaries[n]["rows"]) if n in state.summaries else max(1, state.live[n] // 400)
                   for n in files)
        with _ray_job():
            duplicates = find_duplicates(layout, files, rows=rows) if len(files) > 1 else {}
            groups = _groups(files)
            ds = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
                SelectRows(layout=layout, duplicates=duplicates, classes=classes, ignore_below=options.ignore_below,
                           min_confident_fraction=options.min_confident_fraction, val_fraction=options.val_fraction,
                           tally=tally),
                batch_size=1, batch_format="pyarrow", num_cpus=SELECT_CPUS)
            if options.limit:
                ds = ds.limit(options.limit)
            ds = ds.map_batches(
                WriteShards(layout=layout, dest=dest, fmt=options.format, ignore_below=options.ignore_below,
                            num_classes=len(class_names), shard_bytes=options.shard_bytes,
                            min_class_pixels=options.min_class_pixels, s3=options.s3),
                batch_size=options.images_per_task, batch_format="pyarrow", num_cpus=WRITE_CPUS)
            batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
            for batch in stall_guarded(batches, timeout_s=options.no_progress_timeout_s, what="the export",
                                       setting="ray.no_progress_timeout_s"):
                for text in batch.column("result").to_pylist():
                    result = json.loads(text)
                    merged.add(result)
                    if progress is not None:
                        progress(sum(result["images"].values()))
        counts = tally.counts()
    finally:
        tally.close()  # the stages hold copies of its handle: end the actor with the job
    counts.pop("unread", None)
    counts.pop("unread_count", None)

    dest_layout = OutputLayout(uri=dest, s3=options.s3)
    try:
        removed = remove_stale_shards(dest, options.format, merged.shards, s3=options.s3)
        _write_json(dest_layout, ID2LABEL_FILE, id2label(class_names))
        head = sampling_head(merged, class_names=class_names, min_class_pixels=options.min_class_pixels)
        write_sampling(dest, head, merged.fragments, rows=merged.sampling_rows, num_classes=len(class_names),
                       s3=options.s3, timeout_s=options.no_progress_timeout_s)
        remove_sampling_fragments(dest, s3=options.s3)
        summary = {
            "source": source, "dest": dest, "format": options.format, "options": options.public(),
            "started_at": started.isoformat(), "finished_at": utc_now().isoformat(),
            "duration_s": round(time.perf_counter() - mark, 3),
            "counts": {**counts, "selected": sum(merged.images.values()) + sum(merged.skipped.values()),
                       "exported": sum(merged.images.values()), **{s: merged.images.get(s, 0) for s in SPLITS}},
            "skipped": merged.skipped, "examples": merged.examples, "segments_files": len(files),
            "duplicate_ids": len(duplicates), "removed_stale_shards": removed,
            "shards": {s: sorted(merged.shards.get(s, []), key=lambda x: x["name"]) for s in SPLITS},
        }
        _write_json(dest_layout, EXPORT_FILE, summary)
    except InputError as exc:
        raise ExportError(str(exc), exit_code=1) from exc
    except storage_errors() as exc:
        raise ExportError(f"{dest}: cannot be written ({_describe(exc)})", exit_code=1) from exc
    return summary
