"""``deeplab-batch submit`` against a real two-node local Ray cluster (token auth off)."""

from __future__ import annotations

import json
import textwrap

import pytest

from pipeline.cluster import CRF_NODE_RESOURCE, EXIT_FAILED, EXIT_NOT_SUBMITTED, EXIT_SUCCEEDED, GPU_NODE_RESOURCE

pytestmark = pytest.mark.cluster

# Runs as the job's driver: proves the uploaded working dir is importable on the driver and on a
# worker pinned to the CRF node, and that runtime-env env vars reach both.
PROBE = textwrap.dedent(
    f"""
    import json, os, ray
    import pipeline.cluster as here
    ray.init()

    @ray.remote(num_cpus=0.1, resources={{"{CRF_NODE_RESOURCE}": 0.01}})
    def on_crf_node():
        import pipeline.cluster as there
        return {{"file": there.__file__, "env": os.environ.get("DLB_PROBE"), "node": ray.get_runtime_context().get_node_id()}}

    remote = ray.get(on_crf_node.remote())
    print("PROBE " + json.dumps({{
        "driver_file": here.__file__, "driver_env": os.environ.get("DLB_PROBE"),
        "resources": ray.cluster_resources(), "remote": remote,
        "driver_node": ray.get_runtime_context().get_node_id(),
    }}))
    """
)


def _probe_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"no PROBE line in the job's log:\n{stdout[-2000:]}"
    return json.loads(lines[-1][len("PROBE "):])


def test_submit_waits_streams_logs_and_carries_the_project(submit, ray_cluster):
    result = submit(["--wait", "--env", "DLB_PROBE=hello", "--raw", "--", "python", "-c", PROBE])
    assert result.returncode == EXIT_SUCCEEDED, result.output
    probe = _probe_line(result.stdout)
    # The code ran from the uploaded copy (Ray's working-dir cache), not from this checkout.
    assert str(ray_cluster.temp_dir) in probe["driver_file"], probe
    assert str(ray_cluster.temp_dir) in probe["remote"]["file"], probe
    assert probe["driver_env"] == "hello" and probe["remote"]["env"] == "hello"
    assert probe["resources"][GPU_NODE_RESOURCE] == 1 and probe["resources"][CRF_NODE_RESOURCE] == 1
    assert probe["remote"]["node"] != probe["driver_node"], "the CRF-pinned task ran on the head"
    assert "SUCCEEDED" in result.stderr


def test_failing_job_exits_nonzero_and_shows_its_error(submit):
    result = submit(["--raw", "--", "python", "-c", "import sys; print('about to fail'); sys.exit('boom: bad input 42')"])
    assert result.returncode == EXIT_FAILED, result.output
    assert "FAILED" in result.stderr
    assert "boom: bad input 42" in result.stderr  # the log tail after the summary
    assert "driver exit code 1" in result.stderr


def test_no_wait_prints_the_submission_id(submit):
    result = submit(["--no-wait", "--no-working-dir", "--submission-id", "dlb-nowait-1", "--raw", "--", "true"])
    assert result.returncode == EXIT_SUCCEEDED, result.output
    assert result.stdout.strip() == "dlb-nowait-1"


def test_unreachable_address_is_not_submitted(submit):
    from tests.cluster.local_cluster import free_port

    # a later --address wins over the fixture's
    result = submit(["--address", f"http://127.0.0.1:{free_port()}", "--no-working-dir", "--raw", "--", "true"])
    assert result.returncode == EXIT_NOT_SUBMITTED, result.output
    assert "could not submit" in result.stderr
