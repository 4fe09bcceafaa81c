"""Reading Caffe files, each failure as one clear `InputError`.

- A deploy prototxt is parsed whole into a `NetParameter` (it is small), keeping its text for the
  lossless rewrite (`prototxt`).
- A caffemodel is memory-mapped and walked once at the wire level (`wire`): each layer's blobs
  become read-only numpy views of the file's bytes, and `emit` copies every layer we did not change
  verbatim, so a model where nothing folds comes out byte-identical. A layer with a blob that does
  not decode as floats (a fork's packed or binarised weights) is an `UndecodedLayer`: copied
  verbatim, never folded.
"""

import fcntl
import math
import mmap
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from ..defaults import MAX_PROTOTXT_MB
from ..errors import InputError
from ..net import WeightLayer
from . import proto, prototxt, wire
from .files import open_regular

CHANGED = "the file changed while it was being read; run again once it is complete"
CHANGED_WEIGHTS = "the caffemodel changed while it was being read; run again once it is complete"

# NetParameter field numbers of the two layer lists, and per list (name, blobs) field numbers.
LAYER_FIELDS = {100: (1, 7), 2: (4, 6)}  # 100: LayerParameter `layer`, 2: V1 `layers`
BLOB_DIMS, BLOB_DATA, BLOB_DOUBLE, BLOB_SHAPE = (1, 2, 3, 4), 5, 8, 7
BLOB_RAW_TYPE, BLOB_RAW = 10, 12  # NVIDIA Caffe: raw bytes of the type named by raw_data_type
MAX_LAYER_RECORDS = 100_000  # real nets have a few thousand at most
MAX_BLOBS, MAX_DIMS = 64, 32  # per layer, per blob shape
FLOAT32, FLOAT64, FLOAT16 = np.dtype("<f4"), np.dtype("<f8"), np.dtype("<f2")
_RAW_TYPES = {0: FLOAT64, 1: FLOAT32, 2: FLOAT16}  # caffe.Type: DOUBLE, FLOAT, FLOAT16


@dataclass
class Weights:
    """A caffemodel walked once: its top-level records and, by name, the layers holding blobs.
    Use it as a context manager: leaving it lets other processes change the file again (`_Lease`)."""

    path: Path
    buffer: memoryview
    records: list[wire.Field]
    mapping: mmap.mmap | None = None  # the file's memory map behind `buffer` (None: a private copy)
    identity: tuple[int, ...] = ()  # the file's device, inode, size and mtime
    layers: dict[str, WeightLayer] = field(default_factory=dict)
    record_names: list[str | None] = field(default_factory=list)
    lease: "_Lease | None" = None

    def __enter__(self) -> "Weights":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.release()

    def check(self) -> None:
        """Stop here (InputError) if another process has asked to change the file meanwhile: called
        at safe points of a merge (not while a lock is held), often enough to release it soon."""
        if self.lease is not None and self.lease.broken:
            raise InputError(f"{self.path}: {CHANGED_WEIGHTS}")


@dataclass
class UndecodedLayer(WeightLayer):
    """A layer record holding a blob that does not decode as float values (a fork's encoding:
    another `raw_data_type`, packed bits in a field of its own ...): no blobs, and why."""

    problem: str = ""


def read_net(path: Path, max_mb: int = MAX_PROTOTXT_MB) -> object:
    """Parse a text-format net (deploy or train_val prototxt) into a NetParameter (`layer` form)."""
    return read_net_text(path, max_mb=max_mb).net


def read_net_text(path: Path, schema: prototxt.Schema | None = None, max_mb: int = MAX_PROTOTXT_MB) -> prototxt.NetText:
    """Parse a net prototxt of at most `max_mb` MB, keeping its text and which layers our schema
    cannot fully read."""
    return parse_net_bytes(path, read_net_bytes(path, max_mb), schema)


def read_net_bytes(path: Path, max_mb: int = MAX_PROTOTXT_MB) -> bytes:
    """The bytes of a net prototxt given as --model, at most `max_mb` MB (one clear InputError when
    unreadable or larger)."""
    return bytes(read_regular(path, "--model", max_mb << 20, "--max-prototxt-mb"))


def parse_net_bytes(path: Path, raw: bytes, schema: prototxt.Schema | None = None) -> prototxt.NetText:
    """`read_net_text` of the bytes `raw` read from `path` (named in errors)."""
    text = _decode_text(path, raw)
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


