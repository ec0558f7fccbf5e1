"""The .caffemodel importer: files built here with an independent encoder, both schemas."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from jobs import convert_caffe as job
from pipeline.convert import protobuf as pb
from pipeline.convert.caffe import (
    CaffeFormatError,
    ConversionError,
    convert_caffemodel,
    layer_mapping,
    parse_caffemodel,
)
from pipeline.weights import load_checkpoint, tensors_sha256
from tests.weights import caffe_encoder as enc
from tests.weights.helpers import SMALL_WIDTH, make_small_model


def write_caffemodel(path, model, *, rename=None, drop=(), extra=(), **encode_options):
    layers = [
        (name, blobs)
        for name, blobs in enc.layers_from_state_dict(model.state_dict(), rename=rename)
        if name not in drop
    ]
    layers += list(extra)
    path.write_bytes(enc.encode_net(layers, **encode_options))
    return path


def assert_same_state(converted: torch.nn.Module, original: torch.nn.Module) -> None:
    a, b = converted.state_dict(), original.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "encoding",
    [
        {"schema": "V1"},
        {"schema": "V1", "packed": False},
        {"schema": "V2"},
        {"schema": "V2", "double": True},
    ],
    ids=["v1-packed", "v1-unpacked", "v2", "v2-double"],
)
def test_round_trip_is_exact(tmp_path, small_model, encoding):
    path = write_caffemodel(tmp_path / "net.caffemodel", small_model, **encoding)
    model, record = convert_caffemodel(path, variant="largefov")
    assert_same_state(model, small_model)
    assert (record.variant, record.num_classes, record.width) == ("largefov", 21, SMALL_WIDTH)
    assert record.class_names[1] == "aeroplane"  # 21 classes default to VOC
    assert record.sha256 == tensors_sha256(small_model.state_dict())
    assert record.source.startswith("caffe:net.caffemodel sha256=")
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(model(x), small_model(x))


def _conv_relu_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """3x3 conv, pad 1, + ReLU, with plain numpy (C x H x W)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[1:]
    out = np.zeros((weight.shape[0], h, w), dtype=np.float64)
    for dy in range(3):
        for dx in range(3):
            window = padded[:, dy : dy + h, dx : dx + w]
            out += np.einsum("oc,chw->ohw", weight[:, :, dy, dx].astype(np.float64), window)
    return np.maximum(out + bias[:, None, None], 0)


