"""Blob shapes of a deploy net, computed from the prototxt alone as Caffe's `Reshape` methods do.

`infer_shapes` walks the TEST-phase layers in order, starting from the declared input shapes, and
applies one small rule per layer type (`_RULES`). Shapes never change in place, so one shape per
blob name is enough. The rules follow BVLC Caffe (and the SSD fork for Permute, PriorBox,
DetectionOutput and Normalize), including Pooling's CEIL rounding and its clipping of a last window
that would start in the padding.
"""

import math
from collections.abc import Callable, Sequence

from .errors import InputError
from .graph import build_graph, input_shapes

Shape = tuple[int, ...]
ShapeRule = Callable[[object, list[Shape]], list[Shape]]
DATA_TYPES = ("AnnotatedData", "Data", "DummyData", "HDF5Data", "ImageData", "MemoryData", "VideoData", "WindowData")


def infer_shapes(net: object) -> dict[str, Shape]:
    """The shape of every blob of the TEST-phase net, by blob name, from the net's input shapes."""
    graph = build_graph(net)
    shapes = input_shapes(net)
    for version in graph.inputs:
        if version.name not in shapes:
            raise InputError(f"net input '{version.name}' has no shape (input_shape, input_dim or an Input layer)")
    for node in graph.layers:
        rule = _RULES.get(node.type)
        if node.type in DATA_TYPES:
            raise InputError(
                f"layer '{node.name}' is a {node.type} layer, whose shapes come from its data source; "
                "use a deploy prototxt (Input layer, input_shape or input_dim)"
            )
        if rule is None:
            raise InputError(
                f"layer '{node.name}' has type '{node.type}', for which no shape rule is known; "
                "add one to caffe_bn_merge/shapes.py"
            )
        bottoms = [shapes[version.name] for version in node.bottoms]
        try:
            tops = rule(node.param, bottoms)
        except (ValueError, IndexError, ZeroDivisionError) as err:
            raise InputError(f"layer '{node.name}' ({node.type}): {err}; fix the prototxt") from None
        if len(tops) != len(node.tops):
            raise InputError(f"layer '{node.name}' ({node.type}) has {len(node.tops)} tops, expected {len(tops)}")
        shapes.update(zip((v.name for v in node.tops), tops, strict=True))
    return shapes


def canonical_axis(axis: int, rank: int) -> int:
    """Caffe's CanonicalAxisIndex: a negative axis counts from the end; out of range is an error."""
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for a blob of {rank} axes")
    return axis % rank


# --- rules: (layer, bottom shapes) -> top shapes ------------------------------------------------


