"""What an ``--input`` names, and reading image bytes from it.

Three layouts, all through fsspec:

* a folder/prefix of images (or one image file): listed once in the driver;
* tar shards in WebDataset layout (``<key>.<ext>`` members; only image members are
  used): the shards are listed, their members are read inside Ray tasks;
* a Parquet manifest with a column of URIs (never listed: the manifest names the
  inputs) or a column of image bytes (read by Ray, keyed by a key column or the
  content hash).

Per-row problems (a missing object, an empty file) become error rows later; an
input location that cannot be read at all raises :class:`InputError` up front.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.io.ids import image_id_for
from pipeline.io.uris import (
    InputError,
    S3Settings,
    _describe,
    check_readable,
    filesystem_for,
    normalize_uri,
    scheme_of,
    storage_errors,
    unstrip,
)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp")
SHARD_EXTENSIONS: tuple[str, ...] = ("tar",)
MANIFEST_EXTENSIONS: tuple[str, ...] = ("parquet",)
FORMATS: tuple[str, ...] = ("auto", "images", "webdataset", "manifest")


@dataclass
class Source:
    """The inputs of one run, before anything is read."""

    uri: str
    images: list[dict[str, str]] = field(default_factory=list)  # rows: image_id, source_uri
    shards: list[str] = field(default_factory=list)  # tar shard URIs (members expand in tasks)
    byte_manifests: list[str] = field(default_factory=list)  # Parquet files carrying image bytes

    @property
    def empty(self) -> bool:
        return not (self.images or self.shards or self.byte_manifests)


def extension(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _relative(uri: str, root: str) -> str:
    root = root.rstrip("/")
    if uri.startswith(root + "/"):
        return uri[len(root) + 1:]
    return posixpath.basename(uri)


def list_files(uri: str, *, s3: S3Settings | None = None) -> tuple[list[str], str]:
    """All files under the folder/prefix ``uri`` (sorted URIs), or ``[uri]`` for one file; and the root."""
    uri = normalize_uri(uri)
    fs, path = filesystem_for(uri, s3=s3)
    fs.invalidate_cache(path)
    if fs.isfile(path):
        return [uri], posixpath.dirname(uri)
    found = fs.find(path)
    files = [
        unstrip(fs, p, like=uri)
        for p in sorted(found)
        if not posixpath.basename(p).startswith((".", "_"))
    ]
    return files, uri.rstrip("/")


def read_manifest_uris(manifest_uri: str, *, uri_column: str, s3: S3Settings | None = None) -> list[str]:
    """The URIs a manifest names (relative ones resolved against the manifest's folder)."""
    fs, path = filesystem_for(manifest_uri, s3=s3)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=[uri_column])
    base = posixpath.dirname(normalize_uri(manifest_uri))
    out = []
    for value in table.column(uri_column).to_pylist():
        if not value:
            continue
        value = str(value)
        if "://" not in value and not value.startswith("/"):
            value = f"{base}/{value}"
        out.append(normalize_uri(value))
    return out


def manifest_columns(manifest_uri: str, *, s3: S3Settings | None = None) -> list[str]:
    fs, path = filesystem_for(manifest_uri, s3=s3)
    with fs.open(path, "rb") as f:
        return list(pq.read_schema(f).names)


def discover(
    uri: str,
    *,
    s3: S3Settings | None = None,
    fmt: str = "auto",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    uri_column: str = "uri",
    bytes_column: str = "bytes",
) -> Source:
    """List the inputs that ``uri`` names; raises :class:`InputError` if the location is unusable."""
    if fmt not in FORMATS:
        raise ValueError(f"input.format: expected one of {FORMATS}, got {fmt!r}")
    uri = normalize_uri(uri)
    check_readable(uri, s3=s3)
    exts = {e.lower().lstrip(".") for e in extensions}
    try:
        files, root = list_files(uri, s3=s3)
        source = Source(uri=uri)
        manifests = [f for f in files if extension(f) in MANIFEST_EXTENSIONS]
        if fmt == "manifest" or (fmt == "auto" and manifests and len(files) == 1):
            if not manifests:
                raise InputError(f"input {uri}: format 'manifest' but no .parquet file found")
            for manifest in manifests:
                names = manifest_columns(manifest, s3=s3)
                if uri_column in names:
                    for item in read_manifest_uris(manifest, uri_column=uri_column, s3=s3):
                        source.images.append({"image_id": image_id_for(item), "source_uri": item})
                elif bytes_column in names:
                    source.byte_manifests.append(manifest)
                else:
                    raise InputError(
                        f"manifest {manifest}: expected a column {uri_column!r} (URIs) or {bytes_column!r} "
                        f"(image bytes), got columns {names}"
                    )
            return source
        if fmt in ("auto", "webdataset"):
            source.shards = [f for f in files if extension(f) in SHARD_EXTENSIONS]
        if fmt in ("auto", "images"):
            for f in files:
                if extension(f) in exts:
                    source.images.append({"image_id": image_id_for(f, relative=_relative(f, root)), "source_uri": f})
    except InputError:
        raise
    except storage_errors() as exc:
        raise InputError(f"input {uri}: cannot be listed ({_describe(exc)})") from exc
    return source


def shard_member_uri(shard_uri: str, member: str) -> str:
    return f"{shard_uri}#{member}"


def shard_member_id(shard_uri: str, member: str) -> str:
    stem = posixpath.basename(shard_uri).rsplit(".", 1)[0]
    return image_id_for(shard_member_uri(shard_uri, member), relative=f"{stem}/{member}")


def iter_shard(
    shard_uri: str, *, s3: S3Settings | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Iterator[tuple[str, bytes | None, str | None]]:
    """``(member_source_uri, bytes, None)`` for each image member of a tar shard.

    A shard that cannot be opened or breaks midway yields one final
    ``(shard_uri, None, reason)``; the members read before the break stay.
    """
    exts = {e.lower().lstrip(".") for e in extensions}
    try:
        fs, path = filesystem_for(shard_uri, s3=s3)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or extension(member.name) not in exts:
                    continue
                reader = tar.extractfile(member)
                data = reader.read() if reader is not None else b""
                yield shard_member_uri(shard_uri, member.name), data, None
    except (tarfile.TarError, EOFError, *storage_errors()) as exc:
        yield shard_uri, None, f"unreadable tar shard: {_describe(exc)}"


def fetch_bytes(source_uri: str, *, s3: S3Settings | None = None) -> bytes:
    """The bytes of one object (raises the filesystem's error)."""
    fs, path = filesystem_for(source_uri, s3=s3)
    return fs.cat_file(path)


def content_key(data: bytes) -> str:
    """A stable key for an image known only by its bytes (manifests without a key column)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "InputError",
    "Source",
    "content_key",
    "discover",
    "fetch_bytes",
    "iter_shard",
    "list_files",
    "read_manifest_uris",
    "scheme_of",
    "shard_member_id",
    "shard_member_uri",
]