def _pool1_reference(x: np.ndarray) -> np.ndarray:
    """Caffe max pool k3 s2 p1 in ceil mode: out = ceil((n + 2 - 3) / 2) + 1."""
    c, h, w = x.shape
    oh, ow = -(-(h - 1) // 2) + 1, -(-(w - 1) // 2) + 1
    out = np.empty((c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            ys, xs = max(2 * i - 1, 0), max(2 * j - 1, 0)
            out[:, i, j] = x[:, ys : 2 * i + 2, xs : 2 * j + 2].max(axis=(1, 2))
    return out


def test_first_layers_match_a_numpy_reference_on_the_raw_blobs(tmp_path, small_model):
    path = write_caffemodel(tmp_path / "net.caffemodel", small_model, schema="V1")
    blobs = {layer.name: layer.blobs for layer in parse_caffemodel(path.read_bytes()).layers if layer.blobs}
    model, _ = convert_caffemodel(path, variant="largefov")
    captured = {}
    model.pool1.register_forward_hook(lambda module, inputs, output: captured.update(pool1=output))
    x = torch.randn(1, 3, 17, 19, generator=torch.Generator().manual_seed(1)) * 50
    with torch.no_grad():
        model(x)
    w11, b11 = blobs["conv1_1"]
    w12, b12 = blobs["conv1_2"]
    ref = _conv_relu_reference(x[0].double().numpy(), w11, b11.reshape(-1))  # bias stored 1x1x1xN
    ref = _pool1_reference(_conv_relu_reference(ref, w12, b12.reshape(-1)))
    assert captured["pool1"].shape == (1, 8, 9, 10)
    np.testing.assert_allclose(captured["pool1"][0].numpy(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("variant", ["msc-largefov", "deeplab"])
def test_other_variants_round_trip(tmp_path, variant):
    original = make_small_model(variant, num_classes=3)
    path = write_caffemodel(tmp_path / "net.caffemodel", original, schema="V1")
    model, record = convert_caffemodel(path, variant=variant)
    assert record.num_classes == 3 and record.class_names == ("class_0", "class_1", "class_2")
    assert_same_state(model, original)


def test_released_classifier_name_and_explicit_renames(tmp_path):
    original = make_small_model("msc-largefov")
    names = {"fc8": "fc8_voc12", "fc8_data": "score_data", "fc1_pool1": "branch1_pool1"}
    path = write_caffemodel(tmp_path / "net.caffemodel", original, rename=names)
    with pytest.raises(ConversionError, match=r"missing from the file: fc8_data .*fc1_pool1 .*--rename"):
        convert_caffemodel(path, variant="msc-largefov")
    model, _ = convert_caffemodel(
        path, variant="msc-largefov", rename={"score_data": "fc8_data", "branch1_pool1": "fc1_pool1"}
    )
    assert_same_state(model, original)


def test_layer_mapping_is_unambiguous():
    modules = ["conv1_1", "fc8"]
    assert layer_mapping(["conv1_1", "fc8_voc12", "loss"], modules=modules) == {
        "conv1_1": "conv1_1",
        "fc8_voc12": "fc8",
    }
    with pytest.raises(ConversionError, match="'fc8_voc12' and 'x' both map to model layer 'fc8'"):
        layer_mapping(["fc8_voc12", "x"], modules=modules, rename={"x": "fc8"})
    with pytest.raises(ConversionError, match=r"targets \['fc9'\] are not layers"):
        layer_mapping(["x"], modules=modules, rename={"x": "fc9"})


def test_mis_shaped_layer_names_layer_expected_and_actual(tmp_path, small_model):
    state = small_model.state_dict()
    bad = [("conv3_1", [state["conv3_1.weight"][:, :8].numpy(), state["conv3_1.bias"].numpy()])]
    path = write_caffemodel(tmp_path / "net.caffemodel", small_model, drop={"conv3_1"}, extra=bad)
    with pytest.raises(ConversionError) as info:
        convert_caffemodel(path, variant="largefov")
    message = str(info.value)
    assert "net.caffemodel" in message
    assert "layer 'conv3_1' blob weight (conv3_1.weight): expected (32, 16, 3, 3), got (32, 8, 3, 3)" in message


def test_wrong_variant_is_reported_as_fc6_shape(tmp_path, small_model):
    path = write_caffemodel(tmp_path / "net.caffemodel", small_model)
    with pytest.raises(ConversionError, match=r"fc6.weight\): expected \(512, 64, 4, 4\), got \(128, 64, 3, 3\)"):
        convert_caffemodel(path, variant="deeplab")


def test_missing_layer_is_named(tmp_path, small_model):
    path = write_caffemodel(tmp_path / "net.caffemodel", small_model, drop={"fc7"})
    with pytest.raises(ConversionError, match=r"missing from the file: fc7 \(weight \(128, 128, 1, 1\)\)"):
        convert_caffemodel(path, variant="largefov")


def test_missing_bias_blob_is_named(tmp_path, small_model):
    state = small_model.state_dict()
    no_bias = [("conv2_1", [state["conv2_1.weight"].numpy()])]
    path = write_caffemodel(tmp_path / "net.caffemodel", small_model, drop={"conv2_1"}, extra=no_bias)
    with pytest.raises(ConversionError, match=r"layer 'conv2_1': expected 2 blobs \(weight, bias\), got 1"):
        convert_caffemodel(path, variant="largefov")


def test_extra_layers_are_an_error_unless_ignored(tmp_path, small_model, caplog):
    original = make_small_model("msc-largefov")
    path = write_caffemodel(tmp_path / "net.caffemodel", original)
    with pytest.raises(ConversionError, match=r"no place for: \['fc1_data', 'fc2_data', 'fc8_data'.*--variant"):
        convert_caffemodel(path, variant="largefov")
    with caplog.at_level(logging.WARNING, logger="pipeline.convert.caffe"):
        model, _ = convert_caffemodel(path, variant="largefov", allow_extra=True)
    assert "fc1_pool4" in caplog.text
    assert torch.equal(model.fc6.weight, original.fc6.weight)


def test_dilation_is_never_taken_from_the_file(tmp_path, small_model):
    path = write_caffemodel(tmp_path / "net.caffemodel", small_model, schema="V1")  # conv5_* carry hole = 2
    model, _ = convert_caffemodel(path, variant="largefov")
    assert model.fc6.dilation == (12, 12) and model.conv5_1.dilation == (2, 2)


@pytest.mark.parametrize("cut", [0.5, 0.999, 20])
def test_truncated_file_names_file_and_offset(tmp_path, small_model, cut):
    data = enc.encode_net(enc.layers_from_state_dict(small_model.state_dict()))
    size = int(len(data) * cut) if cut < 1 else cut
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:size])
    with pytest.raises(
        CaffeFormatError, match=rf"cut\.caffemodel: truncated or corrupt \.caffemodel at byte offset \d+ of {size}"
    ):
        convert_caffemodel(path, variant="largefov")


def test_not_a_caffemodel(tmp_path):
    path = tmp_path / "empty.caffemodel"
    path.write_bytes(b"")
    with pytest.raises(CaffeFormatError, match="no layers found"):
        convert_caffemodel(path, variant="largefov")
    path.write_bytes(b"\x0f" * 64)  # wire type 7 does not exist
    with pytest.raises(CaffeFormatError, match="unsupported wire type 7"):
        convert_caffemodel(path, variant="largefov")


def test_blob_whose_data_does_not_fill_its_shape(tmp_path):
    blob = enc.field_varint(1, 2) + enc.field_varint(2, 3) + enc.field_bytes(5, np.zeros(5, "<f4").tobytes())
    layer = enc.field_bytes(4, b"conv1_1") + enc.field_bytes(6, blob)
    with pytest.raises(CaffeFormatError, match=r"shape \(2, 3, 1, 1\) needs 6 values, the file has 5"):
        parse_caffemodel(enc.field_bytes(2, layer), where="x.caffemodel")


def test_wire_format_reader_primitives():
    data = enc.varint(2**63 + 5)
    assert pb.read_varint(data, 0, len(data)) == (2**63 + 5, len(data))
    with pytest.raises(pb.WireFormatError, match=r"truncated varint \(byte offset 0\)"):
        pb.read_varint(b"\x80\x80", 0, 2)
    message = enc.field_varint(1, 7) + enc.tag(2, 1) + (3).to_bytes(8, "little") + enc.field_bytes(3, b"abc")
    fields = list(pb.iter_fields(message))
    assert [(f.number, f.wire_type, f.value) for f in fields] == [(1, 0, 7), (2, 1, 3), (3, 2, None)]
    assert pb.decode_string(message, fields[2]) == "abc"
    # An unpacked run ends where the tag changes, even if a value's bytes look like the tag.
    run = b"".join(enc.tag(5, 5) + np.float32(v).tobytes() for v in (1.5, -2.0)) + enc.field_varint(1, 45)
    first = pb.read_field(run, 0, len(run))
    values, end = pb.decode_unpacked_fixed_run(run, first, end=len(run), dtype="<f4")
    assert values.tolist() == [1.5, -2.0] and end == 10


def test_classes_file_sets_names_and_count(tmp_path):
    original = make_small_model("largefov", num_classes=2)
    path = write_caffemodel(tmp_path / "net.caffemodel", original)
    classes = tmp_path / "classes.txt"
    classes.write_text("# two classes\nground\nsky 10 20 30\n")
    _, record = convert_caffemodel(path, variant="largefov", classes=classes)
    assert record.class_names == ("ground", "sky") and record.palette == ((0, 0, 0), (10, 20, 30))
    with pytest.raises(ConversionError, match=r"fc8.weight\): expected \(21, 128, 1, 1\), got \(2, 128, 1, 1\)"):
        convert_caffemodel(path, variant="largefov", classes="voc")


def test_cli_writes_a_loadable_checkpoint(tmp_path, small_model, capsys):
    source = write_caffemodel(tmp_path / "net.caffemodel", small_model, rename={"fc8": "fc8_voc12"})
    out = tmp_path / "models" / "largefov.safetensors"
    argv = [
        str(source),
        str(out),
        "--variant",
        "largefov",
        "--classes",
        "voc",
        "--reference-split",
        "voc12-val",
        "--reference-miou",
        "0.6225",
        "--input-size",
        "321",
    ]
    assert job.main(argv) == 0
    assert "sha256" in capsys.readouterr().out
    model, record = load_checkpoint(out)
    assert_same_state(model, small_model)
    assert record.reference_metric == {"split": "voc12-val", "miou": 0.6225}
    assert record.input_size == 321 and record.channel_order == "BGR"

    source.write_bytes(source.read_bytes()[:1000])
    assert job.main([str(source), str(tmp_path / "bad.safetensors"), "--variant", "largefov"]) == 1
    assert "byte offset" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()
    assert job.main([str(source), str(out), "--variant", "largefov", "--rename", "nonsense"]) == 1
    assert "--rename: expected FILE_NAME=MODEL_NAME" in capsys.readouterr().err
