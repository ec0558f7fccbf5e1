"""A real ``segment --training`` process SIGKILLed mid-run (with its local Ray), then rerun: no image is
visible twice at any point, and after the rerun every ok image is in exactly one shard.

Marked ``slow`` (make test-all): two cold Ray starts per case. The deterministic kill points of the
commit protocol are covered in test_training_output.py (a fault injected between its steps) and
test_training_store.py (every state a merge can stop in).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.outputs import OutputLayout
from tests.segment.corpus import good_images, write_files

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _shard_ids(training: Path) -> Counter:
    import json
    import tarfile

    seen: Counter = Counter()
    for path in sorted(training.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    seen[json.loads(tar.extractfile(member).read())["image_id"]] += 1
    return seen


def _segment(folder: Path, out: Path, weights: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "jobs.segment", "--input", str(folder), "--output", str(out),
               "--weights", str(weights), "--training", "webdataset", "--ignore-below", "0.5", "--no-crf",
               "--config", str(out.parent / "config.yaml")]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.mark.parametrize("commits_before_kill", [1, 4])
def test_sigkill_mid_run_then_rerun_gives_every_image_exactly_once(tmp_path, tiny_checkpoint, commits_before_kill):
    from tests.conftest import _shutdown_ray

    _shutdown_ray()  # the runs start their own local Ray instances
    folder, out = tmp_path / "in", tmp_path / "out"
    write_files(folder, good_images(40))
    (tmp_path / "config.yaml").write_text("output:\n  rows_per_file: 2\nray:\n  progress: false\n")
    run = _segment(folder, out, tiny_checkpoint, start_new_session=True)  # its own group: Ray dies with it
    segments = out / "segments"
    deadline = time.monotonic() + 300
    try:
        while len(list(segments.glob("part-*.parquet"))) < commits_before_kill:
            assert run.poll() is None, f"the run ended before the kill:\n{run.stdout.read()}"
            assert time.monotonic() < deadline, "no commit within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)

    training = out / "training"
    committed = {r["image_id"] for r in OutputLayout(uri=str(out)).read_segments().to_pylist()}
    visible = _shard_ids(training)
    assert set(visible.values()) <= {1}  # never an image twice
    assert set(visible) <= committed  # never an image whose row is not committed
    assert len(committed) < 40  # the kill came mid-run

    rerun = _segment(folder, out, tiny_checkpoint)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    rows = OutputLayout(uri=str(out)).read_segments().to_pylist()
    ok = {r["image_id"] for r in rows if r["status"] == "ok"}
    assert len(rows) == 40 and len(ok) == 40
    final = _shard_ids(training)
    assert set(final) == ok and set(final.values()) == {1}
    assert not [p for p in (training / "_pending").iterdir() if not p.name.startswith(".")]
