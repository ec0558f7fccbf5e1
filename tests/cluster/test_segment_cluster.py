"""The ``segment`` job submitted with ``deeplab-batch submit --wait`` to a two-node local cluster,
reading and writing a loopback S3 server (``moto_server``, its own process): a first run, then an
incremental run after new images arrive (only those are processed, no duplicate rows), and a
failing run (non-zero exit with the job's error)."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

import jobs.segment  # noqa: F401  (the job under test: a broken import must fail here, not skip)
from pipeline.cluster import CRF_NODE_RESOURCE, EXIT_FAILED, EXIT_SUCCEEDED

pytestmark = [pytest.mark.cluster, pytest.mark.s3]

#: Test photos kept in the repository (tests/data/README.md).
EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "pydensecrf-examples"
SUMMARY = re.compile(r"segmented (\d+) new image\(s\).*: (\d+) ok, (\d+) failed .*?, (\d+) skipped")


@pytest.fixture(scope="module")
def s3fs_client(moto_server):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=moto_server.endpoint, key="testing", secret="testing",
                             skip_instance_cache=True)


@pytest.fixture(scope="module")
def corpus(s3fs_client, tiny_checkpoint, tmp_path_factory):
    """A bucket with two images under in/, the tiny model under models/, and a cluster config file."""
    for name in ("im1.png", "im2.png", "im3.png"):
        assert (EXAMPLES / name).is_file(), f"test data missing: {EXAMPLES / name} (see tests/data/README.md)"
    bucket = "dlb-cluster"
    s3fs_client.mkdir(bucket)
    for name in ("im1.png", "im2.png"):
        s3fs_client.put_file(str(EXAMPLES / name), f"{bucket}/in/{name}")
    s3fs_client.put_file(str(tiny_checkpoint), f"{bucket}/models/tiny.safetensors")
    config = tmp_path_factory.mktemp("config") / "segment.cluster.yaml"
    # The driver runs on the head, on this machine: an absolute path works (a cluster mounts a ConfigMap).
    config.write_text(
        f"crf:\n  resources: {{{CRF_NODE_RESOURCE}: 1}}\n"
        "ray:\n  no_progress_timeout_s: 120\n  progress: false\n"
    )
    return {"bucket": bucket, "config": config}


def _segment(submit, moto_server, corpus, *, extra: list[str] = ()):
    env_flags = [f"--env={k}={v}" for k, v in moto_server.env_vars().items()]
    bucket = corpus["bucket"]
    return submit(
        ["--wait", "--timeout", "240", *env_flags, "--",
         "segment", "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
         "--weights", f"s3://{bucket}/models/tiny.safetensors", "--config", str(corpus["config"]),
         "--incremental", "--no-progress", *extra],
        timeout_s=300,
    )


def _summary(stdout: str) -> dict[str, int]:
    found = SUMMARY.findall(stdout)
    assert found, f"no summary line in the job's log:\n{stdout[-3000:]}"
    new, ok, error, skipped = map(int, found[-1])
    return {"new": new, "ok": ok, "error": error, "skipped": skipped}


def _rows(s3fs_client, bucket: str) -> list[dict]:
    """Every row of every committed segments file, read raw (no de-duplication)."""
    import pyarrow.parquet as pq

    s3fs_client.invalidate_cache()
    rows = []
    for path in s3fs_client.glob(f"{bucket}/out/segments/*.parquet"):
        with s3fs_client.open(path, "rb") as f:
            rows += pq.read_table(f, columns=["image_id", "source_uri", "status", "mask_uri", "nodes",
                                              "run_id"]).to_pylist()
    return rows


def test_segment_then_incremental_run_on_the_cluster(submit, moto_server, corpus, s3fs_client):
    bucket = corpus["bucket"]

    first = _segment(submit, moto_server, corpus)
    assert first.returncode == EXIT_SUCCEEDED, first.output[-5000:]
    assert _summary(first.stdout) == {"new": 2, "ok": 2, "error": 0, "skipped": 0}
    rows = _rows(s3fs_client, bucket)
    assert sorted(Path(r["source_uri"]).name for r in rows) == ["im1.png", "im2.png"]
    assert all(r["status"] == "ok" for r in rows), rows
    for row in rows:
        assert s3fs_client.exists(row["mask_uri"].removeprefix("s3://")), row["mask_uri"]
        # the CRF ran on the CPU worker (crf_node), not where the network ran (the head's fake GPU)
        assert row["nodes"]["crf"] and row["nodes"]["network"] and row["nodes"]["crf"] != row["nodes"]["network"]
    run = json.loads(s3fs_client.cat_file(f"{bucket}/out/_run.json"))
    assert run["counts"]["new"] == 2

    s3fs_client.put_file(str(EXAMPLES / "im3.png"), f"{bucket}/in/im3.png")
    second = _segment(submit, moto_server, corpus)
    assert second.returncode == EXIT_SUCCEEDED, second.output[-5000:]
    assert _summary(second.stdout) == {"new": 1, "ok": 1, "error": 0, "skipped": 2}
    rows = _rows(s3fs_client, bucket)
    per_id = collections.Counter(r["image_id"] for r in rows)
    assert len(per_id) == 3 and set(per_id.values()) == {1}, per_id  # every image once, no duplicates
    runs = {Path(r["source_uri"]).name: r["run_id"] for r in rows}
    assert runs["im1.png"] == runs["im2.png"] != runs["im3.png"]  # the old rows were not rewritten


def test_failing_segment_job_exits_nonzero_with_its_error(submit, moto_server, corpus):
    result = submit(
        [*[f"--env={k}={v}" for k, v in moto_server.env_vars().items()], "--",
         "segment", "--input", "s3://no-such-bucket-dlb/in/", "--output", f"s3://{corpus['bucket']}/failed/",
         "--weights", f"s3://{corpus['bucket']}/models/tiny.safetensors", "--no-progress"],
        timeout_s=180,
    )
    assert result.returncode == EXIT_FAILED, result.output[-5000:]
    assert "FAILED" in result.stderr and "driver exit code 2" in result.stderr
    assert "no-such-bucket-dlb" in result.stderr  # the job's own error message, in the log tail
