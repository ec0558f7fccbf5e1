"""The authors' ``.caffemodel`` files, read without Caffe, mapped by layer name onto DeepLab V1.

Two schemas are read (see docs/weights.md):

* the old V1 one the DeepLab releases use: ``NetParameter.layers`` (field 2),
  ``V1LayerParameter {name = 4; type = 5 (enum); blobs = 6}``, 4-D blobs in
  ``BlobProto {num = 1; channels = 2; height = 3; width = 4; data = 5}``;
* the newer one: ``NetParameter.layer`` (field 100), ``LayerParameter {name = 1;
  type = 2 (string); blobs = 7}``, ``BlobProto.shape = 7`` (``BlobShape.dim = 1``).

Only the weights are taken from the file. Dilation, padding and strides are
fixed by the variant (DeepLab's fork stores dilation as ``hole``, which is
ignored on purpose). Layers without blobs (ReLU, pooling, data, loss) are skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import fsspec
import numpy as np
import torch

from pipeline.constants import DEFAULT_INPUT_SIZE
from pipeline.convert import protobuf as pb
from pipeline.model import VGG_STAGES, DeepLabV1, deeplab_v1
from pipeline.weights import (
    CheckpointError,
    ModelRecord,
    check_state_dict,
    expected_shapes,
    resolve_classes,
    tensors_sha256,
)

log = logging.getLogger(__name__)

# NetParameter
NET_NAME, NET_LAYERS_V1, NET_LAYER = 1, 2, 100
# V1LayerParameter / V0LayerParameter (nested as V1LayerParameter.layer = 1)
V1_LAYER_V0, V1_NAME, V1_TYPE, V1_BLOBS = 1, 4, 5, 6
# LayerParameter
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS = 1, 2, 7
# BlobProto
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH = 1, 2, 3, 4
BLOB_DATA, BLOB_DIFF, BLOB_SHAPE, BLOB_DOUBLE_DATA, BLOB_DOUBLE_DIFF = 5, 6, 7, 8, 9
# BlobShape
SHAPE_DIM = 1

# V1LayerParameter.LayerType values of stock Caffe (for messages only; the fork adds more).
V1_LAYER_TYPES = {
    0: "NONE",
    1: "ACCURACY",
    3: "CONCAT",
    4: "CONVOLUTION",
    5: "DATA",
    6: "DROPOUT",
    8: "FLATTEN",
    12: "IMAGE_DATA",
    14: "INNER_PRODUCT",
    15: "LRN",
    17: "POOLING",
    18: "RELU",
    20: "SOFTMAX",
    21: "SOFTMAX_LOSS",
    22: "SPLIT",
    25: "ELTWISE",
    29: "MEMORY_DATA",
    33: "SLICE",
    36: "SILENCE",
    39: "DECONVOLUTION",
}
# Suffix the released classifiers carry (``fc8_voc12``); stripped when the stripped name is a model layer.
DATASET_SUFFIXES = ("_voc12",)
_LEGACY_DIMS = (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH)
_BLOB_ROLES = ("weight", "bias")


class CaffeFormatError(ValueError):
    """The file is not a readable ``.caffemodel`` (truncated, corrupt, unsupported schema)."""


class ConversionError(CheckpointError):
    """The file's layers do not fit the requested variant (missing, mis-shaped or extra layers)."""


@dataclass(frozen=True)
class CaffeLayer:
    """One layer of a ``.caffemodel``: its blobs as float32 arrays in Caffe's shape."""

    name: str
    type: str
    blobs: tuple[np.ndarray, ...]
    offset: int  # byte offset of the layer message in the file


@dataclass(frozen=True)
class CaffeNet:
    name: str
    schema: str  # "V1" (layers = 2), "V2" (layer = 100) or "V1+V2"
    layers: tuple[CaffeLayer, ...]

    def weighted_layers(self) -> dict[str, CaffeLayer]:
        """Layers that have blobs, by name (duplicate names are an error)."""
        out: dict[str, CaffeLayer] = {}
        for layer in self.layers:
            if not layer.blobs:
                continue
            if layer.name in out:
                raise CaffeFormatError(
                    f"net {self.name!r}: two layers with blobs are named {layer.name!r} "
                    f"(offsets {out[layer.name].offset} and {layer.offset})"
                )
            out[layer.name] = layer
        return out


# --------------------------------------------------------------------------- decoding


