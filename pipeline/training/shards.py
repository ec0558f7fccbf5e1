"""Shards written whole, and the write stage that fills them.

A shard is written to a temporary file and appears under its name only when complete:
locally a hidden ``.<name>.<uuid>.tmp`` beside it, renamed; on object stores a local
temporary uploaded in one request (an S3 object appears only once its upload completes).
A killed export leaves no partial shard visible. Names are deterministic
(``shard-<split>-<task digest>-<n>``, ``pipeline.training.rules``): a retried or rerun
task replaces its own shards.

* WebDataset (:class:`TarShard`): per image ``<key>.<ext>`` (the image), ``<key>.seg.png``
  (8-bit "L" PNG of class ids, 255 = ignored) and ``<key>.json``, consecutive in the tar.
* HF Parquet (:class:`ParquetShard`): ``image``/``label`` as ``{bytes, path}`` structs, the
  id and the quality scores, row groups of :data:`ROW_GROUP_ROWS` rows, the ``huggingface``
  features metadata (``pipeline.training.rules.hf_schema``).

Each write task also leaves its train images' per-class pixels as a small Parquet *sampling
fragment* under ``<DEST>/_sampling/`` (:data:`FRAGMENT_SCHEMA`): the input of ``sampling.json``,
which ``pipeline.training.export`` assembles from the fragments and then deletes.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import tempfile
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.uris import (
    S3Settings,
    _describe,
    filesystem_for,
    is_local,
    join_uri,
    storage_errors,
    write_bytes_atomic,
)
from pipeline.outputs.layout import OutputLayout, json_safe, parquet_bytes
from pipeline.training.rules import hf_schema, shard_name, task_digest
from pipeline.training.samples import (
    UNREADABLE,
    Sample,
    SkipImage,
    SourceReader,
    build_sample,
    source_kind,
)

ROW_GROUP_ROWS = 100
#: Images fetched and prepared ahead of the one being written, per write task.
PREFETCH = 8
FETCH_THREADS = 4
#: Examples of each skip reason a task reports.
EXAMPLES_PER_REASON = 3
TAR_MTIME = 0  # members carry no time: the same inputs give the same bytes
#: Hidden folder under the destination holding the write tasks' sampling fragments while an export runs.
SAMPLING_DIR = "_sampling"
FRAGMENT_PREFIX = "samples-"
#: A sampling fragment: per train image and class with at least ``min_class_pixels``, its pixels.
FRAGMENT_SCHEMA = pa.schema([("class_id", pa.int32()), ("image_id", pa.string()), ("pixels", pa.int64())])


class ShardFile:
    """One file at ``uri``, written to a temporary and published whole by :meth:`commit`."""

    def __init__(self, uri: str, *, s3: S3Settings | None = None) -> None:
        self.uri = uri
        self.fs, self.path = filesystem_for(uri, s3=s3)
        self.local = is_local(self.fs)
        if self.local:
            folder = posixpath.dirname(self.path)
            os.makedirs(folder, exist_ok=True)
            self.tmp = posixpath.join(folder, f".{posixpath.basename(self.path)}.{uuid.uuid4().hex}.tmp")
        else:
            fd, self.tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp")
            os.close(fd)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort

    def _publish(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        else:  # a Parquet writer closes the file it was given
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.bytes = os.path.getsize(self.tmp)
        try:
            if self.local:
                os.replace(self.tmp, self.path)
            else:
                self.fs.put_file(self.tmp, self.path)
        finally:
            if os.path.lexists(self.tmp):
                os.unlink(self.tmp)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.lexists(self.tmp):
            os.unlink(self.tmp)


class TarShard(ShardFile):
    """A WebDataset tar shard: three members per image, consecutive."""

    def __init__(self, uri: str, *, s3: S3Settings | None = None) -> None:
        super().__init__(uri, s3=s3)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.images = 0

    def _member(self, name: str, data: bytes) -> None:
        import io

        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        self.tar.addfile(info, io.BytesIO(data))

    def append(self, fileobj) -> None:
        """Every member of another tar shard (a readable binary file), streamed in its order."""
        with tarfile.open(fileobj=fileobj, mode="r|") as source:
            for member in source:
                if member.isfile():
                    self.tar.addfile(member, source.extractfile(member))
                    self.images += member.name.endswith(".seg.png")

    def add(self, sample: Sample) -> None:
        self._member(f"{sample.key}.{sample.image_ext}", sample.image)
        self._member(f"{sample.key}.seg.png", sample.label)
        self._member(f"{sample.key}.json", json.dumps(json_safe(sample.meta), sort_keys=True).encode("utf-8"))
        self.images += 1

    @property
    def size(self) -> int:
        return self.file.tell()

    def commit(self) -> None:
        self.tar.close()
        self._publish()

    def abort(self) -> None:
        try:
            self.tar.close()
        except (OSError, ValueError):
            pass
        super().abort()


class ParquetShard(ShardFile):
    """An HF Parquet shard: rows of :func:`~pipeline.training.rules.hf_schema`, row groups of 100 rows."""

    def __init__(self, uri: str, *, s3: S3Settings | None = None) -> None:
        super().__init__(uri, s3=s3)
        self.schema = hf_schema()
        self.writer = pq.ParquetWriter(self.file, self.schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.carry: pa.Table | None = None  # appended rows short of a whole row group
        self.images = 0
        self.size = 0

    def add(self, sample: Sample) -> None:
        meta = sample.meta
        row = {"image": {"bytes": sample.image, "path": f"{sample.key}.{sample.image_ext}"},
               "label": {"bytes": sample.label, "path": f"{sample.key}.seg.png"},
               **{name: meta.get(name) for name in self.schema.names if name not in ("image", "label")}}
        self.rows.append(row)
        self.images += 1
        self.size += sample.nbytes
        if len(self.rows) >= ROW_GROUP_ROWS:
            self._flush()

    def append(self, fileobj) -> None:
        """Every row of another HF Parquet shard (a readable binary file), in row groups of this shard's size."""
        if self.rows:  # added one by one: they join the rows to repack
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
            self.carry = table if self.carry is None else pa.concat_tables([self.carry, table])
            self.rows = []
        source = pq.ParquetFile(fileobj)
        for batch in source.iter_batches(batch_size=ROW_GROUP_ROWS):
            table = pa.Table.from_batches([batch]).select(self.schema.names).cast(self.schema)
            self.carry = table if self.carry is None else pa.concat_tables([self.carry, table])
            self.images += table.num_rows
            self.size += table.nbytes
            whole = self.carry.num_rows - self.carry.num_rows % ROW_GROUP_ROWS
            if whole:  # full row groups now, the rest with the next rows
                self.writer.write_table(self.carry.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
                self.carry = self.carry.slice(whole)

    def _flush(self) -> None:
        if self.carry is not None and self.carry.num_rows:
            self.writer.write_table(self.carry, row_group_size=ROW_GROUP_ROWS)
        self.carry = None
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
            self.rows = []

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        self._publish()

    def abort(self) -> None:
        try:
            self.writer.close()
        except (OSError, ValueError, pa.ArrowException):
            pass
        super().abort()


SHARD_TYPES = {"webdataset": TarShard, "hf-parquet": ParquetShard}


class SplitShards:
    """The shards of one split of one write task: a new shard once the next image would pass ``shard_bytes``."""

    def __init__(self, *, dest: str, split: str, digest: str, fmt: str, shard_bytes: int, s3: S3Settings) -> None:
        self.dest, self.split, self.digest, self.fmt = dest, split, digest, fmt
        self.shard_bytes, self.s3 = shard_bytes, s3
        self.current: Any = None
        self.written: list[dict[str, Any]] = []

    def add(self, sample: Sample) -> None:
        if self.current is not None and self.current.images and self.current.size + sample.nbytes > self.shard_bytes:
            self.close()
        if self.current is None:
            name = shard_name(self.split, self.digest, len(self.written), self.fmt)
            self.current = SHARD_TYPES[self.fmt](join_uri(self.dest, self.split, name), s3=self.s3)
        self.current.add(sample)

    def close(self) -> None:
        if self.current is None:
            return
        shard, self.current = self.current, None
        shard.commit()
        self.written.append({"split": self.split, "name": posixpath.basename(shard.path), "images": shard.images,
                             "bytes": shard.bytes})

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None


class WriteShards:
    """Selected rows (``pipeline.training.select.SELECTED_SCHEMA``) -> shards; one result row per call.

    The result (a small JSON string, no per-image entry) holds the shards written, images per
    split, the skipped images by reason (with a few examples), the train split's pixels and
    images per class, and the name of the task's *sampling fragment*: a Parquet file
    ``<dest>/_sampling/samples-<task digest>.parquet`` (:data:`FRAGMENT_SCHEMA`) with
    ``class_id, image_id, pixels`` for each train image with at least ``min_class_pixels`` of a
    class. ``sampling.json``'s lists are assembled from the fragments (``pipeline.training.export``),
    never from the results, so no per-image object reaches the driver.
    """

    def __init__(
        self, *, layout: OutputLayout, dest: str, fmt: str, ignore_below: float, num_classes: int, shard_bytes: int,
        min_class_pixels: int, s3: S3Settings | None = None,
    ) -> None:
        self.layout, self.dest, self.fmt = layout, dest, fmt
        self.ignore_below, self.num_classes = ignore_below, num_classes
        self.shard_bytes, self.min_class_pixels = shard_bytes, min_class_pixels
        self.s3 = s3 or S3Settings()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        digest = task_digest([r["image_id"] for r in rows])
        splits: dict[str, SplitShards] = {}
        result: dict[str, Any] = {"images": {}, "skipped": {}, "examples": {},
                                  "class_pixels": [0] * self.num_classes, "class_images": [0] * self.num_classes,
                                  "sampling_fragment": None, "sampling_rows": 0}
        entries: dict[str, list[Any]] = {name: [] for name in FRAGMENT_SCHEMA.names}
        try:
            for row, outcome in self._prepared(rows):
                if isinstance(outcome, SkipImage):
                    result["skipped"][outcome.reason] = result["skipped"].get(outcome.reason, 0) + 1
                    examples = result["examples"].setdefault(outcome.reason, [])
                    if len(examples) < EXAMPLES_PER_REASON:
                        examples.append(str(outcome))
                    continue
                split = row["split"]
                if split not in splits:
                    splits[split] = SplitShards(dest=self.dest, split=split, digest=digest, fmt=self.fmt,
                                                shard_bytes=self.shard_bytes, s3=self.s3)
                splits[split].add(outcome)
                result["images"][split] = result["images"].get(split, 0) + 1
                if split == "train":
                    self._count(outcome, result, entries)
            for shards in splits.values():
                shards.close()
        except BaseException:
            for shards in splits.values():
                shards.abort()
            raise
        if entries["image_id"]:
            name = f"{FRAGMENT_PREFIX}{digest}.parquet"
            fragment = pa.table(entries, schema=FRAGMENT_SCHEMA)
            write_bytes_atomic(*filesystem_for(join_uri(self.dest, SAMPLING_DIR, name), s3=self.s3),
                               parquet_bytes(fragment))
            result["sampling_fragment"], result["sampling_rows"] = name, fragment.num_rows
        result["shards"] = [s for shards in splits.values() for s in shards.written]
        return pa.table({"result": [json.dumps(result)]})

    def _count(self, sample: Sample, result: dict[str, Any], entries: dict[str, list[Any]]) -> None:
        for class_id, pixels in enumerate(sample.class_pixels):
            if pixels:
                result["class_pixels"][class_id] += pixels
                result["class_images"][class_id] += 1
                if pixels >= self.min_class_pixels:
                    entries["class_id"].append(class_id)
                    entries["image_id"].append(sample.image_id)
                    entries["pixels"].append(pixels)

    def _prepared(self, rows: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Sample | SkipImage]]:
        """``(row, sample or the reason it is skipped)`` in row order, :data:`PREFETCH` rows prepared ahead."""
        manifests = {source_kind(r["source_uri"])[1]: (r.get("bytes_column"), r.get("key_column"))
                     for r in rows if r.get("bytes_column")}
        reader = SourceReader(s3=self.layout.s3, manifests=manifests, expected=[r["source_uri"] for r in rows])

        def prepare(row: dict[str, Any]) -> Sample | SkipImage:
            try:
                return build_sample(row, layout=self.layout, reader=reader, ignore_below=self.ignore_below,
                                    num_classes=self.num_classes, split=row["split"])
            except SkipImage as exc:
                return exc
            except storage_errors() as exc:
                return SkipImage(UNREADABLE, f"{row['image_id']}: {_describe(exc)}")

        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            window: deque[tuple[dict[str, Any], Future]] = deque()
            for row in rows:
                window.append((row, pool.submit(prepare, row)))
                if len(window) > PREFETCH:
                    done_row, future = window.popleft()
                    yield done_row, future.result()
            while window:
                done_row, future = window.popleft()
                yield done_row, future.result()
