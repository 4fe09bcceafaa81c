"""Quantization readiness of folded weights: what folding a BatchNorm did to the weights' int8
resolution. Arrays in, numbers out (float64 throughout).

Folding multiplies each output channel's weights by that channel's scale gamma / sqrt(var + eps).
A channel with a tiny `var + eps` gets a huge factor; with one int8 scale per tensor, every other
channel then keeps only a few of its 255 levels. The measures, per folded host:

- per-channel weight range: max |w| over each output channel, before and after folding;
- dynamic-range ratio: largest channel range / median channel range (1 is ideal);
- symmetric int8 error, per tensor (one scale max|w|/127) and per channel (one per output channel),
  judged on the typical channel, since each output channel is read against its own magnitude: with
  r_c = sum_c (w - q(w))^2 / sum_c w^2 over the weights of output channel c, and R the median of r_c
  over the channels that are not all zero, SQNR = -10 log10(R) dB and relative RMS error = sqrt(R).
  (A whole-tensor ratio would let one huge channel hide what every other channel lost; a mean would
  let one near-zero channel decide.) The folded
  weights' error is judged on the scale the unfolded net had (divided by what folding multiplied
  each weight by), so a backward fold, which scales input columns, shows its cost too.

A host is flagged when folding lowers its per-tensor int8 SQNR by more than `SQNR_DROP_DB`: 12 dB,
two bits of resolution (the largest channel range grew about 4x more than the typical one). Folding
well-conditioned BatchNorms (trained-looking statistics: `synthetic.synth`) costs 0-10 dB; one channel
with a near-zero variance costs 30 dB and more.
"""

import math
from dataclasses import dataclass

import numpy as np

from ..net import FoldedHost
from .fold_math import HOST_LAYOUTS

SQNR_DROP_DB = 12.0  # flag a host when folding costs its per-tensor int8 weights more than this
TINY_VARIANCE = 1e-2  # var + eps below this fraction of the layer's median: the channel's scale is >= 10x typical
INT8_LEVELS = 127  # symmetric int8: q in [-127, 127]


@dataclass(frozen=True)
class Int8Error:
    """Weight error of symmetric int8 quantization."""

    sqnr_db: float  # inf when quantization is exact (or all weights are 0)
    relative_rms: float  # ||w - q(w)|| / ||w||


@dataclass(frozen=True)
class HostReadiness:
    """The quantization readiness of one folded host."""

    host: str
    layers: tuple[str, ...]  # the layers folded into it
    backward: bool  # a chain was folded into its inputs (per-output-channel scales cannot undo it)
    ranges_before: np.ndarray  # max |w| per output channel, as stored
    ranges_after: np.ndarray  # the same, folded
    tensor_before: Int8Error  # per-tensor int8, as stored
    tensor_after: Int8Error  # per-tensor int8, folded
    channel_after: Int8Error  # per-channel int8, folded
    # by chain ("bn + scale") or BatchNorm layer, the channels (only those with any), in its channel numbers:
    constant_channels: dict[str, tuple[int, ...]]  # scale 0 (gamma == 0): the output no longer depends on the input
    tiny_variance_channels: dict[str, tuple[int, ...]]  # var + eps < TINY_VARIANCE x the BatchNorm's median

    @property
    def ratio_before(self) -> float:
        return range_ratio(self.ranges_before)

    @property
    def ratio_after(self) -> float:
        return range_ratio(self.ranges_after)

    @property
    def sqnr_drop_db(self) -> float:
        """How much folding lowered the per-tensor int8 SQNR (negative: it improved)."""
        before, after = self.tensor_before.sqnr_db, self.tensor_after.sqnr_db
        return 0.0 if before == after else before - after

    @property
    def flagged(self) -> bool:
        return self.sqnr_drop_db > SQNR_DROP_DB

    def advice(self) -> str:
        """What to do about a flagged host ("" when it is not flagged)."""
        if not self.flagged:
            return ""
        text = (
            f"folding costs per-tensor int8 {self.sqnr_drop_db:.0f} dB (range ratio "
            f"{self.ratio_before:.3g} -> {self.ratio_after:.3g})"
        )
        for layer, channels in self.tiny_variance_channels.items():
            text += f", from tiny var + eps in {layer} channel(s) {_listed(channels)}"
        keep = f"keep {' + '.join(self.layers)} unfolded" + (" (--no-backward)" if self.backward else "")
        if self.channel_after.sqnr_db >= self.tensor_before.sqnr_db - SQNR_DROP_DB:
            return f"{text}: quantize its weights per channel ({self.channel_after.sqnr_db:.0f} dB), or {keep}"
        return f"{text}: {keep} (per-channel int8 does not recover it: {self.channel_after.sqnr_db:.0f} dB)"


def _listed(channels: tuple[int, ...], most: int = 5) -> str:
    shown = ", ".join(map(str, channels[:most]))
    return shown + (f" (+{len(channels) - most})" if len(channels) > most else "")


