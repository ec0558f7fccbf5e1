"""One exported image: its bytes from ``source_uri``, its mask and confidence map from the output, the label.

* image bytes: plain file URIs (local, s3://, gs://: :func:`pipeline.io.sources.fetch_bytes`) and tar
  members (``<shard>.tar#<member>``: the member's byte range, from the shard's headers, read once
  per task and kept for a few shards). Byte-manifest rows (``<manifest>.parquet#<key>``) are not
  supported: the row does not say where the bytes are (:class:`Unsupported`, counted as skipped).
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.decode import DECODE_FAILURES, DecodeError, decode_image
from pipeline.io.sources import extension, fetch_bytes
from pipeline.io.uris import S3Settings, filesystem_for
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
JPEG_QUALITY = 95
#: Pillow's format name -> the extension of the sample's image member.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif"}

#: Reasons an image is skipped (the export's ``skipped`` counts).
UNSUPPORTED = "unsupported_source"
UNREADABLE = "unreadable"
UNDECODABLE = "undecodable"
SIZE_MISMATCH = "size_mismatch"
NO_CONFIDENCE = "no_confidence_map"


class SkipImage(Exception):
    """This image is left out of the export; ``reason`` is one of the module's reason names."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unsupported(SkipImage):
    def __init__(self, message: str) -> None:
        super().__init__(UNSUPPORTED, message)


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
    """Bytes of images by ``source_uri``; keeps the member index of the last :data:`SHARD_CACHE` tar shards.

    Thread-safe (the prefetch threads of a write task share one).
    """

    def __init__(self, *, s3: S3Settings | None = None) -> None:
        self.s3 = s3 or S3Settings()
        self.shards: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self.lock = threading.Lock()  # shared by a write task's prefetch threads

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
            raise Unsupported(f"{source_uri}: a byte-manifest row (export reads plain files and tar members)")
        if kind == "tar":
            try:
                offset, size = self.members(location)[member]
            except KeyError:
                raise SkipImage(UNREADABLE, f"{source_uri}: no member {member!r} in the shard") from None
            except (tarfile.TarError, EOFError) as exc:
                raise SkipImage(UNREADABLE, f"{source_uri}: unreadable tar shard ({exc})") from exc
            return fetch_bytes(location, s3=self.s3, start=offset, size=size)
        return fetch_bytes(location, s3=self.s3)


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
    if fmt == "JPEG":
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
