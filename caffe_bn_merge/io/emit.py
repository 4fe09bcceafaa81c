"""Writing Caffe files: the merged prototxt into the user's own text, the merged caffemodel with
every untouched record copied verbatim and folded blobs computed as they are written, each file under
a temporary name and published only when complete (`atomic_output`)."""

import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import InputError, OutputError
from ..net import LayerEdit, ScaledRows, WeightLayer
from . import outputs, proto, prototxt, wire
from .read import (
    BLOB_DATA,
    BLOB_DIMS,
    BLOB_DOUBLE,
    BLOB_RAW,
    BLOB_RAW_TYPE,
    BLOB_SHAPE,
    FLOAT16,
    FLOAT32,
    FLOAT64,
    LAYER_FIELDS,
    Weights,
    file_identity,
)
from .streaming import OrderedWriter
from .upgrade import upgrade_layer


def write_net_text(original: prototxt.NetText, net: object, origin: Sequence[int], path: Path) -> None:
    """Write `net` in the original's text: untouched layers verbatim (`prototxt.render_net_text`)."""
    with atomic_output(path) as handle:
        handle.write(prototxt.render_net_text(original, net, origin).encode("utf-8"))


VERBATIM_CHUNK = 16 << 20  # untouched bytes are copied (and released) this much at a time


def write_weights(
    weights: Weights,
    edits: dict[str, LayerEdit],
    dropped: set[str],
    path: Path,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write `weights` with `edits` applied and `dropped` layers left out; other bytes verbatim
    (copied file to file inside the kernel where it can). An edit for a layer the caffemodel does
    not hold (a Power layer turned Scale) adds a record. `progress(done, total)` hears how many
    bytes of the input are written out."""
    upgrade_v1 = any(r.number == 2 for r in weights.records)  # V1 input: written in today's form
    with atomic_output(path) as handle, _source(weights) as source, OrderedWriter(handle, weights.check) as out:
        for record, name in zip(weights.records, weights.record_names, strict=True):
            weights.check()
            if name in dropped:
                continue
            if name in edits or (upgrade_v1 and record.number == 2):
                _write_edited_layer(out, weights, record, weights.layers[name], edits.get(name))
                out.then(partial(_release, weights, record.start, record.end, progress))
                continue
            for start in range(record.start, record.end, VERBATIM_CHUNK):
                end = min(start + VERBATIM_CHUNK, record.end)
                out.copy(source, start, weights.buffer[start:end])
                out.then(partial(_release, weights, start, end, progress))
        for name, edit in edits.items():
            if name not in weights.layers:
                layer = proto.LayerParameter(name=name)
                edit.update(layer)
                blobs = edit.blobs
                _write_layer(out, layer.SerializeToString(), blobs, [False] * len(blobs))
        if progress is not None:  # all through, dropped records included
            out.then(partial(progress, len(weights.buffer), len(weights.buffer)))


@contextmanager
def _source(weights: Weights) -> Iterator[int | None]:
    """The caffemodel opened again for copying, if it is still the file that was mapped (a private
    copy is written from memory: the file may have changed since it was read)."""
    if weights.mapping is None:
        yield None
        return
    try:
        fd = os.open(weights.path, os.O_RDONLY)
    except OSError:
        yield None
        return
    try:
        yield fd if weights.identity and file_identity(fd) == weights.identity else None
    finally:
        os.close(fd)


def _release(weights: Weights, start: int, end: int, progress: Callable[[int, int], None] | None) -> None:
    """Drop the pages of bytes we are done with from our memory (they stay in the page cache), so
    writing a model never holds the whole input in our resident memory; tell `progress`."""
    if progress is not None:
        progress(end, len(weights.buffer))
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
    blob_field = LAYER_FIELDS[record.number][1]
    kept = b"".join(weights.buffer[start:end] for start, end in _runs_without(weights, record, blob_field))
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


def _runs_without(weights: Weights, record: wire.Field, number: int) -> list[tuple[int, int]]:
    """Byte spans of `record`'s fields other than field `number`, adjacent ones merged: at most one
    more span than there are such fields (a record of millions of tiny fields costs no more)."""
    runs: list[tuple[int, int]] = []
    for item in wire.iter_fields(weights.buffer, record.value_start, record.end):
        if item.number == number:
            continue
        if runs and runs[-1][1] == item.start:
            runs[-1] = (runs[-1][0], item.end)
        else:
            runs.append((item.start, item.end))
    return runs


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
        head = b"".join(wire.encode_varint_field(n, d) for n, d in zip(BLOB_DIMS, array.shape, strict=True))
    elif array.ndim == 0:
        head = b""  # a scalar: Caffe writes no shape at all
    else:
        dims = b"".join(wire.encode_varint(d) for d in array.shape)
        shape = wire.encode_length_delimited(1, dims) + dims
        head = wire.encode_length_delimited(BLOB_SHAPE, shape) + shape
    if array.dtype == np.float16:  # kept as NVIDIA Caffe stores it
        data = memoryview(np.ascontiguousarray(array, FLOAT16)).cast("B")
        head += wire.encode_varint_field(BLOB_RAW_TYPE, 2) + wire.encode_length_delimited(BLOB_RAW, data)
    else:
        number, dtype = (BLOB_DOUBLE, FLOAT64) if array.dtype == np.float64 else (BLOB_DATA, FLOAT32)
        if isinstance(array, ScaledRows) and array.dtype == dtype:
            data = array
        else:
            data = memoryview(np.ascontiguousarray(array, dtype)).cast("B")
        head += wire.encode_length_header(number, _length(data))
    return [wire.encode_length_header(LAYER_FIELDS[100][1], len(head) + _length(data)), head, data]


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside `path`; rename it over `path` only when complete. The
    temporary name is registered before the file exists (`outputs.temporary_name`), so an
    interruption at any point (a handled signal included) can remove it."""
    tmp = outputs.temporary_name(path)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
        except OSError as err:
            raise OutputError(f"{path}: cannot write in {path.parent} ({err.strerror})") from err
        with outputs.writing(path), os.fdopen(fd, "wb") as handle:
            yield handle
            outputs.pause_point("written")
        os.replace(tmp, path)
        outputs.TEMPORARY.discard(tmp)
    except BaseException:
        outputs.forget(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
