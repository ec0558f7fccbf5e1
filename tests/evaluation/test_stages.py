"""Stages called directly on dict batches (no Ray), and the rules that match predicted masks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.predictions import match_predictions
from pipeline.evaluation.stages import ScoreStage


def test_score_stage_counts_errors_and_samples():
    rng = np.random.default_rng(0)
    label = np.zeros((17, 17), np.uint8)
    label[4:12, 5:13] = 1
    label[3, 3] = 255
    logits = rng.normal(size=(2, 3, 3)).astype(np.float16)
    logits[1, 1, 1] = 8.0  # the centre scores class 1
    image = np.full((17, 17, 3), 40, np.uint8)
    image[label == 1] = 200
    batch = {
        "image_id": ["a", "b"],
        "image": [image, np.zeros((0, 0, 0), np.uint8)],
        "label": [label, np.zeros((0, 0), np.uint8)],
        "logits": [logits, np.zeros((0, 0, 0), np.float16)],
        "error": ["", "b.jpg: broken"],
    }
    out = ScoreStage(num_classes=2, crf_params="largefov", max_width=4, sample_ids=["a"])(batch)
    assert out["error"] == ["", "b.jpg: broken"]
    for method in ("network", "crf"):
        assert out[f"{method}_confusion"][0].sum() == (label != 255).sum()
        assert out[f"{method}_trimap"][0].shape == (4, 2, 3)
        assert out[f"{method}_confusion"][1].sum() == 0  # the error row counts nothing
        assert out[f"{method}_mask"][0].shape == (17, 17) and out[f"{method}_mask"][1].size == 0


def test_match_predictions_rules(tmp_path):
    for name in ("a.png", "b-0123456789.png", "c-xyz.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert match_predictions(str(tmp_path), ["a", "b"]) == {"a": str(tmp_path / "a.png"), "b": str(tmp_path / "b-0123456789.png")}
    with pytest.raises(FileNotFoundError, match="no predicted mask for 1 of 2 split ids \\(c\\)"):
        match_predictions(str(tmp_path), ["a", "c"])
    (tmp_path / "a-abcdefabcd.png").write_bytes(b"")
    with pytest.raises(ValueError, match="several masks"):
        match_predictions(str(tmp_path), ["a"])
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"")
    assert match_predictions(str(tmp_path), ["a"]) == {"a": str(tmp_path / "masks" / "a.png")}  # masks/ wins
    with pytest.raises(FileNotFoundError, match="does not exist"):
        match_predictions(str(tmp_path / "nope"), ["a"])


def test_network_stage_scores_what_segment_produces(tiny_model, tmp_path):
    """Images larger than the record's input_size are shrunk and resampled, as segment does."""
    import torch

    from pipeline.data.synthetic import generate_dataset
    from pipeline.evaluation.stages import NetworkStage
    from pipeline.inference import record_logits
    from pipeline.preprocess import coarse_size
    from pipeline.weights import load_checkpoint

    root = generate_dataset(tmp_path / "big", num_train=0, num_val=2, seed=5, min_size=90, max_size=110)
    stage = NetworkStage(root=str(root), split="val", weights=str(tiny_model), device="cpu")
    assert stage.record.input_size == 65
    rows = stage({"index": np.arange(2)})
    model, record = load_checkpoint(str(tiny_model))
    for image, logits in zip(rows["image"], rows["logits"]):
        assert max(image.shape[:2]) > record.input_size
        assert logits.shape == (5, coarse_size(image.shape[0]), coarse_size(image.shape[1]))
        (expected,) = record_logits(model, record, [image], device="cpu", dtype=torch.float16)
        np.testing.assert_allclose(logits.astype(np.float32), expected.float().numpy(), atol=2e-2, rtol=1e-2)


def test_plan_placement_always_fits():
    from pipeline.evaluation.runner import plan_placement

    for cpus in (0.5, 1.0, 1.5, 2.0, 3.0, 16.0):
        p = plan_placement(cpus=cpus, gpus=0)
        # the network actor and the first CRF actor fit the free CPUs together
        assert not p.use_gpu and p.network_cpus + p.crf_cpus <= cpus + 1e-9, (cpus, p)
        assert p.network_cpus > 0 and p.crf_cpus > 0 and p.crf_pool >= 1
    assert plan_placement(cpus=16, gpus=0).crf_pool == 15
    assert plan_placement(cpus=16, gpus=0, crf_actors=3).crf_pool == 3
    gpu = plan_placement(cpus=4, gpus=1)
    assert (gpu.use_gpu, gpu.network_gpus, gpu.network_cpus, gpu.crf_pool) == (True, 1.0, 0.0, 4)
    torch_crf = plan_placement(cpus=4, gpus=1, crf_backend="torch")
    assert (torch_crf.crf_device, torch_crf.network_gpus, torch_crf.crf_gpus, torch_crf.crf_pool) == ("cuda", 0.5, 0.5, 1)
    assert plan_placement(cpus=4, gpus=1, device="cpu").use_gpu is False
    predictions = plan_placement(cpus=0.5, gpus=0, with_network=False)
    assert (predictions.network_cpus, predictions.crf_cpus, predictions.crf_pool) == (0.0, 0.5, 1)
    with pytest.raises(ValueError, match="--device cuda: the Ray cluster has no GPU"):
        plan_placement(cpus=4, gpus=0, device="cuda")
    with pytest.raises(ValueError, match="no CPU"):
        plan_placement(cpus=0, gpus=0)


def test_match_predictions_of_segment_run_on_a_parent_folder(tmp_path):
    # segment run on the dataset root: ids are JPEGImages__<id>-<hash>
    (tmp_path / "JPEGImages__2007_000032-0123456789.png").write_bytes(b"")
    (tmp_path / "JPEGImages__2007_000033-abcdefabcd.png").write_bytes(b"")
    got = match_predictions(str(tmp_path), ["2007_000032", "2007_000033"])
    assert got == {
        "2007_000032": str(tmp_path / "JPEGImages__2007_000032-0123456789.png"),
        "2007_000033": str(tmp_path / "JPEGImages__2007_000033-abcdefabcd.png"),
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
