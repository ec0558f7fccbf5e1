"""The console of a default run: the progress bar, the summary and real problems, no Ray internals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from jobs.console import NATIVE_LINE, _Filter
from tests.segment.corpus import good_images, write_files

REPO = Path(__file__).resolve().parents[2]
#: What users read as failures: Ray's Python log lines and its C++ components' lines.
RAY_NOISE = re.compile(r"(INFO|WARNING) \w+\.py:\d+ --|Token authentication|Progress bars disabled|core_worker\.cc|"
                       r"rpc_client|\] \w+\.(cc|h):\d+:")


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as a fresh shell has it
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "jobs.segment", "--input", "in", "--output", "out", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_default_run_prints_the_bar_and_the_summary_and_no_ray_internals(tmp_path):
    write_files(tmp_path / "in", good_images(3))
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    noise = [line for line in console.replace("\r", "\n").splitlines() if RAY_NOISE.search(line)]
    assert noise == []
    assert "segmented 3 new image(s)" in done.stdout and "masks: " in done.stdout
    assert "segment: 3img" in done.stderr  # the progress bar

    write_files(tmp_path / "in", good_images(1, start=10))
    loud = _run(tmp_path, "--verbose")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert RAY_NOISE.search(loud.stdout + loud.stderr)  # --verbose shows Ray's own lines again


def test_the_filter_sets_native_lines_aside_and_passes_everything_else_as_it_comes(tmp_path):
    read_fd, write_fd = os.pipe()
    out_r, out_w = os.pipe()
    log = tmp_path / "native.log"
    filt = _Filter(read_fd, out_w, log)
    native = b"[2026-11-30 13:21:01,803 E 30717 30717] core_worker.cc:2465: Actor with class name: 'X'\n"
    filt.feed(b"\rsegment: 1img [00:01,  1.0s/img]")  # a bar without newline passes at once
    assert os.read(out_r, 4096) == b"\rsegment: 1img [00:01,  1.0s/img]"
    filt.feed(native[:20])  # the start of a native line is held until its line ends
    filt.feed(native[20:] + b"error: a real problem\n")
    filt.feed(b"", final=True)
    os.close(out_w)
    passed = b""
    while chunk := os.read(out_r, 4096):
        passed += chunk
    assert passed == b"error: a real problem\n"
    assert filt.log_file is not None
    filt.log_file.close()
    assert log.read_bytes() == native
    assert NATIVE_LINE.search(native) and not NATIVE_LINE.search(b"segment: 1img [00:01,  1.0s/img]")
    os.close(read_fd)
    os.close(write_fd)
    os.close(out_r)
