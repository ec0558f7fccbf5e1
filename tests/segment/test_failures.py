"""The failure taxonomy (pipeline/failures.py), each kind injected into a real run on a local Ray instance.

Faults are injected where they happen in production (the network and CRF stages) with
``DEEPLAB_BATCH_FAULTS`` (pipeline/faults.py), set before Ray starts so that every
worker inherits it; attempts are counted across processes and runs in a state folder.
"""

from __future__ import annotations

import pytest

from jobs.segment import EXIT_FAILED, EXIT_OK, segment
from pipeline import faults
from pipeline.config import from_mapping
from pipeline.outputs import OutputLayout
from tests.segment.corpus import good_images, write_files

FAULTS = ";".join([
    "network:oom:oomtwice:2",      # CUDA out of memory twice, then fine: recovered within the run
    "crf:device:devonce:1",        # a CUDA error once in the CRF: recovered within the run
    "network:oom:oomlong:4",       # outlasts the run's attempts (batch + 3 alone): a transient row, next run ok
    "crf:data:baddata:99",         # the input is bad: a final data row
    "network:bug:buggy:1",         # a programming error: the job fails, no row
])


@pytest.fixture(scope="module")
def ray_with_faults(tmp_path_factory):
    from tests.conftest import local_ray

    state = tmp_path_factory.mktemp("fault-state")
    with local_ray({faults.ENV: FAULTS, faults.STATE_ENV: str(state)}) as ray:
        yield ray


def _config(tmp_path, weights, **crf):
    return from_mapping({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"weights": str(weights)}, "crf": {"backend": "pydensecrf", **crf},
        "ray": {"no_progress_timeout_s": 300, "progress": False},
    })


def _rows(tmp_path) -> dict[str, dict]:
    table = OutputLayout(uri=str(tmp_path / "out")).read_segments()
    return {r["source_uri"].rsplit("/", 1)[-1].split(".")[0]: r for r in table.to_pylist()}


def _inputs(tmp_path, names: list[str]) -> None:
    images = good_images(len(names))
    write_files(tmp_path / "in", {f"{name}.{old.rsplit('.', 1)[1]}": images[old]
                                  for name, old in zip(names, sorted(images), strict=True)})


def test_data_and_transient_failures_in_a_real_run(ray_with_faults, tmp_path, tiny_checkpoint):
    _inputs(tmp_path, ["plain1", "oomtwice", "devonce", "oomlong", "baddata", "plain2"])
    messages: list[str] = []
    assert segment(_config(tmp_path, tiny_checkpoint), echo=messages.append) == EXIT_OK
    rows = _rows(tmp_path)
    assert len(rows) == 6
    # transient, recovered within the run: ok rows, with masks
    for name in ("plain1", "plain2", "oomtwice", "devonce"):
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
        assert (tmp_path / "out" / "masks" / f"{rows[name]['image_id']}.png").is_file()
    # transient beyond the run's attempts: stored for the next run, named as such
    assert rows["oomlong"]["status"] == "error" and rows["oomlong"]["error_kind"] == "transient"
    assert "CUDA out of memory" in rows["oomlong"]["error"] and "after 3 attempts" in rows["oomlong"]["error"]
    # data: final
    assert rows["baddata"]["error_kind"] == "data" and "injected bad input" in rows["baddata"]["error"]

    # the next run retries the transient row (and only it) and succeeds; the data row stays
    assert segment(_config(tmp_path, tiny_checkpoint), echo=messages.append) == EXIT_OK
    rows = _rows(tmp_path)
    assert rows["oomlong"]["status"] == "ok"
    assert rows["baddata"]["status"] == "error" and rows["baddata"]["error_kind"] == "data"
    import json

    run = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert run["counts"]["new"] == 1 and run["counts"]["retried"] == 1 and run["counts"]["skipped"] == 5
    assert run["output_rows"]["pending_retry"] == 0


def test_a_bug_fails_the_run_loudly_and_is_never_stored(ray_with_faults, tmp_path, tiny_checkpoint, capsys):
    _inputs(tmp_path, ["plain1", "buggy", "plain2"])
    assert segment(_config(tmp_path, tiny_checkpoint, enabled=False), echo=lambda *_: None) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "the Ray job failed" in err and "TypeError: injected bug" in err
    assert 'pipeline/stages/network.py", line' in err  # the stage's traceback, not a one-line summary
    rows = _rows(tmp_path) if (tmp_path / "out" / "segments").exists() else {}
    assert "buggy" not in rows  # never an error row

    # a rerun (the fault fired once) processes it; nothing was stored as final in between
    assert segment(_config(tmp_path, tiny_checkpoint, enabled=False), echo=lambda *_: None) == EXIT_OK
    rows = _rows(tmp_path)
    assert {name: r["status"] for name, r in rows.items()} == {"plain1": "ok", "buggy": "ok", "plain2": "ok"}


def test_fault_specs_are_checked():
    with pytest.raises(ValueError, match="expected stage:kind:match:times"):
        faults.parse("network:explode:x:1")
    assert faults.parse("crf:oom:a:2;network:bug:b:1") == [faults.Fault("crf", "oom", "a", 2),
                                                           faults.Fault("network", "bug", "b", 1)]
