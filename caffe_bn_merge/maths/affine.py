"""Per-channel affine maps y = scale * x + shift, in float64: what BatchNorm, Scale and Bias compute
at inference, and their composition. Arrays in, arrays out."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelAffine:
    """y[c] = scale[c] * x[c] + shift[c] for every channel c (float64 vectors of one length)."""

    scale: np.ndarray
    shift: np.ndarray

    def then(self, after: "ChannelAffine") -> "ChannelAffine":
        """The map that applies `self` first, then `after`."""
        return ChannelAffine(after.scale * self.scale, after.scale * self.shift + after.shift)

    def is_identity(self) -> bool:
        """True when the map changes no value (scale exactly 1, shift exactly 0)."""
        return bool((self.scale == 1.0).all() and (self.shift == 0.0).all())


def batchnorm_affine(mean_sum: np.ndarray, var_sum: np.ndarray, factor: float, eps: float) -> ChannelAffine:
    """BVLC BatchNorm at inference: blobs hold mean*s and var*s with s the moving-average factor.

    f = 0 if s == 0 else 1/s;  mean = mean_sum*f;  var = var_sum*f
    y = (x - mean) / sqrt(var + eps)  ->  scale = 1/sqrt(var + eps),  shift = -mean*scale

    `rules.stacked` computes the same for many layers at once, in the same order: change both.
    """
    f = 0.0 if factor == 0 else 1.0 / factor
    mean = np.asarray(mean_sum, np.float64).ravel() * f
    var = np.asarray(var_sum, np.float64).ravel() * f
    with np.errstate(divide="ignore", invalid="ignore"):  # non-finite results are refused by the caller
        scale = 1.0 / np.sqrt(var + eps)
        return ChannelAffine(scale, -mean * scale)


def scale_affine(gamma: np.ndarray, beta: np.ndarray | None, channels: int) -> ChannelAffine:
    """Scale (gamma, optional beta) broadcast to `channels`; gamma of size 1 is one scalar
    (`rules.stacked` reads many at once the same way)."""
    shift = np.zeros(channels) if beta is None else _per_channel(beta, channels)
    return ChannelAffine(_per_channel(gamma, channels), shift)


def _per_channel(values: np.ndarray, channels: int) -> np.ndarray:
    """`values` (one per channel, or one for all) as a new float64 vector over `channels`."""
    values = np.array(values, np.float64).reshape(-1)  # a copy
    return values if values.size == channels else np.broadcast_to(values, (channels,)).copy()


def bias_affine(beta: np.ndarray, channels: int) -> ChannelAffine:
    """Bias layer: y = x + beta."""
    return scale_affine(np.ones(1), beta, channels)
