"""Fixtures: a two-node local Ray cluster (fake GPU head + CRF worker), a loopback S3 server, and a
runner for ``deeplab-batch submit`` as a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cluster import CRF_NODE_RESOURCE, GPU_NODE_RESOURCE
from tests.cluster.local_cluster import LocalRayCluster, MotoServer

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_cluster():
    """Head: 1 CPU, 1 fake GPU, ``gpu_node``; worker: 1 CPU, ``crf_node``. Token auth off."""
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=1, num_gpus=1, resources={GPU_NODE_RESOURCE: 1})
        cluster.add_worker(num_cpus=1, resources={CRF_NODE_RESOURCE: 1})
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class SubmitResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_submit(cluster: LocalRayCluster, args: list[str], *, env: dict[str, str] | None = None,
               timeout_s: float = 240) -> SubmitResult:
    """``python -m jobs.cli submit --address <cluster> ARGS`` from the repo root, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "submit", "--address", cluster.dashboard_url, *args],
        cwd=REPO_ROOT, env=env if env is not None else cluster.env(), capture_output=True, text=True,
        timeout=timeout_s,
    )
    return SubmitResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def submit(ray_cluster):
    def _submit(args: list[str], **kwargs) -> SubmitResult:
        return run_submit(ray_cluster, args, **kwargs)

    return _submit


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Cluster tests need Ray's CLI and moto_server next to this Python (both are test dependencies,
    installed by ``make install``): without them the test fails before its fixtures start, it never skips."""
    here = Path(__file__).parent
    if "cluster" not in item.keywords or here not in Path(item.path).parents:
        return
    bin_dir = Path(sys.executable).parent
    missing = [name for name in ("ray", "moto_server") if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found next to {sys.executable} (run `make install`)", pytrace=False)
