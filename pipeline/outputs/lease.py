"""One writer per output: a lease on ``<output>/_lease.json``, renewed by a heartbeat.

Two ``segment`` runs writing one output (a manual run beside the scheduled one) would
process the same pending images twice, and the last to finish would win on
``class_stats.parquet`` and ``_run.json``. So a run takes a lease on its output before
its first write (compaction at the start) and gives it back when it ends, however it ends.

The lease is one small JSON object::

    {"owner": {"id": "<run id>", "host": "<host name>", "pid": 1234},
     "acquired_at": "...", "heartbeat_at": "...", "expires_at": "...",   # UTC, ISO 8601
     "ttl_s": 120.0, "taken_over_from": null | {"id": ..., "host": ..., "pid": ..., "expires_at": ...}}

It names who holds it (no credentials) and until when. A heartbeat thread rewrites it every
``ttl_s / 3`` with ``expires_at = now + ttl_s``; a run that is killed stops renewing, and
once ``expires_at`` has passed the next run takes the lease over (the output is left
as a killed run leaves it, which the next run repairs anyway: see compaction).

Every change is a **compare-and-swap** on the object, so no two runs can both believe they
hold it:

* **take** (no lease there): create only if absent. S3: ``PUT`` with ``If-None-Match: *``.
  Local: the body goes to a hidden temporary file that is then hard-linked to
  ``_lease.json`` (``os.link`` fails if the name exists), so a reader never sees a
  half-written lease.
* **take over** (a lease whose ``expires_at`` has passed): overwrite only if the object is
  still the expired one that was read. S3: ``PUT`` with ``If-Match: <its ETag>``; of two
  runs racing for one expired lease, the first PUT changes the ETag and the second gets
  412 Precondition Failed and reports the winner as the holder. Local: under the mutex below,
  compare the bytes, then rename a new file over it.
* **renew** (heartbeat): the same conditional overwrite on the ETag (bytes) of our last
  write. A lease someone took over is therefore never stolen back: the renewal fails, the
  lease is marked **lost**, and :meth:`OutputLease.confirm` (called by the run before it
  writes its final files) fails the run.
* **release**: delete only if the object is still our last write. S3: ``DELETE`` with
  ``If-Match: <our ETag>``; a store that refuses conditional deletes gets a conditional
  overwrite with an already expired body instead (the next run takes that over at once).
  Local: compare and unlink under the mutex.

Locally, every read and compare-and-swap happens under an exclusive ``flock`` of the
hidden file ``<output>/.lease.lock``. The kernel drops the lock when its process dies,
so a killed run never leaves the mutex taken; the lease's expiry is what outlives a kill.
(On NFS, Linux turns ``flock`` into byte-range locks, which reach the server.)

A conditional write whose reply is lost (a network error after the PUT landed) is
retried by the client and then fails its own precondition; every failed swap therefore
re-reads the object and counts it as ours when it holds exactly the bytes we sent.

Guarantees and what is left:

* Two runs never both take, or both take over, one lease: each step is one conditional
  write that the store (or the local mutex) decides. Real S3 evaluates these conditions
  atomically; moto's server checks them per request without a lock, so the loopback
  tests race two threads against it, not the store's atomicity.
* Expiry compares the holder's ``expires_at`` with the reader's clock: hosts that share an
  output must agree on the time to well within ``ttl_s`` (NTP does).
* A holder whose heartbeat cannot get through for ``ttl_s`` (a network outage, a process
  stopped under a debugger) can be taken over while it still runs. It learns so at its next
  renewal and at :meth:`~OutputLease.confirm`, and its run then fails before it writes
  ``class_stats.parquet`` and ``_run.json``; rows it committed meanwhile are ordinary
  rows (readers keep one row per image), so the cost is duplicated work, not wrong data.
  Training shards (``segment --training``) are not deduplicated by readers, so there each
  write task checks the lease before it commits (:class:`LeaseGuard`): a run that lost it
  commits nothing more.
* Filesystems other than S3 and local paths (``gs://``, ``az://``, ``memory://``...) are
  refused (:class:`LeaseUnsupported`): fsspec gives them no conditional write. Setting
  ``output.lease_ttl_s: 0`` runs without a lease there; keeping to one writer is then up to
  the user.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

from pipeline.io.uris import (
    InputError,
    S3Settings,
    _describe,
    filesystem_for,
    is_local,
    join_uri,
    normalize_uri,
    scheme_of,
    storage_errors,
)

LEASE_FILE = "_lease.json"
#: Hidden, beside the lease: the local mutex (see the module docstring). Never deleted:
#: removing a flock file while another process may be about to lock it breaks the mutex.
LOCAL_MUTEX_FILE = ".lease.lock"
#: A lease lapses this long after its holder's last heartbeat (a killed run blocks the
#: output at most this long). Long enough for a heartbeat PUT to get through a slow store.
DEFAULT_TTL_S = 120.0
#: The smallest ``output.lease_ttl_s`` a run accepts: a heartbeat (every ttl/3) must fit a
#: slow PUT and a Python pause with room to spare.
MIN_TTL_S = 10.0
#: Heartbeats per ttl: a lease survives two missed heartbeats.
HEARTBEATS_PER_TTL = 3
#: While waiting for a lease (``output.wait_for_lock_s``), how often to look again.
POLL_INTERVAL_S = 5.0
#: Compare-and-swap attempts per take: each failed one means another run changed the lease
#: in between, and the next attempt reads who now holds it.
MAX_SWAP_ATTEMPTS = 5
#: Schemes with conditional writes (others are refused).
S3_SCHEMES = ("s3", "s3a")

log = logging.getLogger(__name__)


class LeaseError(InputError):
    """The output's lease cannot be taken or kept."""


