"""The fine-tuning loop follows the paper's recipe and actually learns."""

import numpy as np
import pytest
import torch

from pipeline.constants import IGNORE_LABEL
from pipeline.data import synthetic
from pipeline.model import deeplab_v1
from pipeline.train import TrainConfig, learning_rate, make_optimizer, random_crop, train


def test_schedules():
    poly = TrainConfig(data="", lr=0.01, iterations=100, lr_policy="poly", power=0.9)
    assert learning_rate(poly, 0) == pytest.approx(0.01)
    assert learning_rate(poly, 50) == pytest.approx(0.01 * 0.5**0.9)
    step = TrainConfig(data="", lr=0.001, iterations=6000, lr_policy="step", step_size=2000, gamma=0.1)
    assert [learning_rate(step, i) for i in (0, 1999, 2000, 4500)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="crop_size.*8k\\+1"):
        TrainConfig(data="", crop_size=320)
    with pytest.raises(ValueError, match="variant"):
        TrainConfig(data="", variant="resnet")


def test_optimizer_groups_fc8_at_ten_times_and_no_decay_on_biases():
    model = deeplab_v1("msc-largefov", num_classes=4, width=0.0625)
    opt = make_optimizer(model, TrainConfig(data="", lr=0.5))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["fc8.weight"])]["lr_mult"] == 10
    assert by_param[id(named["fc8_pool3.weight"])]["lr_mult"] == 10
    assert by_param[id(named["fc7.weight"])]["lr_mult"] == 1
    assert by_param[id(named["conv1_1.bias"])]["weight_decay"] == 0
    assert by_param[id(named["conv1_1.weight"])]["weight_decay"] == 5e-4
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_random_crop_pads_with_ignore_and_mirrors():
    rng = np.random.default_rng(0)
    image = np.zeros((5, 6, 3), np.uint8)
    label = np.arange(30, dtype=np.uint8).reshape(5, 6)
    seen_mirror = False
    for _ in range(20):
        crop_img, crop_lab = random_crop(rng, image, label, size=9)
        assert crop_img.shape == (9, 9, 3) and crop_lab.shape == (9, 9)
        assert np.all(crop_lab[5:, :] == IGNORE_LABEL) and np.all(crop_lab[:, 6:] == IGNORE_LABEL) or \
            np.all(crop_lab[5:, :] == IGNORE_LABEL) and np.all(crop_lab[:, :3] == IGNORE_LABEL)
        seen_mirror |= bool(crop_lab[0, 8] == 0)
    assert seen_mirror


def test_training_lowers_the_loss(tmp_path):
    synthetic.generate_dataset(tmp_path, num_train=12, num_val=4, seed=0, min_size=64, max_size=80)
    config = TrainConfig(data=str(tmp_path), num_classes=5, width=0.0625, crop_size=57, batch_size=4,
                         iterations=60, lr=0.01, clip_grad_norm=5.0, seed=0, threads=1)
    torch.manual_seed(0)
    model, history = train(config, log_every=10)
    first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-2:]])
    assert last < 0.6 * first and last < 1.5, history
    assert not model.training


def test_train_job_records_the_validation_metric(tmp_path):
    from jobs.cli import main as cli_main
    from pipeline.weights import load_checkpoint

    data = synthetic.generate_dataset(tmp_path / "data", num_train=6, num_val=3, seed=0, min_size=64, max_size=80)
    out = tmp_path / "model.safetensors"
    code = cli_main(["train", "--data", str(data), "--out", str(out), "--num-classes", "5", "--width", "0.0625",
                     "--crop-size", "57", "--batch-size", "2", "--iterations", "5", "--lr", "0.001",
                     "--val-split", "val"])
    assert code == 0
    model, record = load_checkpoint(out)
    metric = record.reference_metric
    assert metric["split"] == "val" and metric["images"] == 3
    assert 0.0 <= metric["miou"] <= 1.0 and 0.0 <= metric["miou_crf"] <= 1.0
    assert record.num_classes == 5 and record.width == 0.0625
