"""URIs and filesystems: s3://, gs://, file:// and plain paths through fsspec.

S3 endpoint, region and credentials come from the standard AWS environment and
config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``~/.aws/config`` ...) as botocore reads them; :class:`S3Settings` overrides them
from the job's configuration file, so a local S3-compatible server works.
Secrets never appear in ``repr`` or in the resolved configuration.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")

#: ``error_kind`` of an error row: the input itself is bad (final), or storage failed (retried next run).
ERROR_DATA = "data"
ERROR_STORAGE = "storage"
#: A failure of the world rather than the input (out of memory, a device error) that outlasted the run's retries.
ERROR_TRANSIENT = "transient"
#: Error kinds the next run retries (``data`` rows are final).
RETRY_KINDS: tuple[str, ...] = (ERROR_STORAGE, ERROR_TRANSIENT)


class InputError(RuntimeError):
    """A location that cannot be read or written: the job stops before any work."""


@dataclass(frozen=True)
class S3Settings:
    """Overrides of the AWS environment for s3:// URIs; empty fields keep botocore's defaults."""

    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    anon: bool = False
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments of ``s3fs.S3FileSystem``."""
        options: dict[str, Any] = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 10}}}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        if self.profile:
            options["profile"] = self.profile
        if self.anon:
            options["anon"] = True
        if self.access_key_id:
            options["key"] = self.access_key_id
        if self.secret_access_key:
            options["secret"] = self.secret_access_key
        if self.session_token:
            options["token"] = self.session_token
        return options

    def redacted(self) -> dict[str, Any]:
        """The settings with secrets replaced by ``"***"`` (for logs and resolved configs)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.name in SECRET_FIELDS and value else value
        return out


def scheme_of(uri: str) -> str:
    """``"s3"``, ``"gs"``, ... or ``"file"`` for plain paths and file:// URIs."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def normalize_uri(uri: str) -> str:
    """A canonical spelling: local paths become absolute plain paths (file:// dropped)."""
    if not uri:
        raise ValueError("uri: expected a path or URI, got ''")
    if scheme_of(uri) == "file":
        path = uri.removeprefix("file://")
        return os.path.abspath(os.path.expanduser(path))
    return uri


def join_uri(base: str, *parts: str) -> str:
    """``base/part/part`` with exactly one slash between pieces (works for URIs and paths)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


#: The package fsspec needs for each object-store scheme (named in the error when it is missing).
SCHEME_PACKAGES: dict[str, str] = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
                                   "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def filesystem_for(uri: str, *, s3: S3Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it.

    Raises :class:`InputError` naming the package to install when the scheme's
    fsspec implementation is missing (``gs://`` needs gcsfs).
    """
    uri = normalize_uri(uri)
    scheme = scheme_of(uri)
    options: dict[str, Any] = {}
    if scheme in ("s3", "s3a"):
        options = (s3 or S3Settings()).storage_options()
    if scheme == "file":
        return fsspec.filesystem("file"), uri
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        package = SCHEME_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
        raise InputError(f"{uri}: install {package} to use {scheme}:// URIs ({_describe(exc)})") from exc
    return fs, path


def unstrip(fs: fsspec.AbstractFileSystem, path: str, *, like: str) -> str:
    """Turn a path returned by ``fs.find`` back into a URI with the scheme of ``like``."""
    if is_local(fs):
        return path
    scheme = scheme_of(like)
    return f"{scheme}://{path.lstrip('/')}"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Local files go to a temporary name in the same folder and are renamed; on
    object stores one PUT is atomic (the object appears only when complete).
    """
    if is_local(fs):
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        # Hidden and not ending in the target's extension: a temporary left by a killed
        # process is never taken for an output (``masks/*.png``, ``segments/*.parquet``).
        tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):  # the write or the rename failed: leave no temporary behind
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def move_atomic(fs: fsspec.AbstractFileSystem, source: str, dest: str) -> None:
    """Move a whole file to ``dest``, where readers see either nothing or all of it.

    Locally a rename (atomic within one filesystem); on object stores a server-side copy
    (the object appears only when complete), then the source is deleted. A repeat after a
    kill finds the source gone or copies it again: the result is the same.
    """
    if is_local(fs):
        os.makedirs(posixpath.dirname(dest), exist_ok=True)
        os.replace(source, dest)
        return
    fs.copy(source, dest)
    fs.rm_file(source)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def storage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "this location cannot be used" (I/O, permissions, botocore).

    Not ``ValueError``: pyarrow's ``ArrowInvalid`` is one, and so is every programming
    error that checks its arguments; callers that read files which may be corrupt catch
    those explicitly and name the file.
    """
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:  # botocore ships with s3fs; absent only without S3 support
        pass
    return tuple(errors)


def check_readable(uri: str, *, s3: S3Settings | None = None) -> None:
    """Raise :class:`InputError` with one clear line if ``uri`` does not exist or cannot be read."""
    try:
        fs, path = filesystem_for(uri, s3=s3)
        if not fs.exists(path):
            raise InputError(f"input {uri}: no such file, folder or prefix")
        if fs.isdir(path):
            fs.ls(path, detail=False)
        else:
            with fs.open(path, "rb") as f:
                f.read(1)
    except InputError:
        raise
    except PermissionError as exc:
        raise InputError(f"input {uri}: access denied ({_describe(exc)}); check the S3/AWS credentials") from exc
    except storage_errors() as exc:
        raise InputError(f"input {uri}: cannot be read ({_describe(exc)})") from exc


def check_writable(uri: str, *, s3: S3Settings | None = None) -> None:
    """Raise :class:`InputError` if nothing can be written under the folder/prefix ``uri``."""
    probe = join_uri(normalize_uri(uri), f".write-probe-{uuid.uuid4().hex}")
    try:
        fs, path = filesystem_for(probe, s3=s3)
        if is_local(fs):
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except PermissionError as exc:
        raise InputError(f"output {uri}: access denied ({_describe(exc)}); check the S3/AWS credentials") from exc
    except storage_errors() as exc:
        raise InputError(f"output {uri}: cannot be written ({_describe(exc)})") from exc
