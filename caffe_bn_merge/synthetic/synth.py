"""Synthetic deploy nets with matching weights and realistic BatchNorm statistics.

Used by `sample_nets/make_sample_nets.py`, the tests and the benchmarks. Statistics follow what
trained Caffe models carry: He-initialised weights, BatchNorm blobs stored as mean*s and var*s with a
moving-average factor s near 1000, gammas near 1 and small betas.
"""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..graph import build_graph
from ..io import proto
from ..io.emit import write_new_weights
from ..io.read import read_net
from ..shapes import canonical_axis, conv_geometry, infer_shapes

Shape = tuple[int, ...]


class NetBuilder:
    """Append layers to a deploy net, tracking blob shapes and generating each layer's blobs."""

    def __init__(self, name: str, input_shape: Shape, seed: int = 0, input_name: str = "data") -> None:
        self.net = proto.NetParameter(name=name)
        self.rng = np.random.default_rng(seed)
        self.shapes: dict[str, Shape] = {}
        self.blobs: dict[str, list[np.ndarray]] = {}
        layer = self.layer("Input", input_name, [], [input_name], input_shape)
        layer.input_param.shape.add(dim=input_shape)

    def layer(self, type_: str, name: str, bottoms: list[str], tops: list[str], shape: Shape | None = None) -> object:
        """Append a layer; its tops get `shape` (default: the first bottom's shape)."""
        layer = self.net.layer.add(name=name, type=type_, bottom=bottoms, top=tops)
        for top in tops:
            self.shapes[top] = shape if shape is not None else self.shapes[bottoms[0]]
        return layer

    def conv(
        self,
        bottom: str,
        num_output: int,
        kernel: int = 3,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = True,
        name: str | None = None,
        top: str | None = None,
        deconv: bool = False,
        dilation: int = 1,
    ) -> str:
        """Convolution (or Deconvolution) with He-initialised weights."""
        name = name or f"conv{len(self.net.layer)}"
        pad = (kernel - 1) // 2 * dilation if pad is None else pad
        n, c, h, w = self.shapes[bottom]
        extent = dilation * (kernel - 1) + 1
        if deconv:
            out = tuple(stride * (x - 1) + extent - 2 * pad for x in (h, w))
            wshape = (c, num_output // group, kernel, kernel)
        else:
            out = tuple((x + 2 * pad - extent) // stride + 1 for x in (h, w))
            wshape = (num_output, c // group, kernel, kernel)
        layer = self.layer(
            "Deconvolution" if deconv else "Convolution", name, [bottom], [top or name], (n, num_output, *out)
        )
        p = layer.convolution_param
        p.num_output, p.bias_term, p.group = num_output, bias, group
        p.kernel_size.append(kernel)
        p.stride.append(stride)
        p.pad.append(pad)
        if dilation != 1:
            p.dilation.append(dilation)
        fan_in = c // group * kernel * kernel
        self._weights(name, wshape, fan_in, bias, num_output)
        return top or name

    def ip(
        self,
        bottom: str,
        num_output: int,
        bias: bool = True,
        transpose: bool = False,
        name: str | None = None,
        top: str | None = None,
    ) -> str:
        """InnerProduct over all axes after the first."""
        name = name or f"fc{len(self.net.layer)}"
        k = math.prod(self.shapes[bottom][1:])
        layer = self.layer("InnerProduct", name, [bottom], [top or name], (self.shapes[bottom][0], num_output))
        layer.inner_product_param.num_output = num_output
        layer.inner_product_param.bias_term = bias
        if transpose:
            layer.inner_product_param.transpose = True
        self._weights(name, (k, num_output) if transpose else (num_output, k), k, bias, num_output)
        return top or name

    def _weights(self, name: str, wshape: Shape, fan_in: int, bias: bool, channels: int) -> None:
        self.blobs[name] = _he_blobs(self.rng, wshape, fan_in, bias, channels)

    def bn(
        self,
        bottom: str,
        top: str | None = None,
        name: str | None = None,
        eps: float | None = None,
        factor: float = 999.982,
        use_global_stats: bool | None = None,
    ) -> str:
        """BVLC BatchNorm (in place unless `top` is given) with realistic statistics."""
        name = name or f"{bottom}/bn{len(self.net.layer)}"
        layer = self.layer("BatchNorm", name, [bottom], [top or bottom])
        if eps is not None:
            layer.batch_norm_param.eps = eps
        if use_global_stats is not None:
            layer.batch_norm_param.use_global_stats = use_global_stats
        self.blobs[name] = _bn_blobs(self.rng, self.shapes[bottom][1], factor)
        return top or bottom

    def scale(
        self,
        bottom: str,
        top: str | None = None,
        name: str | None = None,
        bias: bool = True,
        axis: int | None = None,
        num_axes: int | None = None,
    ) -> str:
        """Scale (gamma near 1, small beta) per channel, or as set by axis/num_axes."""
        name = name or f"{bottom}/scale{len(self.net.layer)}"
        layer = self.layer("Scale", name, [bottom], [top or bottom])
        layer.scale_param.bias_term = bias
        if axis is not None:
            layer.scale_param.axis = axis
        if num_axes is not None:
            layer.scale_param.num_axes = num_axes
        shape = self._param_shape(bottom, 1 if axis is None else axis, 1 if num_axes is None else num_axes)
        self.blobs[name] = _scale_blobs(self.rng, shape, bias)
        return top or bottom

    def bias(self, bottom: str, top: str | None = None, name: str | None = None) -> str:
        """Bias layer: a small per-channel offset."""
        name = name or f"{bottom}/bias{len(self.net.layer)}"
        self.layer("Bias", name, [bottom], [top or bottom])
        self.blobs[name] = _bias_blobs(self.rng, self.shapes[bottom][1])
        return top or bottom

    def _param_shape(self, bottom: str, axis: int, num_axes: int) -> Shape:
        dims = self.shapes[bottom]
        axis %= len(dims)
        return dims[axis:] if num_axes == -1 else dims[axis : axis + num_axes]

    def unary(self, type_: str, bottom: str, top: str | None = None, name: str | None = None) -> object:
        """A shape-preserving layer without blobs (ReLU, Dropout, Softmax ...), in place by default."""
        return self.layer(type_, name or f"{bottom}/{type_.lower()}{len(self.net.layer)}", [bottom], [top or bottom])

    def relu(self, bottom: str, top: str | None = None) -> str:
        self.unary("ReLU", bottom, top)
        return top or bottom

    def pool(
        self,
        bottom: str,
        kernel: int = 2,
        stride: int = 2,
        method: str = "MAX",
        global_pool: bool = False,
        name: str | None = None,
    ) -> str:
        """Pooling with Caffe's ceil rounding."""
        name = name or f"pool{len(self.net.layer)}"
        n, c, h, w = self.shapes[bottom]
        out = (1, 1) if global_pool else tuple(math.ceil((x - kernel) / stride) + 1 for x in (h, w))
        layer = self.layer("Pooling", name, [bottom], [name], (n, c, *out))
        p = layer.pooling_param
        p.pool = proto.PoolingParameter.PoolMethod.Value(method)
        if global_pool:
            p.global_pooling = True
        else:
            p.kernel_size, p.stride = kernel, stride
        return name

    def concat(self, bottoms: list[str], name: str | None = None, axis: int = 1) -> str:
        name = name or f"concat{len(self.net.layer)}"
        shape = list(self.shapes[bottoms[0]])
        shape[axis] = sum(self.shapes[b][axis] for b in bottoms)
        layer = self.layer("Concat", name, bottoms, [name], tuple(shape))
        if axis != 1:
            layer.concat_param.axis = axis
        return name

    def eltwise(self, bottoms: list[str], name: str | None = None) -> str:
        name = name or f"sum{len(self.net.layer)}"
        self.layer("Eltwise", name, bottoms, [name])
        return name

    def save(self, prototxt: Path, caffemodel: Path, dtype: type = np.float32) -> None:
        """Write the deploy prototxt and a caffemodel holding every layer's blobs."""
        from google.protobuf import text_format

        Path(prototxt).write_text(text_format.MessageToString(self.net))
        types = {layer.name: layer.type for layer in self.net.layer}
        write_new_weights(
            [(name, types[name], [np.asarray(b, dtype) for b in blobs]) for name, blobs in self.blobs.items()],
            Path(caffemodel),
        )


# --- statistics shared by NetBuilder and weights_for ---------------------------------------------


def _he_blobs(rng: np.random.Generator, wshape: Shape, fan_in: int, bias: bool, channels: int) -> list[np.ndarray]:
    """He-initialised weights of `wshape`, and a small bias of `channels` values when `bias`."""
    blobs = [rng.normal(0, math.sqrt(2.0 / fan_in), wshape)]
    if bias:
        blobs.append(rng.normal(0, 0.1, channels))
    return blobs


def _bn_blobs(rng: np.random.Generator, channels: int, factor: float) -> list[np.ndarray]:
    """BVLC BatchNorm blobs: mean*factor, var*factor, [factor], with trained-looking mean and variance."""
    mean = rng.normal(0.0, 0.5, channels)
    var = rng.lognormal(0.0, 0.6, channels)
    return [mean * factor, var * factor, np.array([factor])]


def _scale_blobs(rng: np.random.Generator, shape: Shape, bias: bool) -> list[np.ndarray]:
    """Scale blobs: gamma near 1, and a small beta when `bias`."""
    blobs = [rng.normal(1.0, 0.3, shape)]
    if bias:
        blobs.append(rng.normal(0.0, 0.3, shape))
    return blobs


def _bias_blobs(rng: np.random.Generator, shape: Shape | int) -> list[np.ndarray]:
    """Bias blob: a small offset."""
    return [rng.normal(0.0, 0.3, shape)]


# --- weights for any deploy net -------------------------------------------------------------------

BN_FACTOR = 999.982  # the moving-average factor trained BVLC models typically store


def weights_for(net: object, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Realistic float32 blobs for every weighted layer of the TEST-phase `net`, by layer name, in
    layer order: what a caffemodel for this prototxt would hold. Shapes come from `infer_shapes`;
    the statistics are NetBuilder's. Blobs shared through `param { name }` are generated once."""
    shapes = infer_shapes(net)
    rng = np.random.default_rng(seed)
    shared: dict[str, np.ndarray] = {}
    weights: dict[str, list[np.ndarray]] = {}
    for node in build_graph(net).layers:
        make = _BLOB_MAKERS.get(node.type)
        if make is None:
            continue
        try:
            blobs = make(rng, node.param, [shapes[v.name] for v in node.bottoms])
        except ValueError as err:
            raise InputError(f"layer '{node.name}' ({node.type}): {err}; fix the prototxt") from None
        if blobs:
            weights[node.name] = _tie(node.param, [np.asarray(b, np.float32) for b in blobs], shared)
    return weights


def save_weights_for(prototxt: Path, caffemodel: Path, seed: int = 0) -> None:
    """Write a caffemodel of `weights_for` the net in `prototxt` (atomically)."""
    net = read_net(Path(prototxt))
    types = {layer.name: layer.type for layer in net.layer}
    blobs = weights_for(net, seed)
    write_new_weights([(name, types[name], layer_blobs) for name, layer_blobs in blobs.items()], Path(caffemodel))


def _tie(layer: object, blobs: list[np.ndarray], shared: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Replace blob i by the first blob generated under the same `param { name }`, when shapes agree."""
    for i, spec in enumerate(layer.param[: len(blobs)]):
        if spec.name:
            first = shared.setdefault(spec.name, blobs[i])
            if first.shape == blobs[i].shape:
                blobs[i] = first
    return blobs


_BlobMaker = Callable[[np.random.Generator, object, list[Shape]], list[np.ndarray]]


def _conv_blobs(rng: np.random.Generator, layer: object, bottoms: list[Shape]) -> list[np.ndarray]:
    """Convolution (num_output, C/group, *kernel); Deconvolution (C, num_output/group, *kernel)."""
    p, bottom = layer.convolution_param, bottoms[0]
    axis = canonical_axis(p.axis, len(bottom))
    channels = bottom[axis]
    kernel = conv_geometry(p, len(bottom) - axis - 1)[0]
    if layer.type == "Deconvolution":
        wshape = (channels, p.num_output // p.group, *kernel)
    else:
        wshape = (p.num_output, channels // p.group, *kernel)
    return _he_blobs(rng, wshape, channels // p.group * math.prod(kernel), p.bias_term, p.num_output)


def _ip_blobs(rng: np.random.Generator, layer: object, bottoms: list[Shape]) -> list[np.ndarray]:
    """InnerProduct (N, K), or (K, N) with `transpose`; K spans the bottom axes from `axis` on."""
    p, bottom = layer.inner_product_param, bottoms[0]
    k = math.prod(bottom[canonical_axis(p.axis, len(bottom)) :])
    wshape = (k, p.num_output) if p.transpose else (p.num_output, k)
    return _he_blobs(rng, wshape, k, p.bias_term, p.num_output)


def _batchnorm_blobs(rng: np.random.Generator, layer: object, bottoms: list[Shape]) -> list[np.ndarray]:
    """BVLC BatchNorm over axis 1; NVIDIA Caffe's `scale_bias` adds gamma and beta as blobs 3 and 4."""
    channels = bottoms[0][1] if len(bottoms[0]) > 1 else 1
    blobs = _bn_blobs(rng, channels, BN_FACTOR)
    if layer.batch_norm_param.scale_bias:
        blobs += _scale_blobs(rng, (channels,), True)
    return blobs


def _scale_layer_blobs(rng: np.random.Generator, layer: object, bottoms: list[Shape]) -> list[np.ndarray]:
    """Scale: gamma (and beta) over bottom.shape[axis : axis+num_axes]. With a second bottom giving
    gamma, Caffe keeps only the beta blob (shaped like that bottom), if bias_term."""
    p = layer.scale_param
    if len(bottoms) > 1:
        shape = _param_dims(bottoms[0], p.axis, len(bottoms[1]))
        return _bias_blobs(rng, shape) if p.bias_term else []
    return _scale_blobs(rng, _param_dims(bottoms[0], p.axis, p.num_axes), p.bias_term)


def _bias_layer_blobs(rng: np.random.Generator, layer: object, bottoms: list[Shape]) -> list[np.ndarray]:
    """Bias: beta over bottom.shape[axis : axis+num_axes]; none when a second bottom gives it."""
    if len(bottoms) > 1:
        return []
    return _bias_blobs(rng, _param_dims(bottoms[0], layer.bias_param.axis, layer.bias_param.num_axes))


def _prelu_blobs(rng: np.random.Generator, layer: object, bottoms: list[Shape]) -> list[np.ndarray]:
    """PReLU: negative slopes near 0.25 per channel, or one scalar (shape ()) when channel_shared."""
    shape = () if layer.prelu_param.channel_shared else (bottoms[0][1],)
    return [rng.normal(0.25, 0.05, shape)]


def _normalize_blobs(rng: np.random.Generator, layer: object, bottoms: list[Shape]) -> list[np.ndarray]:
    """SSD Normalize: scales near 20 (SSD's usual initial value), per channel unless channel_shared."""
    shape = (1,) if layer.norm_param.channel_shared else (bottoms[0][1],)
    return [rng.normal(20.0, 2.0, shape)]


def _param_dims(dims: Shape, axis: int, num_axes: int) -> Shape:
    """bottom.shape[axis : axis+num_axes] (to the end when num_axes is -1), axis as Caffe checks it."""
    start = canonical_axis(axis, len(dims))
    if num_axes != -1 and not 0 <= num_axes <= len(dims) - start:
        raise ValueError(f"num_axes {num_axes} from axis {axis} does not fit a blob of shape {dims}")
    return dims[start:] if num_axes == -1 else dims[start : start + num_axes]


_BLOB_MAKERS: dict[str, _BlobMaker] = {
    "Convolution": _conv_blobs,
    "Deconvolution": _conv_blobs,
    "InnerProduct": _ip_blobs,
    "BatchNorm": _batchnorm_blobs,
    "Scale": _scale_layer_blobs,
    "Bias": _bias_layer_blobs,
    "PReLU": _prelu_blobs,
    "Normalize": _normalize_blobs,
}