def _decode_blob(buf: memoryview, start: int, end: int) -> np.ndarray:
    legacy: dict[int, int] = {}
    dims: list[int] | None = None
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    pos = start
    while pos < end:
        field = pb.read_field(buf, pos, end)
        pos = field.end
        number, wire = field.number, field.wire_type
        if number in _LEGACY_DIMS and wire == pb.VARINT:
            legacy[number] = field.value
        elif number == BLOB_SHAPE and wire == pb.LENGTH_DELIMITED:
            dims = []
            for dim in pb.iter_fields(buf, field.start, field.end):
                if dim.number != SHAPE_DIM:
                    continue
                if dim.wire_type == pb.LENGTH_DELIMITED:
                    dims.extend(pb.decode_packed_varints(buf, dim))
                elif dim.wire_type == pb.VARINT:
                    dims.append(dim.value)
        elif number == BLOB_DATA and wire == pb.LENGTH_DELIMITED:
            floats.append(pb.decode_packed_fixed(buf, field, dtype="<f4"))
        elif number == BLOB_DATA and wire == pb.FIXED32:
            values, pos = pb.decode_unpacked_fixed_run(buf, field, end=end, dtype="<f4")
            floats.append(values)
        elif number == BLOB_DOUBLE_DATA and wire == pb.LENGTH_DELIMITED:
            doubles.append(pb.decode_packed_fixed(buf, field, dtype="<f8"))
        elif number == BLOB_DOUBLE_DATA and wire == pb.FIXED64:
            values, pos = pb.decode_unpacked_fixed_run(buf, field, end=end, dtype="<f8")
            doubles.append(values)
        # diff / double_diff (gradients) and unknown fields are skipped.
    if floats:
        data = np.concatenate(floats) if len(floats) > 1 else floats[0]
    elif doubles:
        data = np.concatenate(doubles).astype("<f4")
    else:
        data = np.zeros(0, dtype="<f4")
    if dims is not None:
        shape = tuple(int(d) for d in dims)
    elif legacy:
        # Old blobs are always 4-D (num, channels, height, width); unset dims default to 1.
        shape = tuple(int(legacy.get(d, 1)) for d in _LEGACY_DIMS)
    else:
        shape = (data.size,)
    if int(np.prod(shape)) != data.size:
        raise pb.WireFormatError(
            f"blob of shape {shape} needs {int(np.prod(shape))} values, the file has {data.size}", offset=start
        )
    return data.reshape(shape)


def _decode_layer(buf: memoryview, field: pb.Field, *, new_schema: bool) -> CaffeLayer:
    name_no, type_no, blobs_no = (LAYER_NAME, LAYER_TYPE, LAYER_BLOBS) if new_schema else (V1_NAME, V1_TYPE, V1_BLOBS)
    name, type_name, blobs = "", "", []
    for sub in pb.iter_fields(buf, field.start, field.end):
        if sub.number == name_no and sub.wire_type == pb.LENGTH_DELIMITED:
            name = pb.decode_string(buf, sub)
        elif sub.number == type_no and new_schema and sub.wire_type == pb.LENGTH_DELIMITED:
            type_name = pb.decode_string(buf, sub)
        elif sub.number == type_no and not new_schema and sub.wire_type == pb.VARINT:
            type_name = V1_LAYER_TYPES.get(sub.value, f"V1 type {sub.value}")
        elif sub.number == blobs_no and sub.wire_type == pb.LENGTH_DELIMITED:
            blobs.append(_decode_blob(buf, sub.start, sub.end))
        elif not new_schema and sub.number == V1_LAYER_V0 and sub.wire_type == pb.LENGTH_DELIMITED:
            raise pb.WireFormatError(
                "V0 layer (pre-2014 schema); upgrade the file with Caffe's upgrade_net_proto_binary",
                offset=sub.offset,
            )
    return CaffeLayer(name=name, type=type_name, blobs=tuple(blobs), offset=field.offset)


