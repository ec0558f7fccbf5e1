"""Native checkpoints: safetensors tensors plus a :class:`ModelRecord`, in one file.

A checkpoint is a ``.safetensors`` file whose tensors are the float32 state dict
of :func:`pipeline.model.deeplab_v1` (Caffe layer names, ``conv1_1.weight`` ...)
and whose header metadata holds one key, ``deeplab_v1.record``: the record as
JSON. The record carries everything needed to use the weights (variant, class
names, palette, mean, channel order, input size) and their provenance (source,
checksum, reference metric), so no second configuration field can disagree.

``sha256`` is the digest of the tensors, not of the file (the file contains the
record, which contains the digest): :func:`tensors_sha256` defines it.
Loading never unpickles anything; it is strict about names and shapes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError

from pipeline.constants import (
    CHANNEL_ORDER,
    DEFAULT_INPUT_SIZE,
    MEAN_BGR,
    OUTPUT_STRIDE,
    VOC_CLASSES,
    voc_palette,
)
from pipeline.io.uris import write_bytes_atomic
from pipeline.model import VARIANTS, DeepLabV1, deeplab_v1

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo" / "model.safetensors"
METADATA_KEY = "deeplab_v1.record"
FORMAT_VERSION = 1
CHANNEL_ORDERS = ("BGR", "RGB")
# safetensors header: 8-byte little-endian length, then that many bytes of JSON.
_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_HOW_TO_GET_ONE = (
    "create it with `make demo-model` (deeplab-batch make-demo) for the bundled demo model, "
    "`deeplab-batch convert-caffe MODEL.caffemodel OUT --variant largefov` for the authors' weights, "
    "or `deeplab-batch convert-torchvision vgg16.pth OUT --variant largefov` for an ImageNet initialisation"
)


class RecordError(ValueError):
    """A model record field is invalid; the message names the field, expected and actual value."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match its record / the model."""


