"""A minimal reader of the protobuf wire format (no schema, no generated classes).

Enough to walk a ``.caffemodel``: varints, 64-bit and 32-bit fixed fields,
length-delimited fields (sub-messages, strings, packed repeated scalars).
Offsets in errors are absolute byte offsets into the buffer being decoded, so
an error on a truncated file says where the file stops making sense.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
WIRE_TYPE_NAMES = {0: "varint", 1: "fixed64", 2: "length-delimited", 3: "start-group", 4: "end-group", 5: "fixed32"}
_MAX_VARINT_BYTES = 10


class WireFormatError(ValueError):
    """The bytes are not valid protobuf wire format; ``offset`` is where decoding failed."""

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(f"{message} (byte offset {offset})")
        self.offset = offset
        self.reason = message


@dataclass(frozen=True)
class Field:
    """One decoded field. ``value`` is an int (varint, fixed32/64 as raw unsigned) or,
    for length-delimited fields, ``None`` with the payload at ``buf[start:end]``."""

    number: int
    wire_type: int
    value: int | None
    start: int  # payload start (length-delimited) or field value start
    end: int  # payload end (exclusive)
    offset: int  # where the field's tag starts


def read_varint(buf: memoryview | bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireFormatError("truncated varint", offset=start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if pos - start >= _MAX_VARINT_BYTES:
            raise WireFormatError("varint longer than 10 bytes", offset=start)


def read_field(buf: memoryview | bytes, pos: int, end: int) -> Field:
    """Decode the field whose tag starts at ``pos``; the next field starts at ``field.end``."""
    tag_offset = pos
    tag, pos = read_varint(buf, pos, end)
    number, wire_type = tag >> 3, tag & 7
    if number == 0:
        raise WireFormatError("field number 0 is invalid", offset=tag_offset)
    if wire_type == VARINT:
        value, new_pos = read_varint(buf, pos, end)
        return Field(number, wire_type, value, pos, new_pos, tag_offset)
    if wire_type in (FIXED64, FIXED32):
        size = 8 if wire_type == FIXED64 else 4
        if pos + size > end:
            raise WireFormatError(
                f"truncated {WIRE_TYPE_NAMES[wire_type]} field {number}: needs {size} bytes, {end - pos} left",
                offset=pos,
            )
        value = int.from_bytes(bytes(buf[pos : pos + size]), "little")
        return Field(number, wire_type, value, pos, pos + size, tag_offset)
    if wire_type == LENGTH_DELIMITED:
        length, pos = read_varint(buf, pos, end)
        if pos + length > end:
            raise WireFormatError(
                f"truncated length-delimited field {number}: declares {length} bytes, {end - pos} left",
                offset=pos,
            )
        return Field(number, wire_type, None, pos, pos + length, tag_offset)
    raise WireFormatError(
        f"unsupported wire type {wire_type} ({WIRE_TYPE_NAMES.get(wire_type, 'unknown')}) for field {number}",
        offset=tag_offset,
    )


def iter_fields(buf: memoryview | bytes, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """Yield the fields of the message in ``buf[start:end]`` in file order."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        field = read_field(buf, pos, end)
        yield field
        pos = field.end


def decode_string(buf: memoryview | bytes, field: Field) -> str:
    """A length-delimited field as UTF-8 text."""
    try:
        return bytes(buf[field.start : field.end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"field {field.number} is not UTF-8 text: {exc}", offset=field.start) from exc


def decode_packed_varints(buf: memoryview | bytes, field: Field) -> list[int]:
    """A packed repeated varint field (e.g. ``repeated int64 dim [packed = true]``)."""
    values = []
    pos = field.start
    while pos < field.end:
        value, pos = read_varint(buf, pos, field.end)
        values.append(value)
    return values


def decode_packed_fixed(buf: memoryview | bytes, field: Field, *, dtype: str) -> np.ndarray:
    """A packed repeated ``float`` (dtype ``'<f4'``) or ``double`` (``'<f8'``) field, zero-copy."""
    itemsize = np.dtype(dtype).itemsize
    length = field.end - field.start
    if length % itemsize:
        raise WireFormatError(
            f"packed field {field.number}: {length} bytes is not a multiple of {itemsize}", offset=field.start
        )
    return np.frombuffer(buf, dtype=dtype, count=length // itemsize, offset=field.start)


def decode_unpacked_fixed_run(buf: memoryview | bytes, field: Field, *, end: int, dtype: str) -> tuple[np.ndarray, int]:
    """Collect a run of consecutive non-packed entries of the same fixed32/fixed64 field.

    Old writers may emit ``repeated float data`` unpacked: one tag + 4 bytes per value.
    Instead of a Python loop over millions of fields, the run is found with numpy:
    entries are equally spaced, so the run ends at the first entry whose tag differs.
    Returns (values, position after the run).
    """
    itemsize = np.dtype(dtype).itemsize
    tag = bytes(buf[field.offset : field.start])
    stride = len(tag) + itemsize
    available = (end - field.offset) // stride
    raw = np.frombuffer(buf, dtype=np.uint8, count=available * stride, offset=field.offset).reshape(available, stride)
    tags_match = np.all(raw[:, : len(tag)] == np.frombuffer(tag, dtype=np.uint8), axis=1)
    count = int(np.argmin(tags_match)) if not tags_match.all() else available
    values = np.ascontiguousarray(raw[:count, len(tag) :]).view(dtype).reshape(count)
    return values, field.offset + count * stride
