"""The values every stage passes along: a caffemodel layer's blobs (`WeightLayer`), blobs made
on demand by a fold (`FoldedLayer`, `LayerEdit`) and folded weights computed block by block as they
are written (`ScaledRows`), and what a merge folded into each host (`FoldedHost`, for the
quantization readiness report). No I/O, no rules: numpy only."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

BLOCK_BYTES = 1 << 20  # rows computed per block when written: about the size of a core's cache


@dataclass(frozen=True)
class ScaledRows:
    """A folded weight blob, `scale[o] * rows[o]` for each output channel o, computed in float64
    and cast to `dtype`: block by block as it is written (`blocks`), whole only when asked for
    (`np.asarray`), so folding a model holds no copy of its weights."""

    rows: np.ndarray  # (channels, rest): a view of the stored weights
    scale: np.ndarray  # (channels,) float64
    shape: tuple[int, ...]  # the stored shape
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.rows.size * self.dtype.itemsize

    def blocks(self) -> Iterator[tuple[int, Callable[[memoryview], object]]]:
        """The values in order, as blocks of whole rows: per block its size in bytes and a function
        that computes it into a buffer of that size (blocks are independent: any thread, any order)."""
        row_bytes = self.rows.shape[1] * self.dtype.itemsize
        per_block = max(1, BLOCK_BYTES // max(1, row_bytes))
        for start in range(0, len(self.rows), per_block):
            stop = min(start + per_block, len(self.rows))
            yield (stop - start) * row_bytes, partial(self._block, start, stop)

    def _block(self, start: int, stop: int, buffer: memoryview | None = None) -> np.ndarray:
        shape = (stop - start, self.rows.shape[1])
        out = np.empty(shape, self.dtype) if buffer is None else np.frombuffer(buffer, self.dtype).reshape(shape)
        return np.multiply(self.rows[start:stop], self.scale[start:stop, None], out=out, casting="same_kind")

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("ScaledRows are computed on demand: there is no array to view")
        whole = self._block(0, len(self.rows)).reshape(self.shape)
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class WeightLayer:
    """A layer's record in the caffemodel: blobs as numpy views, plus how each was stored."""

    name: str
    blobs: list[np.ndarray]
    legacy_shape: list[bool]  # blob stored with num/channels/height/width instead of `shape`


class FoldedLayer(WeightLayer):
    """A layer whose blobs are computed when read: folded weights are not kept in memory."""

    def __init__(self, name: str, make_blobs: Callable[[], tuple[np.ndarray | ScaledRows, ...]]) -> None:
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


@dataclass(frozen=True)
class FoldedChain:
    """One chain of affine layers folded into a host: its per-channel scale (a 0 makes that channel
    constant) and each BatchNorm's `var + eps` by layer name (float64 vectors over its channels)."""

    layers: tuple[str, ...]
    rule: str  # "forward" (channels are the host's outputs) or "backward" (its inputs)
    scale: np.ndarray
    variance_eps: dict[str, np.ndarray]


@dataclass(frozen=True)
class FoldedHost:
    """A host that took folds: its weights as stored, its folded layer (blobs made when read), how
    its weights are laid out (`fold_math.HOST_LAYOUTS`) and the chains it took, in order."""

    name: str
    layout: str
    groups: int
    c_out: int
    original: np.ndarray
    folded: WeightLayer
    chains: tuple[FoldedChain, ...]
