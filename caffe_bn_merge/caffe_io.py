"""Reading and writing Caffe files: the only module that touches files and protobuf.

- A deploy prototxt is parsed whole into a `NetParameter` (it is small).
- A caffemodel is memory-mapped and walked once at the wire level (`wire`): each layer's blobs
  become read-only numpy views of the file's bytes, and on writing every layer we did not change
  is copied verbatim, so a model where nothing folds comes out byte-identical.
"""

import math
import mmap
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from . import proto, prototxt, wire
from .errors import InputError, OutputError
from .fold_math import ScaledRows
from .streaming import OrderedWriter
from .upgrade import upgrade_layer

# NetParameter field numbers of the two layer lists, and per list (name, blobs) field numbers.
_LAYER_FIELDS = {100: (1, 7), 2: (4, 6)}  # 100: LayerParameter `layer`, 2: V1 `layers`
_BLOB_DIMS, _BLOB_DATA, _BLOB_DOUBLE, _BLOB_SHAPE = (1, 2, 3, 4), 5, 8, 7
_BLOB_RAW_TYPE, _BLOB_RAW = 10, 12  # NVIDIA Caffe: raw bytes of the type named by raw_data_type
MAX_LAYER_RECORDS = 100_000  # real nets have a few thousand at most
MAX_BLOBS, MAX_DIMS = 64, 32  # per layer, per blob shape
_FLOAT32, _FLOAT64, _FLOAT16 = np.dtype("<f4"), np.dtype("<f8"), np.dtype("<f2")
_RAW_TYPES = {0: _FLOAT64, 1: _FLOAT32, 2: _FLOAT16}  # caffe.Type: DOUBLE, FLOAT, FLOAT16


@dataclass
class WeightLayer:
    """A layer's record in the caffemodel: blobs as numpy views, plus how each was stored."""

    name: str
    blobs: list[np.ndarray]
    legacy_shape: list[bool]  # blob stored with num/channels/height/width instead of `shape`


class FoldedLayer(WeightLayer):
    """A layer whose blobs are computed when read: folded weights are not kept in memory."""

    def __init__(self, name: str, make_blobs: Callable[[], tuple[np.ndarray, ...]]) -> None:
        self.name, self._make_blobs = name, make_blobs

    @property
    def blobs(self) -> list[np.ndarray]:
        return [np.asarray(blob) for blob in self._make_blobs()]

    @property
    def legacy_shape(self) -> list[bool]:
        return [False] * len(self.blobs)


@dataclass(frozen=True)
class LayerEdit:
    """New blobs for a layer (made when written, so folded weights are never all held at once;
    `ScaledRows` are computed block by block as they are written), and a change to its
    parameters (applied to both files' copies)."""

    make_blobs: Callable[[], tuple[np.ndarray | ScaledRows, ...]]
    update: Callable[[object], None] = lambda layer: None

    @property
    def blobs(self) -> tuple[np.ndarray | ScaledRows, ...]:
        return self.make_blobs()


@dataclass
class Weights:
    """A caffemodel walked once: its top-level records and, by name, the layers holding blobs."""

    path: Path
    buffer: memoryview
    records: list[wire.Field]
    mapping: mmap.mmap | None = None  # the memory map behind `buffer`
    identity: tuple[int, ...] = ()  # the mapped file's device, inode, size and mtime
    layers: dict[str, WeightLayer] = field(default_factory=dict)
    record_names: list[str | None] = field(default_factory=list)


def read_net(path: Path) -> object:
    """Parse a text-format net (deploy or train_val prototxt) into a NetParameter (`layer` form)."""
    return read_net_text(path).net


def read_net_text(path: Path, schema: prototxt.Schema | None = None) -> prototxt.NetText:
    """Parse a net prototxt, keeping its text and which layers our schema cannot fully read."""
    text = _read_text(path, "--model")
    schema = schema or our_schema()
    try:
        parsed = prototxt.parse_net_text(text, schema)
    except text_format.ParseError as err:
        raise InputError(f"{path}: {_not_a_net(text, err)}") from err
    except (RecursionError, DecodeError) as err:
        raise InputError(f"{path}: nested too deeply or malformed ({type(err).__name__}); not a usable net") from err
    if not parsed.net.layer:
        raise InputError(f"{path}: {_not_a_net(text, None)}")
    if parsed.unknown_fields and parsed.blocks is None:
        raise InputError(
            f"{path}: has fields our schema does not know, and its layout (V1 `layers`, or `layer [...]` "
            "lists) must be written anew, which would drop them: pass the fork's caffe.proto with --caffe-proto"
        )
    return parsed


