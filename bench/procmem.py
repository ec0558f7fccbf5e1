"""Memory of every process of a run, sampled from /proc (Linux): the driver and each Ray process it started.

Processes are found by a marker in their environment (set before Ray starts; Ray's
processes inherit it). **RSS** counts the object-store pages a process touched
(shared memory, mapped by every Ray process that reads or writes a block);
**private** is its own memory (``RssAnon``). Each sample is attributed to what the
process is doing at that moment (its ``ray::`` title names the task or actor).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

#: (title fragment, kind) in order: the first match names the process.
STAGE_KINDS: tuple[tuple[str, str], ...] = (
    ("NetworkStage", "network actor"), ("CRFStage", "CRF actor"), ("DecodeStage", "decode task"),
    ("WriteStage", "write task"), ("ReadBytes", "read task"),
)


def rss_mb(pid: int) -> tuple[float, float]:
    """``(RSS, private RSS)`` of ``pid`` in MB (0 when it is gone)."""
    total = anon = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total = int(line.split()[1]) / 1024.0
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return total, anon


def marked_processes(marker: bytes) -> dict[int, str]:
    """``{pid: title}`` of the processes whose environment holds ``marker`` (``NAME=value``)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                out[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
    return out


def kind_of(title: str) -> str:
    for fragment, kind in STAGE_KINDS:
        if fragment in title:
            return kind
    name = os.path.basename(title)
    if "raylet" in name:
        return "raylet"
    if "gcs_server" in name:
        return "gcs"
    if title.startswith("ray::") or "default_worker" in title:
        return "other Ray worker"
    return name[:20] or "other"


class Sampler:
    """Samples every ``interval_s`` the memory of the marked processes (and ``driver_pid``) in a thread.

    ``with Sampler() as s:`` marks this process's environment first, so Ray started
    inside the block (and the processes it spawns) is sampled; ``s.peaks()`` gives the
    largest RSS and private memory per kind, ``s.top()`` the largest processes.
    """

    def __init__(self, *, driver_pid: int | None = None, interval_s: float = 0.1, marker: str | None = None) -> None:
        self.marker = marker or f"BENCH_RUN={uuid.uuid4().hex}"
        self.driver_pid = driver_pid or os.getpid()
        self.interval_s = interval_s
        self._peak: dict[str, tuple[float, float]] = {}
        self._top: dict[int, tuple[float, float, str]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def environment(self) -> dict[str, str]:
        name, value = self.marker.split("=", 1)
        return {name: value}

    def sample(self) -> None:
        processes = marked_processes(self.marker.encode())
        processes.setdefault(self.driver_pid, "driver")
        for pid, title in processes.items():
            kind = "driver" if pid == self.driver_pid else kind_of(title)
            rss, private = rss_mb(pid)
            old = self._peak.get(kind, (0.0, 0.0))
            self._peak[kind] = (max(old[0], rss), max(old[1], private))
            top = self._top.get(pid, (0.0, 0.0, kind))
            self._top[pid] = (max(top[0], rss), max(top[1], private), kind if rss >= top[0] else top[2])

    def _run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> Sampler:
        os.environ.update(self.environment())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def peaks(self) -> dict[str, tuple[float, float]]:
        """``{kind: (largest RSS MB, largest private MB)}``."""
        return dict(self._peak)

    def top(self, n: int = 3) -> list[tuple[float, float, str]]:
        """The ``n`` largest processes by RSS: (RSS MB, private MB, kind)."""
        return sorted(self._top.values(), key=lambda item: -item[0])[:n]

    def reset(self) -> None:
        self._peak.clear()
        self._top.clear()
