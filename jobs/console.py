"""The console of a job: its progress bar, its summary and real problems, not Ray's native log lines.

Ray's C++ components log to the stderr of the process that hosts them; in the driver that
is the user's terminal (e.g. ``core_worker.cc: Actor ... has constructor arguments in the
object store``, ``rpc_client.h: Failed to connect``). :func:`native_logs_aside` routes this
process's stderr through a filter: lines in the native log format go to a file, the rest
(the progress bar, our messages, Python tracebacks) pass through unchanged, as they come.
``--verbose`` skips the filter.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

#: ``[2026-11-30 13:20:17,135 E 29263 29263] core_worker.cc:2465: ...``: glog-style lines of Ray's C++ code.
NATIVE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w./-]+:\d+: ")
#: A tail that may still grow into a native line's prefix (held back until its line ends).
_MAYBE_NATIVE = re.compile(rb"\[(\d{1,4}(-(\d{1,2}(-(\d{1,2}( [\d:,]*( [DIWEF]?)?)?)?)?)?)?)?$")


def native_log_path() -> Path:
    return Path(tempfile.gettempdir()) / "deeplab-batch" / f"ray-native-{os.getpid()}.log"


class _Filter:
    def __init__(self, read_fd: int, out_fd: int, log: Path) -> None:
        self.read_fd, self.out_fd, self.log = read_fd, out_fd, log
        self.buffer = b""
        self.log_file = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def _aside(self, data: bytes) -> None:
        if self.log_file is None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.log, "ab")  # noqa: SIM115 - closed in run()
        self.log_file.write(data)
        self.log_file.flush()

    def _out(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.out_fd, data):]

    def feed(self, data: bytes, *, final: bool = False) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            match = NATIVE_LINE.search(line)
            if match:
                self._out(line[: match.start()])  # e.g. a progress bar the native line was appended to
                self._aside(line[match.start():] + b"\n")
            else:
                self._out(line + b"\n")
        held = _MAYBE_NATIVE.search(self.buffer) if not final else None
        cut = held.start() if held else len(self.buffer)
        self._out(self.buffer[:cut])
        self.buffer = self.buffer[cut:]

    def run(self) -> None:
        try:
            while chunk := os.read(self.read_fd, 65536):
                self.feed(chunk)
            self.feed(b"", final=True)
        finally:
            os.close(self.read_fd)
            if self.log_file is not None:
                self.log_file.close()


@contextlib.contextmanager
def native_logs_aside(*, enabled: bool = True) -> Iterator[Path]:
    """Within the block, native log lines written to stderr (fd 2) go to :func:`native_log_path`."""
    log = native_log_path()
    if not enabled:
        yield log
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    filt = _Filter(read_fd, saved, log)
    filt.thread.start()
    try:
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the filter drains and stops
        filt.thread.join(timeout=10)
        os.close(saved)


__all__ = ["NATIVE_LINE", "native_log_path", "native_logs_aside"]