def parse_caffemodel(data: bytes | memoryview, *, where: str = "<bytes>") -> CaffeNet:
    """Decode a serialised ``NetParameter`` (both schemas). Errors name ``where`` and the byte offset."""
    buf = memoryview(data)
    net_name, layers, schemas = "", [], set()
    pos = 0
    try:
        while pos < len(buf):
            current = f"the top-level field at byte {pos} (after {len(layers)} layers)"
            field = pb.read_field(buf, pos, len(buf))
            pos = field.end
            if field.number == NET_NAME and field.wire_type == pb.LENGTH_DELIMITED:
                net_name = pb.decode_string(buf, field)
            elif field.number in (NET_LAYERS_V1, NET_LAYER) and field.wire_type == pb.LENGTH_DELIMITED:
                new_schema = field.number == NET_LAYER
                current = f"layer #{len(layers)} (starting at byte {field.offset})"
                layers.append(_decode_layer(buf, field, new_schema=new_schema))
                schemas.add("V2" if new_schema else "V1")
    except pb.WireFormatError as exc:
        raise CaffeFormatError(
            f"{where}: truncated or corrupt .caffemodel at byte offset {exc.offset} of {len(buf)} "
            f"while reading {current}: {exc.reason}"
        ) from exc
    if not layers:
        raise CaffeFormatError(f"{where}: no layers found ({len(buf)} bytes): not a .caffemodel file?")
    return CaffeNet(name=net_name, schema="+".join(sorted(schemas)), layers=tuple(layers))


def read_caffemodel(path_or_uri: str | os.PathLike) -> CaffeNet:
    """Read a ``.caffemodel`` from a local path or an fsspec URI."""
    with fsspec.open(os.fspath(path_or_uri), "rb") as f:
        data = f.read()
    return parse_caffemodel(data, where=os.fspath(path_or_uri))


# --------------------------------------------------------------------------- mapping


def _target_name(name: str, *, modules: Sequence[str], rename: Mapping[str, str], file_names: set[str]) -> str:
    if name in rename:
        return rename[name]
    if name in modules:
        return name
    for suffix in DATASET_SUFFIXES:
        stripped = name.removesuffix(suffix)
        if stripped != name and stripped in modules and stripped not in file_names:
            return stripped
    return name


def layer_mapping(
    layer_names: Sequence[str], *, modules: Sequence[str], rename: Mapping[str, str] | None = None
) -> dict[str, str]:
    """File layer name -> model module name for the layers that map to a module (pure).

    A name maps to itself, to ``rename[name]``, or, for the released classifier
    names, with a dataset suffix removed (``fc8_voc12`` -> ``fc8``).
    """
    rename = dict(rename or {})
    unknown_targets = sorted(set(rename.values()) - set(modules))
    if unknown_targets:
        raise ConversionError(
            f"rename: targets {unknown_targets} are not layers of the model; layers are {list(modules)}"
        )
    file_names = set(layer_names)
    mapping: dict[str, str] = {}
    claimed: dict[str, str] = {}
    for name in layer_names:
        target = _target_name(name, modules=modules, rename=rename, file_names=file_names)
        if target not in modules:
            continue
        if target in claimed:
            raise ConversionError(f"layers {claimed[target]!r} and {name!r} both map to model layer {target!r}")
        claimed[target] = name
        mapping[name] = target
    return mapping


