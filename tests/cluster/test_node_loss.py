"""Node loss: the worker node that holds the CRF actors is killed in the middle of a run.

A local two-node cluster (``ray.cluster_utils.Cluster``): the head holds the network
(1 CPU, a fake GPU), the worker holds the CRF pool (``crf_node``). Once rows have been
committed, the worker is killed without grace and a replacement joins. What happens is
measured, not assumed: the run either completes (Ray restarts the lost actors and
re-executes the lost tasks) or fails, and then a rerun completes it. Either way every
input ends with exactly one row (docs/reliability.md, "Node loss").
"""

from __future__ import annotations

import threading
import time

import pytest

import jobs.segment  # noqa: F401  (a broken import must fail here, not skip)
from jobs.segment import EXIT_OK, segment
from pipeline.config import from_mapping
from pipeline.outputs import OutputLayout
from tests.segment.corpus import good_images, write_files

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # a measurement (docs/reliability.md): `make test-all`

IMAGES = 48


@pytest.fixture
def lossy_cluster():
    import ray
    from ray.cluster_utils import Cluster

    from tests.conftest import RAY_NODE_MEMORY_BYTES, RAY_OBJECT_STORE_BYTES, _data_context, _shutdown_ray

    _shutdown_ray()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 1, "resources": {"gpu_node": 1},
        "object_store_memory": RAY_OBJECT_STORE_BYTES, "memory": RAY_NODE_MEMORY_BYTES})
    worker = cluster.add_node(num_cpus=2, resources={"crf_node": 2}, object_store_memory=RAY_OBJECT_STORE_BYTES,
                              memory=RAY_NODE_MEMORY_BYTES)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    _data_context(timeout_s=180)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_killing_the_crf_node_mid_run_leaves_every_row_exactly_once(lossy_cluster, tmp_path, tiny_checkpoint):
    from tests.conftest import RAY_NODE_MEMORY_BYTES, RAY_OBJECT_STORE_BYTES

    cluster, worker = lossy_cluster
    write_files(tmp_path / "in", good_images(IMAGES))
    config = from_mapping({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out"), "rows_per_file": 4},
        "model": {"weights": str(tiny_checkpoint)},
        "crf": {"resources": {"crf_node": 1}, "batch_size": 2},
        "ray": {"no_progress_timeout_s": 180, "progress": False},
    })
    layout = OutputLayout(uri=str(tmp_path / "out"))
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["code"] = segment(config, echo=lambda *_: None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    first = threading.Thread(target=run, daemon=True)
    first.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.is_alive():
        if (tmp_path / "out" / "segments").is_dir() and len(layout.segment_files()) >= 2:
            break
        time.sleep(0.1)
    assert first.is_alive(), f"the run ended before the node could be killed: {result}"
    committed_before = layout.read_segments().num_rows
    cluster.remove_node(worker, allow_graceful=False)  # the CRF actors' node, killed
    cluster.add_node(num_cpus=2, resources={"crf_node": 2}, object_store_memory=RAY_OBJECT_STORE_BYTES,
                     memory=RAY_NODE_MEMORY_BYTES)
    first.join(timeout=400)
    assert not first.is_alive(), "the run neither completed nor failed after the node loss"
    first_outcome = result.get("code", repr(result.get("error")))
    print(f"node loss: {committed_before}/{IMAGES} rows committed before the kill; first run -> {first_outcome}")

    if result.get("code") != EXIT_OK:  # the run gave up: a rerun completes it
        assert segment(config, echo=lambda *_: None) == EXIT_OK
    rows = layout.read_segments()
    raw = layout.read_segments(deduplicated=False)
    ids = rows.column("image_id").to_pylist()
    assert len(ids) == IMAGES and len(set(ids)) == IMAGES  # every input, once
    assert set(rows.column("status").to_pylist()) == {"ok"}
    assert raw.num_rows == IMAGES, f"{raw.num_rows - IMAGES} row(s) written twice (readers see one per image)"
    for image_id in ids:
        assert (tmp_path / "out" / "masks" / f"{image_id}.png").is_file()
