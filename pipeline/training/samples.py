"""One exported image: its bytes from ``source_uri``, its mask and confidence map from the output, the label.

* image bytes (:class:`SourceReader`): plain file URIs (local, s3://, gs://:
  :func:`pipeline.io.sources.fetch_bytes`); tar members (``<shard>.tar#<member>``: the member's
  byte range, from the shard's headers, read once per task and kept for a few shards); byte-manifest
  rows (``<manifest>.parquet#<key>``: the row is found by its key, as ``segment`` formed it: the
  key column's value, or the content hash of the bytes where the row has none; then that row
  group's bytes column is read, the last one kept).
* the image is kept as it is stored unless its EXIF orientation (2-8) rotates or mirrors it: then
  it is re-encoded upright (JPEG sources as JPEG quality 95, others as PNG), so that the image and
  its label line up pixel for pixel under a plain ``PIL.Image.open``.
* the label: ``masks/<image_id>.png`` (class ids), 255 where ``confidence/<image_id>.png`` is below
  the threshold (``pipeline.training.rules``).
"""

from __future__ import annotations

import io
import tarfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import InputConfig
from pipeline.decode import DECODE_FAILURES, DecodeError, decode_image
from pipeline.io.sources import content_key, extension, fetch_bytes, read_manifest_group
from pipeline.io.uris import (
    InputError,
    S3Settings,
    _describe,
    filesystem_for,
    storage_errors,
)
from pipeline.outputs.layout import CONFIDENCE_DIR, MASKS_DIR, OutputLayout
from pipeline.training.rules import (
    QUALITY_FIELDS,
    confident_pixels,
    label_counts,
    label_png,
    sample_key,
    training_label,
)

EXIF_ORIENTATION = 0x0112
#: Tar shards whose member index a task keeps (rows of one shard usually come together).
SHARD_CACHE = 4
#: How :func:`pipeline.io.sources.content_key` starts: the key segment gives a manifest row without one.
CONTENT_KEY_PREFIX = "sha256:"
JPEG_QUALITY = 95
#: Pillow's format name -> the extension of the sample's image member.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff",
                     "GIF": "gif"}

#: Reasons an image is skipped (the export's ``skipped`` counts).
UNREADABLE = "unreadable"
UNDECODABLE = "undecodable"
SIZE_MISMATCH = "size_mismatch"
NO_CONFIDENCE = "no_confidence_map"