class ChecksumError(CheckpointError):
    """The tensors' digest differs from the ``sha256`` stored in the record."""


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint at the given path; the message says how to create one."""


# --------------------------------------------------------------------------- record


def _fail(field: str, expected: str, actual: Any) -> RecordError:
    return RecordError(f"ModelRecord.{field}: expected {expected}, got {actual!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """What a set of weights is and how to feed it; travels inside the checkpoint.

    ``width`` is the channel multiplier of :func:`~pipeline.model.deeplab_v1`
    (1.0 for real models). ``mean_bgr`` is subtracted from 0..255 pixels in
    ``channel_order``. ``input_size`` is the square side (8k+1) images are padded
    to. ``sha256`` is :func:`tensors_sha256` of the weights (filled in by
    :func:`save_checkpoint`). ``reference_metric`` is e.g.
    ``{"split": "voc12-val", "miou": 0.6225}`` or ``None``. ``created`` is an
    ISO-8601 UTC time stamp (filled in on save when empty).
    """

    variant: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    width: float = 1.0
    mean_bgr: tuple[float, float, float] = MEAN_BGR
    channel_order: str = CHANNEL_ORDER
    input_size: int = DEFAULT_INPUT_SIZE
    source: str = ""
    sha256: str | None = None
    reference_metric: dict[str, Any] | None = None
    created: str | None = None
    notes: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists to tuples once, here
        if self.variant not in VARIANTS:
            raise _fail("variant", f"one of {VARIANTS}", self.variant)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise _fail("num_classes", "a positive int", self.num_classes)
        if isinstance(self.width, bool) or not isinstance(self.width, int | float) or not 0 < self.width <= 1:
            raise _fail("width", "a number in (0, 1]", self.width)
        set_(self, "width", float(self.width))

        if isinstance(self.class_names, str) or not isinstance(self.class_names, Sequence):
            raise _fail("class_names", "a sequence of strings", self.class_names)
        names = tuple(self.class_names)
        if len(names) != self.num_classes:
            raise _fail("class_names", f"{self.num_classes} names (num_classes)", f"{len(names)} names")
        if not all(isinstance(n, str) and n for n in names):
            raise _fail("class_names", "non-empty strings", names)
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise _fail("class_names", "unique names", f"duplicates {duplicates}")
        set_(self, "class_names", names)

        if isinstance(self.palette, str) or not isinstance(self.palette, Sequence):
            raise _fail("palette", "a sequence of (R, G, B) triples", self.palette)
        palette = []
        for i, colour in enumerate(self.palette):
            if (
                isinstance(colour, str)
                or not isinstance(colour, Sequence)
                or len(colour) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)
            ):
                raise _fail(f"palette[{i}]", "an (R, G, B) triple of ints in 0..255", colour)
            palette.append(tuple(colour))
        if len(palette) != self.num_classes:
            raise _fail("palette", f"{self.num_classes} colours (num_classes)", f"{len(palette)} colours")
        set_(self, "palette", tuple(palette))

        mean = self.mean_bgr
        if (
            isinstance(mean, str)
            or not isinstance(mean, Sequence)
            or len(mean) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in mean)
        ):
            raise _fail("mean_bgr", "three finite numbers (B, G, R)", mean)
        set_(self, "mean_bgr", tuple(float(v) for v in mean))
        if self.channel_order not in CHANNEL_ORDERS:
            raise _fail("channel_order", f"one of {CHANNEL_ORDERS}", self.channel_order)
        size = self.input_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % OUTPUT_STRIDE != 1:
            raise _fail("input_size", f"a positive int of the form {OUTPUT_STRIDE}k+1 (e.g. 321, 513)", size)
        if not isinstance(self.source, str):
            raise _fail("source", "a string", self.source)
        if self.sha256 is not None and (
            not isinstance(self.sha256, str)
            or len(self.sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise _fail("sha256", "None or 64 lower-case hex digits", self.sha256)
        metric = self.reference_metric
        if metric is not None:
            if not isinstance(metric, Mapping) or not all(isinstance(k, str) for k in metric):
                raise _fail("reference_metric", "None or a dict with string keys", metric)
            bad = {k: v for k, v in metric.items() if not (v is None or isinstance(v, str | int | float))}
            if bad:
                raise _fail("reference_metric", "values that are strings, numbers or null", bad)
            set_(self, "reference_metric", dict(metric))
        if self.created is not None:
            if not isinstance(self.created, str):
                raise _fail("created", "None or an ISO-8601 time stamp", self.created)
            try:
                _dt.datetime.fromisoformat(self.created)
            except ValueError:
                raise _fail("created", "None or an ISO-8601 time stamp", self.created) from None
        if not isinstance(self.notes, str):
            raise _fail("notes", "a string", self.notes)
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise _fail("format_version", "an int", self.format_version)
        if not 1 <= self.format_version <= FORMAT_VERSION:
            raise _fail(
                "format_version",
                f"1..{FORMAT_VERSION} (a newer deeplab-batch wrote this checkpoint: upgrade)",
                self.format_version,
            )

    # The record is a plain JSON object; tuples become lists.
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names)
        data["palette"] = [list(c) for c in self.palette]
        data["mean_bgr"] = list(self.mean_bgr)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecord:
        if not isinstance(data, Mapping):
            raise RecordError(f"ModelRecord: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RecordError(f"ModelRecord: unknown fields {unknown}; known fields are {sorted(fields)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise RecordError(f"ModelRecord: missing required fields {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"ModelRecord: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelRecord:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def default_classes(num_classes: int) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and palette when none are given: VOC's for 21 classes, else ``class_0`` ...."""
    names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else tuple(f"class_{i}" for i in range(num_classes))
    return tuple(names), tuple(voc_palette(num_classes))


