"""Native checkpoints: the record, strict loading, the digest, local and S3 round trips."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import pipeline
from pipeline.constants import MEAN_BGR, VOC_CLASSES, voc_palette
from pipeline.weights import (
    DEMO_CHECKPOINT,
    METADATA_KEY,
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumError,
    ModelRecord,
    RecordError,
    checkpoint_sha256,
    file_sha256,
    load_checkpoint,
    read_record,
    resolve_classes,
    save_checkpoint,
    tensors_sha256,
)
from tests.weights.helpers import SMALL_WIDTH, make_small_model


def small_record(**changes) -> ModelRecord:
    fields = dict(
        variant="largefov",
        num_classes=21,
        width=SMALL_WIDTH,
        class_names=VOC_CLASSES,
        palette=voc_palette(21),
        source="test",
        reference_metric={"split": "voc12-val", "miou": 0.5},
        notes="random weights",
    )
    return ModelRecord(**{**fields, **changes})


def write_raw(path: Path, tensors: dict, record: ModelRecord | dict | None) -> Path:
    """A safetensors file written directly (bypassing save_checkpoint's checks)."""
    metadata = None
    if record is not None:
        text = record.to_json() if isinstance(record, ModelRecord) else json.dumps(record)
        metadata = {METADATA_KEY: text}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------ the record


def test_record_defaults_and_json_round_trip():
    record = small_record()
    assert record.mean_bgr == MEAN_BGR and record.channel_order == "BGR" and record.input_size == 513
    assert isinstance(record.class_names, tuple) and record.palette[15] == (192, 128, 128)
    assert ModelRecord.from_json(record.to_json()) == record
    assert json.loads(record.to_json())["palette"][1] == [128, 0, 0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variant": "resnet"}, "ModelRecord.variant: expected one of"),
        ({"num_classes": 0}, "ModelRecord.num_classes: expected a positive int, got 0"),
        ({"width": 2.0}, r"ModelRecord.width: expected a number in \(0, 1\], got 2.0"),
        ({"class_names": VOC_CLASSES[:20]}, "ModelRecord.class_names: expected 21 names .num_classes., got '20 names'"),
        ({"class_names": ("a",) * 21}, r"ModelRecord.class_names: expected unique names, got \"duplicates \['a'\]\""),
        ({"palette": voc_palette(20)}, "ModelRecord.palette: expected 21 colours"),
        (
            {"palette": [(0, 0, 256)] * 21},
            r"ModelRecord.palette\[0\]: expected an \(R, G, B\) triple of ints in 0..255",
        ),
        ({"mean_bgr": (1.0, 2.0)}, r"ModelRecord.mean_bgr: expected three finite numbers"),
        ({"channel_order": "bgr"}, r"ModelRecord.channel_order: expected one of \('BGR', 'RGB'\), got 'bgr'"),
        ({"input_size": 512}, r"ModelRecord.input_size: expected a positive int of the form 8k\+1"),
        ({"sha256": "abc"}, "ModelRecord.sha256: expected None or 64 lower-case hex digits, got 'abc'"),
        ({"reference_metric": {"miou": [1]}}, "ModelRecord.reference_metric: expected values that are strings"),
        ({"created": "yesterday"}, "ModelRecord.created: expected None or an ISO-8601 time stamp"),
        ({"format_version": 99}, "a newer deeplab-batch wrote this checkpoint"),
    ],
)
def test_record_validation_names_field_expected_and_actual(changes, message):
    with pytest.raises(RecordError, match=message):
        small_record(**changes)


def test_record_from_dict_rejects_unknown_and_missing_fields():
    data = small_record().to_dict()
    with pytest.raises(RecordError, match=r"unknown fields \['colour'\]"):
        ModelRecord.from_dict({**data, "colour": 1})
    del data["palette"]
    with pytest.raises(RecordError, match=r"missing required fields \['palette'\]"):
        ModelRecord.from_dict(data)


def test_resolve_classes(tmp_path):
    assert resolve_classes("voc")[0] == VOC_CLASSES
    assert resolve_classes(None, num_classes=2) == (("class_0", "class_1"), ((0, 0, 0), (128, 0, 0)))
    path = tmp_path / "classes.txt"
    path.write_text("background\nroad 128 64 128  # colour given\n\ncar\n")
    names, palette = resolve_classes(path, num_classes=3)
    assert names == ("background", "road", "car") and palette == ((0, 0, 0), (128, 64, 128), (0, 128, 0))
    with pytest.raises(ValueError, match=r"classes.txt: expected 4 classes \(num_classes\), got 3"):
        resolve_classes(path, num_classes=4)
    path.write_text("road 1 2\n")
    with pytest.raises(ValueError, match=r"classes.txt:1: expected 'name' or 'name R G B'"):
        resolve_classes(path)
    with pytest.raises(FileNotFoundError, match="nope.txt: not found"):
        resolve_classes(tmp_path / "nope.txt")


def test_demo_checkpoint_location():
    assert DEMO_CHECKPOINT == Path(pipeline.__file__).parent / "assets" / "demo" / "model.safetensors"


# ------------------------------------------------------------------ the digest


def test_tensors_sha256_follows_its_documented_definition(small_model):
    state = small_model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}\0F32\0{','.join(map(str, tensor.shape))}\0".encode())
        digest.update(tensor.numpy().astype("<f4").tobytes())
    assert tensors_sha256(state) == digest.hexdigest()
    state["fc8.bias"] = state["fc8.bias"].clone()
    state["fc8.bias"][0] += 1e-6
    assert tensors_sha256(state) != digest.hexdigest()


