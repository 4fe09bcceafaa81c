"""Host layers: the Convolution / Deconvolution / InnerProduct layers that can absorb an affine map,
and how their parameters and weight blobs are read."""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, MismatchError
from ..net import WeightLayer
from .reasons import Reason, Refusal

HOST_TYPES = {"Convolution": "conv", "Deconvolution": "deconv", "InnerProduct": "ip"}
# Forks' depthwise convolutions: the same parameters and weights as Convolution (`--conv-like` adds more).
DEFAULT_CONV_LIKE = ("DepthwiseConvolution", "ConvolutionDepthwise")


@dataclass(frozen=True)
class Host:
    """What folding needs to know about one host layer."""

    name: str
    layout: str  # key of fold_math.HOST_LAYOUTS
    groups: int
    c_out: int
    rank: int | None  # rank of its output blob, when the parameters pin it down
    padded: bool
    weights: np.ndarray
    bias: np.ndarray | None


def is_host_type(layer_type: str, conv_like: Iterable[str]) -> bool:
    """A type that can take a fold: Convolution, Deconvolution, InnerProduct, or a `conv_like` one."""
    return layer_type in HOST_TYPES or layer_type in conv_like


def read_host(layer: object, stored: WeightLayer | None) -> Host | Refusal:
    """Read a host layer and check its blobs against its parameters. A type not in HOST_TYPES is
    read as a Convolution (the caller has decided it is one under another name)."""
    if len(layer.top) != 1:
        return Refusal(Reason.HOST_UNSUITABLE, f"'{layer.name}' has {len(layer.top)} tops")
    if layer.type == "InnerProduct":
        param = layer.inner_product_param
        if param.axis != 1:  # -1 is axis 1 only for 2-D inputs, whose rank we do not know here
            return Refusal(Reason.HOST_UNSUITABLE, f"InnerProduct '{layer.name}' has axis {param.axis}")
        layout, groups, rank, padded = ("ip_t" if param.transpose else "ip"), 1, 2, False
    else:
        param = layer.convolution_param
        if param.axis != 1:
            return Refusal(Reason.HOST_UNSUITABLE, f"'{layer.name}' convolves with channel axis {param.axis}")
        spatial = 2 if param.HasField("kernel_h") else len(param.kernel_size)
        layout = HOST_TYPES.get(layer.type, "conv")
        groups, rank = param.group, (2 + spatial if spatial > 1 else None)
        padded = any(param.pad) or param.pad_h > 0 or param.pad_w > 0
    if groups < 1 or param.num_output < 1:
        raise InputError(f"layer '{layer.name}': num_output {param.num_output} and group {groups} must be at least 1")
    blobs = _host_blobs(layer, stored, param.bias_term)
    host = Host(layer.name, layout, groups, param.num_output, rank, padded, *blobs)
    _check_shape(layer, host)
    return host


def _host_blobs(layer: object, stored: WeightLayer | None, bias_term: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if stored is None or not stored.blobs:
        raise MismatchError(f"layer '{layer.name}' ({layer.type}) has no weights in the caffemodel")
    expected = 2 if bias_term else 1
    if len(stored.blobs) != expected:
        guess = {
            (2, 1): "an already-merged prototxt with the unmerged caffemodel? use the original prototxt",
            (1, 2): "an unmerged prototxt with an already-merged caffemodel? use the merged prototxt",
        }.get((expected, len(stored.blobs)), "are they from the same net?")
        raise MismatchError(
            f"layer '{layer.name}': the prototxt expects {expected} blob(s) (bias_term: "
            f"{str(bias_term).lower()}) but the caffemodel has {len(stored.blobs)}: {guess}"
        )
    return stored.blobs[0], (stored.blobs[1] if bias_term else None)


def _check_shape(layer: object, host: Host) -> None:
    w = host.weights
    out_axis = {"conv": 0, "deconv": 1, "ip": -2, "ip_t": -1}[host.layout]
    c_out = w.shape[out_axis] * (host.groups if host.layout == "deconv" else 1) if w.ndim >= 2 else -1
    bias_ok = host.bias is None or host.bias.size == host.c_out
    if c_out != host.c_out or not bias_ok or host.c_out % host.groups:
        raise MismatchError(
            f"layer '{layer.name}': weights of shape {list(w.shape)} do not fit num_output "
            f"{host.c_out} (group {host.groups}); is the caffemodel from this net?"
        )


def host_param(layer: object) -> object:
    """The sub-message holding a host's bias_term."""
    return layer.inner_product_param if layer.type == "InnerProduct" else layer.convolution_param
