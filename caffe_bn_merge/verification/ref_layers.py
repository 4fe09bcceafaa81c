"""Caffe layers as float64 numpy functions, one per layer type, at the TEST phase.

Each is `forward(layer, inputs, blobs) -> outputs`: the LayerParameter, the bottom values and the
layer's stored blobs (float64), in Caffe's order. Written from Caffe's layer sources (BVLC master,
the SSD fork for Normalize / Permute / PriorBox, and the forks named at each fork layer).
Convolutions run as im2col views (`sliding_window_view`) contracted with BLAS; loops run over
kernel taps or groups only, never over pixels or channels.
"""

import math
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import VerifyError
from ..rules import bn_variants
from ..rules.reasons import Refusal
from ..shapes import canonical_axis, conv_geometry, prior_aspect_ratios

Forward = Callable[[object, list[np.ndarray], list[np.ndarray]], list[np.ndarray]]
SEGNET_VAR_EPS = 1e-9  # caffe-segnet's BN layer: fixed in LayerSetUp
CORNER, CORNER_SIZE = 1, 3  # PriorBoxParameter.CodeType (CENTER_SIZE = 2)


def _fail(layer: object, problem: str) -> VerifyError:
    return VerifyError(f"layer '{layer.name}' ({layer.type}): {problem}")


# --- convolution -----------------------------------------------------------------------------------


def _conv_input(layer: object, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], tuple[list[int], ...]]:
    """x as (B, C, *spatial) (the axes before `axis` merged into B), those axes, and the kernel,
    stride, pad and dilation per spatial axis."""
    p = layer.convolution_param
    axis = canonical_axis(p.axis, x.ndim)
    try:
        geometry = conv_geometry(p, x.ndim - axis - 1)
    except ValueError as err:
        raise _fail(layer, str(err)) from None
    return x.reshape(-1, *x.shape[axis:]), x.shape[:axis], geometry


def _windows(x: np.ndarray, kernel: list[int], stride: list[int], dilation: list[int]) -> np.ndarray:
    """(B, C, *out, *kernel) view of the (already padded) x of shape (B, C, *spatial)."""
    spatial = list(range(2, x.ndim))
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    view = sliding_window_view(x, extent, axis=spatial)
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in stride) + tuple(slice(None, None, d) for d in dilation)
    return view[index]