def _decode_text(path: Path, raw: bytes) -> str:
    """The file as UTF-8 text, without a byte order mark (Caffe's and OpenCV's parsers refuse one,
    so what we write never holds one)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        hint = " (it looks like a caffemodel: pass it as --weights)" if b"\0" in raw[:4096] else ""
        raise InputError(f"{path}: not a text prototxt{hint}") from err


def read_regular(path: Path, flag: str, limit: int | None = None, limit_flag: str = "") -> bytearray:
    """The bytes of the regular file `path` (given as `flag`), read up to the size it has when
    opened: never more, whatever it is or becomes. Refused (InputError): anything but a regular
    file (`open_regular`), a file over `limit` bytes (saying which flag raises it), one that
    shrinks while it is read."""
    with _reading(path, flag):
        fd = open_regular(path, flag)
        try:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise InputError(
                    f"{path}: {_mb(size)} MB, more than the {_mb(limit)} MB allowed for {flag}; "
                    f"if it is right, raise the limit with {limit_flag}"
                )
            return _read_exactly(fd, size, path)
        finally:
            os.close(fd)


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f}".removesuffix(".0")


def _read_exactly(fd: int, size: int, path: Path, changed: str = CHANGED) -> bytearray:
    """`size` bytes from the start of `fd`; InputError(`changed`) if the file has fewer."""
    data = bytearray(size)
    view, done = memoryview(data), 0
    while done < size:
        got = os.preadv(fd, [view[done:]], done)
        if not got:
            raise InputError(f"{path}: {changed}")
        done += got
    return data


@contextmanager
def _reading(path: Path, flag: str) -> Iterator[None]:
    """Turn a failure to open or read `path` (given as `flag`) into one clear InputError."""
    try:
        yield
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such file (given as {flag})") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}), given as {flag}") from err


def read_weights(path: Path, hold: bool = False) -> Weights:
    """Index a caffemodel's layers and their blobs. With `hold` (use the result as a context
    manager: the lease ends with the block), memory-map it and take views of its bytes, holding a
    lease on the file (`_Lease`) so that a writer waits and we stop with one clear error; without
    `hold`, or where no lease can be had, read it into private memory: a memory map of a file
    truncated by another process would kill us with SIGBUS."""
    weights = open_weights(path, hold)
    try:
        index_weights(weights)
    except BaseException:
        weights.__exit__()
        raise
    return weights


def open_weights(path: Path, hold: bool = False) -> Weights:
    """`read_weights` without the index: the caller fills it in (`index_weights`, or
    `layout.Layout.index` for a caffemodel of a known layout)."""
    buffer, mapping, identity, lease = _open_weights(path, hold)
    try:
        _refuse_other_formats(path, bytes(buffer[:4096]))
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return Weights(path, buffer, [], mapping, identity, lease=lease)


def index_weights(weights: Weights) -> None:
    """Walk the caffemodel's records once: its layers by name, each blob a view of its bytes."""
    path = weights.path
    try:
        weights.records = _top_records(weights.buffer)
        for record in weights.records:
            weights.record_names.append(_index_layer(weights, record))
    except wire.WireError as err:
        raise InputError(f"{path}: not a readable caffemodel ({err}); is the file complete?") from err
    if not weights.layers:
        raise InputError(f"{path}: holds no layers; is it a caffemodel?")


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
        if record.number in LAYER_FIELDS and record.wire_type == wire.LENGTH:
            records.append(record)
        elif records and records[-1].number == 0:
            records[-1] = wire.Field(0, -1, records[-1].start, records[-1].start, record.end)
        else:
            records.append(wire.Field(0, -1, record.start, record.start, record.end))
        if len(records) > MAX_LAYER_RECORDS:
            raise wire.WireError(f"more than {MAX_LAYER_RECORDS} layer records")
    return records


def _open_weights(path: Path, hold: bool) -> tuple[memoryview, mmap.mmap | None, tuple[int, ...], "_Lease | None"]:
    """The caffemodel's bytes, the file's memory map behind them (None for a private copy), what
    identifies the file (`file_identity`) and the lease that keeps it as it is while we map it."""
    with _reading(path, "--weights"), open(open_regular(path, "--weights"), "rb") as handle:
        fd = handle.fileno()
        if os.fstat(fd).st_size == 0:
            raise InputError(f"{path}: the file is empty (given as --weights)")
        lease = _Lease.take(fd, path) if hold else None
        identity = file_identity(fd)
        if lease is None:
            return memoryview(_read_exactly(fd, identity[2], path, CHANGED_WEIGHTS)), None, identity, None
        try:
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # shares `handle`'s open file: the lease stays
        except BaseException:
            lease.release()
            raise
        return memoryview(mapping), mapping, identity, lease


