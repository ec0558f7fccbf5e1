"""DeepLab V1: VGG-16 made dense with atrous convolution (Chen et al., ICLR 2015).

The module attributes are the Caffe layer names of the authors' released
prototxt (``conv1_1`` ... ``fc8``) so that converted ``.caffemodel`` weights map
by name; a test pins them. Every variant of the paper's field-of-view table is
one row of ``FC6_SPECS``; the multi-scale (MSc) variants add a two-layer MLP on
the input and on pool1..pool4 whose scores are summed with fc8.

Input: float32 N x 3 x H x W, BGR minus ``MEAN_BGR`` (see ``pipeline.preprocess``).
Output: logits N x C x h x w at output stride 8 (h = (H - 1) // 8 + 1 for H = 8k + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.constants import OUTPUT_STRIDE

Variant = Literal["largefov", "deeplab", "4x4", "7x7", "msc", "msc-largefov"]
VARIANTS: tuple[str, ...] = ("largefov", "deeplab", "4x4", "7x7", "msc", "msc-largefov")

# VGG-16 convolution stages: (stage, number of convs, output channels).
VGG_STAGES: tuple[tuple[int, int, int], ...] = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
# Stride of pool1..pool5 (pool4/pool5 at stride 1 keep the map dense at 1/8).
POOL_STRIDES: dict[int, int] = {1: 2, 2: 2, 3: 2, 4: 1, 5: 1}
CONV5_DILATION = 2
DROPOUT = 0.5


@dataclass(frozen=True)
class FC6Spec:
    """The fc6 layer that sets a variant's field of view."""

    kernel: int
    dilation: int
    padding: int
    channels: int  # fc6 and fc7 width


FC6_SPECS: dict[str, FC6Spec] = {
    "largefov": FC6Spec(kernel=3, dilation=12, padding=12, channels=1024),
    # The released base model: a 4x4 kernel with hole 4 and pad 6 keeps the size.
    "deeplab": FC6Spec(kernel=4, dilation=4, padding=6, channels=4096),
    "4x4": FC6Spec(kernel=4, dilation=8, padding=12, channels=4096),
    "7x7": FC6Spec(kernel=7, dilation=4, padding=12, channels=4096),
}
# MSc variants: backbone variant they extend.
MSC_BASE: dict[str, str] = {"msc": "deeplab", "msc-largefov": "largefov"}
# MSc branches: source feature map -> stride of the branch's 3x3 conv (lands on the 1/8 grid).
MSC_BRANCH_STRIDES: dict[str, int] = {"data": 8, "pool1": 4, "pool2": 2, "pool3": 1, "pool4": 1}
MSC_BRANCH_CHANNELS = 128


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class DeepLabV1(nn.Module):
    """DeepLab V1 with Caffe layer names; build it with :func:`deeplab_v1`."""

    def __init__(self, *, variant: str, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if not 0 < width <= 1:
            raise ValueError(f"width: expected 0 < width <= 1, got {width!r}")
        self.variant = variant
        self.num_classes = num_classes
        self.width = width
        self.multi_scale = variant in MSC_BASE
        fc6 = FC6_SPECS[MSC_BASE.get(variant, variant)]

        in_ch = 3
        self.stage_channels: dict[str, int] = {"data": 3}
        for stage, n_convs, out_ch in VGG_STAGES:
            out_ch = _scaled(out_ch, width)
            dilation = CONV5_DILATION if stage == 5 else 1
            for i in range(1, n_convs + 1):
                conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=dilation, dilation=dilation)
                self.add_module(f"conv{stage}_{i}", conv)
                in_ch = out_ch
            # Caffe pools in ceil mode; pad 1 and a 3x3 window everywhere.
            self.add_module(
                f"pool{stage}",
                nn.MaxPool2d(kernel_size=3, stride=POOL_STRIDES[stage], padding=1, ceil_mode=True),
            )
            self.stage_channels[f"pool{stage}"] = out_ch
        # pool5a: average pooling, padding counted (as Caffe and PyTorch's default).
        self.pool5a = nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=True)

        fc_ch = _scaled(fc6.channels, width)
        self.fc6 = nn.Conv2d(in_ch, fc_ch, kernel_size=fc6.kernel, padding=fc6.padding, dilation=fc6.dilation)
        self.fc7 = nn.Conv2d(fc_ch, fc_ch, kernel_size=1)
        self.fc8 = nn.Conv2d(fc_ch, num_classes, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(p=DROPOUT)

        if self.multi_scale:
            branch_ch = _scaled(MSC_BRANCH_CHANNELS, width)
            for source, stride in MSC_BRANCH_STRIDES.items():
                src_ch = self.stage_channels[source]
                self.add_module(f"fc1_{source}", nn.Conv2d(src_ch, branch_ch, kernel_size=3, stride=stride, padding=1))
                self.add_module(f"fc2_{source}", nn.Conv2d(branch_ch, branch_ch, kernel_size=1))
                self.add_module(f"fc8_{source}", nn.Conv2d(branch_ch, num_classes, kernel_size=1))

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Caffe-style initialisation: classifiers N(0, 0.01), biases 0."""
        for name, module in self.named_children():
            if isinstance(module, nn.Conv2d):
                if name.startswith("fc8"):
                    nn.init.normal_(module.weight, std=0.01)
                else:
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Parameters of the freshly initialised classifiers (fc8 and MSc fc8_*), trained at lr x10."""
        return [p for name, p in self.named_parameters() if name.startswith("fc8")]

    def _branch(self, source: str, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.relu(getattr(self, f"fc1_{source}")(x)))
        x = self.dropout(self.relu(getattr(self, f"fc2_{source}")(x)))
        return getattr(self, f"fc8_{source}")(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multi_scale:
            height, width = x.shape[-2:]
            if height % OUTPUT_STRIDE != 1 or width % OUTPUT_STRIDE != 1:
                fix = tuple(-(-(s - 1) // OUTPUT_STRIDE) * OUTPUT_STRIDE + 1 for s in (height, width))
                raise ValueError(
                    f"input: the multi-scale branches need sides of 8k+1 pixels, got {height}x{width}; "
                    f"pad the batch to {fix[0]}x{fix[1]} (pipeline.preprocess.prepare_batch does this)"
                )
        branch_inputs = {"data": x}
        for stage, n_convs, _ in VGG_STAGES:
            for i in range(1, n_convs + 1):
                x = self.relu(getattr(self, f"conv{stage}_{i}")(x))
            x = getattr(self, f"pool{stage}")(x)
            branch_inputs[f"pool{stage}"] = x
        x = self.pool5a(x)
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        scores = self.fc8(x)
        if self.multi_scale:
            for source in MSC_BRANCH_STRIDES:
                scores = scores + self._branch(source, branch_inputs[source])
        return scores


def deeplab_v1(variant: Variant = "largefov", *, num_classes: int = 21, width: float = 1.0) -> DeepLabV1:
    """Build a DeepLab V1 network.

    ``variant`` is a row of the paper's field-of-view table (``largefov``,
    ``deeplab``, ``4x4``, ``7x7``) or a multi-scale one (``msc``,
    ``msc-largefov``). ``width`` < 1 scales every channel count (same topology,
    fewer channels), used by the small bundled demo model.
    """
    return DeepLabV1(variant=variant, num_classes=num_classes, width=width)

