"""Training data that ``segment --training`` writes under ``<output>/training/``, each ok image exactly once.

Layout::

    training/part-<run>-<digest>.tar|.parquet   the ok images of segments/part-<run>-<digest>.parquet (one write batch)
    training/compact-<digest>.tar|.parquet      small shards merged after a run, ~output.training.shard_mb each
    training/id2label.json                      {"0": "background", ...}
    training/_training.json                     what every shard was made with (format, ignore_below)
    training/_pending/                          shards not yet published, and merge records (never read by consumers)

A shard holds the samples of :mod:`pipeline.training.samples` in the formats of
:mod:`pipeline.training.shards`. It commits with the segments rows of its batch:

1. the write task writes its masks, then the shard to ``_pending/<stem>`` (whole, or not at all);
2. then ``segments/<stem>.parquet``, the commit point of the batch;
3. then publishes the shard: ``_pending/<stem>`` -> ``training/<stem>`` (a rename locally; a
   server-side copy on object stores, where the object appears only when complete).

The write task checks the output's lease before step 2 (``pipeline.outputs.lease.LeaseGuard``):
readers deduplicate segments rows but not shards, so a run that lost the lease commits nothing.
Every run, under the output's lease, first :func:`recover`\\ s: a pending part shard whose
segments file exists is published (the kill came between 2 and 3), any other is deleted
(its rows were never committed, so this run does those images again). A resumed run never
repeats an image (resume skips committed rows), so no image reaches two shards.

After a run, :meth:`TrainingStore.merge` packs the small shards (under half the target) into
``compact-<digest>`` shards of about ``output.training.shard_mb``, in these steps:

1. the merged shard is written to ``_pending/compact-<digest>`` (:meth:`~TrainingStore.write_merged`);
2. its record ``_pending/compact-<digest>.json``, naming the shards it replaces, commits the merge
   (:meth:`~TrainingStore.commit_merge`);
3. the replaced shards are deleted, 4. the merged shard is published, 5. the record is removed
   (:func:`finish_merge`).

:func:`recover` finishes a merge whose record exists and drops a merged shard whose record does
not. Readers listing ``training/`` therefore never see an image twice; after a kill between
steps 3 and 4 they miss that merge's images until the next run over the output finishes it.
After every completed run, the shards hold the image of every ok row exactly once.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.io.uris import (
    InputError,
    S3Settings,
    _describe,
    filesystem_for,
    move_atomic,
)
from pipeline.outputs.layout import SEGMENTS_DIR, OutputLayout, write_or_explain
from pipeline.training.rules import FORMATS, QUALITY_FIELDS, SHARD_SUFFIX, id2label
from pipeline.training.samples import Sample, make_sample
from pipeline.training.shards import SHARD_TYPES

TRAINING_DIR = "training"
PENDING_DIR = f"{TRAINING_DIR}/_pending"
SETTINGS_FILE = f"{TRAINING_DIR}/_training.json"
ID2LABEL_FILE = f"{TRAINING_DIR}/id2label.json"
PART_PREFIX = "part-"
MERGED_PREFIX = "compact-"
RECORD_SUFFIX = ".json"


class TrainingSettingsError(ValueError):
    """A run whose training settings do not fit the output's (the message says what to do)."""