def resolve_classes(
    spec: str | os.PathLike | None, *, num_classes: int | None = None
) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and palette from ``--classes``: ``voc``, a text file, or ``None`` (defaults).

    A classes file has one class per line, ``name`` or ``name R G B`` (0..255);
    blank lines and ``#`` comments are skipped. Classes without a colour take the
    VOC palette entry of their index. ``num_classes``, when given, must agree.
    """
    if spec is None:
        if num_classes is None:
            raise ValueError("classes: give --classes or --num-classes")
        return default_classes(num_classes)
    if str(spec) == "voc":
        names, palette = tuple(VOC_CLASSES), tuple(voc_palette(len(VOC_CLASSES)))
        where = "--classes voc"
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"classes file {path}: not found (expected 'voc' or a text file)")
        names_list: list[str] = []
        colours: list[tuple[int, int, int]] = []
        default_palette = voc_palette(256)
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) == 1:
                colour = default_palette[len(names_list) % 256]
            elif len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts[1:]):
                colour = tuple(int(p) for p in parts[1:])
            else:
                raise ValueError(f"{path}:{lineno}: expected 'name' or 'name R G B' (0..255), got {line!r}")
            names_list.append(parts[0])
            colours.append(colour)
        names, palette = tuple(names_list), tuple(colours)
        where = f"classes file {path}"
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{where}: expected {num_classes} classes (num_classes), got {len(names)}")
    return names, palette


# --------------------------------------------------------------------------- tensors


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The checkpoint digest: SHA-256 over the tensors in sorted-name order.

    For each name (sorted by code point) the hash is fed
    ``name + "\\0" + dtype + "\\0" + shape + "\\0"`` (UTF-8; dtype as safetensors
    spells it, e.g. ``F32``; shape as decimal sizes joined by ``,``) followed by
    the tensor's bytes in C order, little-endian. It does not depend on the
    record, the safetensors header layout or the file name.
    """
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("tensors_sha256 assumes a little-endian host")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {name}: expected a floating dtype {list(_DTYPE_NAMES)}, got {tensor.dtype}")
        shape = ",".join(str(s) for s in tensor.shape)
        digest.update(f"{name}\0{_DTYPE_NAMES[tensor.dtype]}\0{shape}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def expected_shapes(*, variant: str, num_classes: int, width: float = 1.0) -> dict[str, torch.Size]:
    """Names and shapes of the state dict of ``deeplab_v1(variant, ...)`` (built on the meta device)."""
    with torch.device("meta"):
        model = deeplab_v1(variant, num_classes=num_classes, width=width)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def check_state_dict(
    tensors: Mapping[str, torch.Tensor | torch.Size | Sequence[int]],
    *,
    expected: Mapping[str, torch.Size],
    where: str,
) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    misshaped = []
    for name, shape in expected.items():
        if name in tensors:
            value = tensors[name]
            actual = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
            if actual != tuple(shape):
                misshaped.append(f"{name}: expected {tuple(shape)}, got {actual}")
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append("mis-shaped keys [" + "; ".join(misshaped) + "]")
    if problems:
        raise CheckpointError(f"{where}: " + ", ".join(problems))


# --------------------------------------------------------------------------- files


def _fs_and_path(
    path_or_uri: str | os.PathLike, storage_options: Mapping[str, Any] | None
) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(os.fspath(path_or_uri), **dict(storage_options or {}))


def _not_found(path_or_uri: str | os.PathLike) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(f"checkpoint {os.fspath(path_or_uri)}: not found; {_HOW_TO_GET_ONE}")


def _parse_header(head: bytes, *, size: int, where: str) -> ModelRecord | None:
    """The record (or None if the file has none) from the first bytes of a safetensors file."""
    hint = (
        "not a safetensors checkpoint; convert .caffemodel files with `deeplab-batch convert-caffe` "
        "and torchvision .pth files with `deeplab-batch convert-torchvision`"
    )
    if len(head) < _HEADER_LENGTH_BYTES:
        raise CheckpointError(f"{where}: {hint} (only {size} bytes)")
    (length,) = struct.unpack("<Q", head[:_HEADER_LENGTH_BYTES])
    if length > min(_MAX_HEADER_BYTES, size - _HEADER_LENGTH_BYTES):
        raise CheckpointError(f"{where}: {hint} (header length {length} does not fit in {size} bytes)")
    raw = head[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length]
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: {hint} (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: {hint} (header is a {type(header).__name__}, expected an object)")
    metadata = header.get("__metadata__") or {}
    if METADATA_KEY not in metadata:
        return None
    try:
        return ModelRecord.from_json(metadata[METADATA_KEY])
    except RecordError as exc:
        raise CheckpointError(f"{where}: invalid record in header metadata {METADATA_KEY!r}: {exc}") from exc


def _read_head(f: Any, *, size: int) -> bytes:
    """The length prefix and JSON header of an open safetensors file (at most ``_MAX_HEADER_BYTES``)."""
    head = f.read(_HEADER_LENGTH_BYTES)
    if len(head) == _HEADER_LENGTH_BYTES:
        (length,) = struct.unpack("<Q", head)
        if length <= min(_MAX_HEADER_BYTES, size - _HEADER_LENGTH_BYTES):
            head += f.read(length)
    return head


def read_record(path_or_uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> ModelRecord:
    """Read only the record (the safetensors header), not the tensors: cheap, also on S3.

    The returned ``sha256`` is the stored one, not verified (see :func:`load_checkpoint`).
    """
    where = os.fspath(path_or_uri)
    fs, path = _fs_and_path(path_or_uri, storage_options)
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            head = _read_head(f, size=size)
    except FileNotFoundError:
        raise _not_found(path_or_uri) from None
    record = _parse_header(head, size=size, where=where)
    if record is None:
        raise CheckpointError(f"{where}: safetensors file without a {METADATA_KEY!r} record in its header metadata")
    return record


def _read_tensors(
    path_or_uri: str | os.PathLike, storage_options: Mapping[str, Any] | None
) -> tuple[ModelRecord, dict[str, torch.Tensor]]:
    where = os.fspath(path_or_uri)
    fs, path = _fs_and_path(path_or_uri, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):  # memory-mapped by safetensors below
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = _read_head(f, size=size)
            data = None
        else:
            with fs.open(path, "rb") as f:
                data = f.read()
            size, head = len(data), data
    except FileNotFoundError:
        raise _not_found(path_or_uri) from None
    record = _parse_header(head, size=size, where=where)
    if record is None:
        raise CheckpointError(f"{where}: safetensors file without a {METADATA_KEY!r} record in its header metadata")
    try:
        tensors = safetensors.torch.load_file(path) if data is None else safetensors.torch.load(data)
    except SafetensorError as exc:
        raise CheckpointError(f"{where}: corrupt safetensors file: {exc}") from exc
    return record, tensors


def load_checkpoint(
    path_or_uri: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[DeepLabV1, ModelRecord]:
    """Load a checkpoint from a local path or an fsspec URI (``s3://...``).

    Returns ``(model.eval(), record)``. The state dict must match the record's
    variant / num_classes / width exactly (errors name the keys). With
    ``verify`` the tensors' digest is recomputed and must equal the stored
    ``sha256`` (a record without one gets it filled in).
    """
    where = os.fspath(path_or_uri)
    record, tensors = _read_tensors(path_or_uri, storage_options)
    expected = expected_shapes(variant=record.variant, num_classes=record.num_classes, width=record.width)
    check_state_dict(tensors, expected=expected, where=where)
    if verify:
        digest = tensors_sha256(tensors)
        if record.sha256 is None:
            record = record.replace(sha256=digest)
        elif digest != record.sha256:
            raise ChecksumError(
                f"{where}: tensors sha256 is {digest}, the record says {record.sha256}; "
                "the file was modified or corrupted, convert or download it again"
            )
    with torch.device("meta"):
        model = deeplab_v1(record.variant, num_classes=record.num_classes, width=record.width)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return model.to(map_location).eval(), record


def checkpoint_sha256(path_or_uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """:func:`tensors_sha256` of the tensors stored in a checkpoint (equals a valid record's ``sha256``)."""
    _, tensors = _read_tensors(path_or_uri, storage_options)
    return tensors_sha256(tensors)


def file_sha256(path_or_uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints); used to record a conversion's source."""
    fs, path = _fs_and_path(path_or_uri, storage_options)
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(
    path_or_uri: str | os.PathLike,
    *,
    model: torch.nn.Module,
    record: ModelRecord,
    storage_options: Mapping[str, Any] | None = None,
) -> ModelRecord:
    """Write ``model``'s weights and ``record`` to one safetensors file; return the record written.

    The record's ``sha256`` is (re)computed from the tensors and ``created`` is
    set when empty. Local paths are written atomically (temporary file in the
    same directory, then rename); fsspec URIs with one ``put`` of the bytes.
    """
    where = os.fspath(path_or_uri)
    for attribute in ("variant", "num_classes", "width"):
        value = getattr(model, attribute, getattr(record, attribute))
        if value != getattr(record, attribute):
            raise CheckpointError(
                f"{where}: record.{attribute} is {getattr(record, attribute)!r} but the model's is {value!r}"
            )
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    expected = expected_shapes(variant=record.variant, num_classes=record.num_classes, width=record.width)
    check_state_dict(tensors, expected=expected, where=f"{where} (model to save)")
    record = record.replace(
        sha256=tensors_sha256(tensors),
        created=record.created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    )
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: record.to_json()})
    fs, path = _fs_and_path(path_or_uri, storage_options)
    write_bytes_atomic(fs, path, data)
    return record
