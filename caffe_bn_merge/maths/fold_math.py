"""Folding a per-channel affine map into a host layer's weights. Arrays in, arrays out, float64.

Every host weight blob is viewed in one canonical layout, W[g, o, i, k]: group g, output channel
o and input channel i within that group, k the remaining (kernel / spatial) positions. The layouts
(`HOST_LAYOUTS`) are the only host-specific knowledge:

- Convolution      [C_out, C_in/g, kh, kw]    -> reshape (g, C_out/g, C_in/g, kh*kw)
- Deconvolution    [C_in, C_out/g, kh, kw]    -> reshape (g, C_in/g, C_out/g, k), swap axes 1 and 2
- InnerProduct     [N, K]                     -> reshape (1, N, C, K/C), C input channels
- InnerProduct^T   [K, N] (`transpose: true`) -> transpose, then as InnerProduct

Forward fold (affine a, b after the host, on its outputs), exact always:
    W'[g, o] = a[g, o] * W[g, o];   bias'[g, o] = a[g, o] * bias[g, o] + b[g, o]
Backward fold (affine a, b before the host, on its inputs), exact when every output sums over all
its inputs with no padding (InnerProduct; Convolution with pad 0):
    W'[g, o, i] = W[g, o, i] * a[g, i];   bias'[g, o] = bias[g, o] + sum_{i,k} W[g, o, i, k] * b[g, i]
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..net import ScaledRows
from .affine import ChannelAffine

# Shape (groups, out/groups, in/groups, rest); a view of the stored weights where the layout allows.
# Every product with an affine map (float64) is computed in float64, then cast once by the caller.
Canonical = np.ndarray


@dataclass(frozen=True)
class HostLayout:
    """How one kind of host stores its weights, as maps to and from the canonical layout."""

    to_canonical: Callable[[np.ndarray, int, int, int], Canonical]  # (w, groups, c_out, c_in)
    from_canonical: Callable[[Canonical, tuple[int, ...]], np.ndarray]  # (canon, stored shape)
    input_size: Callable[[np.ndarray, int], int]  # (w, groups) -> C_in, or K for InnerProduct
    backward_ok: bool  # can take an affine on its inputs exactly (given no padding)


def _conv_in(w: np.ndarray, groups: int, c_out: int, c_in: int) -> Canonical:
    return np.asarray(w).reshape(groups, c_out // groups, c_in // groups, -1)


def _deconv_in(w: np.ndarray, groups: int, c_out: int, c_in: int) -> Canonical:
    return np.asarray(w).reshape(groups, c_in // groups, c_out // groups, -1).transpose(0, 2, 1, 3)


def _ip_in(w: np.ndarray, groups: int, c_out: int, c_in: int) -> Canonical:
    return np.asarray(w).reshape(1, c_out, c_in, -1)


def _ip_t_in(w: np.ndarray, groups: int, c_out: int, c_in: int) -> Canonical:
    return np.asarray(w).reshape(-1, c_out).T.reshape(1, c_out, c_in, -1)


def _deconv_out(canon: Canonical, shape: tuple[int, ...]) -> np.ndarray:
    return canon.transpose(0, 2, 1, 3).reshape(shape)


def _ip_t_out(canon: Canonical, shape: tuple[int, ...]) -> np.ndarray:
    return canon.reshape(canon.shape[1], -1).T.reshape(shape)


def _reshape_out(canon: Canonical, shape: tuple[int, ...]) -> np.ndarray:
    return canon.reshape(shape)


HOST_LAYOUTS = {
    "conv": HostLayout(_conv_in, _reshape_out, lambda w, g: w.shape[1] * g, backward_ok=True),
    "deconv": HostLayout(_deconv_in, _deconv_out, lambda w, g: w.shape[0], backward_ok=False),
    "ip": HostLayout(_ip_in, _reshape_out, lambda w, g: w.shape[-1], backward_ok=True),
    "ip_t": HostLayout(_ip_t_in, _ip_t_out, lambda w, g: w.size // w.shape[-1], backward_ok=True),
}


# Layouts whose stored blob has one row per output channel (whatever the groups): a forward fold
# just scales rows, which is done a block of rows at a time as the blob is written (`ScaledRows`).
ROWS_ARE_OUTPUTS = ("conv", "ip")
FLOAT64 = np.dtype(np.float64)


def fold_forward(
    weights: np.ndarray,
    bias: np.ndarray | None,
    affine: ChannelAffine,
    layout: str,
    groups: int,
    dtype: np.dtype = FLOAT64,
) -> tuple[np.ndarray, np.ndarray]:
    """Host then affine -> one host: new weights (in the stored shape, as `dtype`: each product is
    computed in float64 and cast once) and bias (float64)."""
    new_weights, new_bias = fold_forward_lazy(weights, bias, affine, layout, groups, dtype)
    return np.asarray(new_weights), new_bias


def fold_forward_lazy(
    weights: np.ndarray,
    bias: np.ndarray | None,
    affine: ChannelAffine,
    layout: str,
    groups: int,
    dtype: np.dtype = FLOAT64,
) -> tuple[np.ndarray | ScaledRows, np.ndarray]:
    """`fold_forward`, but weights whose rows are outputs come as `ScaledRows`, made when written."""
    c_out = affine.scale.size
    new_bias = affine.shift + affine.scale * _bias64(bias, c_out)
    if layout in ROWS_ARE_OUTPUTS:
        return ScaledRows(weights.reshape(c_out, -1), affine.scale, weights.shape, np.dtype(dtype)), new_bias
    spec = HOST_LAYOUTS[layout]
    canon = spec.to_canonical(weights, groups, c_out, spec.input_size(weights, groups))
    a = affine.scale.reshape(groups, c_out // groups, 1, 1)
    return spec.from_canonical(canon * a, weights.shape).astype(dtype, copy=False), new_bias


def fold_backward(
    weights: np.ndarray, bias: np.ndarray | None, affine: ChannelAffine, layout: str, groups: int, c_out: int
) -> tuple[np.ndarray, np.ndarray]:
    """Affine then host -> one host (caller guarantees no padding): new (weights, bias) in float64."""
    spec = HOST_LAYOUTS[layout]
    c_in = affine.scale.size
    canon = spec.to_canonical(weights, groups, c_out, c_in)
    b = affine.shift.reshape(groups, c_in // groups)
    new_bias = _bias64(bias, c_out) + np.einsum("goik,gi->go", canon, b).reshape(c_out)
    a = affine.scale.reshape(groups, 1, c_in // groups, 1)
    return spec.from_canonical(canon * a, weights.shape), new_bias


def _bias64(bias: np.ndarray | None, channels: int) -> np.ndarray:
    return np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(channels)
