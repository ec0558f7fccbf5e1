"""The network's contract with checkpoints: Caffe layer names, shapes, parameter counts, output sizes.

One shared test class, parametrised over the variants (a few lines per variant).
Full-size models are built on the meta device (shapes without memory); forward
passes run at width 0.125 except one full-size LargeFOV pass.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model import VARIANTS, deeplab_v1
from pipeline.preprocess import coarse_size

# The full state-dict key list of LargeFOV, in module order: the Caffe names of the released prototxt.
LARGEFOV_KEYS = [
    f"{layer}.{role}"
    for layer in (
        "conv1_1",
        "conv1_2",
        "conv2_1",
        "conv2_2",
        "conv3_1",
        "conv3_2",
        "conv3_3",
        "conv4_1",
        "conv4_2",
        "conv4_3",
        "conv5_1",
        "conv5_2",
        "conv5_3",
        "fc6",
        "fc7",
        "fc8",
    )
    for role in ("weight", "bias")
]
MSC_EXTRA_KEYS = {
    f"{layer}_{source}.{role}"
    for layer in ("fc1", "fc2", "fc8")
    for source in ("data", "pool1", "pool2", "pool3", "pool4")
    for role in ("weight", "bias")
}
VGG_CONV_PARAMS = 14_714_688
MSC_BRANCH_PARAMS = 1_206_121  # sum over data/pool1..4 of (c*128*9 + 128) + (128*128 + 128) + (128*21 + 21)
# 7x7: fc6 7*7*512*4096 + 4096 = 102,764,544; fc7 4096*4096 + 4096 = 16,781,312; fc8 4096*21 + 21 = 86,037;
# 14,714,688 + 102,764,544 + 16,781,312 + 86,037 = 134,346,581. (The 134,350,677 is 4,096 more,
# i.e. one extra 4096-vector, and matches no consistent topology.)
PARAMS_7X7 = 14_714_688 + (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 21 + 21)

# variant -> (parameters, fc6 weight shape, fc6 dilation)
SPECS = {
    "largefov": (20_505_429, (1024, 512, 3, 3), 12),
    "deeplab": (65_140_565, (4096, 512, 4, 4), 4),
    "4x4": (65_140_565, (4096, 512, 4, 4), 8),
    "7x7": (134_346_581, (4096, 512, 7, 7), 4),
    "msc": (65_140_565 + MSC_BRANCH_PARAMS, (4096, 512, 4, 4), 4),
    "msc-largefov": (20_505_429 + MSC_BRANCH_PARAMS, (1024, 512, 3, 3), 12),
}


def test_specs_cover_every_variant_and_the_7x7_arithmetic():
    assert set(SPECS) == set(VARIANTS)
    assert PARAMS_7X7 == SPECS["7x7"][0] == 134_350_677 - 4096


def test_largefov_state_dict_shapes_are_pinned():
    with torch.device("meta"):
        state = deeplab_v1("largefov").state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["conv1_1.weight"] == (64, 3, 3, 3)
    assert shapes["conv3_1.weight"] == (256, 128, 3, 3)
    assert shapes["conv5_3.weight"] == (512, 512, 3, 3)
    assert shapes["fc7.weight"] == (1024, 1024, 1, 1)
    assert shapes["fc8.weight"] == (21, 1024, 1, 1) and shapes["fc8.bias"] == (21,)
    assert sum(v.numel() for k, v in state.items() if k.startswith("conv")) == VGG_CONV_PARAMS


@pytest.mark.parametrize("variant", VARIANTS)
class TestVariant:
    def full_size(self, variant):
        with torch.device("meta"):
            return deeplab_v1(variant, num_classes=21)

    def test_state_dict_keys_are_caffe_names(self, variant):
        keys = list(self.full_size(variant).state_dict())
        assert keys[: len(LARGEFOV_KEYS)] == LARGEFOV_KEYS
        assert set(keys[len(LARGEFOV_KEYS) :]) == (MSC_EXTRA_KEYS if variant.startswith("msc") else set())

    def test_parameter_count_and_fc6(self, variant):
        model = self.full_size(variant)
        parameters, fc6_shape, dilation = SPECS[variant]
        assert sum(p.numel() for p in model.parameters()) == parameters
        assert tuple(model.fc6.weight.shape) == fc6_shape and model.fc6.dilation == (dilation, dilation)
        assert model.conv5_1.dilation == (2, 2) and model.pool4.stride == 1

    @pytest.mark.parametrize(
        ("height", "width", "out"), [(321, 321, (41, 41)), (513, 513, (65, 65)), (375, 500, (48, 64))]
    )
    def test_output_size(self, variant, height, width, out):
        assert (coarse_size(height), coarse_size(width)) == out
        model = deeplab_v1(variant, num_classes=3, width=1 / 16).eval()  # shapes do not depend on width
        x = torch.zeros(1, 3, height, width)
        with torch.no_grad():
            if variant.startswith("msc") and (height % 8 != 1 or width % 8 != 1):
                with pytest.raises(ValueError, match="pad the batch to 377x505"):
                    model(x)
                return
            assert model(x).shape == (1, 3, *out)


def test_full_size_largefov_forward_at_321():
    torch.manual_seed(0)
    model = deeplab_v1("largefov").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 321, 321))
    assert out.shape == (1, 21, 41, 41) and torch.isfinite(out).all()
