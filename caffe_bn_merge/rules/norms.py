"""Affine layers (BatchNorm, Scale, Bias, Power with power 1) read as per-channel affine maps, or
refused with the reason they are not one. Caffe's semantics are in each reader's docstring."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import MismatchError
from ..maths.affine import ChannelAffine, bias_affine, scale_affine
from ..net import WeightLayer
from . import bn_variants
from .reasons import Reason, Refusal

NORM_TYPES = ("BatchNorm", "BN", "Scale", "Bias", "Power")


def own_refusal(layer: object, assume_global_stats: bool = False) -> Refusal | None:
    """A reason found in the layer alone (no neighbours, no weights) why it can never fold;
    `assume_global_stats` reads a BatchNorm with `use_global_stats: false` as if it were true."""
    if len(layer.bottom) != 1 or len(layer.top) != 1:
        return Refusal(Reason.TWO_BOTTOMS, f"{len(layer.bottom)} bottom(s), {len(layer.top)} top(s)")
    if uses_batch_stats(layer) and not assume_global_stats:
        return Refusal(Reason.BATCH_STATS)
    if layer.type == "BN" and bn_variants.segnet_learns(layer):
        return Refusal(Reason.BATCH_STATS, "SegNet BN in bn_mode LEARN")
    if layer.type == "Power" and layer.power_param.power != 1:
        return Refusal(Reason.NOT_AFFINE, f"power {layer.power_param.power:g}")
    return None


def uses_batch_stats(layer: object) -> bool:
    """A BatchNorm that computes batch statistics at inference (`use_global_stats: false`)."""
    param = layer.batch_norm_param
    return layer.type == "BatchNorm" and param.HasField("use_global_stats") and not param.use_global_stats


def channels_of(layer: object, stored: WeightLayer | None) -> int | None:
    """The channel count a layer's own blobs reveal (None for scalar maps or missing blobs)."""
    if stored is None or not stored.blobs or layer.type == "Power":
        return None
    if layer.type in ("BatchNorm", "BN"):
        variant = bn_variants.detect(layer, stored.blobs)
        return None if isinstance(variant, Refusal) else stored.blobs[0].size  # blob 0 is per channel in each
    param = layer.scale_param if layer.type == "Scale" else layer.bias_param
    if param.axis == 1 and param.num_axes == 1:
        return stored.blobs[0].size
    return None


Reader = Callable[[list[np.ndarray]], ChannelAffine | Refusal]  # a layer's map from its blobs' values


def affine_reader(
    layer: object,
    stored: WeightLayer | None,
    channels: int,
    rank: int | None,
    bn_flavour: str = "auto",
    assume_global_stats: bool = False,
) -> Reader | Refusal:
    """How to read the map `layer` applies to a blob of `channels` channels (axis 1) and rank
    `rank`, or why it is not a fixed one. Everything that depends on the layer's parameters and its
    blobs' count and shapes is decided here (a refusal, or a mismatch raised); the reader computes
    the map from blobs of those shapes, whatever their values (a refusal when it is not finite).
    `bn_flavour` overrides the detected BatchNorm layout (`bn_variants`); `assume_global_stats`
    takes a BatchNorm's stored statistics even when it is set to use batch statistics."""
    refusal = own_refusal(layer, assume_global_stats)
    if refusal:
        return refusal
    if layer.type == "Power":
        param = layer.power_param
        return partial(_power, param.scale, param.shift, channels)
    if stored is None:
        raise MismatchError(f"layer '{layer.name}' ({layer.type}) has no blobs in the caffemodel")
    if layer.type in ("BatchNorm", "BN"):
        reader = _batchnorm(layer, stored, channels, bn_flavour)
    else:
        reader = _READERS[layer.type](layer, stored, channels, rank)
    return reader if isinstance(reader, Refusal) else partial(_finite, reader)


@dataclass(frozen=True, eq=False)
class BatchNormMap:
    """Reads the map of a BatchNorm / BN layer of `variant` (`bn_variants.affine`)."""

    variant: str
    layer: object
    channels: int

    def __call__(self, blobs: list[np.ndarray]) -> ChannelAffine:
        return bn_variants.affine(self.variant, self.layer, blobs, self.channels)


@dataclass(frozen=True, eq=False)
class ScaleMap:
    """Reads the map of a Scale layer: gamma (per channel, or one for all), and beta with `bias_term`."""

    bias_term: bool
    channels: int

    def __call__(self, blobs: list[np.ndarray]) -> ChannelAffine:
        return scale_affine(blobs[0], blobs[1] if self.bias_term else None, self.channels)


def map_reader(reader: Reader | Refusal) -> object:
    """What reads the map inside `affine_reader`'s reader (which refuses maps that are not finite)."""
    return reader.args[0] if isinstance(reader, partial) and reader.func is _finite else reader


def read_with(reader: Reader | Refusal, stored: WeightLayer | None) -> ChannelAffine | Refusal:
    """The answer of `affine_reader`'s result for the layer's blobs `stored`: a refusal stays."""
    return reader if isinstance(reader, Refusal) else reader(stored.blobs if stored is not None else [])


