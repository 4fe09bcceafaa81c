"""The BatchNorm layouts found in the wild, told apart by parameters and blob shapes.

- `bvlc` (BatchNorm): blobs mean*s, var*s, s. f = 1/s (0 when s == 0);
  y = (x - mean*f) / sqrt(var*f + eps).
- `nvcaffe` (BatchNorm): blobs mean, var, correction[, gamma, beta];
  y = (x - mean) / sqrt(var + eps) * gamma + beta, with eps raised to at least 1e-5.
- `nvcaffe-0.15` (BatchNorm): blobs gamma, beta, mean, var, reserved; y as above, eps as given.
- `bn` (type BN, PSPNet-era forks): blobs slope, bias, mean, var; y as above, eps from bn_param.
- `segnet` (type BN, SegNet's fork): blobs scale, shift (each [1, C, 1, 1]); with
  `bn_mode: INFERENCE`, y = scale * x + shift (SegNet's compute_bn_statistics script folded the
  statistics in); in `LEARN` (the default) it normalises with the batch's own statistics.

NVIDIA Caffe 0.16+ writes 5 blobs with `scale_bias` (the 3rd, "variance correction", has shape [1]);
0.15 and Xilinx's fork wrote the last blob as the [1]-shaped one. With 3 blobs, NVIDIA Caffe and
BVLC differ only when blob 2 is not 1: `scale_bias` (a field BVLC does not have) marks NVIDIA Caffe,
otherwise BVLC is assumed and `--bn-flavour nvcaffe` says otherwise. The two `BN` layers differ in
blob count (2 or 4) and in their `bn_param` fields. A layout that fits none is kept, not refused:
only a layer we change must be understood.
"""

import numpy as np

from ..maths.affine import ChannelAffine, batchnorm_affine, scale_affine
from .reasons import Reason, Refusal

VARIANTS = ("bvlc", "nvcaffe", "nvcaffe-0.15", "bn")  # the ones --bn-flavour may name
SEGNET = "segnet"  # told apart by its blob count alone
NVCAFFE_MIN_EPS = 1e-5
_SEGNET_FIELDS = ("bn_mode", "scale_filler", "shift_filler")
_PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen")


def detect(layer: object, blobs: list[np.ndarray], override: str = "auto") -> str | Refusal:
    """The variant of a BatchNorm / BN layer, or why its blobs fit none."""
    if layer.type == "BN":
        found = _bn_fork(layer.bn_param, blobs)
    elif len(blobs) == 5 and blobs[2].size == 1 and blobs[4].size == 1 and not _declared_nvcaffe(layer):
        found = ""  # one channel: both 5-blob layouts fit; --bn-flavour (or scale_bias) decides
    elif len(blobs) == 5 and blobs[2].size == 1:
        found = "nvcaffe"
    elif len(blobs) == 5 and blobs[4].size == 1:
        found = "nvcaffe-0.15"
    elif len(blobs) == 3 and blobs[2].size == 1:
        found = "nvcaffe" if _declared_nvcaffe(layer) else "bvlc"
    else:
        found = ""
    chosen = found if override == "auto" else override
    if not chosen or _blob_count(chosen, blobs) is None:
        shapes = [list(b.shape) for b in blobs]
        return Refusal(Reason.UNKNOWN_LAYOUT, f"{layer.type} blobs {shapes} fit no known layout ({chosen or 'auto'})")
    return chosen


def _declared_nvcaffe(layer: object) -> bool:
    return layer.batch_norm_param.HasField("scale_bias")


def _bn_fork(param: object, blobs: list[np.ndarray]) -> str:
    """SegNet's BN (2 blobs of one size, none of PSPNet's fields) or PSPNet's (4 blobs, none of
    SegNet's fields); "" when neither fits."""
    if len(blobs) == 2 and blobs[0].size == blobs[1].size and not any(map(param.HasField, _PSPNET_FIELDS)):
        return SEGNET
    if len(blobs) == 4 and not any(map(param.HasField, _SEGNET_FIELDS)):
        return "bn"
    return ""


def segnet_learns(layer: object, blobs: list[np.ndarray] | None = None) -> bool:
    """A SegNet BN not in `bn_mode: INFERENCE` (LEARN is the default): batch statistics at test
    time. Without `blobs`, only when its parameters say it is SegNet's."""
    param = layer.bn_param
    if param.bn_mode == param.INFERENCE:
        return False
    return _bn_fork(param, blobs) == SEGNET if blobs is not None else any(map(param.HasField, _SEGNET_FIELDS))


def _blob_count(variant: str, blobs: list[np.ndarray]) -> int | None:
    counts = {"bvlc": (3,), "nvcaffe": (3, 5), "nvcaffe-0.15": (5,), "bn": (4,), SEGNET: (2,)}[variant]
    return len(blobs) if len(blobs) in counts else None


def statistics(variant: str, blobs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """(mean, variance, gamma or None, beta or None, factor) in the variant's blob order."""
    if variant == "bvlc":
        return blobs[0], blobs[1], None, None, float(blobs[2].ravel()[0])
    if variant == "nvcaffe":
        gamma, beta = (blobs[3], blobs[4]) if len(blobs) == 5 else (None, None)
        return blobs[0], blobs[1], gamma, beta, 1.0
    if variant == "nvcaffe-0.15":
        return blobs[2], blobs[3], blobs[0], blobs[1], 1.0
    return blobs[2], blobs[3], blobs[0], blobs[1], 1.0  # bn: slope, bias, mean, var


def affine(variant: str, layer: object, blobs: list[np.ndarray], channels: int) -> ChannelAffine:
    """The per-channel map the layer computes at inference (for SegNet's, in INFERENCE mode)."""
    if variant == SEGNET:
        return scale_affine(blobs[0], blobs[1], channels)
    mean, var, gamma, beta, factor = statistics(variant, blobs)
    normalise = batchnorm_affine(mean, var, factor, layer_eps(variant, layer))
    if gamma is None:
        return normalise
    return normalise.then(scale_affine(gamma, beta, channels))


def variance_eps(variant: str, layer: object, blobs: list[np.ndarray]) -> np.ndarray | None:
    """`var + eps` per channel (float64), as the layer divides by its square root at inference;
    None for SegNet's inference `BN`, a plain scale and shift with no statistics."""
    if variant == SEGNET:
        return None
    _, var, _, _, factor = statistics(variant, blobs)
    f = 0.0 if factor == 0 else 1.0 / factor
    return np.asarray(var, np.float64).ravel() * f + layer_eps(variant, layer)


def layer_eps(variant: str, layer: object) -> float:
    """The eps a layer of `variant` adds to its variance."""
    eps = layer.bn_param.eps if variant == "bn" else layer.batch_norm_param.eps
    return max(eps, NVCAFFE_MIN_EPS) if variant == "nvcaffe" else eps
