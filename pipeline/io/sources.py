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
Every image id appears once per run: a URI listed twice is dropped in the driver
(:attr:`Source.duplicates`); repeated tar members and manifest keys are dropped
where they are read (``pipeline.stages``).
"""

from __future__ import annotations

import gzip
import hashlib
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow.parquet as pq

from pipeline.io.ids import image_id_for
from pipeline.io.uris import (
    ERROR_DATA,
    ERROR_STORAGE,
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
    manifest_parts: list[dict[str, object]] = field(default_factory=list)  # rows: manifest_uri, row_group
    duplicates: int = 0  # URIs listed more than once (dropped from ``images``)
    listed: bool = False  # the input was a folder/prefix that was listed (not a manifest)

    @property
    def empty(self) -> bool:
        return not (self.images or self.shards or self.byte_manifests)

    @property
    def streamed(self) -> bool:
        """Whether some inputs are only known once read (tar members, manifest bytes)."""
        return bool(self.shards or self.byte_manifests)

    def add_image(self, image_id: str, source_uri: str) -> None:
        """Add one image unless its id is already there (counted in :attr:`duplicates`)."""
        if image_id in self._ids:
            self.duplicates += 1
            return
        self._ids.add(image_id)
        self.images.append({"image_id": image_id, "source_uri": source_uri})

    def __post_init__(self) -> None:
        self._ids = {r["image_id"] for r in self.images}


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
    return manifest_layout(manifest_uri, s3=s3)[0]


def manifest_layout(manifest_uri: str, *, s3: S3Settings | None = None) -> tuple[list[str], int]:
    """``(column names, number of row groups)`` of a Parquet manifest (its footer only)."""
    fs, path = filesystem_for(manifest_uri, s3=s3)
    with fs.open(path, "rb") as f:
        metadata = pq.ParquetFile(f).metadata
        return list(metadata.schema.to_arrow_schema().names), metadata.num_row_groups


def iter_manifest_bytes(
    manifest_uri: str, row_group: int, *, s3: S3Settings | None = None, bytes_column: str = "bytes",
    key_column: str = "key",
) -> Iterator[tuple[str, bytes | None, int]]:
    """``(key, bytes, row index in the row group)`` of one row group of a byte manifest.

    ``key`` comes from ``key_column`` when the manifest has it (and the row a value),
    else it is the content hash of the bytes.
    """
    fs, path = filesystem_for(manifest_uri, s3=s3)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if bytes_column not in names:
            raise InputError(f"manifest {manifest_uri}: no column {bytes_column!r}; got columns {names}")
        columns = [c for c in (bytes_column, key_column) if c in names]
        table = parquet.read_row_group(row_group, columns=columns)
    datas = table.column(bytes_column).to_pylist()
    keys = table.column(key_column).to_pylist() if key_column in columns else [None] * len(datas)
    for index, (key, data) in enumerate(zip(keys, datas, strict=True)):
        if isinstance(data, str):
            data = data.encode("latin-1")
        yield (str(key) if key not in (None, "") else content_key(data or b"")), data, index


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
            for manifest in manifests:  # every manifest's columns are checked, not only the first's
                names, row_groups = manifest_layout(manifest, s3=s3)
                if uri_column in names:
                    for item in read_manifest_uris(manifest, uri_column=uri_column, s3=s3):
                        source.add_image(image_id_for(item), item)
                elif bytes_column in names:
                    source.byte_manifests.append(manifest)
                    source.manifest_parts += [{"manifest_uri": manifest, "row_group": g} for g in range(row_groups)]
                else:
                    raise InputError(
                        f"manifest {manifest}: expected a column {uri_column!r} (URIs) or {bytes_column!r} "
                        f"(image bytes), got columns {names}"
                    )
            return source
        source.listed = True
        if fmt in ("auto", "webdataset"):
            source.shards = [f for f in files if extension(f) in SHARD_EXTENSIONS]
        if fmt in ("auto", "images"):
            for f in files:
                if extension(f) in exts:
                    source.add_image(image_id_for(f, relative=_relative(f, root)), f)
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


class ShardItem(NamedTuple):
    """One image member of a tar shard, or the shard's failure (``data`` None, ``error`` set)."""

    source_uri: str
    data: bytes | None
    error: str | None = None
    error_kind: str | None = None  # "data" (a broken tar) or "storage" (could not be read: retried next run)
    index: int = 0  # member position in the shard (tells a repeated member from a retried read)


#: A shard broken in itself (retrying reads the same broken bytes).
CORRUPT_SHARD_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)


def iter_shard(
    shard_uri: str, *, s3: S3Settings | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Iterator[ShardItem]:
    """A :class:`ShardItem` for each image member of a tar shard.

    A shard that cannot be opened or breaks midway yields one final item
    ``(shard_uri, None, reason, kind)``; the members read before the break stay.
    """
    exts = {e.lower().lstrip(".") for e in extensions}
    index = 0
    try:
        fs, path = filesystem_for(shard_uri, s3=s3)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for index, member in enumerate(tar):
                if not member.isfile() or extension(member.name) not in exts:
                    continue
                reader = tar.extractfile(member)
                data = reader.read() if reader is not None else b""
                yield ShardItem(shard_member_uri(shard_uri, member.name), data, index=index)
    except CORRUPT_SHARD_ERRORS as exc:
        yield ShardItem(shard_uri, None, f"unreadable tar shard: {_describe(exc)}", ERROR_DATA, -1)
    except (InputError, *storage_errors()) as exc:
        yield ShardItem(shard_uri, None, f"cannot read tar shard: {_describe(exc)}", ERROR_STORAGE, -1)


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
    "ShardItem",
    "Source",
    "content_key",
    "discover",
    "fetch_bytes",
    "iter_manifest_bytes",
    "iter_shard",
    "list_files",
    "manifest_layout",
    "read_manifest_uris",
    "scheme_of",
    "shard_member_id",
    "shard_member_uri",
]
