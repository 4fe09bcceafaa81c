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
from .replay import Given, Recording

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
    chains: tuple[tuple[Read, ...], ...]  # the actions' reads of two or more questions ...
    bounds: tuple[tuple[int, int], ...]  # ... where each one's channels are among theirs end to end
    first: np.ndarray  # per chain channel: that channel of its first question, among all
    steps: tuple[tuple[np.ndarray, np.ndarray], ...]  # per further read: which chain channels, from where

    @classmethod
    def of(cls, recording: Recording, layers: Layers) -> "Stacked | None":
        """The stacking of `recording`'s questions (`layers`: the caffemodel it was made with), or
        None when a question is not one this module answers."""
        asked = _asked(recording)
        if asked is None:
            return None
        order = sorted(asked, key=lambda read: isinstance(asked[read][0], ScaleMap))
        batchnorms = [(read, asked[read][0]) for read in order if isinstance(asked[read][0], BatchNormMap)]
        scales = [(read, asked[read][0]) for read in order if isinstance(asked[read][0], ScaleMap)]
        bn_channels = np.array([reader.channels for _, reader in batchnorms], dtype=np.int64)
        eps = [bn_variants.layer_eps(reader.variant, reader.layer) for _, reader in batchnorms]
        scale_channels = [reader.channels for _, reader in scales]
        channels = [reader.channels for _, reader in batchnorms + scales]
        if not channels or min(channels) < 1:
            return None
        starts = np.cumsum([0, *channels[:-1]], dtype=np.int64)
        chains = _chains(recording, asked)
        return cls(
            tuple(order),
            tuple(read[0] for read, _ in batchnorms),
            tuple((read[0], reader.bias_term) for read, reader in scales),
            bn_channels,
            np.repeat(np.array(eps, dtype=np.float64), bn_channels),
            _where([layers[read[0]].blobs[0].size for read, _ in scales], scale_channels),
            _where([layers[read[0]].blobs[1].size if r.bias_term else None for read, r in scales], scale_channels),
            starts,
            np.array([asked[read][1] for read in order], dtype=bool),
            chains,
            *_chain_steps(chains, dict(zip(order, starts.tolist(), strict=True))),
        )

    def maps(self, layers: Layers) -> Given | None:
        """Every question's and chain's map for `layers` (a caffemodel of the recording's layout),
        or None when an answer is not the recorded one (a map not finite, or the identity where it
        was not)."""
        scale, shift = self._stack(layers)
        finite = np.logical_and.reduceat(np.isfinite(scale) & np.isfinite(shift), self.starts)
        identity = np.logical_and.reduceat((scale == 1.0) & (shift == 0.0), self.starts)
        if not finite.all() or not np.array_equal(identity, self.identity):
            return None
        bounds = zip(self.reads, self.starts.tolist(), [*self.starts[1:].tolist(), scale.size], strict=True)
        maps = {read: ChannelAffine(scale[a:b], shift[a:b]) for read, a, b in bounds}
        return Given(maps, self._compose(scale, shift))

    def _compose(self, scale: np.ndarray, shift: np.ndarray) -> dict[tuple[Read, ...], ChannelAffine]:
        """Each chain's map: its questions' maps composed in order (`ChannelAffine.then`)."""
        chain_scale, chain_shift = scale[self.first], shift[self.first]
        for which, where in self.steps:
            chain_shift[which] = scale[where] * chain_shift[which] + shift[where]
            chain_scale[which] = scale[where] * chain_scale[which]
        return {
            reads: ChannelAffine(chain_scale[a:b], chain_shift[a:b])
            for reads, (a, b) in zip(self.chains, self.bounds, strict=True)
        }

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


def _asked(recording: Recording) -> dict[Read, tuple[BatchNormMap | ScaleMap, bool]] | None:
    """The questions the recording's answers depend on the values for (how each is read, whether
    its map was the identity), or None when one is not for `Stacked`."""
    edited = {action.target for round_ in recording.rounds for action in round_.actions}
    asked = {}
    for question in (q for round_ in recording.rounds for q in round_.questions):
        if isinstance(question.reader, Refusal):
            continue  # decided by parameters and shapes: the same for the whole layout
        reader = map_reader(question.reader)
        plain = isinstance(reader, ScaleMap) or (isinstance(reader, BatchNormMap) and reader.variant == "bvlc")
        if question.read[0] in edited or not plain or not isinstance(question.answer, bool):
            return None
        asked[question.read] = reader, question.answer
    return asked


def _chains(recording: Recording, asked: dict[Read, object]) -> tuple[tuple[Read, ...], ...]:
    """The reads of the recording's actions that compose two or more stacked questions of one size."""
    reads = (action.reads for round_ in recording.rounds for action in round_.actions)
    chains = {r: None for r in reads if len(r) > 1 and all(q in asked for q in r) and len({q[1] for q in r}) == 1}
    return tuple(chains)


def _chain_steps(
    chains: tuple[tuple[Read, ...], ...], start: dict[Read, int]
) -> tuple[tuple[tuple[int, int], ...], np.ndarray, tuple[tuple[np.ndarray, np.ndarray], ...]]:
    """Where each chain's channels are among all chains' end to end; per chain channel, that
    channel of its first question; per further read, which chain channels it maps and where that
    question's channels are."""
    ends = np.cumsum([chain[0][1] for chain in chains]).tolist()
    bounds = tuple(zip([0, *ends[:-1]], ends, strict=True))
    first = _ranges([start[chain[0]] for chain in chains], [chain[0][1] for chain in chains])
    steps = []
    for depth in range(1, max(map(len, chains), default=1)):
        longer = [(chain, bound) for chain, bound in zip(chains, bounds, strict=True) if len(chain) > depth]
        which = _ranges([a for _, (a, _) in longer], [b - a for _, (a, b) in longer])
        steps.append(
            (which, _ranges([start[chain[depth]] for chain, _ in longer], [chain[0][1] for chain, _ in longer]))
        )
    return bounds, first, tuple(steps)


def _ranges(starts: list[int], counts: list[int]) -> np.ndarray:
    """`range(start, start + count)` for each, end to end."""
    return np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts, strict=True)] or [np.zeros(0, np.int64)])


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
