"""torchvision's ImageNet VGG-16 as the initialisation of DeepLab V1 (the paper's recipe).

The 13 convolutions map one to one (``features.0`` -> ``conv1_1`` ...
``features.28`` -> ``conv5_3``). The fully connected layers become
convolutions, decimated as the authors did for their ``vgg16_20M`` init:
fc6's 4096 x 25088 matrix is read as 4096 x 512 x 7 x 7, every k-th output
filter is kept (k = 4096 / the variant's width: 4 for LargeFOV, 1 otherwise)
and the 7x7 kernel is subsampled to the variant's kernel (taps
:data:`KERNEL_TAPS`); fc7 keeps every k-th row and column. fc8 and the MSc
branches are freshly initialised (fc8 ~ N(0, 0.01), bias 0).

torchvision's VGG expects RGB in [0, 1] normalised by its mean/std; DeepLab
feeds BGR 0..255 minus ``MEAN_BGR``. The difference is an affine map per
channel, folded into conv1_1 (exact except at the zero-padded image border).
No torchvision import is needed: the state dict is read with
``torch.load(weights_only=True)`` (no arbitrary unpickling) or from safetensors.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Mapping
from pathlib import PurePath

import fsspec
import safetensors.torch
import torch
from safetensors import SafetensorError

from pipeline.constants import DEFAULT_INPUT_SIZE, MEAN_BGR
from pipeline.convert.caffe import ConversionError
from pipeline.model import VGG_STAGES, DeepLabV1, deeplab_v1
from pipeline.weights import ModelRecord, check_state_dict, expected_shapes, resolve_classes, tensors_sha256

# torchvision.models.vgg16: index of each Conv2d in ``features`` (ReLU and MaxPool in between).
FEATURE_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONV_NAMES: tuple[str, ...] = tuple(
    f"conv{stage}_{i}" for stage, n_convs, _ in VGG_STAGES for i in range(1, n_convs + 1)
)
FC6_SOURCE, FC7_SOURCE, FC8_SOURCE = "classifier.0", "classifier.3", "classifier.6"
VGG_FC_KERNEL = 7  # VGG's fc6 sees pool5 as 7 x 7
# Which rows/columns of the 7x7 fc6 kernel each DeepLab fc6 kernel keeps: decimation by 1, 2, 3.
KERNEL_TAPS: dict[int, tuple[int, ...]] = {7: (0, 1, 2, 3, 4, 5, 6), 4: (0, 2, 4, 6), 3: (0, 3, 6)}
# torchvision's ImageNet preprocessing: RGB in [0, 1], minus mean, divided by std.
TORCHVISION_MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)


def read_state_dict(path_or_uri: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``."""
    where = os.fspath(path_or_uri)
    with fsspec.open(where, "rb") as f:
        data = f.read()
    if where.endswith(".safetensors"):
        try:
            return safetensors.torch.load(data)
        except SafetensorError as exc:
            raise ConversionError(f"{where}: corrupt safetensors file: {exc}") from exc
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        detail = str(exc).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0].strip()
        raise ConversionError(
            f"{where}: refused to unpickle: torch.load(weights_only=True) reads only tensors and plain "
            f"containers, and this file holds something else ({detail or type(exc).__name__}); "
            "export the state dict with safetensors or torch.save(model.state_dict())"
        ) from exc
    except RuntimeError as exc:  # not a torch zip/legacy file
        raise ConversionError(f"{where}: not a PyTorch state dict file: {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{where}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return dict(obj)


def _expected_vgg_keys() -> list[str]:
    keys = [f"features.{i}.{role}" for i in FEATURE_INDICES for role in ("weight", "bias")]
    keys += [f"{layer}.{role}" for layer in (FC6_SOURCE, FC7_SOURCE) for role in ("weight", "bias")]
    return keys


def fold_preprocessing(
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    mean_bgr: tuple[float, float, float] = MEAN_BGR,
    mean_rgb: tuple[float, float, float] = TORCHVISION_MEAN_RGB,
    std_rgb: tuple[float, float, float] = TORCHVISION_STD_RGB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1_1 for BGR 0..255 minus ``mean_bgr`` from one for RGB (x/255 - mean_rgb)/std_rgb.

    With x_rgb = pixel/255 and y_bgr = pixel - mean_bgr:
    (x - m)/s = y / (255 s) + (M/255 - m)/s, so W' = W / (255 s) (channels
    reversed to BGR) and b' = b + sum W (M/255 - m)/s.
    """
    mean_bgr_as_rgb = torch.tensor(mean_bgr[::-1], dtype=torch.float64)
    m = torch.tensor(mean_rgb, dtype=torch.float64)
    s = torch.tensor(std_rgb, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).view(1, 3, 1, 1)
    shift = ((mean_bgr_as_rgb / 255.0 - m) / s).view(1, 3, 1, 1)
    w64 = weight.to(torch.float64)
    new_bias = bias.to(torch.float64) + (w64 * shift.to(w64.device)).sum(dim=(1, 2, 3))
    new_weight = (w64 * scale.to(w64.device)).flip(1)
    return new_weight.to(weight.dtype), new_bias.to(bias.dtype)


def decimate_fc6(weight: torch.Tensor, *, out_channels: int, in_channels: int, kernel: int) -> torch.Tensor:
    """VGG fc6 (C x in*7*7) -> (out_channels x in x kernel x kernel): every k-th filter, kernel taps."""
    rows = weight.shape[0]
    if rows % out_channels or weight.shape[1] != in_channels * VGG_FC_KERNEL**2:
        raise ConversionError(
            f"{FC6_SOURCE}.weight: expected ({out_channels} * k, {in_channels * VGG_FC_KERNEL**2}), "
            f"got {tuple(weight.shape)}"
        )
    if kernel not in KERNEL_TAPS:
        raise ConversionError(f"fc6 kernel: expected one of {sorted(KERNEL_TAPS)}, got {kernel}")
    taps = torch.tensor(KERNEL_TAPS[kernel], device=weight.device)
    step = rows // out_channels
    w = weight.reshape(rows, in_channels, VGG_FC_KERNEL, VGG_FC_KERNEL)[::step]
    return w.index_select(2, taps).index_select(3, taps).contiguous()


def vgg16_to_deeplab(
    vgg: Mapping[str, torch.Tensor], *, expected: Mapping[str, torch.Size], where: str = "vgg16"
) -> dict[str, torch.Tensor]:
    """Map a VGG-16 state dict onto the conv1_1..fc7 keys of ``expected`` (pure; fc8/MSc left out).

    Works on any device including ``meta`` (shape checks without memory).
    """
    known = set(_expected_vgg_keys()) | {f"{FC8_SOURCE}.weight", f"{FC8_SOURCE}.bias"}
    missing = [k for k in _expected_vgg_keys() if k not in vgg]
    unexpected = sorted(set(vgg) - known)
    if missing or unexpected:
        raise ConversionError(
            f"{where}: not torchvision's plain VGG-16 (vgg16, not vgg16_bn): "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    out: dict[str, torch.Tensor] = {}
    for index, name in zip(FEATURE_INDICES, CONV_NAMES):
        for role in ("weight", "bias"):
            out[f"{name}.{role}"] = vgg[f"features.{index}.{role}"]
    out["conv1_1.weight"], out["conv1_1.bias"] = fold_preprocessing(out["conv1_1.weight"], out["conv1_1.bias"])

    fc_channels, in_channels, kernel, _ = expected["fc6.weight"]
    rows = vgg[f"{FC6_SOURCE}.weight"].shape[0]
    if rows % fc_channels:
        raise ConversionError(f"{where}: {FC6_SOURCE} has {rows} filters, not a multiple of fc6's {fc_channels}")
    step = rows // fc_channels
    out["fc6.weight"] = decimate_fc6(
        vgg[f"{FC6_SOURCE}.weight"], out_channels=fc_channels, in_channels=in_channels, kernel=kernel
    )
    out["fc6.bias"] = vgg[f"{FC6_SOURCE}.bias"][::step]
    fc7 = vgg[f"{FC7_SOURCE}.weight"]
    out["fc7.weight"] = fc7[::step, ::step].reshape(fc_channels, fc_channels, 1, 1)
    out["fc7.bias"] = vgg[f"{FC7_SOURCE}.bias"][::step]
    out = {k: v.to(torch.float32).contiguous() for k, v in out.items()}
    backbone = {k: v for k, v in expected.items() if k.split(".")[0] in CONV_NAMES + ("fc6", "fc7")}
    check_state_dict(out, expected=backbone, where=where)
    return out


def convert_torchvision(
    path_or_uri: str | os.PathLike,
    *,
    variant: str,
    num_classes: int | None = None,
    classes: str | os.PathLike | None = None,
    seed: int = 0,
    input_size: int = DEFAULT_INPUT_SIZE,
    notes: str = "",
) -> tuple[DeepLabV1, ModelRecord]:
    """``(model.eval(), record)`` initialised from a VGG-16 state dict; fc8 and MSc branches random (``seed``).

    ``width`` is read off ``features.0`` (64 filters -> 1.0); ``num_classes``
    defaults to the classes' count, else 21.
    """
    where = os.fspath(path_or_uri)
    with fsspec.open(where, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    vgg = read_state_dict(path_or_uri)
    if "features.0.weight" not in vgg:
        raise ConversionError(f"{where}: no features.0.weight: not torchvision's VGG-16")
    width = min(vgg["features.0.weight"].shape[0] / VGG_STAGES[0][2], 1.0)
    if num_classes is None:
        num_classes = len(resolve_classes(classes)[0]) if classes is not None else 21
    class_names, palette = resolve_classes(classes, num_classes=num_classes)
    expected = expected_shapes(variant=variant, num_classes=num_classes, width=width)
    mapped = vgg16_to_deeplab(vgg, expected=expected, where=where)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = deeplab_v1(variant, num_classes=num_classes, width=width)  # fc8 / MSc: fresh init
    state = {**model.state_dict(), **mapped}
    check_state_dict(state, expected=expected, where=where)
    model.load_state_dict(state, strict=True)
    fresh = sorted(k.rsplit(".", 1)[0] for k in expected if k not in mapped and k.endswith(".weight"))
    record = ModelRecord(
        variant=variant,
        num_classes=num_classes,
        width=width,
        class_names=class_names,
        palette=palette,
        input_size=input_size,
        source=f"torchvision-vgg16:{PurePath(where).name} sha256={digest}",
        sha256=tensors_sha256(model.state_dict()),
        reference_metric=None,
        notes=(
            f"ImageNet initialisation, not trained for segmentation; fc6/fc7 decimated; "
            f"random (seed {seed}): {', '.join(fresh)}. {notes}"
        ).strip(),
    )
    return model.eval(), record
