"""Shared fixtures: a real S3 endpoint on loopback (moto), local Ray (single and multi-node).

* ``s3_server`` (session): a ``moto`` S3 server on 127.0.0.1 at a free port; sets the
  standard AWS environment (endpoint, fake keys, region) for this process and for
  Ray workers started afterwards. ``s3_bucket`` gives a fresh empty bucket per test.
* ``ray_local`` (module): a one-node local Ray instance with 2 CPUs.
* ``ray_gpu_cluster`` (module): ``ray.cluster_utils.Cluster`` with a head node holding
  one fake GPU (``gpu_node`` resource) and a CPU-only node holding ``crf_node``.

Ray can hold one connection per process: each Ray fixture shuts down whatever is
connected first. ``RAY_AUTH_MODE=disabled`` for local clusters (see docs/ray-data.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Test data kept in the repository (see tests/data/README.md); never looked up outside it.
TEST_DATA = Path(__file__).resolve().parent / "data"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray workers import the project from the repository root.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """End the test process with the session's status once pytest is done, skipping interpreter finalization.

    Observed once (CI, 2026-11-30): after every test had passed and the summary was printed, the
    process died of SIGSEGV while the interpreter tore down what a long session leaves loaded
    (Ray's core worker after ``ray.shutdown``, gRPC, Arrow and fsspec's event-loop threads, torch).
    The results are final by then; a crash in the teardown of native libraries must not turn them
    into a failure. Job processes (``deeplab-batch ...``) exit normally and are tested as subprocesses.
    """
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_EXIT_STATUS = pytest.StashKey[int]()
NO_PROGRESS_TIMEOUT_S = 120.0
RAY_OBJECT_STORE_BYTES = 200 * 1024**2
RAY_NODE_MEMORY_BYTES = 2 * 1024**3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """``{"endpoint_url": ..., "region": ...}`` of a moto S3 server on 127.0.0.1 (real HTTP)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"endpoint_url": endpoint, "region": "us-east-1"}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket name on the moto server (the s3fs instance cache is cleared)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    name = f"bucket-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return name


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _data_context(timeout_s: float = NO_PROGRESS_TIMEOUT_S) -> None:
    from ray.data import DataContext

    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = timeout_s
    ctx.enable_progress_bars = False
    ctx.wait_for_min_actors_s = DEFAULT_WAIT_FOR_MIN_ACTORS_S  # a run on a growable cluster sets it process-wide


@contextlib.contextmanager
def local_ray(env: dict[str, str] | None = None):
    """A local one-node Ray instance (2 CPUs, no GPU); ``env`` is set before it starts, so every worker
    inherits it (fault injection), and restored after."""
    import ray

    _shutdown_ray()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=RAY_OBJECT_STORE_BYTES,
                 include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        _data_context()
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_local():
    """A local one-node Ray instance (2 CPUs, no GPU)."""
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def ray_gpu_cluster():
    """Two nodes: head with 1 CPU + 1 fake GPU (``gpu_node``), worker with 2 CPUs + ``crf_node: 2``."""
    import ray
    from ray.cluster_utils import Cluster

    _shutdown_ray()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 1, "resources": {"gpu_node": 1},
                        "object_store_memory": RAY_OBJECT_STORE_BYTES, "memory": RAY_NODE_MEMORY_BYTES},
    )
    worker = cluster.add_node(num_cpus=2, resources={"crf_node": 2}, object_store_memory=RAY_OBJECT_STORE_BYTES,
                              memory=RAY_NODE_MEMORY_BYTES)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    _data_context()
    head_id = cluster.head_node.node_id
    yield {"cluster": cluster, "head_node_id": head_id, "crf_node_id": worker.node_id}
    ray.shutdown()
    cluster.shutdown()


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny LargeFOV (width 0.125, 5 classes, input_size 65) saved with its record."""
    import torch

    from pipeline.constants import voc_palette
    from pipeline.model import deeplab_v1
    from pipeline.weights import ModelRecord, save_checkpoint

    torch.manual_seed(0)
    model = deeplab_v1("largefov", num_classes=5, width=0.125)
    record = ModelRecord(
        variant="largefov", num_classes=5, width=0.125,
        class_names=("background", "red", "green", "blue", "other"),
        palette=tuple(voc_palette(5)), input_size=65, source="tests/conftest.py (random weights)",
    )
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(path, model=model, record=record)
    return path
