"""What an ``--input`` names, and turning it into *index rows*: one per image, before any byte is read.

Three layouts, all through fsspec:

* a folder/prefix of images and/or tar shards (WebDataset layout: ``<key>.<ext>``
  members; only image members are used), or one file;
* a Parquet manifest with a column of URIs (never listed: the manifest names the inputs);
* a Parquet manifest with a column of image bytes (keyed by a key column, or the content hash).

Nothing here holds the corpus in one process. The driver only looks at the
input's top level (:func:`plan_input`): the files there, its sub-prefixes, a
manifest's footers. Everything per image is produced in Ray tasks by the
functions below, each bounded by one unit of work: :func:`walk_prefix` lists one
sub-prefix as a stream of pages; :func:`index_files` turns listed files into
index rows (a tar shard into one row per member, from its headers: the member's
byte range, not its bytes); :func:`resolve_manifest_uri` resolves a manifest's
URI cells; :func:`index_manifest_group` indexes one row group of a byte
manifest. Bytes are read later, only for the images a run still has to do
(``pipeline.stages.read``).

Per-row problems (a missing object, an empty file, a corrupt shard) become error
rows later; an input location that cannot be read at all raises
:class:`InputError` up front.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
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
#: Files per page of a prefix listing (one block of the listing dataset).
LIST_PAGE = 1000

#: A shard broken in itself (retrying reads the same broken bytes).
CORRUPT_SHARD_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError)


@dataclass
class InputPlan:
    """What the driver knows about an input before any task runs: its top level only.

    ``kind``: ``listing`` (``files`` at the top level, ``prefixes`` below it, each
    listed by a task), ``uri_manifest`` or ``byte_manifest`` (``manifests``; for bytes,
    ``row_groups``: ``(manifest_uri, row_group)`` units).
    """

    uri: str
    kind: str
    root: str = ""
    files: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    row_groups: list[tuple[str, int]] = field(default_factory=list)
    manifest_rows: int = 0

    @property
    def listed(self) -> bool:
        """The input is a folder/prefix that is listed (not a manifest)."""
        return self.kind == "listing"

    @property
    def empty(self) -> bool:
        return not (self.files or self.prefixes or self.manifests)


def extension(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _visible(path: str) -> bool:
    return not posixpath.basename(path.rstrip("/")).startswith((".", "_"))


def _relative(uri: str, root: str) -> str:
    root = root.rstrip("/")
    if uri.startswith(root + "/"):
        return uri[len(root) + 1:]
    return posixpath.basename(uri)


def manifest_layout(manifest_uri: str, *, s3: S3Settings | None = None) -> tuple[list[str], int, int]:
    """``(column names, number of row groups, number of rows)`` of a Parquet manifest (its footer only)."""
    fs, path = filesystem_for(manifest_uri, s3=s3)
    try:
        with fs.open(path, "rb") as f:
            metadata = pq.ParquetFile(f).metadata
            return list(metadata.schema.to_arrow_schema().names), metadata.num_row_groups, metadata.num_rows
    except pa.ArrowInvalid as exc:  # a corrupt file is bad input, not a bug: name it
        raise InputError(f"manifest {manifest_uri}: not a readable Parquet file ({_describe(exc)})") from exc


def plan_input(
    uri: str,
    *,
    s3: S3Settings | None = None,
    fmt: str = "auto",
    uri_column: str = "uri",
    bytes_column: str = "bytes",
) -> InputPlan:
    """Look at the top level of ``uri`` (one delimited listing, or a manifest's footer).

    Raises :class:`InputError` if the location is unusable, ValueError for an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"input.format: expected one of {FORMATS}, got {fmt!r}")
    uri = normalize_uri(uri)
    check_readable(uri, s3=s3)
    try:
        fs, path = filesystem_for(uri, s3=s3)
        fs.invalidate_cache(path)
        if fs.isfile(path):
            files, prefixes, root = [uri], [], posixpath.dirname(uri)
        else:
            files, prefixes, root = [], [], uri.rstrip("/")
            for entry in fs.ls(path, detail=True):
                name = entry["name"]
                if not _visible(name):
                    continue
                target = unstrip(fs, name, like=uri)
                (prefixes if entry.get("type") == "directory" else files).append(target)
        files.sort()
        prefixes.sort()
        manifests = [f for f in files if extension(f) in MANIFEST_EXTENSIONS]
        if fmt == "manifest" or (fmt == "auto" and manifests and len(files) == 1 and not prefixes):
            if not manifests:
                raise InputError(f"input {uri}: format 'manifest' but no .parquet file found at its top level")
            return _manifest_plan(uri, manifests, s3=s3, uri_column=uri_column, bytes_column=bytes_column)
        return InputPlan(uri=uri, kind="listing", root=root, files=files, prefixes=prefixes)
    except InputError:
        raise
    except storage_errors() as exc:
        raise InputError(f"input {uri}: cannot be listed ({_describe(exc)})") from exc


