"""Stages called directly on dict batches (no Ray), and the rules that match predicted masks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.predictions import match_predictions
from pipeline.evaluation.stages import ScoreStage


def test_score_stage_counts_errors_and_samples(tmp_path):
    from pipeline.data.voc import (
        IMAGE_DIR,
        LABEL_DIR,
        SPLIT_DIR,
        VOCDataset,
        write_label_png,
    )
    from pipeline.stages.common import NETWORK_COLUMNS, to_table

    rng = np.random.default_rng(0)
    label = np.zeros((17, 17), np.uint8)
    label[4:12, 5:13] = 1
    label[3, 3] = 255
    logits = rng.normal(size=(2, 3, 3)).astype(np.float16)
    logits[1, 1, 1] = 8.0  # the centre scores class 1
    image = np.full((17, 17, 3), 40, np.uint8)
    image[label == 1] = 200
    # The ground truth is read from the dataset by image id (segment's network rows do not carry it).
    for folder in (IMAGE_DIR, LABEL_DIR, SPLIT_DIR):
        (tmp_path / folder).mkdir(parents=True)
    for image_id in ("a", "b"):
        (tmp_path / IMAGE_DIR / f"{image_id}.jpg").write_bytes(b"")
        write_label_png(tmp_path / LABEL_DIR / f"{image_id}.png", label)
    (tmp_path / SPLIT_DIR / "val.txt").write_text("a\nb\n")
    dataset = VOCDataset(tmp_path, split="val", num_classes=2)
    rows = [
        {"image_id": "a", "status": "ok", "width": 17, "height": 17, "pixels": image.tobytes(),
         "num_classes": 2, "logits": logits.tobytes()},
        {"image_id": "b", "status": "error", "error": "b.jpg: broken", "error_kind": "data", "num_classes": 2},
    ]
    stage = ScoreStage(dataset=dataset, num_classes=2, crf_params="largefov", max_width=4, sample_ids=["a"])
    out = stage(to_table(rows, NETWORK_COLUMNS))  # what segment's NetworkStage emits
    assert out["error"] == ["", "b.jpg: broken"]
    for method in ("network", "crf"):
        assert out[f"{method}_confusion"][0].sum() == (label != 255).sum()
        assert out[f"{method}_trimap"][0].shape == (4, 2, 3)
        assert out[f"{method}_confusion"][1].sum() == 0  # the error row counts nothing
        assert out[f"{method}_mask"][0].shape == (17, 17) and out[f"{method}_mask"][1].size == 0
    # the label is checked against the image it belongs to
    small = to_table([{**rows[0], "width": 9, "height": 9, "pixels": image[:9, :9].tobytes(),
                       "logits": logits[:, :2, :2].tobytes()}], NETWORK_COLUMNS)
    (error,) = stage(small)["error"]
    assert str(tmp_path / LABEL_DIR / "a.png") in error and "label is 17x17 but its image is 9x9" in error


def test_match_predictions_rules(tmp_path):
    for name in ("a.png", "b-0123456789abcdef.png", "c-xyz.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert match_predictions(str(tmp_path), ["a", "b"]) == {"a": str(tmp_path / "a.png"), "b": str(tmp_path / "b-0123456789abcdef.png")}
    with pytest.raises(FileNotFoundError, match="no predicted mask for 1 of 2 split ids \\(c\\)"):
        match_predictions(str(tmp_path), ["a", "c"])
    (tmp_path / "a-abcdefabcdef0123.png").write_bytes(b"")
    with pytest.raises(ValueError, match="several masks"):
        match_predictions(str(tmp_path), ["a"])
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"")
    assert match_predictions(str(tmp_path), ["a"]) == {"a": str(tmp_path / "masks" / "a.png")}  # masks/ wins
    with pytest.raises(FileNotFoundError, match="does not exist"):
        match_predictions(str(tmp_path / "nope"), ["a"])


def test_network_path_is_segments_and_scores_what_segment_produces(tiny_model, tmp_path):
    """VOC read -> segment's NetworkStage: images larger than the record's input_size are
    shrunk and resampled, as segment does; an unreadable image stays an error row naming its file."""
    import torch

    from pipeline.data.synthetic import generate_dataset
    from pipeline.data.voc import VOCDataset
    from pipeline.evaluation.runner import model_rows
    from pipeline.stages.crf import logits_of
    from pipeline.inference import record_logits
    from pipeline.preprocess import coarse_size
    from pipeline.stages.decode import pixels_of
    from pipeline.stages.network import NetworkStage
    from pipeline.weights import load_checkpoint

    root = generate_dataset(tmp_path / "big", num_train=0, num_val=3, seed=5, min_size=90, max_size=110)
    dataset = VOCDataset(root, split="val", num_classes=5)
    broken = dataset.image_path(dataset.ids[2])
    broken.write_bytes(b"not a jpeg")
    stage = NetworkStage(weights=str(tiny_model), device="cpu")
    assert stage.record.input_size == 65
    rows = model_rows(dataset, stage, range(3)).to_pylist()
    model, record = load_checkpoint(str(tiny_model))
    for row in rows[:2]:
        image = pixels_of(row)
        np.testing.assert_array_equal(image, dataset[dataset.ids.index(row["image_id"])][1])
        logits = logits_of(row)
        assert max(image.shape[:2]) > record.input_size
        assert logits.shape == (5, coarse_size(image.shape[0]), coarse_size(image.shape[1]))
        (expected,) = record_logits(model, record, [image], device="cpu", dtype=torch.float16)
        np.testing.assert_allclose(logits.astype(np.float32), expected.float().numpy(), atol=2e-2, rtol=1e-2)
    assert rows[2]["status"] == "error" and str(broken) in rows[2]["error"] and rows[2]["logits"] is None


def evaluate_plan(*, cpus: float, gpus: float = 0.0, **flags):
    from pipeline.evaluation.runner import evaluation_config
    from pipeline.resources import plan_resources

    return plan_resources(evaluation_config(**flags), cpus=cpus, gpus=gpus)


def test_evaluate_plans_with_segments_planner_and_fits():
    """evaluate's actors are sized by pipeline.resources.plan_resources from its flags."""
    from pipeline.config import ConfigError

    for cpus in (1.0, 1.5, 2.0, 3.0, 16.0):
        p = evaluate_plan(cpus=cpus)
        # the network actor, the CRF pool and one read task fit the CPUs together
        need = p.network_pool * p.network_num_cpus + p.crf_pool * p.crf_num_cpus + p.decode_num_cpus
        assert p.network_num_gpus == 0 and p.network_device == "cpu" and need <= cpus + 1e-9, (cpus, p)
        assert p.network_num_cpus > 0 and p.crf_num_cpus > 0 and p.crf_pool >= 1
    one = evaluate_plan(cpus=1.0)  # one CPU: the network and one CRF actor share what the read task leaves
    assert one.network_pool == one.crf_pool == 1 and one.network_num_cpus + one.crf_num_cpus <= 0.5
    assert evaluate_plan(cpus=16).crf_pool >= 10  # the CRF pool grows into the CPUs left
    assert evaluate_plan(cpus=16, crf_actors=3).crf_pool == 3  # --crf-actors
    assert evaluate_plan(cpus=16, batch_size=5).network_batch_size == 5  # --batch-size
    gpu = evaluate_plan(cpus=4, gpus=1)
    assert (gpu.network_num_gpus, gpu.network_pool, gpu.crf_device, gpu.crf_num_gpus) == (1.0, 1, "cpu", 0.0)
    torch_crf = evaluate_plan(cpus=4, gpus=1, crf_backend="torch")
    assert (torch_crf.crf_device, torch_crf.network_num_gpus, torch_crf.crf_num_gpus, torch_crf.crf_pool) == (
        "cuda", 0.5, 0.5, 1)
    cpu = evaluate_plan(cpus=4, gpus=1, device="cpu")
    assert (cpu.network_num_gpus, cpu.network_device, cpu.crf_num_gpus) == (0.0, "cpu", 0.0)
    assert evaluate_plan(cpus=4, crf_backend="torch").crf_device == "cpu"  # no GPU: the torch CRF on CPU
    # refused up front, with the reason, instead of a run that waits forever
    with pytest.raises(ConfigError, match="network.device: 'cuda' was asked for but the cluster has no GPU"):
        evaluate_plan(cpus=4, gpus=0, device="cuda")
    with pytest.raises(ConfigError, match="CPUs, but the cluster has 0.5"):
        evaluate_plan(cpus=0.5)  # two actors and a read task cannot share half a CPU
    with pytest.raises(ConfigError, match="but the cluster has 0"):
        evaluate_plan(cpus=0)
    with pytest.raises(ConfigError, match="crf.pool_size x crf.num_gpus"):
        evaluate_plan(cpus=8, gpus=1, crf_backend="torch", crf_actors=2)  # two GPU CRF actors + the network


