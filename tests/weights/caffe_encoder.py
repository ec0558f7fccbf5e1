"""A tiny protobuf *encoder* for .caffemodel files, so tests build their own files.

Independent of the decoder under test: it writes the wire format from the
field numbers of caffe.proto (V1: NetParameter.layers = 2, V1LayerParameter
name = 4 / type = 5 / blobs = 6; V2: NetParameter.layer = 100, LayerParameter
name = 1 / type = 2 / blobs = 7; BlobProto num/channels/height/width = 1..4,
data = 5, shape = 7 with BlobShape.dim = 1).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import numpy as np
import torch

V1_CONVOLUTION, V1_DATA, V1_POOLING, V1_RELU = 4, 5, 17, 18


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field_varint(number: int, value: int) -> bytes:
    return tag(number, 0) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def blob_v1(array: np.ndarray, *, packed: bool = True) -> bytes:
    """Old BlobProto: 4-D num/channels/height/width (vectors as 1x1x1xN)."""
    shape = (1,) * (4 - array.ndim) + tuple(array.shape)
    out = b"".join(field_varint(n, d) for n, d in zip((1, 2, 3, 4), shape))
    data = np.ascontiguousarray(array, dtype="<f4").ravel()
    if packed:
        out += field_bytes(5, data.tobytes())
    else:
        out += b"".join(tag(5, 5) + struct.pack("<f", v) for v in data.tolist())
    return out


def blob_v2(array: np.ndarray, *, double: bool = False) -> bytes:
    """New BlobProto: shape = 7 { dim = 1 packed }, data = 5 (or double_data = 8)."""
    dims = b"".join(varint(d) for d in array.shape)
    out = field_bytes(7, field_bytes(1, dims))
    if double:
        out += field_bytes(8, np.ascontiguousarray(array, dtype="<f8").tobytes())
    else:
        out += field_bytes(5, np.ascontiguousarray(array, dtype="<f4").tobytes())
    return out


def layer_v1(
    name: str, layer_type: int, blobs: Sequence[np.ndarray] = (), *, packed: bool = True, hole: int = 0
) -> bytes:
    out = field_bytes(4, name.encode()) + field_varint(5, layer_type)
    out += field_bytes(2, b"data")  # bottom
    if hole:  # the DeepLab fork's ConvolutionParameter.hole = 17, inside convolution_param = 10
        out += field_bytes(10, field_varint(1, 1) + field_varint(17, hole))
    return out + b"".join(field_bytes(6, blob_v1(b, packed=packed)) for b in blobs)


def layer_v2(name: str, layer_type: str, blobs: Sequence[np.ndarray] = (), *, double: bool = False) -> bytes:
    out = field_bytes(1, name.encode()) + field_bytes(2, layer_type.encode())
    return out + b"".join(field_bytes(7, blob_v2(b, double=double)) for b in blobs)


def layers_from_state_dict(state: Mapping[str, torch.Tensor], *, rename: Mapping[str, str] | None = None):
    """[(layer name, [weight, bias])] in state-dict order, as numpy float32."""
    rename = dict(rename or {})
    layers: dict[str, list[np.ndarray]] = {}
    for key, tensor in state.items():
        module = key.rsplit(".", 1)[0]
        layers.setdefault(rename.get(module, module), []).append(tensor.detach().numpy().astype(np.float32))
    return list(layers.items())


def encode_net(
    layers: Sequence[tuple[str, Sequence[np.ndarray]]],
    *,
    schema: str = "V1",
    packed: bool = True,
    double: bool = False,
    net_name: str = "deeplab",
) -> bytes:
    """A NetParameter with a data layer, every weighted layer (+ ReLU/pool layers without blobs)."""
    out = field_bytes(1, net_name.encode())
    if schema == "V1":
        out += field_bytes(2, layer_v1("data", V1_DATA))
        for name, blobs in layers:
            out += field_bytes(
                2, layer_v1(name, V1_CONVOLUTION, blobs, packed=packed, hole=2 if name.startswith("conv5") else 0)
            )
            out += field_bytes(2, layer_v1(f"relu_{name}", V1_RELU))
        out += field_bytes(2, layer_v1("pool1", V1_POOLING))
    elif schema == "V2":
        out += field_bytes(100, layer_v2("data", "Input"))
        for name, blobs in layers:
            out += field_bytes(100, layer_v2(name, "Convolution", blobs, double=double))
            out += field_bytes(100, layer_v2(f"relu_{name}", "ReLU"))
    else:
        raise ValueError(f"schema: expected 'V1' or 'V2', got {schema!r}")
    return out