def our_schema() -> prototxt.Schema:
    return prototxt.Schema(proto.NetParameter, proto.LayerParameter)


def _not_a_net(text: str, err: text_format.ParseError | None) -> str:
    """Why text that does not parse as a net is not one, and what to do."""
    try:
        solver = text_format.Parse(text, proto.SolverParameter(), allow_unknown_field=True)
    except text_format.ParseError:
        solver = None
    if solver is not None and (solver.base_lr or solver.HasField("net") or solver.HasField("train_net")):
        named = solver.net or solver.train_net
        return f"this is a solver file, not a net; pass the net prototxt it names{f' ({named})' if named else ''}"
    if re.search(r"\blayers\s*\{\s*layer\s*\{", text):
        return "this is a V0 net (`layers { layer { ... } }`); upgrade it with Caffe's upgrade_net_proto_text"
    if err is None:
        return "the prototxt defines no layers; is it a net (deploy) prototxt?"
    return f"not a Caffe net prototxt ({err}); check the --model file"


def write_net_text(original: prototxt.NetText, net: object, origin: Sequence[int], path: Path) -> None:
    """Write `net` in the original's text: untouched layers verbatim (`prototxt.render_net_text`)."""
    with atomic_output(path) as handle:
        handle.write(prototxt.render_net_text(original, net, origin).encode("utf-8"))


def _read_text(path: Path, flag: str) -> str:
    """The file as UTF-8 text, without a byte order mark (Caffe's and OpenCV's parsers refuse one,
    so what we write never holds one)."""
    raw = _read_bytes(path, flag)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        hint = " (it looks like a caffemodel: pass it as --weights)" if b"\0" in raw[:4096] else ""
        raise InputError(f"{path}: not a text prototxt{hint}") from err


def _read_bytes(path: Path, flag: str) -> bytes:
    with _reading(path, flag):
        return path.read_bytes()


@contextmanager
def _reading(path: Path, flag: str) -> Iterator[None]:
    """Turn a failure to open or read `path` (given as `flag`) into one clear InputError."""
    try:
        yield
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such file (given as {flag})") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}), given as {flag}") from err


def read_weights(path: Path) -> Weights:
    """Memory-map a caffemodel and index its layers' blobs without copying them."""
    mapping, identity = _map_file(path)
    buffer = memoryview(mapping)
    _refuse_other_formats(path, bytes(buffer[:4096]))
    try:
        weights = Weights(path, buffer, _top_records(buffer), mapping, identity)
        for record in weights.records:
            weights.record_names.append(_index_layer(weights, record))
    except wire.WireError as err:
        raise InputError(f"{path}: not a readable caffemodel ({err}); is the file complete?") from err
    if not weights.layers:
        raise InputError(f"{path}: holds no layers; is it a caffemodel?")
    return weights


_OTHER_FORMATS = (
    (b"version https://git-lfs", "is a Git LFS pointer, not the weights: run `git lfs pull` to fetch them"),
    (b"\x1f\x8b", "is gzip-compressed: gunzip it first"),
    (b"PK\x03\x04", "is a zip archive: unzip it first"),
    (b"\x89HDF", "is an HDF5 file (Caffe's .caffemodel.h5 or Keras), not a protobuf caffemodel"),
)


def _refuse_other_formats(path: Path, head: bytes) -> None:
    for magic, message in _OTHER_FORMATS:
        if head.startswith(magic):
            raise InputError(f"{path}: {message}")
    if head.lstrip().startswith((b"name:", b"layer", b"input", b"#")):
        raise InputError(f"{path}: this is a text prototxt, not a caffemodel: pass it as --model")


