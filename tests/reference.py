"""A float64 evaluator of the Caffe layers we fold, written from Caffe's layer definitions.

Used where OpenCV dnn does not implement a layer as Caffe does (it has no Bias layer and ignores
InnerProduct `transpose`), and by the property tests of the fold maths."""

from pathlib import Path

import numpy as np

from caffe_bn_merge.graph import included, inference_state, input_shapes
from caffe_bn_merge.io import read as caffe_io


def conv2d(x, w, b, stride=1, pad=0, dilation=1, group=1):
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // group
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - (dilation * (kh - 1) + 1)) // stride + 1
    ow = (wd + 2 * pad - (dilation * (kw - 1) + 1)) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation :: stride, j * dilation :: stride][:, :, :oh, :ow]
                out[:, g * og : (g + 1) * og] += np.einsum("ncij,oc->noij", patch, w[g * og : (g + 1) * og, :, i, j])
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


def deconv2d(x, w, b, stride=1, pad=0, dilation=1, group=1):
    n, c, h, wd = x.shape
    cg, og, kh, kw = c // group, w.shape[1], w.shape[2], w.shape[3]
    full = np.zeros(
        (n, og * group, (h - 1) * stride + dilation * (kh - 1) + 1, (wd - 1) * stride + dilation * (kw - 1) + 1)
    )
    for g in range(group):
        xs = x[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilation, i * dilation + stride * (h - 1) + 1, stride)
                cols = slice(j * dilation, j * dilation + stride * (wd - 1) + 1, stride)
                full[:, g * og : (g + 1) * og, rows, cols] += np.einsum(
                    "ncij,co->noij", xs, w[g * cg : (g + 1) * cg, :, i, j]
                )
    out = full[:, :, pad : full.shape[2] - pad, pad : full.shape[3] - pad]
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


def _broadcast(param: np.ndarray, x: np.ndarray, axis: int, num_axes: int) -> np.ndarray:
    axis %= x.ndim
    count = x.ndim - axis if num_axes == -1 else num_axes
    return param.reshape((1,) * axis + x.shape[axis : axis + count] + (1,) * (x.ndim - axis - count))


def _conv_args(p):
    first = lambda values, default: values[0] if values else default  # noqa: E731
    return {"stride": first(p.stride, 1), "pad": first(p.pad, 0), "dilation": first(p.dilation, 1), "group": p.group}


CONV_TYPES = ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise")


def _normalise(x, mean, var, eps, gamma=None, beta=None):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return y if gamma is None else y * gamma.reshape(shape) + beta.reshape(shape)


def _batchnorm(layer, x, blobs, flavour):
    """BatchNorm as each fork computes it at inference (see each fork's BatchNorm source)."""
    eps = layer.batch_norm_param.eps
    if layer.type == "BN" and len(blobs) == 2:  # SegNet: scale, shift; LEARN: the batch's statistics
        if layer.bn_param.bn_mode == layer.bn_param.INFERENCE:
            return _normalise(x, np.zeros(1), np.ones(1), 0.0, *blobs)
        axes = (0, *range(2, x.ndim))
        return _normalise(x, x.mean(axis=axes), x.var(axis=axes), 1e-9, *blobs)
    if layer.type == "BN":  # PSPNet-era forks: slope, bias, mean, var
        return _normalise(x, blobs[2], blobs[3], layer.bn_param.eps, blobs[0], blobs[1])
    if flavour == "nvcaffe":  # mean, var (no factor), correction[, gamma, beta]; eps >= 1e-5
        extra = (blobs[3], blobs[4]) if len(blobs) == 5 else ()
        return _normalise(x, blobs[0], blobs[1], max(eps, 1e-5), *extra)
    if flavour == "nvcaffe-0.15":  # gamma, beta, mean, var, reserved
        return _normalise(x, blobs[2], blobs[3], eps, blobs[0], blobs[1])
    f = 0.0 if blobs[2].ravel()[0] == 0 else 1.0 / blobs[2].ravel()[0]  # BVLC: mean*s, var*s, s
    return _normalise(x, blobs[0] * f, blobs[1] * f, eps)


def _run_layer(layer, bottoms, blobs, flavour="bvlc"):
    x = bottoms[0]
    t = layer.type
    if t in (*CONV_TYPES, "Deconvolution") or layer.HasField("convolution_param"):  # forks' conv types too
        fn = deconv2d if t == "Deconvolution" else conv2d
        return fn(x, blobs[0], blobs[1] if len(blobs) > 1 else None, **_conv_args(layer.convolution_param))
    if t == "InnerProduct":
        p = layer.inner_product_param
        w = blobs[0].reshape(-1, p.num_output) if p.transpose else blobs[0].reshape(p.num_output, -1).T
        return x.reshape(x.shape[0], -1) @ w + (blobs[1].ravel() if len(blobs) > 1 else 0)
    if t in ("BatchNorm", "BN"):
        return _batchnorm(layer, x, [b.ravel() for b in blobs], flavour)
    if t == "Scale":
        p = layer.scale_param
        out = x * _broadcast(blobs[0], x, p.axis, p.num_axes)
        return out + (_broadcast(blobs[1], x, p.axis, p.num_axes) if p.bias_term else 0)
    if t == "Bias":
        return x + _broadcast(blobs[0], x, layer.bias_param.axis, layer.bias_param.num_axes)
    if t == "ReLU":
        return np.maximum(x, 0)
    if t == "Power":
        p = layer.power_param
        return (p.shift + p.scale * x) ** p.power
    if t in ("Dropout", "Split"):
        return x
    raise NotImplementedError(t)


def evaluate(
    prototxt: Path, caffemodel: Path, inputs: dict[str, np.ndarray], flavour: str = "bvlc"
) -> dict[str, np.ndarray]:
    """Final value of every blob after running the net in float64 (TEST phase); `flavour` is the
    BatchNorm layout of the fork the net comes from."""
    net = caffe_io.read_net(prototxt)
    stored = caffe_io.read_weights(caffemodel).layers
    values = {name: np.asarray(value, np.float64) for name, value in inputs.items()}
    for layer in net.layer:
        if layer.type == "Input" or not included(layer, inference_state(net)):
            continue
        blobs = [np.asarray(b, np.float64) for b in stored[layer.name].blobs] if layer.name in stored else []
        out = _run_layer(layer, [values[b] for b in layer.bottom], blobs, flavour)
        for top in layer.top:
            values[top] = out
    return values


def random_inputs(prototxt: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in input_shapes(caffe_io.read_net(prototxt)).items()}