def output_rows(weights: np.ndarray, layout: str, groups: int, c_out: int) -> np.ndarray:
    """The weights as float64 rows, one per output channel (any host layout)."""
    spec = HOST_LAYOUTS[layout]
    canon = spec.to_canonical(np.asarray(weights), groups, c_out, spec.input_size(weights, groups))
    return canon.reshape(c_out, -1).astype(np.float64)


def channel_ranges(rows: np.ndarray) -> np.ndarray:
    """max |w| of each row (output channel)."""
    return np.max(np.abs(rows), axis=1, initial=0.0)


def range_ratio(ranges: np.ndarray) -> float:
    """Largest channel range / median channel range (inf when the median is 0, 1 when all are 0)."""
    largest, median = float(np.max(ranges, initial=0.0)), float(np.median(ranges))
    if largest == 0:
        return 1.0
    return largest / median if median > 0 else math.inf


def quantize_int8(rows: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric int8 round trip: w -> round(w / s) clipped to +-127, times s, with s = max|w| / 127
    over the tensor or over each row. All-zero rows (or tensor) stay 0."""
    ranges = channel_ranges(rows)
    step = (ranges[:, None] if per_channel else np.max(ranges, initial=0.0)) / INT8_LEVELS
    q = rows / np.where(step > 0, step, 1.0)
    np.rint(q, out=q)
    np.clip(q, -INT8_LEVELS, INT8_LEVELS, out=q)
    q *= step
    return q


def int8_error(rows: np.ndarray, per_channel: bool, factors: np.ndarray | None = None) -> Int8Error:
    """The error symmetric int8 quantization (per tensor or per channel) makes in `rows`, as the
    median over the rows (output channels) that are not all zero of each row's noise / signal power.
    `factors` (the shape of `rows`): what folding multiplied each weight by; noise and signal are
    then measured divided by them (weights with factor 0 are 0 and carry no error). Factors that
    scale whole rows need not be given: they change no row's ratio."""
    noise = quantize_int8(rows, per_channel)
    np.subtract(rows, noise, out=noise)
    if factors is not None:
        safe = np.where(factors != 0, factors, 1.0)
        rows, noise = rows / safe, noise / safe
    signal = np.einsum("ij,ij->i", rows, rows)
    noise = np.einsum("ij,ij->i", noise, noise)
    live = signal > 0
    ratio = float(np.median(noise[live] / signal[live])) if live.any() else 0.0
    if ratio == 0:
        return Int8Error(math.inf, 0.0)
    return Int8Error(-10 * math.log10(ratio), math.sqrt(ratio))


def input_factors(host: FoldedHost) -> np.ndarray | None:
    """What backward folds multiplied each weight by (their scales on the host's input channels, per
    group), as rows like `output_rows`; None without a backward fold. (A forward fold scales whole
    rows, which changes no row's relative error.)"""
    backward = [chain.scale for chain in host.chains if chain.rule == "backward"]
    if not backward:
        return None
    g, c_out = host.groups, host.c_out
    c_in = HOST_LAYOUTS[host.layout].input_size(host.original, g)
    k = host.original.size // (c_out * c_in // g)
    factors = np.ones((g, 1, c_in // g, 1))
    for scale in backward:
        factors = factors * np.repeat(scale, c_in // scale.size).reshape(g, 1, c_in // g, 1)  # IP: x positions
    return np.broadcast_to(factors, (g, c_out // g, c_in // g, k)).reshape(c_out, -1)


def tiny_variance_channels(variance_eps: np.ndarray) -> np.ndarray:
    """Channels whose var + eps is below TINY_VARIANCE x the layer's median var + eps."""
    return np.flatnonzero(variance_eps < TINY_VARIANCE * np.median(variance_eps))


def readiness(host: FoldedHost) -> HostReadiness:
    """The quantization readiness of one folded host. Channel numbers are the chains' channels:
    the host's outputs for a forward fold, its inputs for a backward one."""
    before = output_rows(host.original, host.layout, host.groups, host.c_out)
    after = output_rows(host.folded.blobs[0], host.layout, host.groups, host.c_out)
    factors = input_factors(host)
    constant = {" + ".join(chain.layers): _channels(np.flatnonzero(chain.scale == 0)) for chain in host.chains}
    tiny = {bn: _channels(tiny_variance_channels(v)) for chain in host.chains for bn, v in chain.variance_eps.items()}
    return HostReadiness(
        host.name,
        tuple(name for chain in host.chains for name in chain.layers),
        any(chain.rule == "backward" for chain in host.chains),
        channel_ranges(before),
        channel_ranges(after),
        int8_error(before, per_channel=False),
        int8_error(after, per_channel=False, factors=factors),
        int8_error(after, per_channel=True, factors=factors),
        {chain: channels for chain, channels in constant.items() if channels},
        {layer: channels for layer, channels in tiny.items() if channels},
    )


def _channels(indices: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in indices)