def _top_records(buffer: memoryview) -> list[wire.Field]:
    """The NetParameter's layer records, with every run of other fields merged into one span
    (so a hostile file of tiny fields cannot make us hold an object per byte)."""
    records: list[wire.Field] = []
    for record in wire.iter_fields(buffer):
        if record.number in _LAYER_FIELDS and record.wire_type == wire.LENGTH:
            records.append(record)
        elif records and records[-1].number == 0:
            records[-1] = wire.Field(0, -1, records[-1].start, records[-1].start, record.end)
        else:
            records.append(wire.Field(0, -1, record.start, record.start, record.end))
        if len(records) > MAX_LAYER_RECORDS:
            raise wire.WireError(f"more than {MAX_LAYER_RECORDS} layer records")
    return records


def _map_file(path: Path) -> tuple[mmap.mmap, tuple[int, ...]]:
    """The file's memory map, and what identifies the file mapped (`_identity`)."""
    with _reading(path, "--weights"), path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise InputError(f"{path}: the file is empty (given as --weights)")
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), _identity(handle.fileno())


def _identity(fd: int) -> tuple[int, ...]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _index_layer(weights: Weights, record: wire.Field) -> str | None:
    """Record the layer stored in `record` (if it is one); return its name."""
    if record.number not in _LAYER_FIELDS or record.wire_type != wire.LENGTH:
        return None
    name_field, blob_field = _LAYER_FIELDS[record.number]
    name, blobs, legacy = "", [], []
    for item in wire.iter_fields(weights.buffer, record.value_start, record.end):
        if item.number == name_field and item.wire_type == wire.LENGTH:
            name = bytes(weights.buffer[item.value_start : item.end]).decode("utf-8", "replace")
        elif item.number == blob_field and item.wire_type == wire.LENGTH:
            if len(blobs) == MAX_BLOBS:
                raise wire.WireError(f"layer '{name}' has more than {MAX_BLOBS} blobs")
            array, is_legacy = _decode_blob(weights.buffer, item)
            blobs.append(array)
            legacy.append(is_legacy)
    weights.layers[name] = WeightLayer(name, blobs, legacy)
    return name


def _decode_blob(buf: memoryview, record: wire.Field) -> tuple[np.ndarray, bool]:
    """A BlobProto's values as a shaped read-only view, and whether it used the legacy 4-D shape."""
    legacy = [0, 0, 0, 0]
    shape: list[int] | None = None
    chunks: list[np.ndarray] = []
    raw: wire.Field | None = None
    raw_type, unpacked = 1, False
    for item in wire.iter_fields(buf, record.value_start, record.end):
        if item.number in _BLOB_DIMS and item.wire_type == wire.VARINT:
            legacy[_BLOB_DIMS.index(item.number)] = item.value
        elif item.number == _BLOB_SHAPE and item.wire_type == wire.LENGTH:
            shape = _decode_dims(buf, item)
        elif item.number in (_BLOB_DATA, _BLOB_DOUBLE) and item.wire_type == wire.LENGTH:
            chunks.append(_decode_values(buf, item))
        elif item.number in (_BLOB_DATA, _BLOB_DOUBLE):
            unpacked = True
        elif item.number == _BLOB_RAW_TYPE and item.wire_type == wire.VARINT:
            raw_type = item.value
        elif item.number == _BLOB_RAW and item.wire_type == wire.LENGTH:
            raw = item
    if raw is not None and not chunks:
        chunks.append(_decode_raw(buf, raw, raw_type))
    values = _unpacked_values(buf, record) if unpacked else _join(chunks)
    is_legacy = shape is None and any(legacy)
    dims = shape if shape is not None else (legacy if is_legacy else [values.size])
    if len(dims) > MAX_DIMS or math.prod(dims) != values.size:
        raise wire.WireError(f"a blob declares shape {dims} but holds {values.size} values")
    return values.reshape(dims), is_legacy


def _decode_dims(buf: memoryview, shape_record: wire.Field) -> list[int]:
    dims: list[int] = []
    for item in wire.iter_fields(buf, shape_record.value_start, shape_record.end):
        if item.number != 1:
            continue
        if item.wire_type == wire.VARINT:
            dims.append(item.value)
            continue
        pos = item.value_start
        while pos < item.end and len(dims) <= MAX_DIMS:
            dim, pos = wire.read_varint(buf, pos, item.end)
            dims.append(dim)
        if len(dims) > MAX_DIMS:
            raise wire.WireError(f"a blob shape has more than {MAX_DIMS} dimensions")
    return dims