@dataclass(frozen=True)
class TrainingStore:
    """The ``training/`` folder of one output, in one format."""

    layout: OutputLayout
    format: str
    ignore_below: float = 0.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"output.training.format: expected one of {FORMATS}, got {self.format!r}")

    @property
    def suffix(self) -> str:
        return SHARD_SUFFIX[self.format]

    @property
    def s3(self) -> S3Settings:
        return self.layout.s3

    def shard_name(self, segments_file: str) -> str:
        """The shard of a segments file: its stem with the format's suffix."""
        return posixpath.splitext(segments_file)[0] + self.suffix

    # ------------------------------------------------------------------ write task

    def sample(self, row: Mapping[str, Any]) -> Sample:
        """The sample of a written row (``image``/``image_ext`` from decode, ``mask``/``confidence`` from the CRF)."""
        shape = (int(row["height"]), int(row["width"]))
        mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(shape)
        confidence = None if row.get("confidence") is None else \
            np.frombuffer(row["confidence"], dtype=np.uint8).reshape(shape)
        return make_sample(image_id=row["image_id"], source_uri=row["source_uri"], image=row["image"],
                           image_ext=row["image_ext"], mask=mask, confidence=confidence,
                           ignore_below=self.ignore_below, num_classes=len(row["class_pixels"]),
                           quality={name: row.get(name) for name in QUALITY_FIELDS})

    def write_pending(self, segments_file: str, samples: Sequence[Sample]) -> str:
        """Step 1: the batch's shard, whole, under ``_pending/``; returns its name."""
        name = self.shard_name(segments_file)
        shard = SHARD_TYPES[self.format](self.layout.path(PENDING_DIR, name), s3=self.s3)
        try:
            for sample in samples:
                shard.add(sample)
            shard.commit()
        except BaseException:
            shard.abort()
            raise
        return name

    def publish(self, name: str) -> None:
        """Step 3: ``_pending/<name>`` -> ``training/<name>``; FileNotFoundError when it is in neither."""
        if not publish_pending(self.layout, name):
            raise FileNotFoundError(f"{self.layout.path(PENDING_DIR, name)}: not there, and not published")

    def discard(self, segments_file: str) -> None:
        """Remove the shard of ``segments_file``, pending or published: its batch is committed without one."""
        name = self.shard_name(segments_file)
        _delete(self.layout, f"{PENDING_DIR}/{name}")
        _delete(self.layout, f"{TRAINING_DIR}/{name}")

    # ------------------------------------------------------------------ driver

    def shards(self) -> dict[str, int]:
        """``{name: bytes}`` of the published shards (one listing)."""
        return self.layout.list_files(TRAINING_DIR, suffix=self.suffix)

    def merge(self, *, target_bytes: int, map_fn: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]
              | None = None) -> list[str]:
        """Merge the small shards into ``compact-*`` shards of about ``target_bytes``; returns the new names."""
        from pipeline.outputs.compaction import pack_small, thread_map

        groups = pack_small(self.shards(), target=target_bytes)
        if not groups:
            return []
        return (map_fn or thread_map)(lambda names: self.merge_group(names), groups)  # a function: Ray tasks take one

    def merged_name(self, names: Sequence[str]) -> str:
        digest = hashlib.sha1("\n".join(sorted(names)).encode("utf-8")).hexdigest()[:20]
        return f"{MERGED_PREFIX}{digest}{self.suffix}"

    def merge_group(self, names: Sequence[str]) -> str:
        """One merge, in the steps of the module docstring; returns the merged shard's name.

        A retry (Ray re-runs a task whose worker died) finds the merge committed and finishes it.
        """
        name = self.merged_name(names)
        record = self.layout.read_json(f"{PENDING_DIR}/{posixpath.splitext(name)[0]}{RECORD_SUFFIX}")
        if record is None:
            self.write_merged(names)
            record = self.commit_merge(name, names)
        finish_merge(self.layout, record)
        return name

    def write_merged(self, names: Sequence[str]) -> str:
        """Merge step 1: every sample of the shards ``names``, in order, to ``_pending/compact-<digest>``."""
        name = self.merged_name(names)
        merged = SHARD_TYPES[self.format](self.layout.path(PENDING_DIR, name), s3=self.s3)
        try:
            for part in names:
                uri = self.layout.path(TRAINING_DIR, part)
                fs, path = filesystem_for(uri, s3=self.s3)
                try:
                    with fs.open(path, "rb") as f:
                        merged.append(f)
                except (tarfile.TarError, pa.ArrowInvalid, EOFError) as exc:
                    raise InputError(f"training shard {uri}: unreadable ({_describe(exc)}); it is not one this job "
                                     "wrote whole: move it out of training/ and rerun") from exc
            merged.commit()
        except BaseException:
            merged.abort()
            raise
        return name

    def commit_merge(self, name: str, names: Sequence[str]) -> dict[str, Any]:
        """Merge step 2, its commit point: the record naming the merged shard and the shards it replaces."""
        record = {"merged": name, "replaces": sorted(names)}
        write_or_explain(self.layout, f"{PENDING_DIR}/{posixpath.splitext(name)[0]}{RECORD_SUFFIX}",
                         json.dumps(record, sort_keys=True).encode("utf-8"))
        return record


def _delete(layout: OutputLayout, relative: str) -> None:
    fs, path = filesystem_for(layout.path(relative), s3=layout.s3)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def finish_merge(layout: OutputLayout, record: Mapping[str, Any]) -> None:
    """Merge steps 3-5 of a committed merge: delete its inputs left, publish the merged shard, remove the record."""
    for part in record["replaces"]:
        _delete(layout, f"{TRAINING_DIR}/{part}")
    name = record["merged"]
    if not publish_pending(layout, name):
        raise InputError(f"{layout.path(PENDING_DIR, name)}: the merged shard of a committed merge is gone (and not "
                         f"published); its images were in {', '.join(record['replaces'])}")
    _delete(layout, f"{PENDING_DIR}/{posixpath.splitext(name)[0]}{RECORD_SUFFIX}")


def publish_pending(layout: OutputLayout, name: str) -> bool:
    """``training/_pending/<name>`` -> ``training/<name>`` whole; False when it is in neither place.

    Already published (a repeat after a kill): True, nothing moved. Listings are not trusted:
    the existence checks go to the store.
    """
    fs, source = filesystem_for(layout.path(PENDING_DIR, name), s3=layout.s3)
    _, dest = filesystem_for(layout.path(TRAINING_DIR, name), s3=layout.s3)
    try:
        move_atomic(fs, source, dest)
        return True
    except FileNotFoundError:
        fs.invalidate_cache(posixpath.dirname(dest))
        return bool(fs.exists(dest))