def _power(scale: float, shift: float, channels: int, blobs: list[np.ndarray]) -> ChannelAffine:
    return scale_affine(np.array([scale]), np.array([shift]), channels)


def reads_rank(layer: object) -> bool:
    """Whether `affine_reader`'s answer for `layer` depends on the rank of its input (a Scale or Bias
    whose axis counts from the last one)."""
    if layer.type == "Scale":
        return layer.scale_param.axis < 0
    return layer.type == "Bias" and layer.bias_param.axis < 0


def _finite(reader: Callable[[list[np.ndarray]], ChannelAffine], blobs: list[np.ndarray]) -> ChannelAffine | Refusal:
    """The map `reader` reads from `blobs`, refused when it is not finite everywhere: folding it
    would spread NaN or infinity into weights that other channels share (Caffe keeps it per channel)."""
    affine = reader(blobs)
    if np.isfinite(affine.scale).all() and np.isfinite(affine.shift).all():
        return affine
    bad = ~(np.isfinite(affine.scale) & np.isfinite(affine.shift))
    return Refusal(Reason.BAD_STATISTICS, f"{int(bad.sum())} channel(s)")


def _batchnorm(layer: object, stored: WeightLayer, channels: int, flavour: str) -> Reader | Refusal:
    """Any BatchNorm layout (`bn_variants`); eps from the layer's parameters."""
    variant = bn_variants.detect(layer, stored.blobs, flavour)
    if isinstance(variant, Refusal):
        return variant
    if variant == bn_variants.SEGNET:
        if bn_variants.segnet_learns(layer, stored.blobs):
            return Refusal(Reason.BATCH_STATS, "SegNet BN in bn_mode LEARN")
        _check_size(layer, stored.blobs[0].size == channels, channels)
    else:
        statistics = bn_variants.statistics(variant, stored.blobs)
        per_channel = [b for b in statistics[:4] if b is not None]
        _check_size(layer, all(b.size == channels for b in per_channel), channels)
    return BatchNormMap(variant, layer, channels)


def negative_variance(layer: object, stored: WeightLayer | None, flavour: str) -> int:
    """How many channels of a BatchNorm / BN layer's stored variance are negative (0 for other
    layers and layouts we do not read; `Stacked.negative_variance` counts many at once)."""
    if layer.type not in ("BatchNorm", "BN") or stored is None:
        return 0
    variant = bn_variants.detect(layer, stored.blobs, flavour)
    if isinstance(variant, Refusal) or variant == bn_variants.SEGNET:  # SegNet's BN stores no variance
        return 0
    return int(np.count_nonzero(bn_variants.statistics(variant, stored.blobs)[1] < 0))  # NaN is not < 0


def _scale(layer: object, stored: WeightLayer, channels: int, rank: int | None) -> Reader | Refusal:
    """Scale: gamma over bottom.shape[axis : axis+num_axes], plus beta when bias_term."""
    param = layer.scale_param
    expected = 2 if param.bias_term else 1
    if len(stored.blobs) != expected:
        raise MismatchError(
            f"layer '{layer.name}': Scale with bias_term {str(param.bias_term).lower()} needs "
            f"{expected} blob(s), the caffemodel has {len(stored.blobs)}"
        )
    gamma = stored.blobs[0]
    refusal = _per_channel(param.axis, param.num_axes, gamma.size, channels, rank)
    if refusal:
        return refusal
    _check_size(layer, not param.bias_term or stored.blobs[1].size == gamma.size, channels)
    return ScaleMap(param.bias_term, channels)


def _bias(layer: object, stored: WeightLayer, channels: int, rank: int | None) -> Reader | Refusal:
    """Bias: beta over bottom.shape[axis : axis+num_axes]."""
    param = layer.bias_param
    if len(stored.blobs) != 1:
        raise MismatchError(f"layer '{layer.name}': Bias needs 1 blob, the caffemodel has {len(stored.blobs)}")
    refusal = _per_channel(param.axis, param.num_axes, stored.blobs[0].size, channels, rank)
    return refusal or (lambda blobs: bias_affine(blobs[0], channels))


def _per_channel(axis: int, num_axes: int, size: int, channels: int, rank: int | None) -> Refusal | None:
    """None when a parameter blob of `size` values over [axis, axis+num_axes) is per channel."""
    if num_axes == 0 and size == 1:
        return None  # one scalar for the whole blob
    if axis < 0:
        if rank is None:
            return Refusal(Reason.NOT_PER_CHANNEL, f"axis {axis} on a blob of unknown rank")
        axis += rank
    if axis != 1 or size != channels:
        return Refusal(Reason.NOT_PER_CHANNEL, f"axis {axis}, {size} values for {channels} channels")
    return None


def _check_size(layer: object, ok: bool, channels: int) -> None:
    if not ok:
        raise MismatchError(f"layer '{layer.name}': blob sizes do not match the {channels} channels of its input")


_READERS: dict[str, Callable[[object, WeightLayer, int, int | None], Reader | Refusal]] = {
    "Scale": _scale,
    "Bias": _bias,
}