def convolution(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Convolution (also DepthwiseConvolution / ConvolutionDepthwise: the same with its `group`)."""
    x, outer, (kernel, stride, pad, dilation) = _conv_input(layer, inputs[0])
    p, w, group = layer.convolution_param, blobs[0], layer.convolution_param.group
    channels, spatial = x.shape[1], x.shape[2:]
    x = np.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in pad])
    cols = _windows(x, kernel, stride, dilation)  # (B, C, *out, *kernel)
    n_sp = len(spatial)
    out_sp = cols.shape[2 : 2 + n_sp]
    w = w.reshape(w.shape[0], w.shape[1], *kernel)
    cg, og = channels // group, w.shape[0] // group
    if cg == 1 and og == 1:  # depthwise: one multiply-add per kernel tap
        y = _depthwise(cols, w, n_sp)
    else:
        taps, w_taps = range(2 + n_sp, 2 + 2 * n_sp), range(2, 2 + n_sp)
        parts = [
            np.tensordot(cols[:, g * cg : (g + 1) * cg], w[g * og : (g + 1) * og], ([1, *taps], [1, *w_taps]))
            for g in range(group)
        ]  # each (B, *out, og)
        y = np.moveaxis(np.concatenate(parts, axis=-1), -1, 1)
    if p.bias_term:
        y = y + blobs[1].reshape(1, -1, *([1] * n_sp))
    return [y.reshape(*outer, w.shape[0], *out_sp)]


def _depthwise(cols: np.ndarray, w: np.ndarray, n_sp: int) -> np.ndarray:
    out = np.zeros(cols.shape[: 2 + n_sp])
    per_channel = (1, -1) + (1,) * n_sp
    for tap in np.ndindex(*w.shape[2:]):
        out += cols[(Ellipsis, *tap)] * w[(slice(None), 0, *tap)].reshape(per_channel)
    return out


def deconvolution(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Deconvolution: each input pixel spreads its kernel over the output (col2im), then `pad` is cut."""
    x, outer, (kernel, stride, pad, dilation) = _conv_input(layer, inputs[0])
    p, w, group = layer.convolution_param, blobs[0], layer.convolution_param.group
    channels, spatial = x.shape[1], x.shape[2:]
    n_sp = len(spatial)
    cg, og = channels // group, w.shape[1]
    w = w.reshape(channels, og, *kernel)
    full = [s * (n - 1) + d * (k - 1) + 1 for n, s, k, d in zip(spatial, stride, kernel, dilation, strict=True)]
    y = np.zeros((x.shape[0], og * group, *full))
    for g in range(group):
        xs = x[:, g * cg : (g + 1) * cg]
        for tap in np.ndindex(*kernel):
            contribution = np.moveaxis(np.tensordot(xs, w[g * cg : (g + 1) * cg, :, *tap], ([1], [0])), -1, 1)
            where = tuple(
                slice(t * d, t * d + s * (n - 1) + 1, s)
                for t, d, s, n in zip(tap, dilation, stride, spatial, strict=True)
            )
            y[(slice(None), slice(g * og, (g + 1) * og), *where)] += contribution
    y = y[(slice(None), slice(None), *(slice(q, f - q) for q, f in zip(pad, full, strict=True)))]
    if p.bias_term:
        y = y + blobs[1].reshape(1, -1, *([1] * n_sp))
    return [y.reshape(*outer, og * group, *y.shape[2:])]


def inner_product(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p, x = layer.inner_product_param, inputs[0]
    axis = canonical_axis(p.axis, x.ndim)
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    w = blobs[0].reshape(flat.shape[1], -1) if p.transpose else blobs[0].reshape(-1, flat.shape[1]).T
    y = flat @ w
    if p.bias_term:
        y = y + blobs[1].ravel()
    return [y.reshape(*x.shape[:axis], w.shape[1])]


# --- pooling ---------------------------------------------------------------------------------------


def _pool_geometry(p: object, h: int, w: int) -> tuple[list[int], list[int], list[int]]:
    if p.global_pooling:
        return [h, w], [1, 1], [0, 0]
    kernel = [p.kernel_h, p.kernel_w] if p.HasField("kernel_h") else [p.kernel_size] * 2
    stride = [p.stride_h, p.stride_w] if p.HasField("stride_h") else [p.stride] * 2
    pad = [p.pad_h, p.pad_w] if p.HasField("pad_h") or p.HasField("pad_w") else [p.pad] * 2
    return kernel, stride, pad


def _pooled(size: int, k: int, s: int, q: int, ceil: bool) -> int:
    """Caffe's output size: ceil (or floor) rounding, minus a last window starting in the padding."""
    span = size + 2 * q - k
    out = (-(-span // s) if ceil else span // s) + 1
    if q and (out - 1) * s >= size + q:
        out -= 1
    return out


def pooling(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """MAX over the window clipped to the input; AVE divides by the window clipped to the padded
    input (so padding counts, the overhang of ceil rounding does not)."""
    p, x = layer.pooling_param, inputs[0]
    h, w = x.shape[2:]
    kernel, stride, pad = _pool_geometry(p, h, w)
    ceil = p.round_mode == p.CEIL and p.ceil_mode
    out = [_pooled(size, k, s, q, ceil) for size, k, s, q in zip((h, w), kernel, stride, pad, strict=True)]
    after = [
        max(0, (o - 1) * s + k - size - q) for o, s, k, size, q in zip(out, stride, kernel, (h, w), pad, strict=True)
    ]
    widths = [(0, 0), (0, 0), (pad[0], after[0]), (pad[1], after[1])]
    method = p.PoolMethod.Name(p.pool)
    if method == "MAX":
        cols = _windows(np.pad(x, widths, constant_values=-np.inf), kernel, stride, [1, 1])
        return [cols[:, :, : out[0], : out[1]].max(axis=(4, 5))]
    if method != "AVE":
        raise _fail(layer, f"{method} pooling has no CPU implementation in Caffe")
    sums = _windows(np.pad(x, widths), kernel, stride, [1, 1]).sum(axis=(4, 5))[:, :, : out[0], : out[1]]
    sizes = [
        np.minimum(np.arange(o) * s - q + k, size + q) - (np.arange(o) * s - q)
        for o, s, q, k, size in zip(out, stride, pad, kernel, (h, w), strict=True)
    ]
    return [sums / np.outer(sizes[0], sizes[1])]


# --- element-wise ----------------------------------------------------------------------------------


def _unary(function: Callable[[object, np.ndarray], np.ndarray]) -> Forward:
    return lambda layer, inputs, blobs: [function(layer, inputs[0])]


def _relu(layer: object, x: np.ndarray) -> np.ndarray:
    slope = layer.relu_param.negative_slope
    return np.maximum(x, 0) + slope * np.minimum(x, 0)


def _elu(layer: object, x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, layer.elu_param.alpha * np.expm1(np.minimum(x, 0)))


def _bnll(layer: object, x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))


def _power(layer: object, x: np.ndarray) -> np.ndarray:
    p = layer.power_param
    return (p.shift + p.scale * x) ** p.power


def _exp(layer: object, x: np.ndarray) -> np.ndarray:
    p = layer.exp_param
    log_base = 1.0 if p.base == -1 else math.log(p.base)
    return np.exp(log_base * (p.shift + p.scale * x))


def _log(layer: object, x: np.ndarray) -> np.ndarray:
    p = layer.log_param
    log_base = 1.0 if p.base == -1 else math.log(p.base)
    return np.log(p.shift + p.scale * x) / log_base


def _threshold(layer: object, x: np.ndarray) -> np.ndarray:
    return (x > layer.threshold_param.threshold).astype(np.float64)


def tile(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p, x = layer.tile_param, inputs[0]
    reps = [1] * x.ndim
    reps[canonical_axis(p.axis, x.ndim)] = p.tiles
    return [np.tile(x, reps)]


def reduction(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """SUM, ASUM, SUMSQ or MEAN over all axes from `axis` on, times `coeff`."""
    p, x = layer.reduction_param, inputs[0]
    axis = canonical_axis(p.axis, x.ndim)
    flat = x.reshape(*x.shape[:axis], -1)
    operation = p.ReductionOp.Name(p.operation)
    values = {"SUM": flat, "ASUM": np.abs(flat), "SUMSQ": flat * flat, "MEAN": flat / flat.shape[-1]}[operation]
    return [values.sum(axis=-1) * p.coeff]


def prelu(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    x = inputs[0]
    slope = blobs[0].ravel()
    slope = slope[0] if layer.prelu_param.channel_shared else slope.reshape(1, -1, *([1] * (x.ndim - 2)))
    return [np.maximum(x, 0) + slope * np.minimum(x, 0)]


def eltwise(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p = layer.eltwise_param
    operation = p.EltwiseOp.Name(p.operation)
    if operation == "PROD":
        return [math.prod(inputs[1:], start=inputs[0])]
    if operation == "MAX":
        return [np.maximum.reduce(inputs)]
    coeffs = list(p.coeff) or [1.0] * len(inputs)
    if len(coeffs) != len(inputs):
        raise _fail(layer, f"{len(coeffs)} coeff for {len(inputs)} bottoms")
    return [sum(c * x for c, x in zip(coeffs, inputs, strict=True))]


def softmax(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    x = inputs[0]
    axis = canonical_axis(layer.softmax_param.axis, x.ndim)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [e / e.sum(axis=axis, keepdims=True)]


def lrn(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """ACROSS_CHANNELS: x * (k + alpha/n * sum of x^2 over n channels)^-beta; WITHIN_CHANNEL:
    x * (1 + alpha * mean of x^2 over an n x n window, padding counted)^-beta."""
    p, x = layer.lrn_param, inputs[0]
    size, half = p.local_size, (p.local_size - 1) // 2
    squares = x * x
    if p.norm_region == p.ACROSS_CHANNELS:
        padded = np.pad(squares, [(0, 0), (half, size - 1 - half), (0, 0), (0, 0)])
        total = sliding_window_view(padded, size, axis=1).sum(axis=-1)
        return [x * (p.k + p.alpha / size * total) ** -p.beta]
    padded = np.pad(squares, [(0, 0), (0, 0), (half, size - 1 - half), (half, size - 1 - half)])
    mean = sliding_window_view(padded, (size, size), axis=(2, 3)).sum(axis=(-1, -2)) / (size * size)
    return [x * (1.0 + p.alpha * mean) ** -p.beta]


def mvn(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Mean (and variance) over each sample's H*W, or C*H*W with across_channels; y = (x-mean)/(std+eps)."""
    p, x = layer.mvn_param, inputs[0]
    flat = x.reshape(x.shape[0], -1) if p.across_channels else x.reshape(x.shape[0] * x.shape[1], -1)
    y = flat - flat.mean(axis=1, keepdims=True)
    if p.normalize_variance:
        y = y / (np.sqrt((y * y).mean(axis=1, keepdims=True)) + p.eps)
    return [y.reshape(x.shape)]


# --- normalisation and affine layers ----------------------------------------------------------------


def _channel(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float64).reshape(1, -1, *([1] * (x.ndim - 2)))


def _batch_stats(x: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps), mean and variance per channel over every other axis."""
    axes = (0, *range(2, x.ndim))
    centred = x - x.mean(axis=axes, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + eps)


def batch_norm(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """BatchNorm in any layout `bn_variants` knows (BVLC, NVIDIA Caffe 3/5 blobs, 0.15) and PSPNet's
    4-blob `BN`; `use_global_stats: false` normalises with the batch's own statistics."""
    x = inputs[0]
    variant = bn_variants.detect(layer, blobs)
    if isinstance(variant, Refusal):
        raise _fail(layer, str(variant))
    param = layer.batch_norm_param
    if layer.type == "BatchNorm" and param.HasField("use_global_stats") and not param.use_global_stats:
        eps = max(param.eps, bn_variants.NVCAFFE_MIN_EPS) if variant == "nvcaffe" else param.eps
        y = _batch_stats(x, eps)
        _, _, gamma, beta, _ = bn_variants.statistics(variant, blobs)
        return [y if gamma is None else y * _channel(gamma, x) + _channel(beta, x)]
    affine = bn_variants.affine(variant, layer, blobs, x.shape[1])
    return [x * _channel(affine.scale, x) + _channel(affine.shift, x)]


def bn(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """`BN`: PSPNet's (4 blobs: slope, bias, mean, var) as `batch_norm`; caffe-segnet's (2 blobs:
    scale, shift): `bn_mode: INFERENCE` -> scale*x + shift, LEARN (the default) -> the batch's own
    statistics (eps 1e-9), then scale and shift."""
    if bn_variants.detect(layer, blobs) != bn_variants.SEGNET:
        return batch_norm(layer, inputs, blobs)
    x = inputs[0]
    normalised = _batch_stats(x, SEGNET_VAR_EPS) if bn_variants.segnet_learns(layer, blobs) else x
    return [normalised * _channel(blobs[0], x) + _channel(blobs[1], x)]


def _param_view(values: np.ndarray, x: np.ndarray, axis: int, count: int) -> np.ndarray:
    return values.reshape((1,) * axis + x.shape[axis : axis + count] + (1,) * (x.ndim - axis - count))


def _axes(x: np.ndarray, axis: int, num_axes: int, second: np.ndarray | None) -> tuple[int, int]:
    axis = canonical_axis(axis, x.ndim)
    if second is not None:
        return axis, second.ndim
    return axis, x.ndim - axis if num_axes == -1 else num_axes


def scale(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Scale: gamma over bottom.shape[axis : axis+num_axes] (stored, or bottom 1), optional beta."""
    p, x = layer.scale_param, inputs[0]
    second = inputs[1] if len(inputs) > 1 else None
    axis, count = _axes(x, p.axis, p.num_axes, second)
    gamma, rest = (second, blobs) if second is not None else (blobs[0], blobs[1:])
    y = x * _param_view(gamma, x, axis, count)
    if p.bias_term:
        y = y + _param_view(rest[0], x, axis, count)
    return [y]


def bias(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p, x = layer.bias_param, inputs[0]
    second = inputs[1] if len(inputs) > 1 else None
    axis, count = _axes(x, p.axis, p.num_axes, second)
    return [x + _param_view(second if second is not None else blobs[0], x, axis, count)]


def normalize(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """SSD Normalize: x / sqrt(sum x^2 + eps) over C*H*W (across_spatial) or over C per pixel, times
    the scale blob (one value if channel_shared, else per channel)."""
    p, x = layer.norm_param, inputs[0]
    axes = tuple(range(1, x.ndim)) if p.across_spatial else (1,)
    y = x / np.sqrt((x * x).sum(axis=axes, keepdims=True) + p.eps)
    factor = blobs[0].ravel()
    return [y * (factor[0] if p.channel_shared else _channel(factor, x))]


# --- moving values ---------------------------------------------------------------------------------


def concat(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p = layer.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") and not p.HasField("axis") else p.axis
    return [np.concatenate(inputs, axis=canonical_axis(axis, inputs[0].ndim))]


def slice_(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p, x = layer.slice_param, inputs[0]
    axis = p.slice_dim if p.HasField("slice_dim") and not p.HasField("axis") else p.axis
    axis = canonical_axis(axis, x.ndim)
    if p.slice_point:
        return np.split(x, list(p.slice_point), axis=axis)
    return np.split(x, len(layer.top), axis=axis)


def split(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    return [inputs[0]] * len(layer.top)


def flatten(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p, x = layer.flatten_param, inputs[0]
    start, end = canonical_axis(p.axis, x.ndim), canonical_axis(p.end_axis, x.ndim)
    return [x.reshape(*x.shape[:start], -1, *x.shape[end + 1 :])]


def reshape(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Reshape: `shape` replaces axes [axis, axis+num_axes); 0 copies the input dim, -1 is inferred."""
    p, x = layer.reshape_param, inputs[0]
    start = p.axis + x.ndim + 1 if p.axis < 0 else p.axis
    end = x.ndim if p.num_axes == -1 else start + p.num_axes
    dims = [x.shape[start + i] if d == 0 else d for i, d in enumerate(p.shape.dim)]
    return [x.reshape(*x.shape[:start], *dims, *x.shape[end:])]


def crop(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Crop bottom 0 to bottom 1's shape from `axis` on, starting at `offset` (one for all or per axis)."""
    p, (x, like) = layer.crop_param, inputs[:2]
    axis = canonical_axis(p.axis, x.ndim)
    offsets = list(p.offset) or [0]
    index = [slice(None)] * axis
    for i in range(axis, x.ndim):
        start = offsets[0] if len(offsets) == 1 else offsets[i - axis]
        index.append(slice(start, start + like.shape[i]))
    return [x[tuple(index)]]


def permute(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    x, order = inputs[0], list(layer.permute_param.order)
    order += [i for i in range(x.ndim) if i not in order]
    return [np.transpose(x, order)]


def argmax(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Top-k indices (largest first; ties: larger index first), or values with out_max_val over
    `axis`; without `axis`, over each sample, as (N, 1 or 2, top_k) with indices then values."""
    p, x = layer.argmax_param, inputs[0]
    if p.HasField("axis"):
        axis = canonical_axis(p.axis, x.ndim)
        moved = np.moveaxis(x, axis, -1)
        order = _top_k(moved, p.top_k)
        picked = np.take_along_axis(moved, order, axis=-1) if p.out_max_val else order.astype(np.float64)
        return [np.moveaxis(picked, -1, axis)]
    flat = x.reshape(x.shape[0], -1)
    order = _top_k(flat, p.top_k)
    parts = [order.astype(np.float64)]
    if p.out_max_val:
        parts.append(np.take_along_axis(flat, order, axis=-1))
    y = np.stack(parts, axis=1)
    return [y.reshape(*y.shape, *([1] * (x.ndim - 3)))]


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    index = np.broadcast_to(np.arange(values.shape[-1]), values.shape)
    order = np.lexsort((-index, -values), axis=-1)
    return order[..., :k]


# --- SSD prior boxes -------------------------------------------------------------------------------


def prior_box(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """SSD PriorBox: per feature-map cell, boxes for each min_size (then sqrt(min*max), then each
    aspect ratio other than 1, with flips), as [xmin, ymin, xmax, ymax] / image size; channel 1 holds
    the variances."""
    p = layer.prior_box_param
    layer_h, layer_w = inputs[0].shape[2:4]
    img_h = p.img_h if p.HasField("img_h") else p.img_size if p.HasField("img_size") else inputs[1].shape[2]
    img_w = p.img_w if p.HasField("img_w") else p.img_size if p.HasField("img_size") else inputs[1].shape[3]
    step_h = p.step_h if p.HasField("step_h") else p.step if p.HasField("step") else img_h / layer_h
    step_w = p.step_w if p.HasField("step_w") else p.step if p.HasField("step") else img_w / layer_w
    sizes = _prior_sizes(p)
    cx = (np.arange(layer_w) + p.offset) * step_w
    cy = (np.arange(layer_h) + p.offset) * step_h
    cy, cx = np.meshgrid(cy, cx, indexing="ij")
    bw, bh = sizes[:, 0] / 2, sizes[:, 1] / 2
    boxes = np.stack(
        [
            (cx[..., None] - bw) / img_w,
            (cy[..., None] - bh) / img_h,
            (cx[..., None] + bw) / img_w,
            (cy[..., None] + bh) / img_h,
        ],
        axis=-1,
    ).ravel()
    if p.clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    variance = list(p.variance) or [0.1]
    variances = (
        np.resize(np.array(variance, np.float64), boxes.size)
        if len(variance) == 4
        else np.full(boxes.size, variance[0])
    )
    return [np.stack([boxes, variances])[np.newaxis]]


def _prior_sizes(p: object) -> np.ndarray:
    """(width, height) of each prior of a cell, in Caffe's order."""
    ratios = prior_aspect_ratios(p)
    sizes = []
    for i, low in enumerate(p.min_size):
        sizes.append((low, low))
        if p.max_size:
            side = math.sqrt(low * p.max_size[i])
            sizes.append((side, side))
        sizes += [(low * math.sqrt(r), low / math.sqrt(r)) for r in ratios if abs(r - 1.0) >= 1e-6]
    return np.array(sizes, np.float64)


def detection_output(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """SSD DetectionOutput: decode loc against the priors, per class keep scores above
    confidence_threshold, greedy NMS (top_k candidates, IoU > nms_threshold suppressed, eta), then
    keep_top_k over all classes; rows [image, label, score, xmin, ymin, xmax, ymax] per image, by
    label, highest score first (one row of -1 per image when nothing is kept)."""
    p = layer.detection_output_param
    loc, conf, prior = inputs[:3]
    n, classes = loc.shape[0], p.num_classes
    priors = prior.reshape(prior.shape[0], 2, -1, 4)[0]
    loc_classes = 1 if p.share_location else classes
    boxes = _decode(p, loc.reshape(n, priors.shape[1], loc_classes, 4), priors[0], priors[1])
    scores = conf.reshape(n, priors.shape[1], classes)
    rows = []
    for image in range(n):
        kept = []
        for label in range(classes):
            if label != p.background_label_id:
                own = boxes[image, :, 0 if p.share_location else label]
                kept += [(scores[image, i, label], label, i, own[i]) for i in _nms(p, own, scores[image, :, label])]
        if p.keep_top_k > -1 and len(kept) > p.keep_top_k:
            kept = sorted(kept, key=lambda row: -row[0])[: p.keep_top_k]
            kept = sorted(kept, key=lambda row: row[1])  # stable: by label, each still by score
        rows += [[image, label, score, *box] for score, label, _, box in kept]
    if not rows:
        rows = [[image] + [-1.0] * 6 for image in range(n)]
    return [np.array(rows, np.float64).reshape(1, 1, -1, 7)]


def _decode(p: object, loc: np.ndarray, prior: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Boxes (xmin, ymin, xmax, ymax) from loc offsets, for code_type CORNER, CENTER_SIZE or CORNER_SIZE."""
    prior, variance = prior[None, :, None], variance[None, :, None]
    if p.variance_encoded_in_target:
        variance = np.ones_like(variance)
    size = prior[..., 2:] - prior[..., :2]
    if p.code_type == CORNER:
        return prior + variance * loc
    if p.code_type == CORNER_SIZE:
        return prior + variance * loc * np.concatenate([size, size], axis=-1)
    centre = (prior[..., :2] + prior[..., 2:]) / 2 + variance[..., :2] * loc[..., :2] * size
    half = np.exp(variance[..., 2:] * loc[..., 2:]) * size / 2
    return np.concatenate([centre - half, centre + half], axis=-1)


def _nms(p: object, boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Caffe's ApplyNMSFast: candidates above the threshold, best first (stable), at most top_k."""
    nms = p.nms_param
    threshold = p.confidence_threshold if p.HasField("confidence_threshold") else -np.inf
    candidates = np.flatnonzero(scores > threshold)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
    if nms.HasField("top_k") and nms.top_k > -1:
        candidates = candidates[: nms.top_k]
    limit, kept = nms.nms_threshold, []
    for index in candidates:
        if all(_iou(boxes[index], boxes[other]) <= limit for other in kept):
            kept.append(int(index))
            if nms.eta < 1 and limit > 0.5:
                limit *= nms.eta
    return kept


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    inter = (min(a[2], b[2]) - max(a[0], b[0])) * (min(a[3], b[3]) - max(a[1], b[1]))
    return float(inter / (_area(a) + _area(b) - inter))


def _area(box: np.ndarray) -> float:
    return 0.0 if box[2] < box[0] or box[3] < box[1] else (box[2] - box[0]) * (box[3] - box[1])


# --- fork layers -----------------------------------------------------------------------------------


def relu6(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.clip(inputs[0], 0.0, 6.0)]


def shuffle_channel(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """ShuffleNet ports: channels viewed as (group, C/group), transposed to (C/group, group)."""
    x, group = inputs[0], layer.shuffle_channel_param.group or 1
    n, c = x.shape[:2]
    return [x.reshape(n, group, c // group, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)]


def upsample(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """One bottom (YOLO / darknet ports): nearest neighbour, each pixel repeated `scale` times (or
    scale_h x scale_w) in each direction. Two bottoms (caffe-segnet): max-unpooling, bottom 0 goes to
    the positions the mask bottom 1 holds, in an upsample_h x upsample_w plane (default: the input
    size times the scale, minus one with pad_out_h / pad_out_w)."""
    p, x = layer.upsample_param, inputs[0]
    scale_h = p.scale_h if p.HasField("scale_h") else p.scale
    scale_w = p.scale_w if p.HasField("scale_w") else p.scale
    if len(inputs) == 1:
        return [x.repeat(scale_h, axis=2).repeat(scale_w, axis=3)]
    out_h = p.upsample_h if p.HasField("upsample_h") else x.shape[2] * scale_h - int(p.pad_out_h)
    out_w = p.upsample_w if p.HasField("upsample_w") else x.shape[3] * scale_w - int(p.pad_out_w)
    top = np.zeros((*x.shape[:2], out_h * out_w))
    mask = inputs[1].reshape(*x.shape[:2], -1).astype(np.int64)
    np.put_along_axis(top, mask, x.reshape(*x.shape[:2], -1), axis=-1)
    return [top.reshape(*x.shape[:2], out_h, out_w)]


def interp(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """PSPNet / DeepLab Interp: crop by pad_beg / pad_end (<= 0), then bilinear resize with corners
    aligned, to the size (in the fork's order) of bottom 1, or shrink_factor alone, or zoom_factor
    alone, or height and width, or shrink_factor then zoom_factor."""
    p, x = layer.interp_param, inputs[0]
    pad_beg, pad_end = p.pad_beg, p.pad_end
    h_eff, w_eff = x.shape[2] + pad_beg + pad_end, x.shape[3] + pad_beg + pad_end
    shrink, zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
    if len(inputs) > 1:
        size = inputs[1].shape[2:4]
    elif p.HasField("height") and p.HasField("width") and shrink == zoom:  # only a lone factor comes first
        size = (p.height, p.width)
    else:
        size = (h_eff, w_eff)
        if shrink:
            size = tuple((s - 1) // p.shrink_factor + 1 for s in size)
        if zoom:
            size = tuple(s + (s - 1) * (p.zoom_factor - 1) for s in size)
    region = x[:, :, -pad_beg : -pad_beg + h_eff, -pad_beg : -pad_beg + w_eff]
    return [_bilinear(region, *size)]


def _bilinear(x: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """Corner-aligned bilinear resize of (N, C, H, W), as caffe_cpu_interp2."""

    def weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ratio = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        pos = ratio * np.arange(size_out)
        low = pos.astype(np.int64)
        step = (low < size_in - 1).astype(np.int64)
        return low, low + step, pos - low

    r0, r1, ry = weights(x.shape[2], h_out)
    c0, c1, cx = weights(x.shape[3], w_out)
    rows = x[:, :, r0] * (1 - ry)[:, None] + x[:, :, r1] * ry[:, None]
    return rows[:, :, :, c0] * (1 - cx) + rows[:, :, :, c1] * cx


def identity(layer: object, inputs: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Dropout at TEST (Caffe scales while training only)."""
    return [inputs[0]]


LAYERS: dict[str, Forward] = {
    "Convolution": convolution,
    "DepthwiseConvolution": convolution,
    "ConvolutionDepthwise": convolution,
    "Deconvolution": deconvolution,
    "InnerProduct": inner_product,
    "Pooling": pooling,
    "ReLU": _unary(_relu),
    "PReLU": prelu,
    "ELU": _unary(_elu),
    "Sigmoid": _unary(lambda layer, x: 0.5 * (1.0 + np.tanh(0.5 * x))),
    "TanH": _unary(lambda layer, x: np.tanh(x)),
    "AbsVal": _unary(lambda layer, x: np.abs(x)),
    "Threshold": _unary(_threshold),
    "Tile": tile,
    "Reduction": reduction,
    "BNLL": _unary(_bnll),
    "Power": _unary(_power),
    "Exp": _unary(_exp),
    "Log": _unary(_log),
    "Eltwise": eltwise,
    "Softmax": softmax,
    "LRN": lrn,
    "MVN": mvn,
    "BatchNorm": batch_norm,
    "BN": bn,
    "Scale": scale,
    "Bias": bias,
    "Normalize": normalize,
    "Concat": concat,
    "Slice": slice_,
    "Split": split,
    "Flatten": flatten,
    "Reshape": reshape,
    "Crop": crop,
    "Permute": permute,
    "ArgMax": argmax,
    "PriorBox": prior_box,
    "DetectionOutput": detection_output,
    "Dropout": identity,
    "ReLU6": relu6,
    "ShuffleChannel": shuffle_channel,
    "Upsample": upsample,
    "Interp": interp,
}
