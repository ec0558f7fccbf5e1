"""Exactly once: a run killed midway (SIGKILL of the job and its local Ray), then rerun.

Every input ends as exactly one row; rows committed before the kill are not
redone; no half-written file is visible (temporary names start with a dot).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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


def _processes_with_env(marker: bytes) -> list[int]:
    """PIDs whose environment holds ``marker`` (an exact ``NAME=value`` entry)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if marker in environ:
            pids.append(int(entry.name))
    return pids


def _kill_ray_of(temp_root: str) -> None:
    """SIGKILL every process of the local Ray a killed job started under ``temp_root``.

    Ray's node and worker processes leave the job's process group, so killing the
    driver alone lets in-flight write tasks go on committing rows. Workers also rename
    themselves (``ray::...``), so they are found by the ``RAY_TMPDIR`` they inherited,
    not by their command line.
    """
    marker = f"RAY_TMPDIR={temp_root}".encode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = [pid for pid in _processes_with_env(marker) if pid != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of the killed job's Ray still alive: {pids}")


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
    ray_root = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_root}
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
    _kill_ray_of(ray_root)
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
    assert all(p.suffix in (".png", ".parquet", ".json", ".html") for p in visible)  # no temporary files left
    assert len(list((out / "masks").glob("*.png"))) == COUNT


def _run_json(out: Path) -> dict:
    import json

    return json.loads((out / "_run.json").read_text())


def test_storage_errors_are_retried_duplicates_dropped_relative_weights(ray_local, tmp_path, tiny_checkpoint,
                                                                         monkeypatch):
    import shutil

    from pipeline.config import from_mapping
    from tests.segment.corpus import manifest

    images = good_images(3)
    names = sorted(images)
    write_files(tmp_path / "in", {n: images[n] for n in names[:2]})  # names[2] arrives later
    uris = [f"in/{names[0]}", f"in/{names[1]}", f"in/{names[0]}", f"in/{names[2]}"]
    (tmp_path / "m.parquet").write_bytes(manifest({"uri": uris}))
    shutil.copy(tiny_checkpoint, tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)  # relative --input, --output and --weights (Ray workers run elsewhere)
    config = from_mapping({
        "input": {"uri": "m.parquet"}, "output": {"uri": "out"}, "model": {"weights": "w.safetensors"},
        "crf": {"enabled": False}, "ray": {"no_progress_timeout_s": 120, "progress": False},
    })
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    counts = _run_json(tmp_path / "out")["counts"]
    assert (counts["new"], counts["ok"], counts["error"], counts["error_storage"]) == (3, 2, 1, 1)
    assert counts["duplicates"] == 1

    (tmp_path / "in" / names[2]).write_bytes(images[names[2]])  # the missing object appears
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    run = _run_json(tmp_path / "out")
    # skipped counts input rows whose image already has a row: names[0] is listed twice
    assert (run["counts"]["new"], run["counts"]["retried"], run["counts"]["skipped"]) == (1, 1, 3)
    assert run["output_rows"] == {"rows": 3, "ok": 3, "error": 0, "pending_retry": 0}
    layout = OutputLayout(uri=str(tmp_path / "out"))
    rows = layout.read_segments().to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert layout.read_segments(deduplicated=False).num_rows == 4  # the old error row is superseded, not removed
    import pyarrow.parquet as pq

    stats = pq.read_table(tmp_path / "out" / "class_stats.parquet").to_pylist()
    assert sum(s["pixels"] for s in stats) == sum(r["width"] * r["height"] for r in rows)


def test_limit_counts_only_new_rows_of_shards(ray_local, tmp_path, tiny_checkpoint):
    from pipeline.config import from_mapping
    from tests.segment.corpus import tar_shard

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.tar").write_bytes(tar_shard(good_images(4)))
    config = from_mapping({
        "input": {"uri": str(tmp_path / "in"), "limit": 2}, "output": {"uri": str(tmp_path / "out")},
        "model": {"weights": str(tiny_checkpoint)}, "crf": {"enabled": False},
        "ray": {"no_progress_timeout_s": 120, "progress": False},
    })
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    assert _run_json(tmp_path / "out")["counts"]["new"] == 2
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    counts = _run_json(tmp_path / "out")["counts"]
    assert (counts["new"], counts["skipped"]) == (2, 2)  # the 2 done members do not use up the limit
    assert OutputLayout(uri=str(tmp_path / "out")).read_segments().num_rows == 4


def test_a_stalled_run_fails_with_a_clear_message(ray_local, tmp_path, tiny_checkpoint, capsys):
    from jobs.segment import EXIT_FAILED
    from pipeline.config import from_mapping

    write_files(tmp_path / "in", good_images(2))
    config = from_mapping({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"weights": str(tiny_checkpoint)}, "crf": {"enabled": False},
        "decode": {"max_pixels": 10**13},  # decode tasks reserve more memory than the node has: never scheduled
        "ray": {"no_progress_timeout_s": 5, "progress": False},
    })
    assert segment(config, echo=lambda *_: None) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "made no progress for ray.no_progress_timeout_s = 5 s" in err and err.startswith("error: ")