def _manifest_plan(uri: str, manifests: list[str], *, s3, uri_column: str, bytes_column: str) -> InputPlan:
    kinds = set()
    plan = InputPlan(uri=uri, kind="", manifests=manifests)
    for manifest in manifests:  # every manifest's columns are checked, not only the first's
        names, row_groups, rows = manifest_layout(manifest, s3=s3)
        plan.manifest_rows += rows
        if uri_column in names:
            kinds.add("uri_manifest")
        elif bytes_column in names:
            kinds.add("byte_manifest")
        else:
            raise InputError(
                f"manifest {manifest}: expected a column {uri_column!r} (URIs) or {bytes_column!r} "
                f"(image bytes), got columns {names}"
            )
        plan.row_groups += [(manifest, g) for g in range(row_groups)]
    if len(kinds) > 1:
        raise InputError(f"input {uri}: mixes URI manifests and byte manifests; give them as separate inputs")
    plan.kind = kinds.pop()
    return plan


# ----------------------------------------------------------------------------- listing


def walk_prefix(prefix: str, *, s3: S3Settings | None = None, page: int = LIST_PAGE) -> Iterator[list[str]]:
    """Every visible file under ``prefix``, as pages of at most ``page`` URIs (one folder at a time).

    Memory is bounded by the largest single folder (a delimited listing), not by the
    prefix: sub-folders are walked one after another.
    """
    fs, path = filesystem_for(prefix, s3=s3)
    out: list[str] = []
    for folder, dirs, files in fs.walk(path):
        dirs[:] = sorted(d for d in dirs if _visible(d))  # walk in order, skip hidden folders
        for name in sorted(files):
            if _visible(name):
                out.append(unstrip(fs, posixpath.join(folder, name), like=prefix))
                if len(out) >= page:
                    yield out
                    out = []
    if out:
        yield out