# ------------------------------------------------------------------ local files


def test_save_load_round_trip(tmp_path, small_model):
    path = tmp_path / "sub" / "model.safetensors"
    written = save_checkpoint(path, model=small_model, record=small_record())
    assert written.sha256 == tensors_sha256(small_model.state_dict()) and written.created
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary file left
    model, record = load_checkpoint(path)
    assert record == written == read_record(path)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).device.type == "cpu"
    for key, value in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert checkpoint_sha256(path) == written.sha256
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    # Overwriting keeps a single, complete file.
    save_checkpoint(path, model=make_small_model("largefov", seed=1), record=small_record())
    assert load_checkpoint(path)[1].sha256 != written.sha256


def test_save_refuses_a_model_that_disagrees_with_its_record(tmp_path, small_model):
    with pytest.raises(CheckpointError, match=r"record.num_classes is 5 but the model's is 21"):
        save_checkpoint(
            tmp_path / "m.safetensors",
            model=small_model,
            record=small_record(num_classes=5, class_names=VOC_CLASSES[:5], palette=voc_palette(5)),
        )
    assert not (tmp_path / "m.safetensors").exists()


def test_strict_loading_names_missing_unexpected_and_mis_shaped_keys(tmp_path, small_model):
    tensors = dict(small_model.state_dict())
    del tensors["fc7.bias"]
    tensors["fc9.weight"] = torch.zeros(1)
    tensors["fc8.weight"] = torch.zeros(20, 128, 1, 1)
    path = write_raw(tmp_path / "m.safetensors", tensors, small_record())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "m.safetensors" in message
    assert "missing keys ['fc7.bias']" in message
    assert "unexpected keys ['fc9.weight']" in message
    assert "fc8.weight: expected (21, 128, 1, 1), got (20, 128, 1, 1)" in message


def test_checksum_mismatch_is_an_error(tmp_path, small_model):
    other = make_small_model("largefov", seed=3).state_dict()
    record = small_record(sha256=tensors_sha256(other))
    path = write_raw(tmp_path / "m.safetensors", dict(small_model.state_dict()), record)
    with pytest.raises(ChecksumError, match=r"m.safetensors: tensors sha256 is [0-9a-f]{64}, the record says"):
        load_checkpoint(path)
    model, loaded = load_checkpoint(path, verify=False)
    assert loaded.sha256 == record.sha256


def test_record_without_checksum_gets_one_on_load(tmp_path, small_model):
    path = write_raw(tmp_path / "m.safetensors", dict(small_model.state_dict()), small_record())
    assert read_record(path).sha256 is None
    assert load_checkpoint(path)[1].sha256 == tensors_sha256(small_model.state_dict())


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nope.safetensors: not found; .*make demo-model.*convert-caffe"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "nope.safetensors")


def test_foreign_files_are_rejected_without_unpickling(tmp_path, small_model):
    pth = tmp_path / "model.pth"
    torch.save(small_model.state_dict(), pth)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint; convert .caffemodel files"):
        load_checkpoint(pth)
    plain = write_raw(tmp_path / "plain.safetensors", dict(small_model.state_dict()), None)
    with pytest.raises(CheckpointError, match="without a 'deeplab_v1.record' record"):
        load_checkpoint(plain)
    broken = write_raw(tmp_path / "broken.safetensors", {"x": torch.zeros(2)}, {"variant": "largefov"})
    with pytest.raises(CheckpointError, match=r"invalid record .*missing required fields"):
        load_checkpoint(broken)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, model=small_model, record=small_record())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated.safetensors: corrupt safetensors file"):
        load_checkpoint(truncated)


@pytest.mark.parametrize("variant", ["msc-largefov", "7x7"])
def test_other_variants_round_trip(tmp_path, variant):
    original = make_small_model(variant, num_classes=2)
    names, palette = resolve_classes(None, num_classes=2)
    record = small_record(variant=variant, num_classes=2, class_names=names, palette=palette)
    save_checkpoint(tmp_path / "m.safetensors", model=original, record=record)
    model, loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.variant == variant and type(model) is type(original)
    x = torch.randn(1, 3, 25, 25)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


# ------------------------------------------------------------------ S3 (real moto server)


@pytest.mark.s3
def test_s3_round_trip_with_endpoint_from_the_environment(s3_bucket, small_model):
    """How jobs reach S3: endpoint and credentials from the environment (set by ``s3_server``), a bare URI."""
    uri = f"s3://{s3_bucket}/models/small.safetensors"
    written = save_checkpoint(uri, model=small_model, record=small_record())
    assert read_record(uri) == written
    model, record = load_checkpoint(uri)
    assert record == written and checkpoint_sha256(uri) == written.sha256
    for key, value in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(CheckpointNotFoundError, match="absent.safetensors: not found"):
        load_checkpoint(f"s3://{s3_bucket}/models/absent.safetensors")


@pytest.mark.s3
def test_s3_with_explicit_storage_options(s3_server, s3_bucket, small_model):
    options = {
        "endpoint_url": s3_server["endpoint_url"],
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
    }
    uri = f"s3://{s3_bucket}/explicit.safetensors"
    written = save_checkpoint(uri, model=small_model, record=small_record(), storage_options=options)
    assert load_checkpoint(uri, storage_options=options)[1] == written
