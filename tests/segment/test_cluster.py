"""On a two-node local Ray cluster: each stage runs where it should.

Head node: 1 CPU + 1 fake GPU (torch sees no CUDA, so the network actor falls back
to CPU math, but Ray schedules it on the GPU node). Worker node: 2 CPUs and the
custom resource ``crf_node`` that the CRF pool asks for.
"""

from __future__ import annotations

import pytest

from jobs.segment import EXIT_OK, segment
from pipeline.config import from_mapping
from pipeline.outputs import OutputLayout
from tests.segment.corpus import good_images, write_files

pytestmark = [pytest.mark.cluster]


def test_stages_run_on_their_nodes(ray_gpu_cluster, tmp_path, tiny_checkpoint):
    write_files(tmp_path / "in", good_images(8))
    config = from_mapping({
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out"), "rows_per_file": 4},
        "model": {"weights": str(tiny_checkpoint)},
        "network": {"num_cpus": 0.5},
        "crf": {"resources": {"crf_node": 1}, "num_cpus": 0.5},
        "ray": {"no_progress_timeout_s": 120, "progress": False},
    })
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    rows = OutputLayout(uri=config.output.uri).read_segments().to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert {r["nodes"]["network"] for r in rows} == {ray_gpu_cluster["head_node_id"]}
    assert {r["nodes"]["crf"] for r in rows} == {ray_gpu_cluster["crf_node_id"]}
    all_nodes = {ray_gpu_cluster["head_node_id"], ray_gpu_cluster["crf_node_id"]}
    for stage in ("read", "decode", "write"):
        assert {r["nodes"][stage] for r in rows} <= all_nodes