def index_files(
    uris: Sequence[str], *, root: str, fmt: str = "auto", extensions: Sequence[str] = IMAGE_EXTENSIONS,
    s3: S3Settings | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Listed files -> index rows (images: one row; tar shards: one per image member).

    Returns ``(rows, unread)``: ``unread`` holds ``(uri, reason)`` of shards storage
    could not deliver (no rows: the next run retries them).
    """
    exts = {e.lower().lstrip(".") for e in extensions}
    rows: list[dict[str, Any]] = []
    unread: list[tuple[str, str]] = []
    for uri in uris:
        ext = extension(uri)
        if ext in exts and fmt in ("auto", "images"):
            rows.append(index_row(uri, relative=_relative(uri, root)))
        elif ext in SHARD_EXTENSIONS and fmt in ("auto", "webdataset"):
            for row in index_shard(uri, s3=s3, extensions=exts):
                if row["error_kind"] == ERROR_STORAGE:
                    unread.append((uri, row["error"]))
                else:
                    rows.append(row)
    return rows, unread


def index_row(source_uri: str, *, relative: str | None = None, **locator: Any) -> dict[str, Any]:
    """One index row: the image's URI, the readable part its id is made from, and where its bytes are.

    The id itself (:func:`~pipeline.io.ids.image_id_for`) is computed only for the
    rows a run still has to do (:func:`with_image_ids`), after resume.
    """
    return {"source_uri": source_uri, "relative": relative, "status": "ok", "error": None, "error_kind": None,
            **locator}


def with_image_ids(table: pa.Table) -> list[str]:
    """The image id of each index row of ``table`` (``source_uri`` and ``relative``)."""
    return [image_id_for(uri, relative=rel) for uri, rel in zip(table.column("source_uri").to_pylist(),
                                                               table.column("relative").to_pylist(), strict=True)]


def shard_member_uri(shard_uri: str, member: str) -> str:
    return f"{shard_uri}#{member}"


def split_member_uri(source_uri: str) -> tuple[str, str]:
    """``(shard URI, member name)`` of a tar member's source URI."""
    shard, _, member = source_uri.partition("#")
    return shard, member


def index_shard(
    shard_uri: str, *, s3: S3Settings | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Iterator[dict[str, Any]]:
    """An index row per image member of an uncompressed tar shard: its byte range, from the headers.

    A shard that cannot be opened or breaks midway yields one final error row for the
    shard (``data``: the tar is broken, final; ``storage``: it could not be read); the
    members indexed before the break stay.
    """
    exts = {e.lower().lstrip(".") for e in extensions}
    stem = posixpath.basename(shard_uri).rsplit(".", 1)[0]
    try:
        fs, path = filesystem_for(shard_uri, s3=s3)
        size = fs.size(path)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:  # cut inside this member: the error row follows
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                if not member.isfile() or extension(member.name) not in exts:
                    continue
                yield index_row(shard_member_uri(shard_uri, member.name), relative=f"{stem}/{member.name}",
                                byte_offset=member.offset_data, byte_size=member.size)
    except CORRUPT_SHARD_ERRORS as exc:
        reason = _describe(exc)
        if "compress" in reason.lower() or "gzip" in reason.lower():
            reason += " (shards must be uncompressed .tar files)"
        yield {**index_row(shard_uri), "status": "error", "error": f"unreadable tar shard: {reason}",
               "error_kind": ERROR_DATA}
    except (InputError, *storage_errors()) as exc:
        yield {**index_row(shard_uri), "status": "error", "error": f"cannot read tar shard: {_describe(exc)}",
               "error_kind": ERROR_STORAGE}


# ----------------------------------------------------------------------------- manifests


def resolve_manifest_uri(value: Any, *, base: str) -> str | None:
    """A manifest's URI cell as a normalized URI (relative ones against the manifest's folder); None if empty."""
    if value is None or value == "":
        return None
    value = str(value)
    if "://" not in value and not value.startswith("/"):
        value = f"{base}/{value}"
    return normalize_uri(value)


def content_key(data: bytes) -> str:
    """A stable key for an image known only by its bytes (manifests without a key column)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


def read_manifest_group(manifest_uri: str, row_group: int, columns: Sequence[str], *,
                        s3: S3Settings | None = None) -> pa.Table:
    """The ``columns`` (those the manifest has) of one row group of a Parquet manifest."""
    fs, path = filesystem_for(manifest_uri, s3=s3)
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            return parquet.read_row_group(row_group, columns=present)
    except pa.ArrowInvalid as exc:
        raise InputError(f"manifest {manifest_uri} (row group {row_group}): unreadable ({_describe(exc)})") from exc


def index_manifest_group(
    manifest_uri: str, row_group: int, *, s3: S3Settings | None = None, bytes_column: str = "bytes",
    key_column: str = "key",
) -> list[dict[str, Any]]:
    """Index rows of one row group of a byte manifest (source URI ``<manifest>#<key>``).

    ``key`` comes from ``key_column`` when the manifest has it (and the row a value),
    else it is the content hash of the bytes (then, and only then, the bytes are read here).
    """
    keys_table = read_manifest_group(manifest_uri, row_group, [key_column], s3=s3)
    keys = keys_table.column(key_column).to_pylist() if key_column in keys_table.column_names else None
    datas = None  # the bytes column, read only when some row has no key
    rows = []
    for index in range(keys_table.num_rows if keys is not None else _group_rows(manifest_uri, row_group, s3=s3)):
        key = keys[index] if keys is not None else None
        if key in (None, ""):
            if datas is None:
                table = read_manifest_group(manifest_uri, row_group, [bytes_column], s3=s3)
                if bytes_column not in table.column_names:
                    raise InputError(f"manifest {manifest_uri}: no column {bytes_column!r}")
                datas = table.column(bytes_column)
            data = datas[index].as_py()
            key = content_key(data.encode("latin-1") if isinstance(data, str) else (data or b""))
        source_uri = f"{manifest_uri}#{key}"
        rows.append(index_row(source_uri, relative=str(key), row_group=row_group, row_index=index))
    return rows


def _group_rows(manifest_uri: str, row_group: int, *, s3: S3Settings | None = None) -> int:
    fs, path = filesystem_for(manifest_uri, s3=s3)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.row_group(row_group).num_rows


def fetch_bytes(source_uri: str, *, s3: S3Settings | None = None, start: int | None = None,
                size: int | None = None) -> bytes:
    """The bytes of one object, or of ``size`` bytes from ``start`` (raises the filesystem's error)."""
    fs, path = filesystem_for(source_uri, s3=s3)
    if start is None:
        return fs.cat_file(path)
    data = fs.cat_file(path, start=start, end=start + (size or 0))
    if len(data) != (size or 0):
        raise EOFError(f"{source_uri}: expected {size} bytes at offset {start}, got {len(data)} (truncated?)")
    return data


__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "InputError",
    "InputPlan",
    "content_key",
    "fetch_bytes",
    "index_files",
    "index_manifest_group",
    "index_row",
    "with_image_ids",
    "index_shard",
    "manifest_layout",
    "plan_input",
    "read_manifest_group",
    "resolve_manifest_uri",
    "scheme_of",
    "shard_member_uri",
    "split_member_uri",
    "walk_prefix",
]