def test_match_predictions_of_segment_run_on_a_parent_folder(tmp_path):
    # segment run on the dataset root: ids are JPEGImages__<id>-<hash>
    (tmp_path / "JPEGImages__2007_000032-0123456789abcdef.png").write_bytes(b"")
    (tmp_path / "JPEGImages__2007_000033-abcdefabcdef0123.png").write_bytes(b"")
    got = match_predictions(str(tmp_path), ["2007_000032", "2007_000033"])
    assert got == {
        "2007_000032": str(tmp_path / "JPEGImages__2007_000032-0123456789abcdef.png"),
        "2007_000033": str(tmp_path / "JPEGImages__2007_000033-abcdefabcdef0123.png"),
    }


def test_segment_model_record_reads_the_parquet_metadata(tiny_model, tmp_path):
    from pipeline.evaluation.predictions import segment_model_record
    from pipeline.outputs import OutputLayout, metadata_for
    from pipeline.weights import read_record

    assert segment_model_record(str(tmp_path)) is None  # a plain folder of masks
    record = read_record(tiny_model).replace(class_names=("bg", "one", "two", "three", "four"))
    layout = OutputLayout(str(tmp_path))
    layout.write_segments([{"image_id": "x", "status": "ok"}], metadata=metadata_for(config={}, model=record.to_dict()))
    stored = segment_model_record(str(tmp_path))
    assert stored["class_names"] == ["bg", "one", "two", "three", "four"]
    assert stored["found_in"].startswith(str(tmp_path / "segments"))