def _pending_entries(layout: OutputLayout) -> list[str]:
    fs, path = filesystem_for(layout.path(PENDING_DIR), s3=layout.s3)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory")


def recover(layout: OutputLayout) -> dict[str, int]:
    """Settle what a killed run left under ``training/_pending/`` (see the module docstring); returns counts.

    Runs under the output's lease, before anything else writes or compacts the segments files.
    """
    counts = {"published": 0, "dropped": 0, "merges_finished": 0, "merges_dropped": 0}
    names = _pending_entries(layout)
    records = [n for n in names if n.startswith(MERGED_PREFIX) and n.endswith(RECORD_SUFFIX)]
    committed = set()
    for record_name in records:
        fs, path = filesystem_for(layout.path(PENDING_DIR, record_name), s3=layout.s3)
        record = json.loads(fs.cat_file(path))
        finish_merge(layout, record)
        committed.add(record["merged"])
        counts["merges_finished"] += 1
    pending_parts = [n for n in names if n.startswith(PART_PREFIX)]
    segments = set(layout.list_files(SEGMENTS_DIR)) if pending_parts else set()  # fresh (never a cached listing)
    for name in names:
        if name in records or name in committed:
            continue
        stem, suffix = posixpath.splitext(name)
        if name.startswith(".") and suffix == ".tmp":  # a killed writer's temporary (no writer is live now)
            _delete(layout, f"{PENDING_DIR}/{name}")
            continue
        if suffix not in SHARD_SUFFIX.values():
            continue
        if name.startswith(PART_PREFIX):
            if f"{stem}.parquet" in segments:
                publish_pending(layout, name)
                counts["published"] += 1
                continue
            counts["dropped"] += 1
        else:
            counts["merges_dropped"] += 1
        _delete(layout, f"{PENDING_DIR}/{name}")
    return counts


def read_settings(layout: OutputLayout) -> dict[str, Any] | None:
    return layout.read_json(SETTINGS_FILE)


def check_settings(layout: OutputLayout, *, fmt: str, ignore_below: float, ok_rows: int) -> dict[str, Any] | None:
    """The settings to record before this run writes: None to keep what is recorded, ``{}`` to remove
    the record (no training data, and nothing committed under it), else the settings; raises
    TrainingSettingsError.

    Every ok image of an output with training data is in it exactly once, so the settings
    cannot change between runs: a run with others, without ``--training`` on an output that
    has training data, or with it on an output whose earlier images have none, is refused.
    """
    stored = read_settings(layout)
    if stored is None:
        if not fmt:
            return None
        if ok_rows:
            raise TrainingSettingsError(
                f"{ok_rows} image(s) under this output were segmented without --training, so training/ would miss "
                f"them; build training data from all of them with `deeplab-batch export --from {layout.uri} --to DEST "
                f"--format {fmt}`, or segment into a new --output")
        return {"format": fmt, "ignore_below": ignore_below}
    wanted = {"format": fmt, "ignore_below": ignore_below}
    if wanted == {"format": stored.get("format"), "ignore_below": stored.get("ignore_below")}:
        return None
    if not ok_rows:  # nothing was committed with the old settings
        return wanted if fmt else {}
    have = f"--training {stored.get('format')} --ignore-below {stored.get('ignore_below')}"
    if not fmt:
        raise TrainingSettingsError(
            f"this output keeps training data ({have}, {SETTINGS_FILE}); rerun with {have} so that new images reach "
            f"it too")
    raise TrainingSettingsError(
        f"this output's training data was made with {have} (in {SETTINGS_FILE}), not --training {fmt} "
        f"--ignore-below {ignore_below}; rerun with {have}, or build other training data with `deeplab-batch export`")


def write_settings(layout: OutputLayout, settings: Mapping[str, Any]) -> None:
    """Record the settings (an empty mapping removes the record)."""
    if not settings:
        _delete(layout, SETTINGS_FILE)
        return
    write_or_explain(layout, SETTINGS_FILE, (json.dumps(dict(settings), indent=2, sort_keys=True) + "\n").encode())


def write_id2label(layout: OutputLayout, class_names: Sequence[str]) -> None:
    """``training/id2label.json``: ``{"0": "background", ...}`` (the convention of HF datasets and models)."""
    text = json.dumps(id2label(class_names), indent=2) + "\n"
    write_or_explain(layout, ID2LABEL_FILE, text.encode("utf-8"))


__all__ = ["ID2LABEL_FILE", "PENDING_DIR", "SETTINGS_FILE", "TRAINING_DIR", "TrainingSettingsError", "TrainingStore",
           "check_settings", "read_settings", "recover", "write_id2label", "write_settings"]