def _unpacked_values(buf: memoryview, record: wire.Field) -> np.ndarray:
    """Values written one field each (old writers): parsed by protobuf into compact arrays."""
    try:
        blob = proto.BlobProto.FromString(bytes(buf[record.value_start : record.end]))
    except DecodeError as err:
        raise wire.WireError(f"a blob does not decode ({err})") from err
    return np.array(blob.double_data, _FLOAT64) if blob.double_data else np.array(blob.data, _FLOAT32)


def _decode_values(buf: memoryview, item: wire.Field) -> np.ndarray:
    """Packed float or double values, as a view."""
    dtype = _FLOAT32 if item.number == _BLOB_DATA else _FLOAT64
    if (item.end - item.value_start) % dtype.itemsize:
        raise wire.WireError("a blob's data length is not a whole number of values")
    return np.frombuffer(buf, dtype, (item.end - item.value_start) // dtype.itemsize, item.value_start)


def _decode_raw(buf: memoryview, item: wire.Field, raw_type: int) -> np.ndarray:
    """NVIDIA Caffe's `raw_data` (float16 / float / double bytes), as a view."""
    if raw_type not in _RAW_TYPES:
        raise wire.WireError(f"a blob stores raw_data of type {raw_type}, which is not a float type")
    dtype = _RAW_TYPES[raw_type]
    if (item.end - item.value_start) % dtype.itemsize:
        raise wire.WireError("a blob's raw_data length is not a whole number of values")
    return np.frombuffer(buf, dtype, (item.end - item.value_start) // dtype.itemsize, item.value_start)


def _join(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, _FLOAT32)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


VERBATIM_CHUNK = 16 << 20  # untouched bytes are copied (and released) this much at a time


def write_weights(weights: Weights, edits: dict[str, LayerEdit], dropped: set[str], path: Path) -> None:
    """Write `weights` with `edits` applied and `dropped` layers left out; other bytes verbatim
    (copied file to file inside the kernel where it can). An edit for a layer the caffemodel does
    not hold (a Power layer turned Scale) adds a record."""
    upgrade_v1 = any(r.number == 2 for r in weights.records)  # V1 input: written in today's form
    with atomic_output(path) as handle, _source(weights) as source, OrderedWriter(handle) as out:
        for record, name in zip(weights.records, weights.record_names, strict=True):
            if name in dropped:
                continue
            if name in edits or (upgrade_v1 and record.number == 2):
                _write_edited_layer(out, weights, record, weights.layers[name], edits.get(name))
                out.then(partial(_release, weights, record.start, record.end))
                continue
            for start in range(record.start, record.end, VERBATIM_CHUNK):
                end = min(start + VERBATIM_CHUNK, record.end)
                out.copy(source, start, weights.buffer[start:end])
                out.then(partial(_release, weights, start, end))
        for name, edit in edits.items():
            if name not in weights.layers:
                layer = proto.LayerParameter(name=name)
                edit.update(layer)
                blobs = edit.blobs
                _write_layer(out, layer.SerializeToString(), blobs, [False] * len(blobs))


@contextmanager
def _source(weights: Weights) -> Iterator[int | None]:
    """The caffemodel opened again for copying, if it is still the file that was mapped."""
    try:
        fd = os.open(weights.path, os.O_RDONLY)
    except OSError:
        yield None
        return
    try:
        yield fd if weights.identity and _identity(fd) == weights.identity else None
    finally:
        os.close(fd)


def _release(weights: Weights, start: int, end: int) -> None:
    """Drop the pages of bytes we are done with from our memory (they stay in the page cache), so
    writing a model never holds the whole input in our resident memory."""
    if weights.mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start -= start % mmap.PAGESIZE
    end = min(end + (-end) % mmap.PAGESIZE, len(weights.buffer))
    if end > start:
        weights.mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def _write_edited_layer(
    out: OrderedWriter, weights: Weights, record: wire.Field, stored: WeightLayer, edit: LayerEdit | None
) -> None:
    """Re-encode one layer record: its non-blob fields through the schema (unknown fields kept),
    its blobs from `edit` (or as stored). A V1 record is written in today's `layer` form: a file
    must not mix the two, since Caffe's upgrade then ignores the `layer` records."""
    blob_field = _LAYER_FIELDS[record.number][1]
    kept = b"".join(
        weights.buffer[item.start : item.end]
        for item in wire.iter_fields(weights.buffer, record.value_start, record.end)
        if item.number != blob_field
    )
    try:
        if record.number == 100:
            layer = proto.LayerParameter.FromString(kept)
        else:
            layer = upgrade_layer(proto.V1LayerParameter.FromString(kept))
    except DecodeError as err:
        raise InputError(f"{weights.path}: layer '{stored.name}' does not decode ({err}); is the file intact?") from err
    if edit is None:
        edit = LayerEdit(lambda: tuple(stored.blobs))
    edit.update(layer)
    blobs = edit.blobs
    legacy = [_is_legacy(stored, i, blob) for i, blob in enumerate(blobs)]
    _write_layer(out, layer.SerializeToString(), blobs, legacy)


def write_new_weights(layers: list[tuple[str, str, list[np.ndarray]]], path: Path) -> None:
    """Write a caffemodel from scratch: (name, type, blobs) per layer, blobs in their own dtype."""
    with atomic_output(path) as handle, OrderedWriter(handle) as out:
        for name, type_, blobs in layers:
            head = proto.LayerParameter(name=name, type=type_).SerializeToString()
            _write_layer(out, head, blobs, [False] * len(blobs))


def _write_layer(out: OrderedWriter, head: bytes, blobs: Sequence[np.ndarray | ScaledRows], legacy: list[bool]) -> None:
    """One `layer` record: its serialized non-blob fields, then its blobs, without joining them."""
    pieces = [piece for blob, is_legacy in zip(blobs, legacy, strict=True) for piece in _encode_blob(blob, is_legacy)]
    out.write(wire.encode_length_header(100, len(head) + sum(_length(p) for p in pieces)))
    out.write(head)
    for piece in pieces:
        if isinstance(piece, ScaledRows):
            for size, fill in piece.blocks():
                out.compute(size, fill)
        else:
            out.write(piece)


def _length(piece: bytes | memoryview | ScaledRows) -> int:
    return piece.nbytes if isinstance(piece, ScaledRows) else len(piece)


def _is_legacy(stored: WeightLayer, index: int, blob: np.ndarray) -> bool:
    """Keep a blob's legacy 4-D storage when it replaces one of the same shape."""
    return index < len(stored.blobs) and stored.legacy_shape[index] and stored.blobs[index].shape == blob.shape


def _encode_blob(array: np.ndarray | ScaledRows, legacy: bool) -> list[bytes | memoryview | ScaledRows]:
    """A BlobProto field holding `array` in its own dtype, as pieces to write in order (the
    values are a view of the array, or the `ScaledRows` to compute: no copy of the data is made)."""
    if legacy:
        head = b"".join(wire.encode_varint_field(n, d) for n, d in zip(_BLOB_DIMS, array.shape, strict=True))
    elif array.ndim == 0:
        head = b""  # a scalar: Caffe writes no shape at all
    else:
        dims = b"".join(wire.encode_varint(d) for d in array.shape)
        shape = wire.encode_length_delimited(1, dims) + dims
        head = wire.encode_length_delimited(_BLOB_SHAPE, shape) + shape
    if array.dtype == np.float16:  # kept as NVIDIA Caffe stores it
        data = memoryview(np.ascontiguousarray(array, _FLOAT16)).cast("B")
        head += wire.encode_varint_field(_BLOB_RAW_TYPE, 2) + wire.encode_length_delimited(_BLOB_RAW, data)
    else:
        number, dtype = (_BLOB_DOUBLE, _FLOAT64) if array.dtype == np.float64 else (_BLOB_DATA, _FLOAT32)
        if isinstance(array, ScaledRows) and array.dtype == dtype:
            data = array
        else:
            data = memoryview(np.ascontiguousarray(array, dtype)).cast("B")
        head += wire.encode_length_header(number, _length(data))
    return [wire.encode_length_header(_LAYER_FIELDS[100][1], len(head) + _length(data)), head, data]


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside `path`; rename it over `path` only when complete. The
    temporary name is chosen before the file exists, so an interruption at any point (a handled
    signal included) can remove it."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
        except OSError as err:
            raise OutputError(f"{path}: cannot write in {path.parent} ({err.strerror})") from err
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
