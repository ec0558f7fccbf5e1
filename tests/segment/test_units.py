"""Fast tests without Ray or S3: ids, decode, config, outputs, resource plans, stages on dict batches."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, SegmentConfig, from_mapping, load_config, override, to_dict
from pipeline.decode import DecodeError, decode_image
from pipeline.io.ids import image_id_for, is_safe_id
from pipeline.io.sources import index_files, index_shard, plan_input, walk_prefix
from pipeline.io.uris import InputError
from pipeline.outputs import SEGMENT_SCHEMA, OutputLayout, dedupe, encode_label_png, rows_table
from pipeline.outputs.index import class_stats, load_state, merge_totals, summarize_uncovered
from pipeline.resources import plan_resources
from pipeline.stages import (
    CRFStage,
    DecodeStage,
    IndexFiles,
    IndexManifestGroups,
    ManifestUris,
    NetworkStage,
    ReadBytes,
    RunTally,
    WriteStage,
    each_row,
    label_statistics,
    mark_new,
    one_per_source,
)
from tests.segment.corpus import good_images, odd_corpus, tar_shard, write_files

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "jobs" / "configs" / "segment.example.yaml"


# ----------------------------------------------------------------------------- ids


def test_image_ids_are_stable_safe_and_distinct():
    a = image_id_for("s3://b/imgs/cat 1.jpg", relative="imgs/cat 1.jpg")
    assert a == image_id_for("s3://b/imgs/cat 1.jpg", relative="imgs/cat 1.jpg")
    b = image_id_for("s3://b/imgs/cat_1.jpg", relative="imgs/cat_1.jpg")
    assert a != b and a.startswith("imgs__cat_1-") and b.startswith("imgs__cat_1-")
    for uri in ("s3://b/../../etc/passwd", "/x/.hidden.png", "gs://b/" + "é" * 300 + ".jpg", "s3://b/t.tar#a/b.jpg"):
        assert is_safe_id(image_id_for(uri)), image_id_for(uri)


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("name", sorted(odd_corpus()))
def test_decode_corpus(name):
    data, (status, error, size) = odd_corpus()[name]
    if status == "ok":
        rgb = decode_image(data)
        assert rgb.dtype == np.uint8 and rgb.shape == (size[1], size[0], 3)
    else:
        with pytest.raises(DecodeError, match=error):
            decode_image(data)


def test_decode_pixel_limit_names_the_limit():
    data = odd_corpus()["gray.png"][0]
    with pytest.raises(DecodeError, match="2400 pixels > max_pixels 1000"):
        decode_image(data, max_pixels=1000)


def test_decode_16_bit_keeps_the_range():
    values = np.full((8, 8), 65535, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).min() == 255


# ----------------------------------------------------------------------------- config


def test_example_config_is_valid_and_round_trips():
    config = load_config(EXAMPLE_CONFIG)
    assert from_mapping(to_dict(config, redact=False)) == config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"crf": {"pool_size": -1}}, "crf.pool_size: expected >= 0, got -1"),
        ({"crf": {"bakend": "torch"}}, "crf.bakend: unknown field"),
        ({"network": {"device": "tpu"}}, "network.device: expected one of 'auto', 'cpu', 'cuda', got 'tpu'"),
        ({"input": {"limit": "10"}}, "input.limit: expected an integer, got '10'"),
        ({"crf": {"num_gpus": 0.5}}, "crf.num_gpus: only the 'torch' backend"),
        ({"s3": {"anon": "yes"}}, "s3.anon: expected a boolean"),
    ],
)
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_mapping(data, source="job.yaml")


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[decode]\nmax_pixels = 0\n")
    with pytest.raises(ConfigError, match=r"job.toml: decode.max_pixels: expected >= 1, got 0"):
        load_config(path)


def test_resolved_config_redacts_secrets():
    config = override(SegmentConfig(), **{"s3.secret_access_key": "hunter2", "s3.endpoint_url": "http://x"})
    text = json.dumps(to_dict(config))
    assert "hunter2" not in text and "http://x" in text
    assert "hunter2" not in repr(config)


# ----------------------------------------------------------------------------- resource plans


def test_plan_leaves_cpus_for_tasks_on_a_small_machine():
    plan = plan_resources(SegmentConfig(), cpus=2)
    actors = plan.network_pool * plan.network_num_cpus + plan.crf_pool * plan.crf_num_cpus
    assert plan.network_num_gpus == 0 and plan.network_device == "cpu"
    assert actors + plan.read_num_cpus + plan.decode_num_cpus + plan.write_num_cpus <= 2


def test_plan_on_a_gpu_node_sizes_crf_from_cpus():
    plan = plan_resources(SegmentConfig(), cpus=16, gpus=2)
    assert plan.network_pool == 2 and plan.network_num_gpus == 1.0 and plan.network_batch_size == 8
    assert plan.crf_pool + plan.network_pool * plan.network_num_cpus <= 16 - 1
    assert plan.crf_pool >= 10


def test_plan_with_custom_crf_resource_counts_slots():
    config = from_mapping({"crf": {"resources": {"crf_node": 1}, "num_cpus": 0.5}})
    plan = plan_resources(config, cpus=3, gpus=1, custom={"crf_node": 2})
    assert plan.crf_pool == 2 and plan.crf_resources == {"crf_node": 1.0}


def test_plan_torch_crf_shares_the_gpu():
    config = from_mapping({"crf": {"backend": "torch", "num_gpus": 0.5}, "network": {"num_gpus": 0.5}})
    plan = plan_resources(config, cpus=8, gpus=1)
    assert plan.network_pool == 1 and plan.crf_pool == 1 and plan.crf_device == "cuda"
    assert plan.network_num_gpus + plan.crf_num_gpus <= 1


# ----------------------------------------------------------------------------- outputs


def test_label_png_is_a_palette_png_of_the_same_size():
    labels = np.zeros((33, 47), dtype=np.uint8)
    labels[5:20, 10:30] = 3
    image = Image.open(io.BytesIO(encode_label_png(labels, palette=[(0, 0, 0), (1, 2, 3), (4, 5, 6), (7, 8, 9)])))
    assert image.mode == "P" and image.size == (47, 33)
    assert np.array_equal(np.asarray(image), labels)
    assert image.getpalette()[9:12] == [7, 8, 9]


def test_class_stats_and_dedupe():
    rows = [
        {"image_id": "a", "source_uri": "a", "status": "ok", "width": 2, "height": 2, "class_pixels": [4, 0, 0]},
        {"image_id": "b", "source_uri": "b", "status": "ok", "width": 2, "height": 1, "class_pixels": [1, 1, 0]},
        {"image_id": "c", "source_uri": "c", "status": "error", "error": "bad"},
        {"image_id": "c", "source_uri": "c", "status": "ok", "width": 1, "height": 1, "class_pixels": [0, 0, 1]},
    ]
    table = dedupe(rows_table(rows))
    assert sorted(table.column("image_id").to_pylist()) == ["a", "b", "c"]
    stats = class_stats(table, class_names=["bg", "x", "y"]).to_pylist()
    assert [s["pixels"] for s in stats] == [5, 1, 1]
    assert [s["images_present"] for s in stats] == [2, 1, 1]
    assert math.isclose(stats[0]["mean_fraction"], (1.0 + 0.5 + 0.0) / 3)


def test_segments_file_is_named_by_its_ids_and_replaced_on_retry(tmp_path):
    layout = OutputLayout(uri=str(tmp_path))
    rows = [{"image_id": i, "source_uri": i, "status": "error", "error": "x"} for i in ("a", "b")]
    first = layout.write_segments(rows)
    second = layout.write_segments(list(reversed(rows)))
    assert first == second and len(layout.segment_files()) == 1
    state = load_state(layout)
    (summary,) = summarize_uncovered(layout, state)
    assert (summary["rows"], summary["error_data"], summary["error_storage"]) == (2, 2, 0)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_label_statistics():
    probs = np.zeros((3, 2, 2), dtype=np.float32)
    probs[0] = [[0.9, 0.1], [0.6, 0.2]]
    probs[2] = 1 - probs[0]
    labels, counts, confidence = label_statistics(probs)
    assert labels.tolist() == [[0, 2], [0, 2]] and counts == [2, 0, 2]
    assert math.isclose(confidence[0], 0.75, rel_tol=1e-6) and math.isnan(confidence[1])


# ----------------------------------------------------------------------------- sources


def test_plan_input_looks_at_the_top_level_and_tasks_list_the_rest(tmp_path):
    write_files(tmp_path / "in" / "sub", good_images(2))
    (tmp_path / "in" / "shard-0.tar").write_bytes(tar_shard(good_images(3)))
    (tmp_path / "in" / "notes.txt").write_text("skip me")
    plan = plan_input(str(tmp_path / "in"))
    assert plan.kind == "listing" and plan.prefixes == [str(tmp_path / "in" / "sub")]
    assert [Path(f).name for f in plan.files] == ["notes.txt", "shard-0.tar"]
    pages = list(walk_prefix(plan.prefixes[0], page=1))
    assert len(pages) == 2 and all(len(p) == 1 for p in pages)  # one page per file at page=1
    rows, unread = index_files([u for p in pages for u in p] + plan.files, root=plan.root)
    assert len(rows) == 5 and not unread  # 2 images + 3 shard members; notes.txt is no image
    ids = mark_new(IndexFiles(root=plan.root)({"source_uri": [u for p in pages for u in p]})).column("image_id")
    assert all(i.startswith("sub__img") for i in ids.to_pylist())
    with pytest.raises(InputError, match="no such file"):
        plan_input(str(tmp_path / "missing"))


def test_truncated_shard_keeps_members_read_and_reports_the_shard(tmp_path):
    data = tar_shard(good_images(4))
    path = tmp_path / "broken.tar"
    cut = data.index(b"img002.jpg") + 512 + 100  # inside the third image's data
    path.write_bytes(data[:cut])
    rows = list(index_shard(str(path)))
    assert rows[-1]["status"] == "error" and "unreadable tar shard" in rows[-1]["error"]
    assert rows[-1]["error_kind"] == "data" and "img002.jpg is truncated" in rows[-1]["error"]
    assert [r["error"] for r in rows[:-1]] == [None, None]


# ----------------------------------------------------------------------------- stages without Ray


def _read_batch(folder: Path, names: list[str]) -> dict[str, list]:
    uris = [str(folder / n) for n in names]
    return {"image_id": [image_id_for(u) for u in uris], "source_uri": uris, "status": ["ok"] * len(uris)}


def test_stages_chain_on_dict_batches(tmp_path, tiny_checkpoint):
    corpus = odd_corpus()
    write_files(tmp_path / "in", {k: v[0] for k, v in corpus.items()})
    names = sorted(corpus) + ["missing.jpg"]
    read = ReadBytes()(_read_batch(tmp_path / "in", names))
    assert read.num_rows == len(names)
    decoded = DecodeStage(max_pixels=10_000)(read)
    assert "data" not in decoded.column_names
    logits = NetworkStage(weights=str(tiny_checkpoint), device="cpu")(decoded)
    crf = CRFStage(params="largefov")(logits)
    assert "logits" not in crf.column_names and "pixels" not in crf.column_names
    layout = OutputLayout(uri=str(tmp_path / "out"))
    result = WriteStage(layout=layout, run_id="r", palette=None, crf={"backend": "pydensecrf"})(crf)
    by_name = {Path(r["source_uri"]).name: r for r in result.to_pylist()}
    assert by_name["missing.jpg"]["status"] == "error" and "cannot read" in by_name["missing.jpg"]["error"]
    for name, (_, (status, error, size)) in corpus.items():
        row = by_name[name]
        assert row["status"] == status, (name, row["error"])
        if status == "ok":
            assert (row["width"], row["height"]) == size
            mask = Image.open(row["mask_uri"])
            assert mask.mode == "P" and mask.size == size
            assert sum(row["class_pixels"]) == size[0] * size[1]
        else:
            assert error in row["error"] and "\n" not in row["error"]
    stored = layout.read_segments()
    assert stored.num_rows == len(names) and stored.schema.equals(SEGMENT_SCHEMA)
    file_schema = pq.read_schema(layout.segment_files()[0])
    assert b"deeplab_batch.config" not in (file_schema.metadata or {})  # none given here


def test_network_stage_matches_single_image_inference_and_shrinks_large_images(tiny_checkpoint):
    import torch

    from pipeline.inference import coarse_logits
    from pipeline.weights import load_checkpoint

    stage = NetworkStage(weights=str(tiny_checkpoint), device="cpu")
    small = np.random.default_rng(0).integers(0, 255, (41, 57, 3), dtype=np.uint8)
    large = np.random.default_rng(1).integers(0, 255, (90, 100, 3), dtype=np.uint8)  # > input_size 65
    (work_small, out_small), (work_large, out_large) = stage.forward([small, large])
    assert work_small is small and work_large is large  # no working resolution given: pixels pass as they are
    model, record = load_checkpoint(tiny_checkpoint)
    (alone,) = coarse_logits(model, [small], input_size=record.input_size, mean_bgr=record.mean_bgr)
    np.testing.assert_allclose(out_small.astype(np.float32), alone.numpy(), rtol=1e-2, atol=1e-2)
    assert out_large.shape == (5, (90 - 1 + 7) // 8 + 1, (100 - 1 + 7) // 8 + 1)
    assert torch.isfinite(torch.from_numpy(out_large.astype(np.float32))).all()


def test_shard_members_are_indexed_from_headers_then_read_by_byte_range(tmp_path):
    images = good_images(3)
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_shard(images))
    tally = RunTally()
    index = IndexFiles(root=str(tmp_path), tally=tally)({"source_uri": [str(shard)]})
    assert index.num_rows == 3 and tally.counts()["inputs"] == 3
    assert "data" not in index.column_names and index.column("byte_size").to_pylist() == [len(images[n]) for n in
                                                                                          sorted(images)]
    read = ReadBytes()(mark_new(index)).to_pylist()
    assert [r["data"] for r in read] == [images[n] for n in sorted(images)]
    assert [r["image_id"].split("-")[0] for r in read] == [f"s__{Path(n).stem}" for n in sorted(images)]


# ----------------------------------------------------------------------------- review fixes


def test_plan_torch_crf_sharing_one_gpu_gives_the_network_the_rest():
    config = from_mapping({"crf": {"backend": "torch", "num_gpus": 0.5}})  # network.num_gpus left at 1
    plan = plan_resources(config, cpus=8, gpus=1)
    assert plan.network_num_gpus == 0.5 and plan.crf_num_gpus == 0.5
    assert plan.network_pool == plan.crf_pool == 1 and plan.crf_device == "cuda"
    plan = plan_resources(config, cpus=16, gpus=2)
    assert plan.network_pool * plan.network_num_gpus + plan.crf_pool * plan.crf_num_gpus <= 2


@pytest.mark.parametrize(
    "data, cluster, message",
    [
        ({"network": {"pool_size": 2}}, {"cpus": 8, "gpus": 1}, "network.pool_size x network.num_gpus"),
        ({"crf": {"pool_size": 4}}, {"cpus": 2}, "crf.pool_size x crf.num_cpus"),
        ({"crf": {"resources": {"crf_node": 1}}}, {"cpus": 4, "custom": {}}, "crf.resources.crf_node: each CRF"),
    ],
)
def test_plan_refuses_pools_the_cluster_cannot_start(data, cluster, message):
    with pytest.raises(ConfigError, match=message):
        plan_resources(from_mapping(data), **cluster)


def test_stall_timeout_is_on_by_default():
    from ray.data import DataContext

    from pipeline.execution import configure_context

    assert SegmentConfig().ray.no_progress_timeout_s == 900
    ctx = DataContext.get_current()
    saved = ctx.execution_no_progress_timeout_s
    try:
        configure_context(no_progress_timeout_s=SegmentConfig().ray.no_progress_timeout_s)
        assert ctx.execution_no_progress_timeout_s == 900
        configure_context(no_progress_timeout_s=0)
        assert ctx.execution_no_progress_timeout_s == -1  # Ray's "never"
    finally:
        ctx.execution_no_progress_timeout_s = saved


def test_each_row_isolates_data_failures_retries_transient_ones_and_raises_bugs():
    from pipeline.failures import DataError, TransientFailure

    calls, released = [], []
    failures = {"bad": DataError("not an image"), "oom": RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")}
    left = {"bad": 99, "oom": 2}  # bad always fails; oom fails twice, then succeeds

    def upper(items):
        calls.append(list(items))
        for item in items:
            if item in failures and left[item] > 0:
                left[item] -= 1
                raise failures[item]
        return [x.upper() for x in items]

    out = each_row(upper, ["a", "bad", "oom", "c"], after_failure=lambda: released.append(1), backoff_s=0.0)
    assert out[0] == "A" and isinstance(out[1], DataError) and out[3] == "C"
    assert out[2] == "OOM"  # alone it failed twice, then the third attempt succeeded
    assert calls == [["a", "bad", "oom", "c"], ["a"], ["bad"], ["oom"], ["oom"], ["oom"], ["c"]]
    assert len(released) == 4  # the device cache is freed after every failure (batch, bad, oom twice)

    left["oom"] = 99  # never recovers: after the attempts, a transient failure for the next run
    out = each_row(upper, ["oom"], attempts=3, backoff_s=0.0)
    assert isinstance(out[0], TransientFailure) and "after 3 attempts" in str(out[0])

    def buggy(items):
        raise KeyError("a programming error")

    with pytest.raises(KeyError, match="a programming error"):
        each_row(buggy, ["a", "b"])


def test_failures_are_classified_by_kind():
    import pyarrow as pa

    from pipeline.decode import DecodeError
    from pipeline.failures import BUG, DATA, TRANSIENT, classify

    assert classify(DecodeError("truncated")) == DATA
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate")) == TRANSIENT
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == TRANSIENT
    assert classify(MemoryError()) == TRANSIENT
    assert classify(ConnectionResetError("peer reset")) == TRANSIENT
    assert classify(pa.ArrowInvalid("bad file")) == BUG
    assert classify(ValueError("a check in our own code")) == BUG
    assert classify(TypeError("unsupported operand")) == BUG
    assert classify(RuntimeError("shape mismatch in a matmul")) == BUG


def _decoded(images: dict[str, np.ndarray]):
    """A decoded batch (as DecodeStage emits it) of in-memory RGB arrays."""
    from tests.segment.corpus import encode

    ids = list(images)
    return DecodeStage()({
        "image_id": ids, "source_uri": ids, "status": ["ok"] * len(ids), "error": [None] * len(ids),
        "error_kind": [None] * len(ids), "t_read": [0.0] * len(ids), "node_read": ["local"] * len(ids),
        "data": [encode(images[i], "PNG") for i in ids]})


def test_network_and_crf_turn_a_bad_row_into_an_error_row(tiny_checkpoint):
    import dataclasses

    from pipeline.crf import load_params
    from tests.segment.corpus import shapes_image

    decoded = _decoded({"wide": shapes_image(8, 400), "small": shapes_image(30, 40, seed=1),
                        "broken": shapes_image(20, 20, seed=2)})
    rows = decoded.to_pylist()
    rows[2]["pixels_width"] = 21  # its pixels no longer fit their size: a bug upstream, not bad data
    with pytest.raises(ValueError, match="reshape"):
        NetworkStage(weights=str(tiny_checkpoint), device="cpu")({k: [r[k] for r in rows] for k in decoded.column_names})
    network = NetworkStage(weights=str(tiny_checkpoint), device="cpu")(decoded.filter(
        pa.compute.not_equal(decoded.column("image_id"), "broken")))
    by_id = {r["image_id"]: r for r in network.to_pylist()}
    assert by_id["wide"]["status"] == by_id["small"]["status"] == "ok"

    narrow = dataclasses.replace(load_params("largefov"), sigma_gamma=0.02)  # 400 px wide: beyond int16 keys
    crf = {r["image_id"]: r for r in CRFStage(params=narrow, backend="pydensecrf")(network).to_pylist()}
    assert crf["wide"]["status"] == "error" and "CRF failed" in crf["wide"]["error"] and "int16" in crf["wide"]["error"]
    assert crf["wide"]["error_kind"] == "data"  # a property of the image: final
    assert crf["small"]["status"] == "ok" and sum(crf["small"]["class_pixels"]) == 30 * 40

    capped = {r["image_id"]: r for r in CRFStage(params="largefov", max_pixels=2000)(network).to_pylist()}
    assert capped["wide"]["error"] == ("too large for the CRF (400x8 = 3200 pixels at the working resolution > "
                                       "crf.max_pixels 2000; lower crf.resolution)")
    assert capped["wide"]["error_kind"] == "data" and capped["small"]["status"] == "ok"


def test_storage_error_rows_are_retried_and_the_later_row_wins(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").write_text("a file where the masks folder should be")  # every mask write fails
    layout = OutputLayout(uri=str(out))
    batch = {"image_id": ["a", "b"], "source_uri": ["s/a", "s/b"], "status": ["ok", "error"],
             "error": [None, "not a recognised image format"], "error_kind": [None, "data"],
             "mask": [bytes(4), None], "height": [2, None], "width": [2, None]}
    first = WriteStage(layout=layout, run_id="r1")(batch).to_pylist()
    assert first[0]["status"] == "error" and first[0]["error_kind"] == "storage" and "cannot write mask" in first[0]["error"]
    state = load_state(layout)
    summarize_uncovered(layout, state)
    assert merge_totals(state.live_summaries()).to_dict() == {"rows": 2, "ok": 0, "error": 2, "pending_retry": 1}

    (out / "masks").unlink()
    WriteStage(layout=layout, run_id="r2")({**{k: v[:1] for k, v in batch.items()}, "retry": [True]})
    rows = {r["image_id"]: r for r in layout.read_segments().to_pylist()}
    assert len(rows) == 2 and rows["a"]["status"] == "ok" and rows["a"]["run_id"] == "r2"
    assert layout.read_segments(deduplicated=False).num_rows == 3
    state = load_state(layout)
    summarize_uncovered(layout, state)  # the retried row supersedes the storage error: none left to retry
    assert merge_totals(state.live_summaries()).to_dict() == {"rows": 2, "ok": 1, "error": 1, "pending_retry": 0}


def test_dedupe_prefers_ok_then_the_latest_row():
    import datetime as dt

    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    rows = [
        {"image_id": "a", "source_uri": "a", "status": "error", "error_kind": "storage", "written_at": t0, "run_id": "1"},
        {"image_id": "a", "source_uri": "a", "status": "error", "error_kind": "data", "written_at": t0 + dt.timedelta(1),
         "run_id": "2"},
        {"image_id": "b", "source_uri": "b", "status": "ok", "written_at": t0, "run_id": "1"},
        {"image_id": "b", "source_uri": "b", "status": "error", "written_at": t0 + dt.timedelta(1), "run_id": "2"},
    ]
    table = dedupe(rows_table(rows))
    assert {r["image_id"]: r["run_id"] for r in table.to_pylist()} == {"a": "2", "b": "1"}


def test_repeated_manifest_uris_become_one_row_and_a_duplicate_count(tmp_path):
    from tests.segment.corpus import manifest

    write_files(tmp_path / "in", good_images(2))
    names = sorted(p.name for p in (tmp_path / "in").iterdir())
    (tmp_path / "m.parquet").write_bytes(manifest({"uri": [f"in/{names[0]}", f"in/{names[1]}", f"in/{names[0]}"]}))
    plan = plan_input(str(tmp_path / "m.parquet"))
    assert plan.kind == "uri_manifest" and plan.manifest_rows == 3 and plan.row_groups == [(plan.manifests[0], 0)]
    rows = ManifestUris()({"manifest_uri": [plan.manifests[0]], "row_group": [0]})
    assert rows.num_rows == 3
    assert rows.column("source_uri").to_pylist()[0] == str(tmp_path / "in" / names[0])  # resolved, absolute
    first = rows.filter(pa.compute.equal(rows.column("source_uri"), rows.column("source_uri")[0]))
    (kept,) = one_per_source(first).to_pylist()
    assert kept["duplicates"] == 1 and kept["retry"] is False and kept["image_id"] == image_id_for(kept["source_uri"])


def test_manifest_bytes_drop_repeated_keys_keep_the_scheme_and_admit_retries(tmp_path):
    import pyarrow as pa

    from pipeline.io.sources import content_key

    images = list(good_images(3).values())
    folder = tmp_path / "m"
    folder.mkdir()
    keyed = pa.table({"key": ["x", "x", "y", "z"], "bytes": [images[0], images[1], images[2], images[2]]})
    pq.write_table(keyed, folder / "a.parquet", row_group_size=2)  # two row groups
    pq.write_table(pa.table({"bytes": [images[0], images[0]]}), folder / "b.parquet")  # no key column
    plan = plan_input(str(folder), fmt="manifest")
    assert plan.kind == "byte_manifest" and len(plan.manifests) == 2 and len(plan.row_groups) == 3
    stage = IndexManifestGroups()
    index = stage({"manifest_uri": [m for m, _ in plan.row_groups], "row_group": [g for _, g in plan.row_groups]})
    assert "data" not in index.column_names  # keys only: bytes are read after resume
    keys = sorted(uri.rsplit("#", 1)[1] for uri in index.column("source_uri").to_pylist())
    assert keys == sorted(["x", "x", "y", "z", content_key(images[0]), content_key(images[0])])
    assert all(uri.startswith(str(folder) + "/") for uri in index.column("source_uri").to_pylist())
    kept = [one_per_source(index.filter(pa.compute.equal(index.column("source_uri"), uri))).to_pylist()[0]
            for uri in sorted(set(index.column("source_uri").to_pylist()))]
    assert sum(r["duplicates"] for r in kept) == 2  # the second "x", the identical unkeyed bytes
    by_key = {r["source_uri"].rsplit("#", 1)[1]: r for r in ReadBytes()(pa.Table.from_pylist(kept)).to_pylist()}
    assert by_key["x"]["data"] == images[0]  # the first occurrence of a repeated key
    assert by_key["z"]["data"] == images[2] and by_key[content_key(images[0])]["data"] == images[0]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("job.yaml", "crf:\n  enabled: true\n  params: [unclosed\n", r"job.yaml: invalid YAML at line \d+, column \d+"),
        ("job.toml", "[crf]\nenabled = \n", r"job.toml: invalid TOML: .*line 2"),
        ("job.json", '{"crf": {"enabled": true,}}', r"job.json: invalid JSON at line 1, column \d+"),
    ],
)
def test_config_syntax_errors_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_gs_without_gcsfs_is_a_clear_input_error(monkeypatch):
    import sys

    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if gcsfs were not installed
    for scheme in ("gs", "gcs"):
        monkeypatch.delitem(_registry, scheme, raising=False)
    with pytest.raises(InputError, match=r"install gcsfs to use gs:// URIs"):
        plan_input("gs://bucket/images/")


def _resume_setup(tmp_path, tiny_checkpoint, *, model_sha256, crf):
    from pipeline.weights import read_record

    write_files(tmp_path / "in", good_images(1))
    layout = OutputLayout(uri=str(tmp_path / "out"))
    layout.write_segments([{"image_id": "old", "source_uri": "old", "status": "ok", "width": 1, "height": 1,
                            "class_pixels": [1, 0, 0, 0, 0], "model_sha256": model_sha256, "crf": crf}])
    return read_record(tiny_checkpoint).sha256


def _job(tmp_path, tiny_checkpoint, **sections):
    data = {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
            "model": {"weights": str(tiny_checkpoint)}, "crf": {"enabled": False}, "ray": {"progress": False}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_mapping(data)


def test_resume_refuses_other_weights(tmp_path, tiny_checkpoint, capsys):
    from jobs.segment import EXIT_USAGE, segment

    sha = _resume_setup(tmp_path, tiny_checkpoint, model_sha256="0" * 64, crf=None)
    assert segment(_job(tmp_path, tiny_checkpoint), echo=lambda *_: None) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "0" * 64 in err and sha in err and "--allow-mixed" in err and err.count("\n") == 1


def test_resume_refuses_other_crf_parameters(tmp_path, tiny_checkpoint, capsys):
    from jobs.segment import EXIT_USAGE, segment

    sha = _resume_setup(tmp_path, tiny_checkpoint, model_sha256=None, crf=None)
    OutputLayout(uri=str(tmp_path / "out")).write_segments(
        [{"image_id": "old", "source_uri": "old", "status": "ok", "model_sha256": sha, "crf": None}])
    config = _job(tmp_path, tiny_checkpoint, crf={"enabled": True})
    assert segment(config, echo=lambda *_: None) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "CRF parameters none" in err and '"sigma_alpha": 121.0' in err and "--allow-mixed" in err


def test_class_stats_refuses_rows_with_another_class_count():
    rows = rows_table([{"image_id": "a", "source_uri": "a", "status": "ok", "width": 1, "height": 1,
                        "class_pixels": [1, 0]}])
    with pytest.raises(ValueError, match="has 2 class counts, expected 3"):
        class_stats(rows, class_names=["bg", "x", "y"])


def test_output_inside_the_input_is_refused(tmp_path, tiny_checkpoint, capsys):
    from jobs.segment import EXIT_USAGE, segment

    write_files(tmp_path / "in", good_images(1))
    config = _job(tmp_path, tiny_checkpoint, output={"uri": str(tmp_path / "in" / "out")})
    assert segment(config, echo=lambda *_: None) == EXIT_USAGE
    assert "is inside --input" in capsys.readouterr().err


@pytest.mark.parametrize("error", [struct.error, IndexError, KeyError, OverflowError, EOFError, SyntaxError])
def test_decode_turns_pillow_plugin_errors_into_decode_errors(monkeypatch, error):
    from PIL import ImageFile

    class BrokenImageFile(ImageFile.ImageFile):
        format = "BROKENTEST"

        def _open(self):
            self._size, self._mode = (4, 4), "RGB"

        def load(self):
            raise error("malformed data")

    monkeypatch.setattr(Image, "ID", ["BROKENTEST", *Image.ID])
    monkeypatch.setitem(Image.OPEN, "BROKENTEST", (BrokenImageFile, lambda prefix: prefix[:6] == b"BROKEN"))
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(b"BROKEN" + bytes(32))


def test_class_stats_write_failure_is_a_clear_error(tmp_path):
    from pipeline.outputs.index import write_class_stats

    (tmp_path / "class_stats.parquet").mkdir()  # cannot be replaced by a file
    with pytest.raises(InputError, match=r"output .*class_stats.parquet: cannot be written"):
        write_class_stats(OutputLayout(uri=str(tmp_path)), [], class_names=["bg"])


def test_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    import fsspec

    from pipeline.io.uris import write_bytes_atomic

    (tmp_path / "target").mkdir()
    with pytest.raises(OSError):
        write_bytes_atomic(fsspec.filesystem("file"), str(tmp_path / "target"), b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_label_png_takes_a_flat_palette():
    labels = np.array([[0, 1]], dtype=np.uint8)
    flat = [0] * 768
    flat[3:6] = [10, 20, 30]
    image = Image.open(io.BytesIO(encode_label_png(labels, palette=flat)))
    assert image.getpalette()[3:6] == [10, 20, 30] and np.array_equal(np.asarray(image), labels)


def test_run_json_is_strict_json(tmp_path):
    from pipeline.outputs import write_run_json

    write_run_json(OutputLayout(uri=str(tmp_path)), {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": 2}})

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads((tmp_path / "_run.json").read_text(), parse_constant=reject)
    assert data == {"a": None, "b": [None, 1.5], "c": {"d": 2}}