def _same(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Element-wise and in-place layers: every top has the first bottom's shape."""
    return [bottoms[0]] * len(layer.top)


def _no_top(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Silence: no tops."""
    return []


def _input(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Input: top i gets shape i, or the only shape given."""
    given = [tuple(shape.dim) for shape in layer.input_param.shape]
    if not given:
        raise ValueError("input_param declares no shape")
    return [given[min(i, len(given) - 1)] for i in range(len(layer.top))]


def _convolution(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Convolution: (in + 2 pad - extent) / stride + 1, rounded down, per spatial axis."""
    return [_conv_shape(layer.convolution_param, bottom, deconv=False) for bottom in bottoms]


def _deconvolution(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Deconvolution: stride (in - 1) + extent - 2 pad, per spatial axis."""
    return [_conv_shape(layer.convolution_param, bottom, deconv=True) for bottom in bottoms]


def _conv_shape(param: object, bottom: Shape, deconv: bool) -> Shape:
    """One top of a (de)convolution: bottom axes before `axis`, num_output, then the spatial sizes."""
    axis = canonical_axis(param.axis, len(bottom))
    channels, spatial = bottom[axis], bottom[axis + 1 :]
    kernel, stride, pad, dilation = conv_geometry(param, len(spatial))
    if param.num_output < 1 or channels % param.group or param.num_output % param.group:
        raise ValueError(f"{channels} input and {param.num_output} output channels do not fit group {param.group}")
    out = []
    for size, k, s, p, d in zip(spatial, kernel, stride, pad, dilation, strict=True):
        extent = d * (k - 1) + 1
        out.append(s * (size - 1) + extent - 2 * p if deconv else (size + 2 * p - extent) // s + 1)
    return (*bottom[:axis], param.num_output, *_positive(out, spatial))


def conv_geometry(param: object, spatial: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Kernel, stride, pad and dilation per spatial axis from a ConvolutionParameter."""
    kernel = _pair(param, "kernel_h", "kernel_w", spatial) or _repeat(param.kernel_size, spatial, None, "kernel_size")
    stride = _pair(param, "stride_h", "stride_w", spatial) or _repeat(param.stride, spatial, 1, "stride")
    pad = _pair(param, "pad_h", "pad_w", spatial) or _repeat(param.pad, spatial, 0, "pad")
    dilation = _repeat(param.dilation, spatial, 1, "dilation")
    if min(kernel + stride + dilation, default=1) < 1:
        raise ValueError(f"kernel {kernel}, stride {stride} and dilation {dilation} must be positive")
    return kernel, stride, pad, dilation


def _pair(param: object, h: str, w: str, spatial: int) -> list[int] | None:
    """The _h/_w form of a 2-D parameter, if either is set."""
    if not (param.HasField(h) or param.HasField(w)):
        return None
    if spatial != 2:
        raise ValueError(f"{h}/{w} need a 2-D convolution, this one has {spatial} spatial axes")
    return [getattr(param, h), getattr(param, w)]


def _repeat(values: Sequence[int], spatial: int, default: int | None, what: str) -> list[int]:
    """A repeated parameter given once (for every axis) or once per spatial axis."""
    if not values:
        if default is None:
            raise ValueError(f"{what} is not set")
        return [default] * spatial
    if len(values) not in (1, spatial):
        raise ValueError(f"{what} has {len(values)} values for {spatial} spatial axes")
    return list(values) * spatial if len(values) == 1 else list(values)


def _positive(out: list[int], spatial: Sequence[int]) -> list[int]:
    """`out`, unless an input this small leaves an empty output."""
    if min(out, default=1) < 1:
        raise ValueError(f"input of spatial size {tuple(spatial)} is too small: the output would be {tuple(out)}")
    return out


def _pooling(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Pooling: CEIL rounding (unless round_mode FLOOR or the fork's ceil_mode false), and with padding
    the last window must start inside the input plus its padding, as Caffe's PoolingLayer::Reshape."""
    param, bottom = layer.pooling_param, bottoms[0]
    if len(bottom) != 4:
        raise ValueError(f"Pooling needs a 4-D bottom, got {bottom}")
    n, c, *spatial = bottom
    if param.global_pooling:
        return [(n, c, 1, 1)] * len(layer.top)
    kernel, stride, pad = _pool_geometry(param)
    floor = param.round_mode == param.RoundMode.Value("FLOOR") or not param.ceil_mode
    out = []
    for size, k, s, p in zip(spatial, kernel, stride, pad, strict=True):
        steps = (size + 2 * p - k) // s if floor else -(-(size + 2 * p - k) // s)
        pooled = steps + 1
        if any(pad) and (pooled - 1) * s >= size + p:
            pooled -= 1
        out.append(pooled)
    return [(n, c, *_positive(out, spatial))] * len(layer.top)


def _pool_geometry(param: object) -> tuple[list[int], list[int], list[int]]:
    """Kernel, stride and pad as (h, w) from a PoolingParameter."""
    if param.HasField("kernel_size"):
        kernel = [param.kernel_size] * 2
    elif param.HasField("kernel_h") and param.HasField("kernel_w"):
        kernel = [param.kernel_h, param.kernel_w]
    else:
        raise ValueError("kernel_size (or kernel_h and kernel_w) is not set")
    pad = [param.pad_h, param.pad_w] if param.HasField("pad_h") else [param.pad] * 2
    stride = [param.stride_h, param.stride_w] if param.HasField("stride_h") else [param.stride] * 2
    if min(kernel + stride) < 1 or pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        raise ValueError(f"kernel {kernel} and stride {stride} must be positive and pad {pad} below the kernel")
    return kernel, stride, pad


def _inner_product(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """InnerProduct: the axes from `axis` on become num_output."""
    bottom = bottoms[0]
    axis = canonical_axis(layer.inner_product_param.axis, len(bottom))
    return [(*bottom[:axis], layer.inner_product_param.num_output)]


def _concat(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Concat along `axis` (or the legacy `concat_dim`); the other axes must agree."""
    param, first = layer.concat_param, bottoms[0]
    axis = param.concat_dim if param.HasField("concat_dim") else canonical_axis(param.axis, len(first))
    for shape in bottoms[1:]:
        if len(shape) != len(first) or shape[:axis] + shape[axis + 1 :] != first[:axis] + first[axis + 1 :]:
            raise ValueError(f"bottoms {first} and {shape} differ outside the concat axis {axis}")
    return [(*first[:axis], sum(shape[axis] for shape in bottoms), *first[axis + 1 :])]


def _eltwise(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Eltwise: all bottoms have one shape, which the top keeps."""
    if any(shape != bottoms[0] for shape in bottoms):
        raise ValueError(f"bottoms of different shapes {bottoms}")
    return [bottoms[0]]


def _slice(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Slice along `axis` (or `slice_dim`) at slice_point, or into equal parts."""
    param, bottom = layer.slice_param, bottoms[0]
    axis = param.slice_dim if param.HasField("slice_dim") else canonical_axis(param.axis, len(bottom))
    points, count = list(param.slice_point), len(layer.top)
    if points:
        if len(points) != count - 1:
            raise ValueError(f"{len(points)} slice points for {count} tops")
        sizes = [b - a for a, b in zip([0, *points], [*points, bottom[axis]], strict=True)]
    elif bottom[axis] % count:
        raise ValueError(f"axis {axis} of size {bottom[axis]} does not split into {count} equal parts")
    else:
        sizes = [bottom[axis] // count] * count
    if min(sizes) < 1:
        raise ValueError(f"slice points {points} do not fit axis {axis} of size {bottom[axis]}")
    return [(*bottom[:axis], size, *bottom[axis + 1 :]) for size in sizes]


def _flatten(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Flatten axes `axis` to `end_axis` (both included) into one."""
    bottom = bottoms[0]
    start = canonical_axis(layer.flatten_param.axis, len(bottom))
    end = canonical_axis(layer.flatten_param.end_axis, len(bottom))
    return [(*bottom[:start], math.prod(bottom[start : end + 1]), *bottom[end + 1 :])]


def _reshape(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Reshape: replace axes [axis, axis+num_axes) by `shape`; 0 copies a bottom axis, -1 is inferred."""
    param, bottom = layer.reshape_param, bottoms[0]
    start = param.axis if param.axis >= 0 else len(bottom) + param.axis + 1
    end = len(bottom) if param.num_axes == -1 else start + param.num_axes
    if not 0 <= start <= end <= len(bottom):
        raise ValueError(f"axis {param.axis} and num_axes {param.num_axes} do not fit a bottom of shape {bottom}")
    dims = [bottom[start + i] if d == 0 else d for i, d in enumerate(param.shape.dim)]
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise ValueError(f"shape {list(param.shape.dim)} has more than one -1 or a negative dimension")
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        rest = math.prod(bottom[start:end])
        if known == 0 or rest % known:
            raise ValueError(f"cannot infer the -1 of shape {list(param.shape.dim)} from {bottom}")
        dims[dims.index(-1)] = rest // known
    top = (*bottom[:start], *dims, *bottom[end:])
    if math.prod(top) != math.prod(bottom):
        raise ValueError(f"cannot reshape {bottom} ({math.prod(bottom)} values) to {top}")
    return [top]


def _permute(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """SSD Permute: axes in `order`, the unlisted ones after them in their original order."""
    bottom, order = bottoms[0], list(layer.permute_param.order)
    if len(set(order)) != len(order) or any(axis >= len(bottom) for axis in order):
        raise ValueError(f"order {order} is not a permutation of the axes of {bottom}")
    order += [axis for axis in range(len(bottom)) if axis not in order]
    return [tuple(bottom[axis] for axis in order)]


def _crop(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Crop: the axes from `axis` on take the second bottom's sizes."""
    axis = canonical_axis(layer.crop_param.axis, len(bottoms[0]))
    return [(*bottoms[0][:axis], *bottoms[1][axis:])]


def _argmax(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """ArgMax: top_k along `axis`, or (N, 1 or 2, top_k) over each item when no axis is set."""
    param, bottom = layer.argmax_param, bottoms[0]
    if param.HasField("axis"):
        axis = canonical_axis(param.axis, len(bottom))
        return [(*bottom[:axis], param.top_k, *bottom[axis + 1 :])]
    return [(bottom[0], 2 if param.out_max_val else 1, param.top_k, *[1] * (len(bottom) - 3))]


def _tile(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Tile: axis `axis` repeated `tiles` times."""
    bottom = bottoms[0]
    axis = canonical_axis(layer.tile_param.axis, len(bottom))
    return [(*bottom[:axis], bottom[axis] * layer.tile_param.tiles, *bottom[axis + 1 :])]


def _reduction(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """Reduction: the axes from `axis` on are reduced away."""
    return [bottoms[0][: canonical_axis(layer.reduction_param.axis, len(bottoms[0]))]]


def _prior_box(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """SSD PriorBox: (1, 2, H * W * num_priors * 4) for the feature map `bottom[0]`."""
    height, width = bottoms[0][2:4]
    return [(1, 2, height * width * num_priors(layer.prior_box_param) * 4)]


def prior_aspect_ratios(param: object) -> list[float]:
    """The SSD fork's aspect ratios of a PriorBox: 1, then each new ratio (and its inverse when `flip`)."""
    ratios = [1.0]
    for ratio in param.aspect_ratio:
        if all(abs(ratio - known) >= 1e-6 for known in ratios):
            ratios.append(ratio)
            if param.flip:
                ratios.append(1.0 / ratio)
    return ratios


def num_priors(param: object) -> int:
    """Priors per location, as the SSD fork counts them: each aspect ratio per min_size, plus one per
    max_size."""
    ratios = prior_aspect_ratios(param)
    if param.max_size and len(param.max_size) != len(param.min_size):
        raise ValueError(f"{len(param.max_size)} max_size for {len(param.min_size)} min_size")
    return len(ratios) * len(param.min_size) + len(param.max_size)


def _detection_output(layer: object, bottoms: list[Shape]) -> list[Shape]:
    """SSD DetectionOutput: (1, 1, keep_top_k, 7); -1 rows when keep_top_k is unset (data-dependent)."""
    keep = layer.detection_output_param.keep_top_k
    return [(1, 1, keep if keep > 0 else -1, 7)]


_SAME_SHAPE = [  # element-wise, normalising and in-place layers; Split copies its bottom to every top
    "AbsVal", "BatchNorm", "Bias", "BNLL", "Clip", "Dropout", "ELU", "Exp", "Log", "LRN", "MVN", "Normalize",
    "Power", "PReLU", "ReLU", "Scale", "Sigmoid", "Softmax", "Split", "Swish", "TanH", "Threshold",
]  # fmt: skip
_RULES: dict[str, ShapeRule] = {
    **dict.fromkeys(_SAME_SHAPE, _same),
    "Input": _input,
    "Silence": _no_top,
    "Convolution": _convolution,
    "Deconvolution": _deconvolution,
    "Pooling": _pooling,
    "InnerProduct": _inner_product,
    "Concat": _concat,
    "Eltwise": _eltwise,
    "Slice": _slice,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Permute": _permute,
    "Crop": _crop,
    "ArgMax": _argmax,
    "Tile": _tile,
    "Reduction": _reduction,
    "PriorBox": _prior_box,
    "DetectionOutput": _detection_output,
}