def _fits(blob_shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Equal shapes, or equal once size-1 dims are dropped (old 1x1x1xN biases, 1x1 kernels);
    dropping unit dims keeps the row-major order, so the data need not move."""
    if blob_shape == expected:
        return True
    return tuple(d for d in blob_shape if d != 1) == tuple(d for d in expected if d != 1)


def caffe_to_state_dict(
    layers: Mapping[str, Sequence[np.ndarray]],
    *,
    expected: Mapping[str, torch.Size],
    rename: Mapping[str, str] | None = None,
    allow_extra: bool = False,
    where: str = "caffemodel",
) -> dict[str, torch.Tensor]:
    """Map ``{layer name: [weight, bias]}`` onto the state dict described by ``expected`` (pure).

    Errors name the layers: model layers missing from the file, blobs whose
    shape differs (expected vs actual), and layers with blobs that the model
    does not have (an error unless ``allow_extra``: they usually mean a wrong
    ``--variant``; with ``allow_extra`` they are logged and dropped).
    """
    modules = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in expected))
    mapping = layer_mapping(list(layers), modules=modules, rename=rename)
    extra = [name for name in layers if name not in mapping]
    missing = [m for m in modules if m not in mapping.values()]
    if missing:
        shapes = ", ".join(f"{m} (weight {tuple(expected[m + '.weight'])})" for m in missing)
        hint = f"; layers in the file not used: {extra} (map them with --rename FILE_NAME=MODEL_NAME)" if extra else ""
        raise ConversionError(f"{where}: model layers missing from the file: {shapes}{hint}")
    if extra:
        message = f"{where}: layers with blobs that the model has no place for: {extra}"
        if not allow_extra:
            raise ConversionError(
                f"{message}; check --variant (multi-scale files have fc1_*/fc2_* branch layers), "
                "map them with --rename, or drop them with --ignore-extra-layers"
            )
        log.warning("%s (dropped)", message)
    state: dict[str, torch.Tensor] = {}
    problems = []
    for name, target in mapping.items():
        blobs = layers[name]
        if len(blobs) != len(_BLOB_ROLES):
            problems.append(f"layer {name!r}: expected {len(_BLOB_ROLES)} blobs (weight, bias), got {len(blobs)}")
            continue
        for role, blob in zip(_BLOB_ROLES, blobs):
            key = f"{target}.{role}"
            want = tuple(expected[key])
            if not _fits(tuple(blob.shape), want):
                problems.append(f"layer {name!r} blob {role} ({key}): expected {want}, got {tuple(blob.shape)}")
                continue
            state[key] = torch.from_numpy(np.array(blob, dtype=np.float32).reshape(want))
    if problems:
        raise ConversionError(f"{where}: mis-shaped layers: " + "; ".join(problems))
    check_state_dict(state, expected=expected, where=where)
    return state


def _infer(
    net_layers: Mapping[str, Sequence[np.ndarray]], *, variant: str, rename: Mapping[str, str] | None, where: str
):
    """(num_classes, width) read off fc8 and conv1_1 of the file."""
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in expected_shapes(variant=variant, num_classes=1)))
    by_target = {t: n for n, t in layer_mapping(list(net_layers), modules=modules, rename=rename).items()}
    for needed in ("conv1_1", "fc8"):
        if needed not in by_target or not net_layers[by_target[needed]]:
            raise ConversionError(f"{where}: no {needed} layer with blobs: cannot read the model's size from the file")
    first_channels = VGG_STAGES[0][2]
    width = net_layers[by_target["conv1_1"]][0].shape[0] / first_channels
    num_classes = int(net_layers[by_target["fc8"]][0].shape[0])
    return num_classes, min(width, 1.0)


def convert_caffemodel(
    path_or_uri: str | os.PathLike,
    *,
    variant: str,
    classes: str | os.PathLike | None = None,
    num_classes: int | None = None,
    width: float | None = None,
    rename: Mapping[str, str] | None = None,
    allow_extra: bool = False,
    input_size: int = DEFAULT_INPUT_SIZE,
    reference_metric: dict[str, Any] | None = None,
    notes: str = "",
) -> tuple[DeepLabV1, ModelRecord]:
    """Convert a ``.caffemodel`` into ``(model.eval(), record)``; save with :func:`pipeline.weights.save_checkpoint`.

    ``num_classes`` defaults to the classes file's count, else fc8's output
    channels; ``width`` to conv1_1's channels / 64 (1.0 for the released files).
    """
    where = os.fspath(path_or_uri)
    with fsspec.open(where, "rb") as f:
        data = f.read()
    net = parse_caffemodel(data, where=where)
    blobs = {name: layer.blobs for name, layer in net.weighted_layers().items()}
    if classes is not None and num_classes is None:
        num_classes = len(resolve_classes(classes)[0])
    if num_classes is None or width is None:
        inferred_classes, inferred_width = _infer(blobs, variant=variant, rename=rename, where=where)
        num_classes = inferred_classes if num_classes is None else num_classes
        width = inferred_width if width is None else width
    class_names, palette = resolve_classes(classes, num_classes=num_classes)
    expected = expected_shapes(variant=variant, num_classes=num_classes, width=width)
    state = caffe_to_state_dict(blobs, expected=expected, rename=rename, allow_extra=allow_extra, where=where)
    with torch.device("meta"):  # every tensor comes from the file: skip the random initialisation
        model = deeplab_v1(variant, num_classes=num_classes, width=width)
    model.load_state_dict(state, strict=True, assign=True)
    record = ModelRecord(
        variant=variant,
        num_classes=num_classes,
        width=width,
        class_names=class_names,
        palette=palette,
        input_size=input_size,
        source=f"caffe:{PurePath(where).name} sha256={hashlib.sha256(data).hexdigest()} schema={net.schema}",
        sha256=tensors_sha256(state),
        reference_metric=reference_metric,
        notes=notes,
    )
    return model.eval(), record
