"""torchvision VGG-16 -> DeepLab V1 initialisation.

Fast tests use a width-0.125 analogue of VGG-16 (every channel count / 8,
4096-wide classifiers -> 512), which exercises the same code path; the real
shapes are checked on the meta device (no memory), and one slow test converts
a full-size random VGG-16 (138M parameters).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from jobs import convert_torchvision as job
from pipeline.constants import MEAN_BGR
from pipeline.convert.caffe import ConversionError
from pipeline.convert.torchvision import (
    FEATURE_INDICES,
    TORCHVISION_MEAN_RGB,
    TORCHVISION_STD_RGB,
    convert_torchvision,
    fold_preprocessing,
    vgg16_to_deeplab,
)
from pipeline.model import VARIANTS
from pipeline.weights import expected_shapes, load_checkpoint

VGG_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def fake_vgg16(*, width: float = 1.0, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's vgg16 state dict layout with random values, channel counts scaled by ``width``."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=generator) * 0.1

    state, in_ch = {}, 3
    for index, channels in zip(FEATURE_INDICES, VGG_CHANNELS):
        out_ch = int(channels * width)
        state[f"features.{index}.weight"] = rand(out_ch, in_ch, 3, 3)
        state[f"features.{index}.bias"] = rand(out_ch)
        in_ch = out_ch
    fc = int(4096 * width)
    state["classifier.0.weight"] = rand(fc, in_ch * 49)
    state["classifier.0.bias"] = rand(fc)
    state["classifier.3.weight"] = rand(fc, fc)
    state["classifier.3.bias"] = rand(fc)
    state["classifier.6.weight"] = rand(1000, fc)
    state["classifier.6.bias"] = rand(1000)
    return state


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_shapes_for_every_variant_on_meta(variant):
    expected = expected_shapes(variant=variant, num_classes=21)
    mapped = vgg16_to_deeplab(fake_vgg16(device="meta"), expected=expected)
    fresh = {k for k in expected if k.startswith(("fc8", "fc1_", "fc2_"))}  # classifiers and MSc branches
    assert set(mapped) == set(expected) - fresh
    assert all(mapped[k].shape == expected[k] for k in mapped)


@pytest.mark.parametrize(
    ("variant", "step", "taps"), [("largefov", 4, (0, 3, 6)), ("deeplab", 1, (0, 2, 4, 6)), ("7x7", 1, tuple(range(7)))]
)
def test_decimation_against_explicit_indices(tmp_path, variant, step, taps):
    vgg = fake_vgg16(width=0.125)
    path = tmp_path / "vgg16.safetensors"
    safetensors.torch.save_file(vgg, str(path))
    model, record = convert_torchvision(path, variant=variant)
    assert (record.width, record.num_classes) == (0.125, 21) and record.reference_metric is None
    fc6 = model.fc6.weight.detach().numpy()
    src6 = vgg["classifier.0.weight"].numpy()  # row o, column c*49 + ky*7 + kx (torchvision flattens C x 7 x 7)
    for o in range(fc6.shape[0]):
        for c in (0, 5, 63):
            for i, ky in enumerate(taps):
                for j, kx in enumerate(taps):
                    assert fc6[o, c, i, j] == src6[o * step, c * 49 + ky * 7 + kx]
    assert torch.equal(model.fc6.bias, vgg["classifier.0.bias"][::step])
    src7 = vgg["classifier.3.weight"]
    fc7 = model.fc7.weight[:, :, 0, 0]
    assert all(
        fc7[o, i] == src7[o * step, i * step] for o in (0, 7, fc7.shape[0] - 1) for i in (0, 3, fc7.shape[1] - 1)
    )
    assert torch.equal(model.conv3_2.weight, vgg["features.12.weight"])
    assert torch.equal(model.conv5_3.bias, vgg["features.28.bias"])


def test_fold_preprocessing_matches_torchvision_input_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 3, 3, 3, generator=generator), torch.randn(8, generator=generator)
    pixels_rgb = torch.randint(0, 256, (1, 3, 12, 14), generator=generator).float()
    mean, std = torch.tensor(TORCHVISION_MEAN_RGB).view(1, 3, 1, 1), torch.tensor(TORCHVISION_STD_RGB).view(1, 3, 1, 1)
    torchvision_input = (pixels_rgb / 255 - mean) / std
    deeplab_input = pixels_rgb.flip(1) - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)  # BGR minus mean
    expected = F.conv2d(torchvision_input, weight, bias, padding=1)
    folded = F.conv2d(deeplab_input, *fold_preprocessing(weight, bias), padding=1)
    torch.testing.assert_close(folded[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(folded[..., 0, :], expected[..., 0, :], atol=1e-3)  # the zero-padded border differs


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_is_read_without_unpickling_objects(tmp_path):
    vgg = fake_vgg16(width=0.125)
    pth = tmp_path / "vgg16.pth"
    torch.save(vgg, pth)
    model, record = convert_torchvision(pth, variant="msc-largefov", num_classes=3, seed=7)
    assert record.source.startswith("torchvision-vgg16:vgg16.pth sha256=")
    assert "fc1_data" in record.notes and "fc8" in record.notes
    again, _ = convert_torchvision(pth, variant="msc-largefov", num_classes=3, seed=7)
    assert torch.equal(model.fc8_pool2.weight, again.fc8_pool2.weight)  # seeded fresh layers
    assert 0.005 < model.fc8.weight.std().item() < 0.015 and not model.fc8.bias.any()

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(ConversionError, match="refused to unpickle"):
        convert_torchvision(evil, variant="largefov")
    evil.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ConversionError, match="evil.pth"):
        convert_torchvision(evil, variant="largefov")


def test_other_vgg_layouts_are_rejected(tmp_path):
    vgg = fake_vgg16(width=0.125)
    vgg["features.1.running_mean"] = torch.zeros(8)  # vgg16_bn-like
    del vgg["features.28.bias"]
    path = tmp_path / "vgg16_bn.safetensors"
    safetensors.torch.save_file(vgg, str(path))
    with pytest.raises(
        ConversionError, match=r"not torchvision's plain VGG-16.*'features.28.bias'.*'features.1.running_mean'"
    ):
        convert_torchvision(path, variant="largefov")


def test_cli_writes_a_loadable_initial_checkpoint(tmp_path, capsys):
    path = tmp_path / "vgg16.pth"
    torch.save(fake_vgg16(width=0.125), path)
    out = tmp_path / "init.safetensors"
    assert job.main([str(path), str(out), "--variant", "largefov", "--classes", "voc"]) == 0
    model, record = load_checkpoint(out)
    assert record.variant == "largefov" and record.class_names[0] == "background"
    assert model(torch.zeros(1, 3, 33, 33)).shape == (1, 21, 5, 5)
    assert job.main([str(tmp_path / "missing.pth"), str(out), "--variant", "largefov"]) == 1
    assert "missing.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_vgg16_converts_and_round_trips(tmp_path):
    vgg = {k: v.to(torch.float32) for k, v in fake_vgg16(width=1.0).items()}  # 138M parameters, ~550 MB
    path = tmp_path / "vgg16.safetensors"
    safetensors.torch.save_file(vgg, str(path))
    model, record = convert_torchvision(path, variant="largefov")
    assert sum(p.numel() for p in model.parameters()) == 20_505_429 and record.width == 1.0
    np.testing.assert_array_equal(
        model.fc6.weight[5, 17].detach().numpy(),
        vgg["classifier.0.weight"][20].reshape(512, 7, 7)[17][np.ix_((0, 3, 6), (0, 3, 6))].numpy(),
    )
    model7, _ = convert_torchvision(path, variant="7x7")
    assert torch.equal(model7.fc6.weight.reshape(4096, -1), vgg["classifier.0.weight"])
