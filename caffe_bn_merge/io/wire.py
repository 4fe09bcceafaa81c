"""Protobuf wire format, just enough to walk a caffemodel without building its objects.

A caffemodel is one `NetParameter` whose bulk is packed float arrays. Walking its records at the
wire level lets us copy untouched layers verbatim and expose blob payloads as zero-copy numpy
views; the small non-blob part of a layer is still parsed with the schema (`proto`).
"""

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InputError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
_FIXED_SIZE = {FIXED64: 8, FIXED32: 4}


@dataclass(frozen=True)
class Field:
    """One field record: its number, wire type, and byte spans of the whole record and the value."""

    number: int
    wire_type: int
    start: int
    value_start: int
    end: int
    value: int = 0  # the decoded integer for VARINT fields


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; return (value, position after it)."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise WireError("truncated or malformed varint")


class WireError(InputError):
    """The bytes are not a well-formed protobuf message."""


def iter_fields(buf: memoryview, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """Yield the field records of the message stored in buf[start:end]."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, value_start = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value = 0
        if wire_type == VARINT:
            value, value_end = read_varint(buf, value_start, end)
        elif wire_type == LENGTH:
            length, value_start = read_varint(buf, value_start, end)
            value_end = value_start + length
        elif wire_type in _FIXED_SIZE:
            value_end = value_start + _FIXED_SIZE[wire_type]
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if value_end > end:
            raise WireError("a field runs past the end of its message (truncated file?)")
        yield Field(number, wire_type, pos, value_start, value_end, value)
        pos = value_end


def encode_varint(value: int) -> bytes:
    """Encode a non-negative int as a base-128 varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_length_delimited(number: int, payload: bytes | memoryview) -> bytes:
    """Key and length of a LENGTH field; the caller writes `payload` right after (no copy here)."""
    return encode_length_header(number, len(payload))


def encode_length_header(number: int, size: int) -> bytes:
    """Key and length of a LENGTH field of `size` bytes."""
    return encode_varint(number << 3 | LENGTH) + encode_varint(size)


def encode_varint_field(number: int, value: int) -> bytes:
    """A whole VARINT field record."""
    return encode_varint(number << 3 | VARINT) + encode_varint(value)
