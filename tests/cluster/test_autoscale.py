"""Elastic pools on an autoscaling cluster (issue #12).

The cluster tests run the ``segment`` job on Ray's fake multi-node autoscaler (the real
v1 autoscaler with the ``fake_multinode`` node provider, which starts each node as local
Ray processes): the head has ``num-cpus 0`` and both worker groups start at zero nodes,
as the shipped KubeRay and AWS configs do. The first run must ask the autoscaler for its
minimum pools, wait for the nodes, and run each stage on its group; a run that asks for a
resource no node group offers fails after ``ray.autoscale_wait_s`` with a message naming it.
On a static ``ray start`` cluster (no autoscaler) a missing resource is still refused at once.

The pure tests pin the pool bounds (``min_pool_size`` / ``max_pool_size`` / ``pool_size``,
and the autoscaler's node-group maxima where Ray reports them) and the request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from jobs.segment import EXIT_FAILED, EXIT_OK, segment
from pipeline.cluster import CRF_NODE_RESOURCE, GPU_NODE_RESOURCE
from pipeline.config import ConfigError, from_mapping
from pipeline.outputs import OutputLayout
from pipeline.resources import min_bundles, plan_resources
from tests.cluster.local_cluster import BIN_DIR, RAY, LocalRayCluster, free_port, stop_session, wait_for
from tests.segment.corpus import good_images, write_files

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
#: Worker node groups of the fake cluster, as in infra/: GPU nodes (a fake GPU) and CRF nodes.
#: ``memory`` must stay out: the fake provider passes node-type resources to Ray as custom ones.
GPU_GROUP = {"CPU": 1, "GPU": 1, GPU_NODE_RESOURCE: 1, "object_store_memory": 200 * MIB}
CRF_GROUP = {"CPU": 2, CRF_NODE_RESOURCE: 2, "object_store_memory": 200 * MIB}


# ---------------------------------------------------------------------------- pool bounds (no cluster)


def test_fixed_pool_size_and_a_static_cluster_keep_fixed_pools():
    plan = plan_resources(from_mapping({"crf": {"pool_size": 3}}), cpus=16, gpus=2)
    assert plan.network_bounds == (2, 2) and plan.crf_bounds == (3, 3)
    plan = plan_resources(from_mapping({}), cpus=2)
    assert plan.network_bounds == (1, 1) and plan.crf_bounds[0] == plan.crf_bounds[1] >= 1


def test_configured_bounds_make_elastic_pools():
    config = from_mapping({"network": {"max_pool_size": 8},
                           "crf": {"resources": {"crf_node": 1}, "min_pool_size": 2, "max_pool_size": 40}})
    plan = plan_resources(config, cpus=20, gpus=1, custom={"crf_node": 12})
    assert plan.network_bounds == (1, 8)
    assert plan.crf_bounds == (2, 40)
    # a derived minimum larger than the configured maximum is cut to it
    plan = plan_resources(from_mapping({"crf": {"max_pool_size": 3}}), cpus=32)
    assert plan.crf_bounds == (3, 3)


def test_node_group_maxima_bound_the_pools_when_ray_reports_them():
    config = from_mapping({"crf": {"resources": {"crf_node": 1}}})
    # what 8 GPU nodes (1 GPU) and 16 CRF nodes (12 crf_node, 15 CPUs) reach
    grow_to = {"CPU": 8 * 3 + 16 * 15, "GPU": 8, "gpu_node": 8, "crf_node": 16 * 12}
    plan = plan_resources(config, cpus=18, gpus=1, custom={"crf_node": 12}, grow_to=grow_to)
    assert plan.network_bounds == (1, 8)
    assert plan.crf_bounds[0] >= 1 and plan.crf_bounds[1] == 192
    # max_pool_size wins over the node groups
    capped = from_mapping({"network": {"max_pool_size": 2}, "crf": {"resources": {"crf_node": 1}, "max_pool_size": 20}})
    plan = plan_resources(capped, cpus=18, gpus=1, custom={"crf_node": 12}, grow_to=grow_to)
    assert plan.network_bounds == (1, 2) and plan.crf_bounds[1] == 20


@pytest.mark.parametrize(
    "data, message",
    [
        ({"crf": {"pool_size": 2, "max_pool_size": 4}}, "crf.pool_size: a fixed pool of 2 actors"),
        ({"network": {"min_pool_size": 5, "max_pool_size": 4}}, "network.min_pool_size: expected <= "),
        ({"crf": {"max_pool_size": -1}}, "crf.max_pool_size: expected >= 0"),
        ({"ray": {"autoscale_wait_s": -5}}, "ray.autoscale_wait_s: expected >= 0"),
    ],
)
def test_bad_pool_bounds_are_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(data)


def test_the_request_covers_the_minimum_pools_and_a_task():
    config = from_mapping({"network": {"min_pool_size": 2, "num_cpus": 2},
                           "crf": {"resources": {"crf_node": 1}, "num_cpus": 0.5, "min_pool_size": 3}})
    bundles = {b.what: (b.count, b.resources) for b in min_bundles(config, gpu=True)}
    assert bundles["network actors"] == (2, {"CPU": 2.0, "GPU": 1.0})
    assert bundles["CRF actors"] == (3, {"CPU": 0.5, "crf_node": 1.0})
    assert bundles["read/decode/write tasks"] == (1, {"CPU": 0.25 + 0.5 + 0.25})
    assert "GPU" not in dict(min_bundles(config, gpu=False)[0].resources)


# ---------------------------------------------------------------------------- the fake autoscaling cluster


class FakeAutoscalingCluster:
    """``RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=...`` with ``num-cpus 0``, in its own
    session, private temp dir and HOME, free ports. The provider starts nodes inside the head's autoscaler
    process (so in that session: stopping it stops them); ``gcs_address`` tells it this head's port (it assumes
    6379 otherwise: another cluster's, or nobody's)."""

    def __init__(self, worker_types: dict[str, dict]):
        self.root = Path(tempfile.mkdtemp(prefix="dlb-autoscale-", dir="/tmp"))
        self.port = free_port()
        self.worker_types = worker_types
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "head.log"

    def autoscaling_config(self) -> dict:
        types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
        types.update({name: {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": 1}
                      for name, resources in self.worker_types.items()})
        return {
            "cluster_name": "dlb-fake", "max_workers": len(self.worker_types), "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "auth": {"ssh_user": "ray"}, "docker": {},
            "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> None:
        (self.root / "home").mkdir()
        config = self.root / "autoscaling.json"
        config.write_text(json.dumps(self.autoscaling_config()))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
        env.update(
            HOME=str(self.root / "home"), PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=str(REPO_ROOT),  # the nodes' workers import the project
            RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
            AUTOSCALER_UPDATE_INTERVAL_S="1", AUTOSCALER_METRIC_PORT=str(free_port()), PYTHONUNBUFFERED="1",
        )
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
             f"--port={self.port}", f"--temp-dir={self.root / 'ray'}", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--autoscaling-config={config}",
             "--num-cpus=0", "--num-gpus=0", f"--object-store-memory={200 * MIB}"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
        )
        wait_for(lambda: "block forever" in self.log.read_text(), timeout_s=90, what="fake autoscaling head",
                 proc=self.proc, log=self.log)

    def monitor_log(self) -> str:
        logs = self.root / "ray" / "session_latest" / "logs"
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in (logs / "monitor.log", logs / "monitor.err")
                         if p.exists())

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc)
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = FakeAutoscalingCluster({"gpu": GPU_GROUP, "crf": CRF_GROUP})
    try:
        cluster.start()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def _config(tmp_path: Path, checkpoint: Path, cluster: FakeAutoscalingCluster, **sections) -> object:
    base = {
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out"), "rows_per_file": 2},
        "model": {"weights": str(checkpoint)},
        "network": {"num_cpus": 0.5},
        "ray": {"address": cluster.address, "no_progress_timeout_s": 120, "progress": False,
                "autoscale_wait_s": 120},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return from_mapping(base)


@pytest.mark.cluster
def test_a_head_only_cluster_grows_for_the_run_and_each_stage_runs_on_its_group(
        fake_cluster, tmp_path, tiny_checkpoint):
    (head,) = _alive_nodes()  # the cluster starts as the head alone, with no CPU, GPU or crf_node
    assert head["Resources"].get("CPU", 0) == 0 and "GPU" not in head["Resources"]
    write_files(tmp_path / "in", good_images(6))
    config = _config(tmp_path, tiny_checkpoint, fake_cluster,
                     crf={"resources": {CRF_NODE_RESOURCE: 1}, "num_cpus": 0.5, "min_pool_size": 1,
                          "max_pool_size": 2})
    lines: list[str] = []
    started = time.monotonic()
    code = segment(config, echo=lines.append)
    assert code == EXIT_OK, f"exit {code}\n" + "\n".join(lines) + "\n" + fake_cluster.monitor_log()
    elapsed = time.monotonic() - started

    rows = OutputLayout(uri=config.output.uri).read_segments().to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    nodes = _alive_nodes()
    gpu_nodes = {n["NodeID"] for n in nodes if n["Resources"].get(GPU_NODE_RESOURCE)}
    crf_nodes = {n["NodeID"] for n in nodes if n["Resources"].get(CRF_NODE_RESOURCE)}
    assert len(gpu_nodes) == 1 and len(crf_nodes) == 1  # the autoscaler added one node of each group
    assert {r["nodes"]["network"] for r in rows} <= gpu_nodes
    assert {r["nodes"]["crf"] for r in rows} <= crf_nodes
    assert head["NodeID"] not in {r["nodes"][stage] for r in rows for stage in ("read", "decode", "write")}

    summary = json.loads((Path(config.output.uri) / "_run.json").read_text())
    plan = summary["config"]["resolved"]["plan"]
    assert plan["network_num_gpus"] == 1.0  # planned once the GPU node was there, not on the empty head
    assert (plan["crf_pool"], plan["crf_max_pool"]) == (1, 2)  # crf.min_pool_size / max_pool_size
    assert summary["phases_s"]["resources_s"] > 0.5  # it waited for the nodes
    print(f"run on the grown cluster: {elapsed:.1f} s, of which waiting for nodes "
          f"{summary['phases_s']['resources_s']:.1f} s")


@pytest.mark.cluster
def test_a_resource_no_node_group_offers_fails_after_the_wait_naming_it(
        fake_cluster, tmp_path, tiny_checkpoint, capsys):
    from ray.experimental.internal_kv import _internal_kv_get

    write_files(tmp_path / "in", good_images(2))
    wait_s = 8
    config = _config(tmp_path, tiny_checkpoint, fake_cluster,
                     crf={"resources": {"crf_gpu_nowhere": 1}},
                     ray={"autoscale_wait_s": wait_s})
    started = time.monotonic()
    code = segment(config, echo=lambda *_: None)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == EXIT_FAILED, err
    assert elapsed >= wait_s, f"failed after {elapsed:.1f} s, before ray.autoscale_wait_s = {wait_s}"
    assert "ray.autoscale_wait_s = 8 s" in err and "crf_gpu_nowhere 0 of 1" in err, err
    segments = Path(config.output.uri) / "segments"
    assert not segments.exists() or not any(segments.iterdir())
    # the request was withdrawn (v1 keeps it in the GCS key-value store until replaced)
    request = _internal_kv_get(b"autoscaler_resource_request")
    assert request is not None and "crf_gpu_nowhere" not in request.decode(), request


@pytest.mark.cluster
def test_a_static_cluster_without_the_resource_still_refuses_at_once(tmp_path, tiny_checkpoint):
    """``ray start`` without an autoscaling config (Ray's read-only autoscaler): nothing can add the node, so the
    run stops with exit 2 and the plan's message at once, not after ray.autoscale_wait_s."""
    write_files(tmp_path / "in", good_images(2))
    (tmp_path / "segment.yaml").write_text(
        f"crf:\n  resources: {{{CRF_NODE_RESOURCE}: 1}}\nray:\n  autoscale_wait_s: 120\n  progress: false\n")
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=1)
        env = {**cluster.env(), "PYTHONPATH": str(REPO_ROOT)}
        started = time.monotonic()
        proc = subprocess.run(
            [os.fspath(BIN_DIR / "python"), "-m", "jobs.segment", "--input", str(tmp_path / "in"),
             "--output", str(tmp_path / "out"), "--weights", str(tiny_checkpoint),
             "--config", str(tmp_path / "segment.yaml"), "--ray-address", f"127.0.0.1:{cluster.gcs_port}"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
        )
        elapsed = time.monotonic() - started
    finally:
        cluster.stop()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "crf.resources.crf_node: each CRF actor asks for 1, but the cluster offers 0" in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s: it waited for an autoscaler that is not there"
