"""Fault injection for chaos tests of real runs: ``DEEPLAB_BATCH_FAULTS`` makes chosen images fail.

The failure taxonomy (:mod:`pipeline.failures`) is tested by injecting each kind into a
real ``segment`` run, in the stage where it happens in production, the way Ray's own
``RAY_testing_*`` variables inject faults into Ray. Unset (always, outside tests), this
costs one environment lookup per batch.

``DEEPLAB_BATCH_FAULTS`` is a ``;``-separated list of ``stage:kind:match:times``:

* ``stage``: ``network`` or ``crf``; or, in the writer of ``segment --training``, ``shard`` (once the
  batch's training shard is written, before its rows commit) or ``publish`` (after the rows
  commit, before the shard is published): a ``bug`` there stops the run where a kill could;
* ``kind``: ``oom`` (CUDA out of memory), ``device`` (a CUDA error), ``data`` (the input is
  bad) or ``bug`` (a ``TypeError``);
* ``match``: a substring of the image's ``source_uri``;
* ``times``: how many attempts of that image fail before it succeeds. Attempts are counted
  per process, or across processes and runs when ``DEEPLAB_BATCH_FAULTS_STATE`` names a
  folder (one small file per image and fault).

Example: ``network:oom:img003:2;crf:bug:img007:1``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ENV = "DEEPLAB_BATCH_FAULTS"
STATE_ENV = "DEEPLAB_BATCH_FAULTS_STATE"
STAGES = ("network", "crf", "shard", "publish")
KINDS = ("oom", "device", "data", "bug")

_attempts: dict[str, int] = {}


@dataclass(frozen=True)
class Fault:
    stage: str
    kind: str
    match: str
    times: int

    def exception(self, uri: str) -> BaseException:
        from pipeline.failures import DataError

        note = f"(injected by {ENV} for {uri})"
        if self.kind == "oom":
            return RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB {note}")
        if self.kind == "device":
            return RuntimeError(f"CUDA error: an illegal memory access was encountered {note}")
        if self.kind == "data":
            return DataError(f"injected bad input {note}")
        return TypeError(f"injected bug {note}")


def parse(spec: str) -> list[Fault]:
    """The faults of a ``DEEPLAB_BATCH_FAULTS`` value; a malformed entry is a ValueError naming it."""
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        parts = entry.split(":")
        if len(parts) != 4 or parts[0] not in STAGES or parts[1] not in KINDS or not parts[2] \
                or not parts[3].isdigit():
            raise ValueError(f"{ENV}: expected stage:kind:match:times with stage in {STAGES} and kind in {KINDS}, "
                             f"got {entry!r}")
        faults.append(Fault(parts[0], parts[1], parts[2], int(parts[3])))
    return faults


def _attempt(key: str) -> int:
    """This attempt's number (1, 2, ...) for ``key``: per process, or shared through the state folder."""
    folder = os.environ.get(STATE_ENV)
    if not folder:
        _attempts[key] = _attempts.get(key, 0) + 1
        return _attempts[key]
    path = Path(folder) / hashlib.sha256(key.encode()).hexdigest()[:32]
    with open(path, "ab") as f:  # one byte per attempt; O_APPEND keeps concurrent writers whole
        f.write(b".")
    return path.stat().st_size


def inject(stage: str, uris: Iterable[str]) -> None:
    """Raise the injected failure of the first image of ``uris`` that has one left in ``stage``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for fault in parse(spec):
        if fault.stage != stage:
            continue
        for uri in uris:
            if fault.match in uri and _attempt(f"{stage}:{fault.kind}:{fault.match}:{uri}") <= fault.times:
                raise fault.exception(uri)


__all__ = ["ENV", "STATE_ENV", "Fault", "inject", "parse"]
