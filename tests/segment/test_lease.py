"""One writer per output: the lease on ``<output>/_lease.json``, on a local folder and on a loopback S3 (moto).

Every lease test runs against both stores through the real filesystem code: conditional
PUTs on the moto server, exclusive create + flock locally. The lease object is read and
written behind the module's back (plain reads, plain PUTs) to check what it holds and to
leave what a killed run leaves. One end-to-end test goes through ``jobs.segment.segment``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.io.uris import InputError, S3Settings
from pipeline.outputs.lease import (
    LeaseHeld,
    LeaseLost,
    LeaseUnsupported,
    OutputLease,
    expired,
    take_lease,
)

REPO = Path(__file__).resolve().parents[2]
RACE_ROUNDS = 10
#: Short leases so that expiry and heartbeats happen within a test (a run's minimum is 10 s).
SHORT_TTL_S = 3.0


@dataclass
class Place:
    """An output location and raw access to its ``_lease.json`` that bypasses the lease module."""

    output: str
    s3: S3Settings | None
    fs: object | None = None  # s3fs for S3; None locally
    path: str = ""  # the lease object: bucket/key on S3, a file path locally

    def read(self) -> dict | None:
        try:
            data = self.fs.cat_file(self.path) if self.fs else Path(self.path).read_bytes()
        except FileNotFoundError:
            return None
        return json.loads(data)

    def write(self, body: dict) -> None:
        data = json.dumps(body).encode()
        if self.fs:
            self.fs.pipe_file(self.path, data)
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_bytes(data)

    def lease(self, owner_id: str, *, ttl_s: float = 60.0) -> OutputLease:
        return OutputLease(self.output, s3=self.s3, ttl_s=ttl_s, owner_id=owner_id)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def place(request, tmp_path) -> Place:
    if request.param == "local":
        return Place(output=str(tmp_path / "out"), s3=None, path=str(tmp_path / "out" / "_lease.json"))
    import s3fs

    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    fs = s3fs.S3FileSystem(endpoint_url=server["endpoint_url"], key="testing", secret="testing")
    settings = S3Settings(endpoint_url=server["endpoint_url"], region=server["region"])
    return Place(output=f"s3://{bucket}/out", s3=settings, fs=fs, path=f"{bucket}/out/_lease.json")


def _at(seconds_from_now: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now)).isoformat()


def _left_by(owner_id: str, *, expires_in_s: float) -> dict:
    """A lease as another run on another host wrote it (expired when ``expires_in_s`` < 0)."""
    return {"owner": {"id": owner_id, "host": "worker-7", "pid": 4242}, "acquired_at": _at(-600),
            "heartbeat_at": _at(expires_in_s - 120), "expires_at": _at(expires_in_s), "ttl_s": 120.0}


def _wait_until(when_iso: str, *, margin_s: float = 0.3) -> None:
    left = (dt.datetime.fromisoformat(when_iso) - dt.datetime.now(dt.UTC)).total_seconds()
    time.sleep(max(left, 0) + margin_s)


# ----------------------------------------------------------------------------- refusing, releasing


def test_a_second_acquire_is_refused_naming_the_holder(place):
    first = place.lease("scheduled-run-1").acquire()
    try:
        with pytest.raises(LeaseHeld) as refused:
            place.lease("manual-run").acquire()
        raw = place.read()
        message = str(refused.value)
        assert isinstance(refused.value, InputError)  # the job turns it into exit 2
        for part in ("scheduled-run-1", f"host {socket.gethostname()}", f"pid {os.getpid()}",
                     raw["heartbeat_at"], raw["expires_at"], "--wait-for-lock", place.output):
            assert part in message, (part, message)
        assert raw["owner"]["id"] == "scheduled-run-1"  # the refused run changed nothing
        assert refused.value.holder["owner"]["id"] == "scheduled-run-1"
    finally:
        first.release()


def test_a_released_lease_can_be_taken_again(place):
    with place.lease("run-a").acquire():
        assert place.read()["owner"]["id"] == "run-a"
    assert place.read() is None  # released: the object is gone
    with place.lease("run-b").acquire():
        assert place.read()["owner"]["id"] == "run-b"
    assert place.read() is None


def test_release_and_confirm_never_touch_a_lease_someone_else_took_over(place):
    # As if our heartbeat had lapsed and another run had taken the lease over.
    mine = place.lease("slow-run").acquire()
    place.write(_left_by("took-over", expires_in_s=60))
    mine.release()
    assert place.read()["owner"]["id"] == "took-over"

    place.write(_left_by("killed-run", expires_in_s=-5))
    mine = place.lease("slow-run").acquire()
    try:
        place.write(_left_by("took-over-again", expires_in_s=60))
        with pytest.raises(LeaseLost, match="took-over-again"):
            mine.confirm()
    finally:
        mine.release()
    assert place.read()["owner"]["id"] == "took-over-again"


# ----------------------------------------------------------------------------- expiry and takeover


def test_an_expired_lease_left_behind_is_taken_over_and_a_live_one_is_not(place):
    place.write(_left_by("alive-elsewhere", expires_in_s=60))
    with pytest.raises(LeaseHeld, match="alive-elsewhere"):
        place.lease("next-run").acquire()

    place.write(_left_by("killed-run", expires_in_s=-5))
    with place.lease("next-run").acquire():
        raw = place.read()
        assert raw["owner"]["id"] == "next-run"
        assert raw["taken_over_from"]["id"] == "killed-run"
    assert place.read() is None


def test_the_lease_of_a_killed_process_is_taken_over_at_once_here_and_at_expiry_elsewhere(place):
    """A real holder, SIGKILLed on this host: its process is gone, so the next run takes over at once.
    A holder on another host cannot be checked: its lease stands until it expires."""
    script = ("import sys, time; from pipeline.io.uris import S3Settings; from pipeline.outputs.lease import OutputLease;"
              "s3 = S3Settings(endpoint_url=sys.argv[2], region='us-east-1') if sys.argv[2] else None;"
              f"OutputLease(sys.argv[1], s3=s3, ttl_s={SHORT_TTL_S}, owner_id='doomed-run').acquire();"
              "print('held', flush=True); time.sleep(600)")
    endpoint = place.s3.endpoint_url if place.s3 else ""
    holder = subprocess.Popen([sys.executable, "-c", script, place.output, endpoint], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match="doomed-run"):  # alive: refused
            place.lease("rerun").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    left = place.read()
    assert left["owner"]["id"] == "doomed-run" and left["owner"]["pid"] == holder.pid
    assert not expired(left)
    with place.lease("rerun").acquire():  # well before its expiry
        assert place.read()["owner"]["id"] == "rerun"
        assert place.read()["taken_over_from"]["pid"] == holder.pid

    elsewhere = _left_by("killed-elsewhere", expires_in_s=SHORT_TTL_S)  # pid 4242 on host worker-7
    place.write(elsewhere)
    with pytest.raises(LeaseHeld, match="killed-elsewhere"):
        place.lease("rerun").acquire()
    _wait_until(elsewhere["expires_at"])
    with place.lease("rerun").acquire():
        assert place.read()["taken_over_from"]["id"] == "killed-elsewhere"


def _race(leases: list[OutputLease]) -> dict[int, object]:
    """Acquire every lease at once, one thread each: ``{i: "won" or the LeaseHeld it raised}``."""
    start = threading.Barrier(len(leases))
    outcome: dict[int, object] = {}

    def race(i: int) -> None:
        start.wait()
        try:
            leases[i].acquire()
            outcome[i] = "won"
        except LeaseHeld as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcome


def test_two_runs_racing_for_one_expired_lease_exactly_one_wins(place):
    for round_ in range(RACE_ROUNDS):
        place.write(_left_by("killed-run", expires_in_s=-5))
        racers = [place.lease(f"racer-{round_}-{i}") for i in range(2)]
        outcome = _race(racers)
        try:
            winners = [i for i, result in outcome.items() if result == "won"]
            assert len(outcome) == 2 and len(winners) == 1, (round_, outcome)
            winner, loser = winners[0], 1 - winners[0]
            assert place.read()["owner"]["id"] == f"racer-{round_}-{winner}"
            assert f"racer-{round_}-{winner}" in str(outcome[loser])  # the loser names who won
        finally:
            for lease in racers:
                lease.release()


# ----------------------------------------------------------------------------- waiting, heartbeat


def test_waiting_succeeds_when_the_holder_releases_during_the_wait(place):
    holder = place.lease("long-run").acquire()
    try:
        with pytest.raises(LeaseHeld, match=r"still in use after waiting 0\.3 s.*long-run"):
            place.lease("patient-run").acquire(wait_s=0.3, poll_s=0.1)
        release_after_s = 1.0
        threading.Timer(release_after_s, holder.release).start()
        started = time.monotonic()
        with place.lease("patient-run").acquire(wait_s=30, poll_s=0.1):
            waited = time.monotonic() - started
            assert place.read()["owner"]["id"] == "patient-run"
        assert release_after_s <= waited < 30
    finally:
        holder.release()


def test_the_heartbeat_extends_the_expiry_and_keeps_the_lease_past_it(place):
    with place.lease("heartbeating-run", ttl_s=SHORT_TTL_S).acquire():
        first = place.read()
        time.sleep(SHORT_TTL_S * 0.75)  # two heartbeats are due (every ttl/3)
        later = place.read()
        assert dt.datetime.fromisoformat(later["expires_at"]) > dt.datetime.fromisoformat(first["expires_at"])
        assert later["heartbeat_at"] > first["heartbeat_at"] and later["acquired_at"] == first["acquired_at"]
        _wait_until(first["expires_at"])  # past the first expiry: still held, not taken over
        with pytest.raises(LeaseHeld, match="heartbeating-run"):
            place.lease("impatient-run").acquire()
        assert place.read()["owner"]["id"] == "heartbeating-run"


# ----------------------------------------------------------------------------- other stores, configuration


def test_a_filesystem_without_conditional_writes_is_refused_unless_the_lease_is_off():
    with pytest.raises(LeaseUnsupported, match=r"memory:// outputs.*output\.lease_ttl_s = 0"):
        OutputLease("memory://bucket/out", owner_id="run")
    with take_lease("memory://bucket/out", ttl_s=0) as lease:
        assert not lease.held


def test_lease_settings_are_checked_and_the_flag_sets_the_wait():
    import argparse

    from jobs.segment import add_arguments, resolve_config
    from pipeline.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match=r"output\.lease_ttl_s: expected 0 \(no lease\) or >= 10"):
        from_mapping({"output": {"lease_ttl_s": 5}})
    with pytest.raises(ConfigError, match=r"output\.wait_for_lock_s: expected >= 0, got -1"):
        from_mapping({"output": {"wait_for_lock_s": -1}})
    assert from_mapping({"output": {"lease_ttl_s": 0}}).output.lease_ttl_s == 0
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--input", "in", "--output", "out", "--wait-for-lock", "45"])
    assert resolve_config(args).output.wait_for_lock_s == 45.0


# ----------------------------------------------------------------------------- end to end


def test_segment_refuses_an_output_in_use_then_runs_once_it_is_released(ray_local, tmp_path, tiny_checkpoint,
                                                                        capsys):
    from jobs.segment import segment
    from pipeline.config import from_mapping
    from pipeline.outputs import OutputLayout
    from tests.segment.corpus import good_images, write_files

    write_files(tmp_path / "in", good_images(2))
    out = tmp_path / "out"
    config = from_mapping({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(out)},
        "model": {"weights": str(tiny_checkpoint)}, "crf": {"enabled": False},
        "ray": {"no_progress_timeout_s": 120, "progress": False},
    })
    other = OutputLease(str(out), owner_id="manual-run-elsewhere").acquire()
    try:
        assert segment(config, echo=lambda *_: None) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: output ") and err.count("\n") == 1
        assert "manual-run-elsewhere" in err and f"pid {os.getpid()}" in err and "--wait-for-lock" in err
        assert not (out / "segments").exists()  # refused before its first write
    finally:
        other.release()

    assert segment(config, echo=lambda *_: None) == 0
    assert OutputLayout(uri=str(out)).read_segments().num_rows == 2
    assert not (out / "_lease.json").exists()  # released at the end of the run