class _Lease:
    """A read lease on a file (Linux `F_SETLEASE`): a process that opens it for writing or
    truncates it waits (up to /proc/sys/fs/lease-break-time, 45 s by default) until we release it,
    and we hear of it (SIGIO: `broken`) and stop with `InputError` (CHANGED_WEIGHTS) at the next
    safe point (`Weights.check`), before the file changes under our memory map. (Raising from the
    signal handler itself could leave a lock of the fold threads held, and hang.) Taken only where
    it can be: the file's owner (or CAP_LEASE), a local file system, nobody writing it now, on the
    main thread (where signal handlers run)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path, self.broken = os.dup(fd), path, False

    @classmethod
    def take(cls, fd: int, path: Path) -> "_Lease | None":
        if not hasattr(fcntl, "F_SETLEASE") or threading.current_thread() is not threading.main_thread():
            return None
        lease = cls(fd, path)
        previous = signal.signal(signal.SIGIO, _lease_broken)
        if not _LEASES:
            _LEASES[-1] = previous  # the handler to restore once no lease is left
        _LEASES[lease.fd] = lease  # before the lease exists: a SIGIO at once finds it
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            lease._forget()
            return None
        return lease

    def release(self) -> None:
        """Let other processes change the file again (our memory map must not be read after)."""
        if self.fd in _LEASES:
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            self._forget()

    def _forget(self) -> None:
        if _LEASES.pop(self.fd, None) is None:
            return
        os.close(self.fd)
        if len(_LEASES) == 1:
            signal.signal(signal.SIGIO, _LEASES.pop(-1))


_LEASES: dict[int, object] = {}  # descriptor -> lease held; -1 -> the SIGIO handler before ours


def _lease_broken(signum: int, frame: object) -> None:
    """Another process wants to change a caffemodel we read (it waits until we release it): the
    merge stops at its next safe point (`Weights.check`)."""
    for fd, lease in _LEASES.items():
        if fd >= 0:
            lease.broken = True


def file_identity(fd: int) -> tuple[int, ...]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _index_layer(weights: Weights, record: wire.Field) -> str | None:
    """Record the layer stored in `record` (if it is one); return its name. A blob that does not
    decode makes the layer an `UndecodedLayer` (a V1 record, which is written anew, is refused)."""
    if record.number not in LAYER_FIELDS or record.wire_type != wire.LENGTH:
        return None
    name_field, blob_field = LAYER_FIELDS[record.number]
    name, blobs, legacy, count, problem = "", [], [], 0, ""
    for item in wire.iter_fields(weights.buffer, record.value_start, record.end):
        if item.number == name_field and item.wire_type == wire.LENGTH:
            name = _layer_name(bytes(weights.buffer[item.value_start : item.end]))
        elif item.number == blob_field and item.wire_type == wire.LENGTH:
            count += 1
            if count > MAX_BLOBS:
                raise wire.WireError(f"layer '{name}' has more than {MAX_BLOBS} blobs")
            try:
                array, is_legacy = _decode_blob(weights.buffer, item)
            except wire.WireError as err:
                problem = problem or str(err)
                continue
            blobs.append(array)
            legacy.append(is_legacy)
    if problem and record.number != 100:
        raise InputError(
            f"{weights.path}: V1 layer '{name}': {problem}; a V1 caffemodel is written anew in today's "
            "form, which needs every blob's values: upgrade it with the fork's own Caffe first"
        )
    weights.layers[name] = UndecodedLayer(name, [], [], problem) if problem else WeightLayer(name, blobs, legacy)
    return name


def _layer_name(raw: bytes) -> str:
    """A stored layer name, its bytes kept distinct as Caffe compares them: bytes that are not
    UTF-8 become lone surrogates, which no name read from a (UTF-8) prototxt can equal."""
    return raw.decode("utf-8", "surrogateescape")


def _decode_blob(buf: memoryview, record: wire.Field) -> tuple[np.ndarray, bool]:
    """A BlobProto's values as a shaped read-only view, and whether it used the legacy 4-D shape."""
    legacy = [0, 0, 0, 0]
    shape: list[int] | None = None
    chunks: list[np.ndarray] = []
    raw: wire.Field | None = None
    raw_type, unpacked = 1, False
    for item in wire.iter_fields(buf, record.value_start, record.end):
        if item.number in BLOB_DIMS and item.wire_type == wire.VARINT:
            legacy[BLOB_DIMS.index(item.number)] = item.value
        elif item.number == BLOB_SHAPE and item.wire_type == wire.LENGTH:
            shape = _decode_dims(buf, item)
        elif item.number in (BLOB_DATA, BLOB_DOUBLE) and item.wire_type == wire.LENGTH:
            chunks.append(_decode_values(buf, item))
        elif item.number in (BLOB_DATA, BLOB_DOUBLE):
            unpacked = True
        elif item.number == BLOB_RAW_TYPE and item.wire_type == wire.VARINT:
            raw_type = item.value
        elif item.number == BLOB_RAW and item.wire_type == wire.LENGTH:
            raw = item
    if raw is not None and not chunks:
        chunks.append(_decode_raw(buf, raw, raw_type))
    values = _unpacked_values(buf, record) if unpacked else _join(chunks)
    is_legacy = shape is None and any(legacy)
    dims = shape if shape is not None else (legacy if is_legacy else [values.size])
    if len(dims) > MAX_DIMS or math.prod(dims) != values.size or math.prod(d or 1 for d in dims) >= 2**63:
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
    return np.array(blob.double_data, FLOAT64) if blob.double_data else np.array(blob.data, FLOAT32)


def _decode_values(buf: memoryview, item: wire.Field) -> np.ndarray:
    """Packed float or double values, as a view."""
    dtype = FLOAT32 if item.number == BLOB_DATA else FLOAT64
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
        return np.zeros(0, FLOAT32)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