class SkipImage(Exception):
    """This image is left out of the export; ``reason`` is one of the module's reason names."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def source_kind(source_uri: str) -> tuple[str, str, str]:
    """``(kind, location, member)``: ``("tar", shard, member)``, ``("manifest", path, key)`` or ``("file", uri, "")``.

    A ``#`` splits a source only where the part before it is a ``.tar`` shard or a ``.parquet``
    manifest (as ``pipeline.io.sources`` builds them); any other ``#`` belongs to the file name.
    """
    start = 0
    while (index := source_uri.find("#", start)) >= 0:
        head, tail = source_uri[:index], source_uri[index + 1:]
        if extension(head) == "tar":
            return "tar", head, tail
        if extension(head) == "parquet":
            return "manifest", head, tail
        start = index + 1
    return "file", source_uri, ""


class SourceReader:
    """Bytes of images by ``source_uri``; thread-safe (the prefetch threads of a write task share one).

    * tar members: the member index of the last :data:`SHARD_CACHE` shards is kept.
    * byte-manifest rows: ``manifests`` maps a manifest URI to the ``(bytes column, key column)``
      of the segment run that read it (``input.bytes_column``, ``input.key_column``; segment's
      defaults for a manifest not named). ``expected``: the source URIs the reader will be asked
      for (a write task's rows): one pass over a manifest's key column finds the rows of all of
      them, and only theirs are remembered (memory grows with the task, not the manifest). A key
      segment made from the content hash (rows without a key) is found by hashing the bytes of
      the row groups that hold such rows, stopping once every expected one is found. The bytes
      column of the last row group read is kept (rows of one manifest usually come together).
    """

    def __init__(
        self, *, s3: S3Settings | None = None, manifests: Mapping[str, tuple[str | None, str | None]] | None = None,
        expected: Iterable[str] = (),
    ) -> None:
        self.s3 = s3 or S3Settings()
        self.shards: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self.lock = threading.Lock()  # shared by a write task's prefetch threads
        self.columns = {uri: (names[0] or InputConfig.bytes_column, names[1] or InputConfig.key_column)
                        for uri, names in (manifests or {}).items()}
        self.wanted: dict[str, set[str]] = {}  # manifest -> keys expected
        for uri in expected:
            kind, location, key = source_kind(uri)
            if kind == "manifest":
                self.wanted.setdefault(location, set()).add(key)
        self.rows: dict[str, dict[str, tuple[int, int]]] = {}  # manifest -> {key: (row group, row)} found
        self.searched: dict[str, set[str]] = {}  # manifest -> keys looked for (found or not)
        self.broken: dict[str, str] = {}  # manifest -> why it cannot be read
        self.group: tuple[tuple[str, int], pa.ChunkedArray] | None = None  # the last row group's bytes column

    def members(self, shard: str) -> dict[str, tuple[int, int]]:
        with self.lock:
            return self._members(shard)

    def _members(self, shard: str) -> dict[str, tuple[int, int]]:
        if shard in self.shards:
            self.shards.move_to_end(shard)
            return self.shards[shard]
        fs, path = filesystem_for(shard, s3=self.s3)
        found: dict[str, tuple[int, int]] = {}
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    found[member.name] = (member.offset_data, member.size)
        self.shards[shard] = found
        while len(self.shards) > SHARD_CACHE:
            self.shards.popitem(last=False)
        return found

    def read(self, source_uri: str) -> bytes:
        kind, location, member = source_kind(source_uri)
        if kind == "manifest":
            with self.lock:
                return self._manifest_row(source_uri, location, member)
        if kind == "tar":
            try:
                offset, size = self.members(location)[member]
            except KeyError:
                raise SkipImage(UNREADABLE, f"{source_uri}: no member {member!r} in the shard") from None
            except (tarfile.TarError, EOFError) as exc:
                raise SkipImage(UNREADABLE, f"{source_uri}: unreadable tar shard ({exc})") from exc
            return fetch_bytes(location, s3=self.s3, start=offset, size=size)
        return fetch_bytes(location, s3=self.s3)

    def _manifest_row(self, source_uri: str, manifest: str, key: str) -> bytes:
        """The bytes of the row ``key`` names in ``manifest`` (:class:`SkipImage` ``unreadable`` naming the URI)."""
        bytes_column, key_column = self.columns.get(manifest, (InputConfig.bytes_column, InputConfig.key_column))
        if manifest in self.broken:
            raise SkipImage(UNREADABLE, f"{source_uri}: cannot read the manifest ({self.broken[manifest]})")
        try:
            where = self._locate(manifest, key, bytes_column=bytes_column, key_column=key_column)
            if where is None:
                raise SkipImage(UNREADABLE, f"{source_uri}: no row of the manifest has the key {key!r} (column "
                                            f"{key_column!r}, or the content hash of {bytes_column!r})")
            group, row = where
            if self.group is None or self.group[0] != (manifest, group):
                table = read_manifest_group(manifest, group, [bytes_column], s3=self.s3)
                self.group = ((manifest, group), table.column(bytes_column))
            data = self.group[1][row].as_py()
        except (InputError, pa.ArrowInvalid, *storage_errors()) as exc:
            raise SkipImage(UNREADABLE, f"{source_uri}: cannot read the manifest ({_describe(exc)})") from exc
        if data is None:
            raise SkipImage(UNREADABLE, f"{source_uri}: the manifest's {bytes_column!r} cell is null")
        return data.encode("latin-1") if isinstance(data, str) else data  # as segment reads it (stages.read)

    def _locate(self, manifest: str, key: str, *, bytes_column: str, key_column: str) -> tuple[int, int] | None:
        """``(row group, row)`` of ``key`` in ``manifest``, or None; one pass finds every expected key not yet sought."""
        searched = self.searched.setdefault(manifest, set())
        found = self.rows.setdefault(manifest, {})
        if key not in searched:
            todo = (self.wanted.get(manifest, set()) | {key}) - searched
            try:
                self._scan(manifest, todo, found, bytes_column=bytes_column, key_column=key_column)
            except (InputError, pa.ArrowInvalid, *storage_errors()) as exc:
                self.broken[manifest] = _describe(exc)
                raise
            searched |= todo
        return found.get(key)

    def _scan(self, manifest: str, todo: set[str], found: dict[str, tuple[int, int]], *, bytes_column: str,
              key_column: str) -> None:
        """Find the rows of the keys ``todo`` in ``manifest`` (the first row of a repeated key, as segment kept)."""
        todo = set(todo)
        fs, path = filesystem_for(manifest, s3=self.s3)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if bytes_column not in names:
                raise InputError(f"no column {bytes_column!r} (the segment run's input.bytes_column); the manifest "
                                 f"has {names}")
            keyed = key_column in names
            for group in range(parquet.num_row_groups):
                if not todo:
                    return
                unkeyed: list[int] = []  # rows whose key is their content hash
                if keyed:
                    for row, value in enumerate(parquet.read_row_group(group, columns=[key_column])
                                                .column(key_column).to_pylist()):
                        if value in (None, ""):
                            unkeyed.append(row)
                        elif (name := f"{value}") in todo:  # segment's key: f"{manifest}#{value}"
                            found[name] = (group, row)
                            todo.discard(name)
                else:
                    unkeyed = list(range(parquet.metadata.row_group(group).num_rows))
                if unkeyed and any(k.startswith(CONTENT_KEY_PREFIX) for k in todo):
                    column = parquet.read_row_group(group, columns=[bytes_column]).column(bytes_column)
                    self.group = ((manifest, group), column)  # its rows are likely the next ones read
                    for row in unkeyed:
                        data = column[row].as_py()
                        name = content_key(data.encode("latin-1") if isinstance(data, str) else (data or b""))
                        if name in todo:
                            found[name] = (group, row)
                            todo.discard(name)


@dataclass
class Sample:
    """Everything one image contributes to a shard."""

    image_id: str
    key: str
    image: bytes
    image_ext: str
    label: bytes  # "L" PNG of class ids, 255 = ignored
    meta: dict[str, Any]
    class_pixels: list[int]  # pixels per class in the label (255 not counted)

    @property
    def nbytes(self) -> int:
        return len(self.image) + len(self.label)


def upright_image(data: bytes, *, decoded: np.ndarray | None = None) -> tuple[bytes, str, tuple[int, int]]:
    """``(bytes, extension, (width, height))`` of the image as viewers show it.

    The stored bytes when no EXIF orientation 2-8 applies; else re-encoded upright (JPEG
    sources: JPEG quality 95; others: PNG). ``decoded``: the image already decoded upright
    (``pipeline.decode.decode_image``), which saves a second decode of a rotated image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                fmt, size = image.format or "", image.size
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except DECODE_FAILURES as exc:
        raise SkipImage(UNDECODABLE, f"cannot read the image header: {exc}") from exc
    ext = FORMAT_EXTENSIONS.get(fmt, fmt.lower() or "img")
    if orientation not in range(2, 9):
        return data, ext, size
    if decoded is not None:
        rgb = decoded
    else:
        try:
            rgb = decode_image(data, max_pixels=size[0] * size[1] + 1)  # applies the orientation
        except DecodeError as exc:
            raise SkipImage(UNDECODABLE, str(exc)) from exc
    buffer = io.BytesIO()
    if fmt in ("JPEG", "MPO"):  # MPO: a phone JPEG with extra frames after the first
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        ext = "jpg"
    else:
        Image.fromarray(rgb).save(buffer, format="PNG")
        ext = "png"
    return buffer.getvalue(), ext, (rgb.shape[1], rgb.shape[0])


def read_png_array(data: bytes, *, what: str) -> np.ndarray:
    """A 2-D uint8 array of an 8-bit PNG (palette indices for a palette PNG, values for "L")."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("P", "L"):
                raise SkipImage(UNDECODABLE, f"{what}: expected an 8-bit palette or grayscale PNG, got {image.mode}")
            return np.asarray(image, dtype=np.uint8)
    except SkipImage:
        raise
    except DECODE_FAILURES as exc:
        raise SkipImage(UNDECODABLE, f"{what}: cannot decode ({exc})") from exc


def build_sample(
    row: Mapping[str, Any], *, layout: OutputLayout, reader: SourceReader, ignore_below: float, num_classes: int,
    split: str,
) -> Sample:
    """The sample of one selected segments row (raises :class:`SkipImage`; storage errors propagate)."""
    image_id = row["image_id"]
    width, height = int(row["width"]), int(row["height"])
    image, ext, size = upright_image(reader.read(row["source_uri"]))
    if size != (width, height):
        raise SkipImage(SIZE_MISMATCH, f"{image_id}: image is {size[0]}x{size[1]}, its row says {width}x{height}")
    mask = read_png_array(fetch_bytes(layout.path(MASKS_DIR, f"{image_id}.png"), s3=layout.s3), what="mask")
    if mask.shape != (height, width):
        raise SkipImage(SIZE_MISMATCH, f"{image_id}: mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}")
    confidence = None
    if ignore_below > 0:
        if not row.get("confidence_uri"):
            raise SkipImage(NO_CONFIDENCE, f"{image_id}: no confidence map (segmented without --confidence)")
        confidence = read_png_array(fetch_bytes(layout.path(CONFIDENCE_DIR, f"{image_id}.png"), s3=layout.s3),
                                    what="confidence map")
        if confidence.shape != mask.shape:
            raise SkipImage(SIZE_MISMATCH, f"{image_id}: confidence map and mask differ in size")
    return make_sample(image_id=image_id, source_uri=row["source_uri"], image=image, image_ext=ext, mask=mask,
                       confidence=confidence, ignore_below=ignore_below, num_classes=num_classes,
                       quality={name: row.get(name) for name in QUALITY_FIELDS}, split=split)


def make_sample(
    *, image_id: str, source_uri: str, image: bytes, image_ext: str, mask: np.ndarray, confidence: np.ndarray | None,
    ignore_below: float, num_classes: int, quality: Mapping[str, Any], split: str | None = None,
) -> Sample:
    """The sample of an image whose upright bytes, mask and 8-bit confidence map are at hand.

    One rule for ``export`` and ``segment --training``: the label is
    :func:`~pipeline.training.rules.training_label`; with a threshold, ``confident_fraction`` and
    ``ignored_pixels`` are recounted from the label (the 8-bit rule of ``pipeline.training.rules``).
    """
    height, width = mask.shape
    quality = dict(quality)
    if ignore_below > 0:
        confident = confident_pixels(confidence, ignore_below) if confidence is not None else 0
        quality["confident_fraction"] = confident / float(width * height)
        quality["ignored_pixels"] = width * height - confident
    label = training_label(mask, confidence, ignore_below)
    counts = label_counts(label, num_classes)
    key = sample_key(image_id)
    meta = {"image_id": image_id, "key": key, "source_uri": source_uri, **({"split": split} if split else {}),
            "width": int(width), "height": int(height), "class_pixels": counts, "ignore_below": ignore_below,
            **quality}
    return Sample(image_id=image_id, key=key, image=image, image_ext=image_ext, label=label_png(label), meta=meta,
                  class_pixels=counts)
