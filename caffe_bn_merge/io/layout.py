"""A caffemodel's layout: where each blob's values lie, and every other byte. Two caffemodels of one
layout (the same size, the same bytes outside the values) have the same records, names, types and
blob shapes: another caffemodel of a known layout is indexed without walking its records
(`Layout.index`), and a merge recorded for one caffemodel writes its merged caffemodel for another
without encoding records (`Recipe`). For fleets of one net with many weights (`pipeline.NetCache`).

Only small caffemodels get a layout (`MAX_MODEL_BYTES`): in larger ones the values, not the
records, take the time, and they are written by `emit`, which never holds a folded blob whole."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO

import numpy as np

from ..net import ScaledRows, WeightLayer
from . import wire
from .read import UndecodedLayer, Weights

Blobs = Callable[[str], Sequence[np.ndarray | ScaledRows]]  # a layer's blobs, by name
MAX_MODEL_BYTES = 64 << 20
MAX_OTHER_BYTES = 256 << 10  # bytes outside the values (names, parameters, undecoded blobs), at most


@dataclass(frozen=True)
class Slot:
    """Where blob `blob` of layer `layer` keeps its values."""

    layer: str
    blob: int
    start: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.start + self.dtype.itemsize * math.prod(self.shape)


@dataclass(frozen=True, eq=False)
class Layout:
    """The values' slots in file order, every other byte (positions and values), and the index of
    the caffemodel they came from (records, names, how blobs were stored, undecoded layers)."""

    size: int
    slots: tuple[Slot, ...]
    positions: np.ndarray  # every byte outside the slots, as positions ...
    values: np.ndarray  # ... and their values (uint8)
    records: tuple[wire.Field, ...]
    record_names: tuple[str | None, ...]
    legacy: dict[str, list[bool]]
    undecoded: dict[str, UndecodedLayer]

    @classmethod
    def of(cls, weights: Weights) -> "Layout | None":
        """The layout of an indexed caffemodel; None when it has none we keep: too large, a name
        stored twice, or a blob whose values are not one run of the file's bytes (written one
        value per field, in pieces, or empty)."""
        size = len(weights.buffer)
        names = [name for name in weights.record_names if name is not None]
        if size > MAX_MODEL_BYTES or len(set(names)) != len(names):
            return None
        base = np.frombuffer(weights.buffer, np.uint8).__array_interface__["data"][0]
        slots = []
        for name, layer in weights.layers.items():
            if isinstance(layer, UndecodedLayer):
                continue
            for i, blob in enumerate(layer.blobs):
                start = blob.__array_interface__["data"][0] - base
                if blob.size == 0 or not blob.flags.c_contiguous or not 0 <= start <= size - blob.nbytes:
                    return None
                slots.append(Slot(name, i, start, blob.dtype, blob.shape))
        slots.sort(key=lambda slot: slot.start)
        edges = [0, *(x for slot in slots for x in (slot.start, slot.end)), size]
        runs = list(zip(edges[::2], edges[1::2], strict=True))
        if any(end < start for start, end in runs) or sum(end - start for start, end in runs) > MAX_OTHER_BYTES:
            return None
        positions = np.concatenate([np.arange(start, end, dtype=np.int32) for start, end in runs])  # < 64 MiB
        return cls(
            size,
            tuple(slots),
            positions,
            np.frombuffer(weights.buffer, np.uint8)[positions],  # a copy of those bytes only
            tuple(weights.records),
            tuple(weights.record_names),
            {name: list(layer.legacy_shape) for name, layer in weights.layers.items()},
            {name: layer for name, layer in weights.layers.items() if isinstance(layer, UndecodedLayer)},
        )

    def matches(self, buffer: memoryview) -> bool:
        """True when `buffer` is a caffemodel of this layout."""
        return len(buffer) == self.size and np.array_equal(np.frombuffer(buffer, np.uint8)[self.positions], self.values)

    def index(self, weights: Weights) -> None:
        """Fill in the index of `weights`, a caffemodel of this layout (`matches`): its blobs are
        views of its own bytes."""
        weights.records = list(self.records)
        weights.record_names = list(self.record_names)
        buffer = weights.buffer
        for name, views, legacy in self._layers:
            if name in self.undecoded:
                weights.layers[name] = self.undecoded[name]
                continue
            blobs = [np.frombuffer(buffer, dtype, count, start).reshape(shape) for dtype, count, start, shape in views]
            weights.layers[name] = WeightLayer(name, blobs, list(legacy))

    @cached_property
    def _layers(self) -> list[tuple[str, list[tuple[np.dtype, int, int, tuple[int, ...]]], list[bool]]]:
        """Per layer in index order: (dtype, count, start, shape) of each blob, and `legacy`."""
        views: dict[str, list] = {name: [] for name in self.legacy}
        for slot in sorted(self.slots, key=lambda slot: (slot.layer, slot.blob)):
            views[slot.layer].append((slot.dtype, math.prod(slot.shape), slot.start, slot.shape))
        return [(name, views[name], legacy) for name, legacy in self.legacy.items()]


@dataclass(frozen=True, eq=False)
class Recipe:
    """How a merge writes its caffemodel for any caffemodel of the layout it read: every byte
    outside the values as written once (`Layout.of` the merged file), values of layers kept as
    they were copied from the input's slots, the others (folded, new) computed."""

    size: int
    positions: np.ndarray
    values: np.ndarray
    copies: tuple[tuple[int, int, int], ...]  # (start in the output, start in the input, bytes)
    made: tuple[Slot, ...]

    @classmethod
    def of(cls, read: Layout, written: Layout, edited: set[str]) -> "Recipe":
        """The recipe of a merge that read a caffemodel of layout `read`, changed the blobs of the
        `edited` layers and wrote one of layout `written`."""
        sources = {(slot.layer, slot.blob): slot for slot in read.slots}
        copies, made = [], []
        for slot in written.slots:
            source = None if slot.layer in edited else sources.get((slot.layer, slot.blob))
            if source is not None and (source.dtype, source.shape) == (slot.dtype, slot.shape):
                copies.append((slot.start, source.start, slot.end - slot.start))
            else:
                made.append(slot)
        return cls(written.size, written.positions, written.values, tuple(copies), tuple(made))

    def write(self, weights: Weights, blobs: Blobs, handle: BinaryIO) -> None:
        """Write the merged caffemodel of `weights` (of the layout read), each made slot's values
        from `blobs(layer)` (folded rows computed straight into the output)."""
        out = np.empty(self.size, np.uint8)
        out[self.positions] = self.values
        source = np.frombuffer(weights.buffer, np.uint8)
        for start, start_in, count in self.copies:
            out[start : start + count] = source[start_in : start_in + count]
        made: dict[str, Sequence[np.ndarray | ScaledRows]] = {}
        for slot in self.made:
            if slot.layer not in made:
                made[slot.layer] = blobs(slot.layer)  # a folded layer computes them here, once
            _put(out[slot.start : slot.end], slot, made[slot.layer][slot.blob])
        handle.write(memoryview(out))


def _put(out: np.ndarray, slot: Slot, blob: np.ndarray | ScaledRows) -> None:
    """Put `blob`'s values into `out`, the bytes of `slot`, in its dtype."""
    if tuple(blob.shape) != slot.shape:
        raise ValueError(f"layer '{slot.layer}' blob {slot.blob}: shape {list(blob.shape)}, not {list(slot.shape)}")
    if isinstance(blob, ScaledRows) and blob.dtype == slot.dtype:
        start = 0
        for size, fill in blob.blocks():
            fill(memoryview(out[start : start + size]))
            start += size
        return
    out.view(slot.dtype)[:] = np.asarray(blob).reshape(-1)
