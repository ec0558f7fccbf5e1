"""A real multi-node Ray cluster and a real S3 endpoint on loopback, started as separate processes.

Isolation, so a test cannot touch another Ray cluster on the same machine:

* every port is picked free (GCS, dashboard, client server, agents, metrics);
* ``--temp-dir`` and ``HOME`` are fresh temporary directories, so the session
  files, ``ray_current_cluster`` and ``~/.ray/auth_token`` are private;
* each ``ray start --block`` (and ``moto_server``) runs in its own session
  (``setsid``); stopping sends SIGTERM to that leader (``--block`` then tears its
  node down) and SIGKILLs whatever is left *in that session* after a grace
  period. ``ray stop`` is never used: it kills every Ray process of the user.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN_DIR = Path(sys.executable).parent
RAY = str(BIN_DIR / "ray")
MOTO_SERVER = str(BIN_DIR / "moto_server")
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # after "pid (comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def stop_session(proc: subprocess.Popen, *, grace_s: float = 15.0) -> None:
    """SIGTERM the session leader ``proc``, then SIGKILL what is left of its session."""
    sid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_pids(sid):
        if proc.poll() is None:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(0.2)
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def wait_for(predicate, *, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}\n{tail}")
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what}: not ready after {timeout_s}s\n{tail}")


def http_ok(url: str, *, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:  # 401/403 under token auth still means "up"
        return exc.code < 500
    except OSError:
        return False


@dataclass
class LocalRayCluster:
    """``ray start --head`` + ``ray start --address`` worker nodes on 127.0.0.1."""

    auth_token: str | None = None  # token auth on when set (via RAY_AUTH_TOKEN, never ~/.ray)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dlb-", dir="/tmp")))
    procs: list[subprocess.Popen] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, *, auth: bool | None = None) -> dict[str, str]:
        """The environment of the cluster's processes (and a client that should see the same)."""
        # Nothing of this process's Ray, AWS or PYTHONPATH settings: the job gets them from its runtime env.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
        env.update(
            HOME=str(self.home),
            PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        auth = self.auth_token is not None if auth is None else auth
        if auth:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.auth_token or "")
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def _start(self, args: list[str], *, log_name: str) -> subprocess.Popen:
        log = self.root / log_name
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
            env=self.env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.root,
        )
        self.procs.append(proc)
        return proc

    def start_head(self, *, num_cpus: int = 1, num_gpus: int = 0, resources: dict | None = None,
                   memory_mib: int = 2048, object_store_mib: int = 256) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        proc = self._start(
            [
                "--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--resources={json.dumps(resources or {})}",
                f"--memory={memory_mib * MIB}", f"--object-store-memory={object_store_mib * MIB}",
            ],
            log_name="head.log",
        )
        wait_for(lambda: http_ok(f"{self.dashboard_url}/api/version"), timeout_s=90,
                 what="ray head dashboard", proc=proc, log=self.root / "head.log")

    def add_worker(self, *, num_cpus: int = 1, num_gpus: int = 0, resources: dict | None = None,
                   memory_mib: int = 2048, object_store_mib: int = 256) -> None:
        index = len(self.procs)
        self._start(
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--resources={json.dumps(resources or {})}",
                f"--memory={memory_mib * MIB}", f"--object-store-memory={object_store_mib * MIB}",
            ],
            log_name=f"worker{index}.log",
        )

    def wait_for_nodes(self, count: int, *, timeout_s: float = 90) -> None:
        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

        def alive() -> bool:
            request = urllib.request.Request(f"{self.dashboard_url}/nodes?view=summary", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    summary = json.load(response)["data"]["summary"]
            except (OSError, KeyError, ValueError):
                return False
            return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE") >= count

        wait_for(alive, timeout_s=timeout_s, what=f"{count} alive Ray nodes", proc=self.procs[-1],
                 log=self.root / f"worker{len(self.procs) - 1}.log")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_session(proc)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class MotoServer:
    """``moto_server`` on 127.0.0.1 in its own process (Ray workers on other nodes can reach it)."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env_vars(self) -> dict[str, str]:
        """What a job needs to reach it (fake credentials: moto accepts any)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(lambda: http_ok(f"{self.endpoint}/moto-api/"), timeout_s=30, what="moto_server", proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc, grace_s=5)
            self.proc = None
