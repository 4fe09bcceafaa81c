"""A replay's questions answered all at once: the maps of every BVLC BatchNorm and Scale layer the
rules read, computed over their blobs laid end to end, with the float64 operations of
`maths.affine` in the same order (elementwise: each value is the same, bit for bit, as read one
layer at a time), and every answer (finite, identity) checked in one pass. `replay` takes these
maps as given; one layer at a time, reading and checking them is most of a replay's time.

Only for what most fleets are made of: a recording that asks another layer type or BatchNorm
layout, whose answer was a refusal found in the values, or that asks about a layer a rule edits, is
not stacked (`Stacked.of` is None) and is replayed one layer at a time."""

from dataclasses import dataclass

import numpy as np

from ..maths.affine import ChannelAffine
from . import bn_variants
from .norms import BatchNormMap, ScaleMap, map_reader
from .plan import Layers, Read
from .reasons import Refusal
from .replay import Recording

_ZERO = np.zeros(1)


@dataclass(frozen=True, eq=False)
class Stacked:
    """The questions of a recording, BatchNorms first, then Scales, and how their blobs stack."""

    reads: tuple[Read, ...]
    batchnorms: tuple[str, ...]  # the BatchNorm questions' layers
    scales: tuple[tuple[str, bool], ...]  # the Scale questions' layers, and whether each has a beta
    bn_channels: np.ndarray  # per BatchNorm: its channels
    eps: np.ndarray  # per BatchNorm channel
    gammas: np.ndarray  # per Scale channel: where its gamma is among the Scales' gammas end to end
    betas: np.ndarray  # per Scale channel: where its beta is among the betas end to end, then a zero
    starts: np.ndarray  # per question: its first channel among all
    identity: np.ndarray  # per question: whether its map was the identity

    @classmethod
    def of(cls, recording: Recording, layers: Layers) -> "Stacked | None":
        """The stacking of `recording`'s questions (`layers`: the caffemodel it was made with), or
        None when a question is not one this module answers."""
        edited = {action.target for round_ in recording.rounds for action in round_.actions}
        asked: dict[Read, tuple[object, bool]] = {}
        for question in (q for round_ in recording.rounds for q in round_.questions):
            if isinstance(question.reader, Refusal):
                continue  # decided by parameters and shapes: the same for the whole layout
            reader = map_reader(question.reader)
            plain = isinstance(reader, ScaleMap) or (isinstance(reader, BatchNormMap) and reader.variant == "bvlc")
            if question.read[0] in edited or not plain or not isinstance(question.answer, bool):
                return None
            asked[question.read] = reader, question.answer
        order = sorted(asked, key=lambda read: isinstance(asked[read][0], ScaleMap))
        batchnorms = [(read, asked[read][0]) for read in order if isinstance(asked[read][0], BatchNormMap)]
        scales = [(read, asked[read][0]) for read in order if isinstance(asked[read][0], ScaleMap)]
        bn_channels = np.array([reader.channels for _, reader in batchnorms], dtype=np.int64)
        eps = [bn_variants.layer_eps(reader.variant, reader.layer) for _, reader in batchnorms]
        scale_channels = [reader.channels for _, reader in scales]
        channels = [reader.channels for _, reader in batchnorms + scales]
        if not channels or min(channels) < 1:
            return None
        return cls(
            tuple(order),
            tuple(read[0] for read, _ in batchnorms),
            tuple((read[0], reader.bias_term) for read, reader in scales),
            bn_channels,
            np.repeat(np.array(eps, dtype=np.float64), bn_channels),
            _where([layers[read[0]].blobs[0].size for read, _ in scales], scale_channels),
            _where([layers[read[0]].blobs[1].size if r.bias_term else None for read, r in scales], scale_channels),
            np.cumsum([0, *channels[:-1]], dtype=np.int64),
            np.array([asked[read][1] for read in order], dtype=bool),
        )

    def maps(self, layers: Layers) -> dict[Read, ChannelAffine] | None:
        """Every question's map for `layers` (a caffemodel of the recording's layout), or None when
        an answer is not the recorded one (a map not finite, or the identity where it was not)."""
        scale, shift = self._stack(layers)
        finite = np.logical_and.reduceat(np.isfinite(scale) & np.isfinite(shift), self.starts)
        identity = np.logical_and.reduceat((scale == 1.0) & (shift == 0.0), self.starts)
        if not finite.all() or not np.array_equal(identity, self.identity):
            return None
        bounds = zip(self.reads, self.starts.tolist(), [*self.starts[1:].tolist(), scale.size], strict=True)
        return {read: ChannelAffine(scale[a:b], shift[a:b]) for read, a, b in bounds}

    def negative_variance(self, layers: Layers) -> dict[str, int]:
        """The BatchNorm layers whose stored variance has negative channels, and how many
        (`norms.negative_variance` of each)."""
        if not self.batchnorms:
            return {}
        negative = _flat([layers[name].blobs[1].reshape(-1) for name in self.batchnorms]) < 0
        counts = np.add.reduceat(negative, self.starts[: len(self.batchnorms)]).tolist()
        return {name: count for name, count in zip(self.batchnorms, counts, strict=True) if count}

    def _stack(self, layers: Layers) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) of every question, end to end: `bn_variants.affine` for BVLC BatchNorm
        (`batchnorm_affine`) and `scale_affine`, per layer."""
        bn = [layers[name].blobs for name in self.batchnorms]
        factor = _flat([blobs[2].reshape(-1)[:1] for blobs in bn])
        f = np.repeat(np.divide(1.0, factor, out=np.zeros_like(factor), where=factor != 0), self.bn_channels)
        mean = _flat([blobs[0].reshape(-1) for blobs in bn]) * f
        var = _flat([blobs[1].reshape(-1) for blobs in bn]) * f
        with np.errstate(divide="ignore", invalid="ignore"):  # not finite: refused (by `maps`)
            bn_scale = 1.0 / np.sqrt(var + self.eps)
            bn_shift = -mean * bn_scale
        gammas = _flat([layers[name].blobs[0].reshape(-1) for name, _ in self.scales])
        betas = _flat([*(layers[name].blobs[1].reshape(-1) for name, beta in self.scales if beta), _ZERO])
        return np.concatenate([bn_scale, gammas[self.gammas]]), np.concatenate([bn_shift, betas[self.betas]])


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    """`arrays` end to end, as float64 (exactly: they are float16, 32 or 64)."""
    return np.concatenate(arrays).astype(np.float64, copy=False) if arrays else np.zeros(0)


def _where(sizes: list[int | None], channels: list[int]) -> np.ndarray:
    """Per channel of each layer, where its value is among the layers' blobs of `sizes` values laid
    end to end: one value serves every channel; no blob (None) reads the zero laid after them."""
    zero, parts, start = sum(size or 0 for size in sizes), [], 0
    for size, count in zip(sizes, channels, strict=True):
        if size is None:
            parts.append(np.full(count, zero))
        else:
            parts.append(np.arange(start, start + count) if size == count else np.full(count, start))
            start += size
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