class LeaseHeld(LeaseError):
    """Another live run holds the output's lease; the message names it and what to do."""

    def __init__(self, message: str, *, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder


class LeaseLost(LeaseError):
    """This run's lease was taken over (its heartbeat did not get through for ttl_s)."""


class LeaseUnsupported(LeaseError):
    """The output's filesystem has no conditional write to build a lease on."""


# ----------------------------------------------------------------------------- time and bodies


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _iso(when: _dt.datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def _parse_time(value: Any) -> _dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=_dt.UTC)


def _decode(data: bytes) -> dict[str, Any] | None:
    """The lease body, or None when the object is not a lease (not JSON, no expiry)."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict) or _parse_time(body.get("expires_at")) is None:
        return None
    return body


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=1).encode()


def expired(body: dict[str, Any], *, now: _dt.datetime | None = None) -> bool:
    """Whether the lease ``body`` lapsed (its holder stopped renewing it)."""
    expires = _parse_time(body.get("expires_at"))
    return expires is not None and expires <= (now or _now())


def holder_gone(body: dict[str, Any]) -> bool:
    """Whether the lease's holder ran on this host and its process no longer exists (killed, crashed).

    A killed run on the same machine (a laptop, one pod rerunning a job) is then taken over at
    once instead of at its expiry; a holder on another host is judged by its expiry alone.
    """
    owner = body.get("owner") if isinstance(body.get("owner"), dict) else {}
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def describe_holder(body: dict[str, Any], *, now: _dt.datetime | None = None) -> str:
    """``run R on host H (pid P), last heartbeat T, expires E (in N s)`` from a lease body."""
    owner = body.get("owner") if isinstance(body.get("owner"), dict) else {}
    expires = _parse_time(body.get("expires_at"))
    left = f" (in {max((expires - (now or _now())).total_seconds(), 0):.0f} s)" if expires else ""
    return (f"run {owner.get('id', '?')} on host {owner.get('host', '?')} (pid {owner.get('pid', '?')}), "
            f"last heartbeat {body.get('heartbeat_at', '?')}, expires {body.get('expires_at', '?')}{left}")


# ----------------------------------------------------------------------------- stores: compare-and-swap on one object


class _LocalStore:
    """``_lease.json`` on a local filesystem; reads and swaps under an exclusive flock."""

    def __init__(self, path: str):
        self.path = path
        self.folder = posixpath.dirname(path)
        self.mutex_path = posixpath.join(self.folder, LOCAL_MUTEX_FILE)

    @contextmanager
    def _mutex(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.mutex_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one open file description each: threads exclude each other too
            yield
        finally:
            os.close(fd)  # drops the lock

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _temporary(self, data: bytes) -> str:
        tmp = posixpath.join(self.folder, f".{LEASE_FILE}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read(self) -> tuple[bytes, bytes] | None:
        """``(body, version)``; the version of a local lease is its bytes."""
        with self._mutex():
            data = self._read()
        return None if data is None else (data, data)

    def create(self, data: bytes) -> bytes | None:
        with self._mutex():
            tmp = self._temporary(data)
            try:
                os.link(tmp, self.path)  # exclusive, and the name appears with the whole body
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        return data

    def replace(self, data: bytes, *, version: bytes) -> bytes | None:
        with self._mutex():
            if self._read() != version:
                return None
            tmp = self._temporary(data)
            try:
                os.replace(tmp, self.path)
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        return data

    def delete(self, *, version: bytes) -> bool:
        with self._mutex():
            if self._read() != version:
                return False
            os.unlink(self.path)
        return True


def _s3_error_code(exc: BaseException) -> str:
    """The S3 error code behind an s3fs exception (s3fs turns ClientError into OSError)."""
    cause = exc if hasattr(exc, "response") else exc.__cause__
    response = getattr(cause, "response", None) or {}
    error = response.get("Error", {})
    return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


#: A failed precondition (412), a concurrent conditional write (409), or no object: the swap lost.
_S3_SWAP_LOST = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}
#: A store that does not do conditional deletes.
_S3_NO_CONDITIONAL_DELETE = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}


class _S3Store:
    """``_lease.json`` on S3: conditional PUT/DELETE on the object's ETag (through s3fs's botocore client)."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            reply = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                    ContentType="application/json", **condition)
        except (FileExistsError, FileNotFoundError):  # 412 on If-None-Match; 404 on If-Match
            return None
        except OSError as exc:
            if _s3_error_code(exc) in _S3_SWAP_LOST:
                return None
            raise
        return reply["ETag"]

    def read(self) -> tuple[bytes, str] | None:
        """``(body, ETag)`` from one GET, so the ETag is the one of these bytes."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            reply = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await reply["Body"].read(), reply["ETag"]
            finally:
                reply["Body"].close()

        from s3fs.core import _error_wrapper

        try:  # s3fs retries the request; the wrapper also retries a body cut off mid-read
            return sync(self.fs.loop, _error_wrapper, get, retries=self.fs.retries)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, *, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, *, version: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as exc:
            code = _s3_error_code(exc)
            if code in _S3_SWAP_LOST:
                return False
            if code not in _S3_NO_CONDITIONAL_DELETE:
                raise
            # No conditional delete on this store: leave a lapsed lease instead (a conditional overwrite
            # on our ETag), which the next run takes over at once.
            current = self.read()
            lapsed = (_decode(current[0]) if current is not None else None) or {}
            lapsed.update(expires_at=_iso(_now() - _dt.timedelta(seconds=1)), released=True)
            return self._put(_encode(lapsed), IfMatch=version) is not None
        return True


def _store_for(output: str, *, s3: S3Settings | None):
    uri = join_uri(output, LEASE_FILE)
    fs, path = filesystem_for(uri, s3=s3)
    if is_local(fs):
        return _LocalStore(path), uri
    if scheme_of(uri) in S3_SCHEMES:
        return _S3Store(fs, path), uri
    raise LeaseUnsupported(
        f"output {output}: cannot take a lease on {scheme_of(uri)}:// outputs (one writer per output needs a "
        f"conditional write, which this project does for s3:// and local paths only). Set output.lease_ttl_s = 0 "
        f"to run without a lease, and make sure no other run writes to {output} at the same time")


# ----------------------------------------------------------------------------- the lease


class OutputLease:
    """This run's lease on one output: ``acquire`` (or wait), a heartbeat thread, ``confirm``, ``release``.

    ``with OutputLease(output, owner_id=run_id).acquire(wait_s=30) as lease: ...`` holds it for the
    block and releases it however the block ends.
    """

    def __init__(self, output: str, *, s3: S3Settings | None = None, ttl_s: float = DEFAULT_TTL_S,
                 owner_id: str | None = None):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: expected > 0, got {ttl_s!r}")
        self.output = normalize_uri(output)
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = self.ttl_s / HEARTBEATS_PER_TTL
        self.owner = {"id": owner_id or uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._store, self.uri = _store_for(self.output, s3=s3)
        self._lock = threading.Lock()  # one swap at a time: heartbeat, confirm, release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._version: Any = None  # the ETag (bytes locally) of our last write; None when not held
        self._lost: str | None = None
        self.body: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._version is not None

    # -- taking it

    def acquire(self, *, wait_s: float = 0.0, poll_s: float = POLL_INTERVAL_S) -> Self:
        """Take the lease, or take over an expired one; wait up to ``wait_s`` for a live holder to let go.

        Raises :class:`LeaseHeld` naming the holder when it is still held after ``wait_s``
        (0: at once), :class:`LeaseError` when the lease object cannot be read or written.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                holder = self._try_take()
            except storage_errors() as exc:
                raise LeaseError(f"output {self.output}: cannot take the lease {self.uri} ({_describe(exc)})") from exc
            if holder is None:
                self._start_heartbeat()
                return self
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseHeld(self._held_message(holder, waited_s=wait_s), holder=holder)
            time.sleep(min(poll_s, left))

    def _new_body(self, *, taken_over_from: dict[str, Any] | None = None) -> dict[str, Any]:
        now = _now()
        return {"owner": self.owner, "acquired_at": _iso(now), "heartbeat_at": _iso(now),
                "expires_at": _iso(now + _dt.timedelta(seconds=self.ttl_s)), "ttl_s": self.ttl_s,
                "taken_over_from": taken_over_from}

    def _try_take(self) -> dict[str, Any] | None:
        """None when we now hold the lease, else the body of the live lease that stopped us."""
        holder: dict[str, Any] = {}
        for _ in range(MAX_SWAP_ATTEMPTS):
            body = self._new_body()
            data = _encode(body)
            version = self._store.create(data)
            if version is not None:
                self._took(body, version)
                return None
            current = self._store.read()
            if current is None:  # released between our create and our read: try again
                continue
            found, found_version = current
            if found == data:  # our own create, whose reply was lost and retried
                self._took(body, found_version)
                return None
            holder = _decode(found)
            if holder is None:
                raise LeaseError(
                    f"output {self.output}: {self.uri} is not a lease (not JSON with an expires_at); if no run is "
                    "writing to this output, delete it and run again")
            if not (expired(holder) or holder_gone(holder)):
                return holder
            owner = holder.get("owner") if isinstance(holder.get("owner"), dict) else {}
            body = self._new_body(taken_over_from={**owner, "expires_at": holder.get("expires_at")})
            data = _encode(body)
            version = self._store.replace(data, version=found_version)
            if version is not None:
                log.warning("output %s: took over the lease of %s, which %s", self.output, describe_holder(holder),
                            "expired (killed?)" if expired(holder) else "was killed (its process is gone)")
                self._took(body, version)
                return None
            # Another run swapped it first: the next attempt reads who holds it now.
        return holder

    def _took(self, body: dict[str, Any], version: Any) -> None:
        self.body, self._version, self._lost = body, version, None

    def _held_message(self, holder: dict[str, Any], *, waited_s: float) -> str:
        still = f"still in use after waiting {waited_s:g} s" if waited_s > 0 else "in use"
        return (f"output {self.output} is {still} by another run: the lease {self.uri} is held by "
                f"{describe_holder(holder)}. Two runs writing one output would process the same images twice. "
                f"Let that run finish, or pass --wait-for-lock SECONDS (output.wait_for_lock_s) to wait for it; "
                f"if it was killed, its lease lapses at its expiry and the next run takes it over")

    # -- keeping it

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-heartbeat {self.uri}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - transient or not, the next beat tries again;
                # the lease survives two missed heartbeats, and confirm() before the final files says if it was lost
                log.warning("output %s: lease heartbeat failed (%s); retrying in %.0f s",
                            self.output, _describe(exc), self.heartbeat_s)

    def renew(self) -> None:
        """Push ``expires_at`` to now + ttl_s, only if the lease is still our last write (else :class:`LeaseLost`)."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            if not self.held:
                return
            now = _now()
            body = {**self.body, "heartbeat_at": _iso(now), "expires_at": _iso(now + _dt.timedelta(seconds=self.ttl_s))}
            data = _encode(body)
            version = self._store.replace(data, version=self._version)
            if version is None:
                current = self._store.read()
                if current is not None and current[0] == data:  # our own write, whose reply was lost
                    version = current[1]
                else:
                    other = _decode(current[0]) if current is not None else None
                    now_held = f"it is now held by {describe_holder(other)}" if other else "it is gone"
                    self._lost = (f"output {self.output}: this run lost its lease {self.uri} ({now_held}); its "
                                  f"heartbeat did not get through for lease_ttl_s = {self.ttl_s:g} s. Rows committed "
                                  "so far are kept; the final files were not written")
                    self._version = None
                    raise LeaseLost(self._lost)
            self.body, self._version = body, version

    def confirm(self) -> None:
        """Renew now and raise :class:`LeaseLost` unless this run still holds the lease (before final writes)."""
        try:
            self.renew()
        except storage_errors() as exc:
            raise LeaseError(f"output {self.output}: cannot confirm the lease {self.uri} ({_describe(exc)})") from exc
        if not self.held:
            raise LeaseLost(f"output {self.output}: this run does not hold the lease {self.uri}")

    # -- giving it back

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (a failure is logged: it lapses anyway)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._lock:
            if not self.held:
                return
            try:
                if not self._store.delete(version=self._version):
                    log.warning("output %s: the lease %s was no longer ours; left as it is", self.output, self.uri)
            except storage_errors() as exc:
                log.warning("output %s: could not release the lease %s (%s); it lapses at %s", self.output,
                            self.uri, _describe(exc), self.body.get("expires_at") if self.body else "?")
            self._version = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(frozen=True)
class LeaseGuard:
    """A check a write task makes before it commits: this run still holds the lease, with time to spare.

    One read of ``_lease.json``: :class:`LeaseLost` unless its owner is ``owner_id`` and it expires
    in at least ``ttl_s / HEARTBEATS_PER_TTL`` (a holder renews that often, so less left means its
    heartbeat is not getting through and another run may take over before the commit lands).
    Picklable: it travels to the write tasks.
    """

    output: str
    owner_id: str
    ttl_s: float
    s3: S3Settings | None = None

    def __call__(self) -> None:
        store, uri = _store_for(self.output, s3=self.s3)
        current = store.read()
        body = _decode(current[0]) if current is not None else None
        owner = (body or {}).get("owner") or {}
        expires = _parse_time((body or {}).get("expires_at"))
        margin = _dt.timedelta(seconds=self.ttl_s / HEARTBEATS_PER_TTL)
        if owner.get("id") != self.owner_id or expires is None or expires - _now() < margin:
            now_held = f"it is held by {describe_holder(body)}" if body else "it is gone"
            raise LeaseLost(f"output {self.output}: this run no longer holds its lease {uri} with time to spare "
                            f"({now_held}); it commits nothing more. Rows committed so far are kept")


class NoLease:
    """``output.lease_ttl_s = 0``: no lease; the same calls, doing nothing."""

    held = False

    def confirm(self) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def take_lease(output: str, *, s3: S3Settings | None = None, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0,
               owner_id: str | None = None, poll_s: float = POLL_INTERVAL_S) -> OutputLease | NoLease:
    """The output's lease, held (``ttl_s == 0``: a :class:`NoLease`); a context manager that releases it."""
    if ttl_s == 0:
        return NoLease()
    return OutputLease(output, s3=s3, ttl_s=ttl_s, owner_id=owner_id).acquire(wait_s=wait_s, poll_s=poll_s)


__all__ = [
    "DEFAULT_TTL_S",
    "HEARTBEATS_PER_TTL",
    "LEASE_FILE",
    "MIN_TTL_S",
    "POLL_INTERVAL_S",
    "LeaseError",
    "LeaseGuard",
    "LeaseHeld",
    "LeaseLost",
    "LeaseUnsupported",
    "NoLease",
    "OutputLease",
    "describe_holder",
    "holder_gone",
    "expired",
    "take_lease",
]
