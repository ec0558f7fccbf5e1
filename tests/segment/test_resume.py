"""Exactly once: a run killed midway (SIGKILL of the job and its local Ray), then rerun.

Every input ends as exactly one row; rows committed before the kill are not
redone; no half-written file is visible (temporary names start with a dot).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.segment import EXIT_OK, segment
from pipeline.config import load_config
from pipeline.outputs import OutputLayout
from tests.segment.corpus import good_images, write_files

REPO = Path(__file__).resolve().parents[2]
COUNT = 24
KILL_AFTER_FILES = 2
DEADLINE_S = 180


@pytest.mark.timeout(400)
def test_killed_run_then_rerun_gives_each_row_once(ray_local, tmp_path, tiny_checkpoint):
    write_files(tmp_path / "in", good_images(COUNT))
    out = tmp_path / "out"
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump({
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(out), "rows_per_file": 2},
        "model": {"weights": str(tiny_checkpoint)},
        "crf": {"batch_size": 2},
        "network": {"batch_size": 2},
        "ray": {"address": "local", "no_progress_timeout_s": 120, "progress": False},
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.segment", "--config", str(config_path)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    layout = OutputLayout(uri=str(out))
    deadline = time.monotonic() + DEADLINE_S
    try:
        while len(layout.segment_files()) < KILL_AFTER_FILES and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        still_running = proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and the local Ray it started (same session)
        proc.wait(timeout=30)
    assert still_running, "the job finished (or failed) before it could be killed midway"
    committed = layout.read_segments()
    done_before = set(committed.column("image_id").to_pylist())
    assert KILL_AFTER_FILES * 2 <= len(done_before) < COUNT
    run_ids_before = set(committed.column("run_id").to_pylist())

    assert segment(load_config(config_path), echo=lambda *_: None) == EXIT_OK
    rows = layout.read_segments().to_pylist()
    ids = []
    for path in layout.segment_files():
        import pyarrow.parquet as pq

        ids += pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == COUNT  # physically, not only after dedupe
    assert {r["status"] for r in rows} == {"ok"}
    redone = {r["image_id"] for r in rows if r["run_id"] not in run_ids_before}
    assert redone.isdisjoint(done_before) and len(redone) == COUNT - len(done_before)
    visible = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert all(p.suffix in (".png", ".parquet", ".json") for p in visible)
    assert len(list((out / "masks").glob("*.png"))) == COUNT
