"""Synthetic deploy nets with matching weights and realistic BatchNorm statistics.

Used by `sample_nets/make_sample_nets.py`, the tests and the benchmarks. Statistics follow what
trained Caffe models carry: He-initialised weights, BatchNorm blobs stored as mean*s and var*s with a
moving-average factor s near 1000, gammas near 1 and small betas.
"""

import math
from pathlib import Path

import numpy as np

from . import proto
from .caffe_io import write_new_weights

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
        blobs = [self.rng.normal(0, math.sqrt(2.0 / fan_in), wshape)]
        if bias:
            blobs.append(self.rng.normal(0, 0.1, channels))
        self.blobs[name] = blobs

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
        c = self.shapes[bottom][1]
        mean = self.rng.normal(0.0, 0.5, c)
        var = self.rng.lognormal(0.0, 0.6, c)
        self.blobs[name] = [mean * factor, var * factor, np.array([factor])]
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
        blobs = [self.rng.normal(1.0, 0.3, shape)]
        if bias:
            blobs.append(self.rng.normal(0.0, 0.3, shape))
        self.blobs[name] = blobs
        return top or bottom

    def bias(self, bottom: str, top: str | None = None, name: str | None = None) -> str:
        """Bias layer: a small per-channel offset."""
        name = name or f"{bottom}/bias{len(self.net.layer)}"
        self.layer("Bias", name, [bottom], [top or bottom])
        self.blobs[name] = [self.rng.normal(0.0, 0.3, self.shapes[bottom][1])]
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
