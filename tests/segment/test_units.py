"""Fast tests without Ray or S3: ids, decode, config, outputs, resource plans, stages on dict batches."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, SegmentConfig, from_mapping, load_config, override, to_dict
from pipeline.decode import DecodeError, decode_image
from pipeline.graph import plan_resources
from pipeline.io.ids import image_id_for, is_safe_id
from pipeline.io.sources import discover, iter_shard
from pipeline.io.uris import InputError
from pipeline.outputs import SEGMENT_SCHEMA, OutputLayout, class_stats, dedupe, mask_png, rows_table
from pipeline.stages import CRFStage, DecodeStage, ExpandShards, NetworkStage, ReadBytes, WriteStage, label_statistics
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


def test_mask_png_is_a_palette_png_of_the_same_size():
    labels = np.zeros((33, 47), dtype=np.uint8)
    labels[5:20, 10:30] = 3
    image = Image.open(io.BytesIO(mask_png(labels, palette=[(0, 0, 0), (1, 2, 3), (4, 5, 6), (7, 8, 9)])))
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
    assert layout.done_ids() == {"a", "b"}
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_label_statistics():
    probs = np.zeros((3, 2, 2), dtype=np.float32)
    probs[0] = [[0.9, 0.1], [0.6, 0.2]]
    probs[2] = 1 - probs[0]
    labels, counts, confidence = label_statistics(probs)
    assert labels.tolist() == [[0, 2], [0, 2]] and counts == [2, 0, 2]
    assert math.isclose(confidence[0], 0.75, rel_tol=1e-6) and math.isnan(confidence[1])


# ----------------------------------------------------------------------------- sources


def test_discover_folder_lists_images_and_shards_and_rejects_missing(tmp_path):
    write_files(tmp_path / "in" / "sub", good_images(2))
    (tmp_path / "in" / "shard-0.tar").write_bytes(tar_shard(good_images(3)))
    (tmp_path / "in" / "notes.txt").write_text("skip me")
    source = discover(str(tmp_path / "in"))
    assert len(source.images) == 2 and len(source.shards) == 1
    assert all(r["image_id"].startswith("sub__img") for r in source.images)
    with pytest.raises(InputError, match="no such file"):
        discover(str(tmp_path / "missing"))


def test_truncated_shard_keeps_members_read_and_reports_the_shard(tmp_path):
    data = tar_shard(good_images(4))
    path = tmp_path / "broken.tar"
    cut = data.index(b"img002.jpg") + 512 + 100  # inside the third image's data
    path.write_bytes(data[:cut])
    items = list(iter_shard(str(path)))
    assert items[-1][1] is None and "unreadable tar shard" in items[-1][2]
    assert [error for _, _, error in items[:-1]] == [None, None]


# ----------------------------------------------------------------------------- stages without Ray


def _read_batch(folder: Path, names: list[str]) -> dict[str, list]:
    uris = [str(folder / n) for n in names]
    return {"image_id": [image_id_for(u) for u in uris], "source_uri": uris}


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
    out_small, out_large = stage.forward([small, large])
    model, record = load_checkpoint(tiny_checkpoint)
    (alone,) = coarse_logits(model, [small], input_size=record.input_size, mean_bgr=record.mean_bgr)
    np.testing.assert_allclose(out_small.astype(np.float32), alone.numpy(), rtol=1e-2, atol=1e-2)
    assert out_large.shape == (5, (90 - 1 + 7) // 8 + 1, (100 - 1 + 7) // 8 + 1)
    assert torch.isfinite(torch.from_numpy(out_large.astype(np.float32))).all()


def test_expand_shards_marks_done_members_skipped(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_shard(good_images(3)))
    first = ExpandShards()({"shard_uri": [str(shard)]})
    assert first.num_rows == 3 and set(first.column("status").to_pylist()) == {"ok"}
    done = frozenset(first.column("image_id").to_pylist()[:2])
    second = ExpandShards(done=done)({"shard_uri": [str(shard)]})
    assert second.column("status").to_pylist().count("skipped") == 2
    assert second.column("image_id").to_pylist() == first.column("image_id").to_pylist()
