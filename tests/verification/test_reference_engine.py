"""The float64 reference engine (`caffe_bn_merge.verification.reference`) against real engines and formulas.

- Per layer type, one net holding several variants (shapes, groups, pads, strides, dilations, axes,
  ceil rounding) side by side, each on its own input: compared with OpenCV dnn (where it computes the
  layer as Caffe does) and with real Caffe (pycaffe).
- Every weighted real net of ../shared/real_nets on both engines, at the blobs `--verify` compares.
- Fork layers (Upsample, Interp, ShuffleChannel, ReLU6, caffe-segnet BN, depthwise convolutions)
  against direct formulas written here with loops.
- Unknown types: a one-line error, and a plug-in that makes the net run.
"""

import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from harness import REAL_NETS as REAL

from caffe_bn_merge.errors import VerifyError
from caffe_bn_merge.graph import build_graph
from caffe_bn_merge.io import proto
from caffe_bn_merge.io.emit import write_new_weights
from caffe_bn_merge.io.read import read_net
from caffe_bn_merge.synthetic.synth import weights_for
from caffe_bn_merge.verification import reference
from caffe_bn_merge.verification.compare import compare_points, random_inputs, run_opencv
from caffe_bn_merge.verification.pycaffe import run_caffe
from caffe_bn_merge.verification.reference import load_plugin, register_layer, run_reference

UNUSED_RECORD = {"unused": [np.zeros(1)]}  # a caffemodel needs a layer record; engines skip unknown names
TOLERANCE = 1e-5  # max |difference| relative to the output's max |value|
Shape = tuple[int, ...]


def assert_close(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    theirs = np.asarray(theirs, np.float64)
    assert ours.size == theirs.size, f"{name}: shape {ours.shape} vs {theirs.shape}"
    scale = float(np.max(np.abs(ours)))
    assert scale > 0 and np.isfinite(scale), f"{name}: output is all zero or not finite, the check could not fail"
    error = float(np.max(np.abs(ours - theirs.reshape(ours.shape)))) / scale
    assert error <= TOLERANCE, f"{name}: relative error {error:.3g}"


# --- (a) one net per layer type, variants side by side ---------------------------------------------


@dataclass
class Variant:
    """One layer under test: its bottoms' shapes, its parameters as prototxt text, its top count,
    and optionally its blobs (default: synth.weights_for's realistic ones)."""

    shapes: list[Shape]
    params: str = ""
    tops: int = 1
    blobs: list[np.ndarray] | None = None
    opencv: str = ""  # why OpenCV does not compute this variant as Caffe does ("": it does)
    values: list[np.ndarray] | None = None  # the inputs (default: seeded standard normal)


@dataclass
class Case:
    type: str
    variants: list[Variant]

    def for_opencv(self) -> "Case":
        return Case(self.type, [v for v in self.variants if not v.opencv])


def _v(
    shapes: Shape | list[Shape],
    params: str = "",
    tops: int = 1,
    blobs: list | None = None,
    opencv: str = "",
    values: list | None = None,
) -> Variant:
    return Variant(shapes if isinstance(shapes, list) else [shapes], params, tops, blobs, opencv, values)


def _detection_variant(images: int, priors: int, classes: int, params: str, loc_classes: int = 1) -> Variant:
    """DetectionOutput on loc offsets, confidences in [0, 1) and valid prior boxes with SSD's variances."""
    rng = np.random.default_rng(priors + classes)
    centre, size = rng.uniform(0.1, 0.9, (priors, 2)), rng.uniform(0.05, 0.4, (priors, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).ravel()
    prior = np.stack([boxes, np.tile([0.1, 0.1, 0.2, 0.2], priors)])[None]
    loc = rng.standard_normal((images, priors * loc_classes * 4))
    conf = rng.uniform(0, 1, (images, priors * classes))
    shapes = [loc.shape, conf.shape, prior.shape]
    text = f"detection_output_param {{ {params} }}"
    return _v(shapes, text, opencv="orders detections by score, not by label", values=[loc, conf, prior])


def _bn_blobs(channels: int, factor: float, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mean, var = rng.normal(0, 0.5, channels), rng.lognormal(0, 0.8, channels)
    return [mean * factor, var * factor, np.array([factor])]


CONV = "convolution_param {{ num_output: {0} {1} }}"
CASES = [
    Case(
        "Convolution",
        [
            _v((2, 3, 9, 11), CONV.format(4, "kernel_size: 3")),
            _v((1, 3, 10, 9), CONV.format(5, "kernel_size: 3 pad: 1 stride: 2")),
            _v((1, 4, 8, 8), CONV.format(6, "kernel_size: 3 pad: 1 group: 2")),
            _v((1, 3, 11, 10), CONV.format(4, "kernel_size: 3 pad: 2 dilation: 2")),
            _v((1, 3, 9, 8), CONV.format(4, "kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1")),
            _v((1, 5, 7, 6), CONV.format(3, "kernel_size: 1 bias_term: false")),
            _v((1, 6, 9, 9), CONV.format(6, "kernel_size: 3 pad: 1 stride: 2 group: 6")),
            _v((1, 6, 8, 7), CONV.format(12, "kernel_size: 3 pad: 1 group: 6")),
            _v((1, 3, 10, 10), CONV.format(4, "kernel_size: 2 stride: 3 pad: 1")),
            _v((2, 3, 12), CONV.format(4, "kernel_size: 3 pad: 1 stride: 2"), opencv="1-D"),
        ],
    ),
    Case(
        "Deconvolution",
        [
            _v((1, 3, 5, 6), CONV.format(4, "kernel_size: 4 stride: 2 pad: 1")),
            _v((2, 4, 5, 5), CONV.format(6, "kernel_size: 3 stride: 2 group: 2")),
            _v((1, 3, 4, 5), CONV.format(2, "kernel_size: 3 dilation: 2 pad: 1 bias_term: false"), opencv="dilation"),
            _v((1, 4, 5, 4), CONV.format(4, "kernel_size: 2 stride: 2 group: 4")),
            _v((1, 3, 4, 4), CONV.format(3, "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1")),
        ],
    ),
    Case(
        "InnerProduct",
        [
            _v((2, 3, 4, 5), "inner_product_param { num_output: 7 }"),
            _v((3, 10), "inner_product_param { num_output: 4 bias_term: false }"),
            _v((2, 3, 4, 5), "inner_product_param { num_output: 6 axis: 2 }"),
            _v((2, 3, 4, 5), "inner_product_param { num_output: 7 transpose: true }", opencv="transpose"),
        ],
    ),
    Case(
        "Pooling",
        [
            _v((1, 3, 10, 10), "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
            _v((1, 3, 10, 9), "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }"),
            _v((1, 3, 10, 9), "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"),
            _v((2, 3, 7, 7), "pooling_param { pool: AVE kernel_size: 2 stride: 2 }"),
            _v((1, 3, 6, 5), "pooling_param { pool: AVE global_pooling: true }"),
            _v((1, 3, 6, 5), "pooling_param { pool: MAX global_pooling: true }"),
            _v((1, 2, 9, 8), "pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 }"),
            _v((1, 2, 8, 8), "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }"),
            _v((1, 2, 11, 11), "pooling_param { pool: AVE kernel_size: 3 stride: 3 pad: 2 }"),
            _v((1, 2, 12, 13), "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }"),
        ],
    ),
    Case(
        "Eltwise",
        [
            _v([(1, 3, 4, 5)] * 3, "eltwise_param { operation: SUM coeff: 0.5 coeff: -1 coeff: 2 }"),
            _v([(2, 3, 4)] * 2, "eltwise_param { operation: PROD }"),
            _v([(1, 3, 4, 5)] * 3, "eltwise_param { operation: MAX }"),
            _v([(1, 2, 3, 3)] * 2),
        ],
    ),
    Case(
        "Concat",
        [
            _v([(1, 2, 4, 5), (1, 3, 4, 5), (1, 1, 4, 5)]),
            _v([(1, 2, 3, 5), (1, 2, 4, 5)], "concat_param { axis: 2 }"),
            _v([(2, 3, 4), (1, 3, 4)], "concat_param { concat_dim: 0 }", opencv="concat_dim"),
            _v([(1, 2, 3, 2), (1, 2, 3, 4)], "concat_param { axis: -1 }"),
        ],
    ),
    Case(
        "Slice",
        [
            _v((1, 6, 4, 5), "slice_param { slice_point: 1 slice_point: 3 }", tops=3),
            _v((1, 2, 6, 5), "slice_param { axis: 2 }", tops=2, opencv="even split"),
            _v((1, 2, 3, 8), "slice_param { slice_dim: 3 slice_point: 5 }", tops=2, opencv="slice_dim"),
        ],
    ),
    Case("Split", [_v((1, 3, 4, 5), tops=2), _v((2, 5), tops=3)]),
    Case(
        "Flatten",
        [
            _v((2, 3, 4, 5)),
            _v((2, 3, 4, 5), "flatten_param { axis: 2 }"),
            _v((2, 3, 4, 5), "flatten_param { axis: 1 end_axis: 2 }"),
        ],
    ),
    Case(
        "Reshape",
        [
            _v((2, 3, 4, 5), "reshape_param { shape { dim: 0 dim: -1 } }"),
            _v((2, 4, 3, 5), "reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 5 } }"),
            _v((2, 4, 3, 5), "reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: 2 } }"),
        ],
    ),
    Case(
        "Crop",
        [
            _v([(2, 4, 9, 9), (2, 4, 5, 6)], "crop_param { axis: 2 offset: 1 offset: 2 }"),
            _v([(1, 4, 7, 7), (1, 2, 4, 4)], "crop_param { axis: 1 offset: 1 }"),
            _v([(1, 3, 6, 8), (1, 3, 6, 3)]),
        ],
    ),
    Case("ReLU", [_v((2, 3, 4, 5)), _v((2, 7), "relu_param { negative_slope: 0.1 }")]),
    Case("PReLU", [_v((2, 3, 4, 5)), _v((1, 4, 3, 3), "prelu_param { channel_shared: true }")]),
    Case("ELU", [_v((2, 3, 4, 5)), _v((1, 4, 3), "elu_param { alpha: 0.5 }")]),
    Case("Sigmoid", [_v((2, 3, 4, 5)), _v((3, 7))]),
    Case("TanH", [_v((2, 3, 4, 5)), _v((3, 7))]),
    Case("AbsVal", [_v((2, 3, 4, 5)), _v((3, 7))]),
    Case("BNLL", [_v((2, 3, 4, 5)), _v((3, 7))]),
    Case(
        "Threshold",
        [
            _v((2, 3, 4, 5), opencv="no Threshold layer"),
            _v((3, 7), "threshold_param { threshold: 0.4 }", opencv="no Threshold layer"),
        ],
    ),
    Case(
        "Tile",
        [
            _v((2, 3, 4), "tile_param { tiles: 3 }", opencv="Caffe's Tile"),
            _v((2, 3, 4, 2), "tile_param { axis: -1 tiles: 2 }", opencv="Caffe's Tile"),
        ],
    ),
    Case(
        "Reduction",
        [
            _v((2, 3, 4, 5), opencv="no Reduction layer"),
            _v((2, 3, 4, 5), "reduction_param { operation: ASUM axis: 1 }", opencv="no Reduction layer"),
            _v((2, 3, 4), "reduction_param { operation: SUMSQ axis: 2 coeff: 0.5 }", opencv="no Reduction layer"),
            _v((2, 3, 4, 5), "reduction_param { operation: MEAN axis: -2 coeff: -2 }", opencv="no Reduction layer"),
        ],
    ),
    Case(
        "Power",
        [
            _v((2, 3, 4, 5), "power_param { power: 2 scale: 0.5 shift: 1 }"),
            _v((2, 3, 4), "power_param { scale: 2 shift: -1 }"),
            _v((2, 3, 4), "power_param { power: 3 }"),
        ],
    ),
    Case("Exp", [_v((2, 3, 4, 5)), _v((3, 7), "exp_param { base: 2 scale: 0.5 shift: 0.1 }")]),
    Case(
        "Log",
        [
            _v((2, 3, 4, 5), "log_param { shift: 10 }", opencv="shift"),
            _v((3, 7), "log_param { base: 2 scale: 0.5 shift: 5 }", opencv="shift"),
        ],
    ),
    Case(
        "Softmax",
        [_v((2, 5, 3, 4)), _v((2, 3, 6), "softmax_param { axis: 2 }"), _v((2, 3, 4), "softmax_param { axis: -1 }")],
    ),
    Case(
        "LRN",
        [
            _v((1, 7, 4, 5), "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 }"),
            _v((2, 4, 3, 3), "lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 k: 2 }", opencv="k"),
            _v((1, 3, 6, 7), "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
            _v(
                (1, 2, 7, 6),
                "lrn_param { local_size: 5 alpha: 0.8 beta: 0.5 norm_region: WITHIN_CHANNEL }",
                opencv="window divisor at the borders",
            ),
        ],
    ),
    Case(
        "MVN",
        [
            _v((2, 3, 4, 5)),
            _v((2, 3, 4, 5), "mvn_param { across_channels: true }"),
            _v((2, 3, 4, 5), "mvn_param { normalize_variance: false }"),
            _v((1, 2, 3, 3), "mvn_param { eps: 0.01 }", opencv="eps inside the square root"),
        ],
    ),
    Case(
        "BatchNorm",
        [
            _v((2, 5, 4, 3)),
            _v((1, 4, 3, 3), "batch_norm_param { eps: 0.001 }"),
            _v((3, 6), "batch_norm_param { eps: 0.0001 }"),
            _v((1, 3, 4, 4), blobs=_bn_blobs(3, 0.0)),  # factor 0: mean = var = 0
            _v((1, 3, 4, 4), blobs=_bn_blobs(3, 7.5)),
            _v((1, 5, 4, 3), "batch_norm_param { use_global_stats: false }"),
            _v((2, 5, 4, 3), "batch_norm_param { use_global_stats: false }", opencv="batch statistics, N > 1"),
            _v((4, 3), "batch_norm_param { use_global_stats: false eps: 0.01 }", opencv="batch statistics, N > 1"),
        ],
    ),
    Case(
        "Scale",
        [
            _v((2, 3, 4, 5), "scale_param { bias_term: true }"),
            _v((2, 3, 4, 5)),
            _v((2, 3, 4, 5), "scale_param { axis: 1 num_axes: 2 bias_term: true }"),
            _v((2, 3, 4, 5), "scale_param { num_axes: 0 }"),
            _v((2, 3, 4, 5), "scale_param { axis: 0 num_axes: -1 }"),
            _v([(2, 3, 4, 5), (2, 3)], "scale_param { axis: 0 }"),
            _v([(2, 3, 4, 5), (3, 4)], "scale_param { bias_term: true }", opencv="two bottoms with bias"),
        ],
    ),
    Case(
        "Bias",
        [
            _v((2, 3, 4, 5), opencv="no Bias layer"),
            _v((2, 3, 4, 5), "bias_param { axis: 2 num_axes: 2 }", opencv="no Bias layer"),
            _v([(2, 3, 4, 5), (3,)], opencv="no Bias layer"),
        ],
    ),
    Case("Dropout", [_v((2, 3, 4, 5)), _v((3, 7), "dropout_param { dropout_ratio: 0.3 }")]),
    Case(
        "ArgMax",
        [
            _v((2, 7, 1, 1), opencv="no ArgMax layer"),
            _v((2, 3, 4, 5), "argmax_param { top_k: 3 out_max_val: true }", opencv="no ArgMax layer"),
            _v((2, 5, 3, 4), "argmax_param { axis: 1 }", opencv="no ArgMax layer"),
            _v((2, 5, 3, 4), "argmax_param { axis: 1 top_k: 2 out_max_val: true }", opencv="no ArgMax layer"),
            _v((2, 3, 4), "argmax_param { axis: 2 top_k: 2 }", opencv="no ArgMax layer"),
        ],
    ),
    Case(
        "Permute",
        [
            _v((2, 3, 4, 5), "permute_param { order: 0 order: 2 order: 3 order: 1 }"),
            _v((2, 3, 4, 5), "permute_param { order: 0 order: 3 order: 1 order: 2 }"),
            _v((2, 3, 4, 5), "permute_param { order: 0 order: 1 order: 3 }", opencv="partial order"),
        ],
    ),
    Case(
        "Normalize",
        [
            _v((2, 4, 3, 5), "norm_param { across_spatial: false channel_shared: false }"),
            _v((2, 4, 3, 5), "norm_param { across_spatial: true channel_shared: true }", blobs=[np.array(17.5)]),
            _v(
                (1, 3, 4, 4),
                "norm_param { across_spatial: false channel_shared: true eps: 0.001 }",
                blobs=[np.array(3.0)],
            ),
            _v((1, 3, 4, 4), "norm_param { across_spatial: true channel_shared: false }", opencv="fails"),
        ],
    ),
    Case(
        "PriorBox",
        [
            _v(
                [(1, 4, 5, 6), (1, 3, 60, 72)],
                "prior_box_param { min_size: 10 max_size: 20 aspect_ratio: 2 flip: true clip: true"
                " variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }",
            ),
            _v(
                [(1, 4, 3, 4), (1, 3, 30, 40)],
                "prior_box_param { min_size: 15 aspect_ratio: 2 aspect_ratio: 3 flip: false step: 12 offset: 0.3"
                " variance: 0.1 clip: false }",
            ),
            _v(
                [(1, 2, 4, 4), (1, 3, 10, 10)],
                "prior_box_param { min_size: 30 min_size: 50 max_size: 60 max_size: 90 aspect_ratio: 2"
                " img_h: 100 img_w: 120 clip: false variance: 0.2 }",
                opencv="several min_size",
            ),
            _v(
                [(1, 2, 3, 5), (1, 3, 9, 9)],
                "prior_box_param { min_size: 4 img_size: 50 step_h: 8 step_w: 6 clip: true }",
                opencv="no variance given",
            ),
        ],
    ),
    Case(
        "DetectionOutput",
        [
            _detection_variant(
                1,
                20,
                4,
                "num_classes: 4 code_type: CENTER_SIZE keep_top_k: 8 confidence_threshold: 0.1"
                " nms_param { nms_threshold: 0.45 top_k: 10 }",
            ),
            _detection_variant(2, 20, 4, "num_classes: 4 nms_param { nms_threshold: 0.3 }"),
            _detection_variant(
                1,
                30,
                3,
                "num_classes: 3 code_type: CORNER_SIZE background_label_id: 2 confidence_threshold: 0.5"
                " nms_param { nms_threshold: 0.6 eta: 0.9 }",
            ),
            _detection_variant(
                1,
                20,
                4,
                "num_classes: 4 share_location: false code_type: CENTER_SIZE"
                " variance_encoded_in_target: true nms_param { nms_threshold: 0.5 top_k: 6 }",
                loc_classes=4,
            ),
        ],
    ),
]
CASE_IDS = [case.type for case in CASES]


def _case_net(case: Case, folder: Path) -> tuple[Path, Path, dict[str, np.ndarray], list[tuple[str, str]]]:
    """The case's net (variant i reads inputs in{i}_{j} and writes v{i}_{k}), weights, inputs, outputs."""
    net = proto.NetParameter(name=f"case_{case.type}")
    rng = np.random.default_rng(len(case.variants))
    inputs, outputs, blobs = {}, [], {}
    for i, variant in enumerate(case.variants):
        bottoms = [f"in{i}_{j}" for j in range(len(variant.shapes))]
        values = variant.values or [rng.standard_normal(shape) for shape in variant.shapes]
        for name, shape, value in zip(bottoms, variant.shapes, values, strict=True):
            layer = net.layer.add(name=name, type="Input", top=[name])
            layer.input_param.shape.add(dim=shape)
            inputs[name] = np.asarray(value, np.float32).reshape(shape)
        tops = [f"v{i}_{k}" for k in range(variant.tops)]
        layer = net.layer.add(name=f"v{i}", type=case.type, bottom=bottoms, top=tops)
        text_format.Merge(variant.params, layer)
        outputs += [(layer.name, top) for top in tops]
        if variant.blobs is not None:
            blobs[layer.name] = variant.blobs
    blobs = {**weights_for(net, seed=7), **blobs} or UNUSED_RECORD
    model, weights = folder / "net.prototxt", folder / "net.caffemodel"
    model.write_text(text_format.MessageToString(net))
    types = {layer.name: layer.type for layer in net.layer}
    write_new_weights(
        [(n, types.get(n, "Unused"), [np.asarray(b, np.float32) for b in bs]) for n, bs in blobs.items()], weights
    )
    return model, weights, inputs, outputs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_matches_opencv(case: Case, tmp_path) -> None:
    if not case.for_opencv().variants:
        pytest.skip(f"OpenCV computes no variant of {case.type} as Caffe does")
    model, weights, inputs, outputs = _case_net(case.for_opencv(), tmp_path)
    outputs = [(layer, top) for layer, top in outputs if top.endswith("_0")]  # run_opencv reads a layer's first top
    ours = run_reference(model, weights, inputs, outputs)
    for (layer, top), mine, theirs in zip(outputs, ours, run_opencv(model, weights, inputs, outputs), strict=True):
        assert_close(f"{layer}/{top}", mine, theirs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_matches_caffe(case: Case, tmp_path, pycaffe) -> None:
    model, weights, inputs, outputs = _case_net(case, tmp_path)
    ours = run_reference(model, weights, inputs, outputs)
    for (layer, top), mine, theirs in zip(outputs, ours, run_caffe(model, weights, inputs, outputs), strict=True):
        assert_close(f"{layer}/{top}", mine, theirs)


FLOOR_POOLING = Case(  # `ceil_mode: false` (forks; BVLC's round_mode FLOOR): real Caffe's schema lacks it
    "Pooling",
    [
        _v((1, 2, 10, 10), "pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false }"),
        _v((1, 2, 10, 9), "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 ceil_mode: false }"),
        _v((2, 3, 7, 8), "pooling_param { pool: AVE kernel_size: 2 stride: 2 ceil_mode: false }"),
    ],
)


def test_floor_pooling_matches_opencv(tmp_path) -> None:
    model, weights, inputs, outputs = _case_net(FLOOR_POOLING, tmp_path)
    ours = run_reference(model, weights, inputs, outputs)
    for (layer, top), mine, theirs in zip(outputs, ours, run_opencv(model, weights, inputs, outputs), strict=True):
        assert_close(f"{layer}/{top}", mine, theirs)


# --- (b) real nets ---------------------------------------------------------------------------------


def _real(real_nets: Path, name: str) -> tuple[Path, Path, dict[str, np.ndarray], list[tuple[str, str]]]:
    prototxt, caffemodel, _ = REAL[name]
    model = real_nets / prototxt
    points = [p for p in compare_points(build_graph(read_net(model))).values() if p.gating]
    return model, real_nets / caffemodel, random_inputs(model), [(p.layer, p.top) for p in points]


@pytest.mark.parametrize("name", REAL)
def test_real_net_matches_opencv(name: str, real_nets) -> None:
    model, weights, inputs, outputs = _real(real_nets, name)
    ours = run_reference(model, weights, inputs, outputs)
    for (layer, top), mine, theirs in zip(outputs, ours, run_opencv(model, weights, inputs, outputs), strict=True):
        assert_close(f"{name} {layer}/{top}", mine, theirs)


@pytest.mark.parametrize("name", REAL)
def test_real_net_matches_caffe(name: str, real_nets, pycaffe) -> None:
    model, weights, inputs, outputs = _real(real_nets, name)
    ours = run_reference(model, weights, inputs, outputs)
    for (layer, top), mine, theirs in zip(outputs, ours, run_caffe(model, weights, inputs, outputs), strict=True):
        assert_close(f"{name} {layer}/{top}", mine, theirs)


# --- (c) fork layers against direct formulas ---------------------------------------------------------


def _dims(shape: Shape) -> str:
    return " ".join(f"dim: {d}" for d in shape)


def _fork_net(folder: Path, shapes: list[Shape], layer_text: str, blobs: dict | None = None) -> tuple[Path, Path]:
    """A net of Input layers in0.. and the given layer text (with fields our schema lacks)."""
    lines = [
        f'layer {{ name: "in{i}" type: "Input" top: "in{i}" input_param {{ shape {{ {_dims(s)} }} }} }}'
        for i, s in enumerate(shapes)
    ]
    model, weights = folder / "fork.prototxt", folder / "fork.caffemodel"
    model.write_text("\n".join([*lines, layer_text]) + "\n")
    stored = blobs or UNUSED_RECORD
    write_new_weights([(n, "X", [np.asarray(b, np.float32) for b in bs]) for n, bs in stored.items()], weights)
    return model, weights


def _one(folder: Path, shapes: list[Shape], layer_text: str, inputs: list[np.ndarray], blobs: dict | None = None):
    model, weights = _fork_net(folder, shapes, layer_text, blobs)
    given = {f"in{i}": x for i, x in enumerate(inputs)}
    return run_reference(model, weights, given, [("f", "out")])[0]


def _layer(type_: str, params: str, bottoms: int = 1) -> str:
    bottom = " ".join(f'bottom: "in{i}"' for i in range(bottoms))
    return f'layer {{ name: "f" type: "{type_}" {bottom} top: "out" {params} }}'


UPSAMPLE = [((1, 2, 3, 4), "upsample_param { scale: 2 }", 2, 2), ((2, 3, 2, 3), "upsample_param { scale: 3 }", 3, 3)]
UPSAMPLE += [((1, 2, 3, 3), "upsample_param { scale_h: 2 scale_w: 3 }", 2, 3), ((1, 1, 2, 2), "", 2, 2)]


@pytest.mark.parametrize(("shape", "params", "sh", "sw"), UPSAMPLE)
def test_upsample_nearest(shape, params, sh, sw, tmp_path) -> None:
    x = np.random.default_rng(1).standard_normal(shape)
    expected = np.zeros((*shape[:2], shape[2] * sh, shape[3] * sw))
    for i in range(expected.shape[2]):
        for j in range(expected.shape[3]):
            expected[:, :, i, j] = x[:, :, i // sh, j // sw]
    got = _one(tmp_path, [shape], _layer("Upsample", params), [x])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("shape", "out"), [((1, 2, 3, 4), (6, 8)), ((2, 1, 3, 3), (5, 6))])
def test_segnet_upsample_unpools_to_the_mask(shape, out, tmp_path) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    mask = np.stack(
        [rng.choice(out[0] * out[1], shape[2] * shape[3], replace=False) for _ in range(shape[0] * shape[1])]
    )
    mask = mask.reshape(shape).astype(np.float64)
    expected = np.zeros((*shape[:2], *out))
    for n, c, i, j in np.ndindex(*shape):
        index = int(mask[n, c, i, j])
        expected[n, c, index // out[1], index % out[1]] = x[n, c, i, j]
    params = f"upsample_param {{ upsample_h: {out[0]} upsample_w: {out[1]} }}"
    got = _one(tmp_path, [shape, shape], _layer("Upsample", params, 2), [x, mask])
    np.testing.assert_array_equal(got, expected)


def _interp_expected(x: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """Corner-aligned bilinear interpolation, one output pixel at a time."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, h_out, w_out))
    for i in range(h_out):
        for j in range(w_out):
            y = i * (h - 1) / (h_out - 1) if h_out > 1 else 0.0
            z = j * (w - 1) / (w_out - 1) if w_out > 1 else 0.0
            y0, z0 = min(int(y), h - 1), min(int(z), w - 1)
            y1, z1 = min(y0 + 1, h - 1), min(z0 + 1, w - 1)
            a, b = y - y0, z - z0
            out[:, :, i, j] = (
                (1 - a) * (1 - b) * x[:, :, y0, z0]
                + (1 - a) * b * x[:, :, y0, z1]
                + a * (1 - b) * x[:, :, y1, z0]
                + a * b * x[:, :, y1, z1]
            )
    return out


INTERP = [
    ((1, 2, 4, 5), "interp_param { zoom_factor: 2 }", (7, 9), 0),
    ((1, 2, 9, 7), "interp_param { shrink_factor: 2 }", (5, 4), 0),
    ((2, 1, 5, 6), "interp_param { height: 11 width: 3 }", (11, 3), 0),
    ((1, 2, 6, 6), "interp_param { zoom_factor: 3 pad_beg: -1 pad_end: -1 }", (10, 10), 1),
    ((1, 1, 9, 9), "interp_param { shrink_factor: 2 zoom_factor: 3 }", (13, 13), 0),
    ((1, 2, 4, 4), "interp_param { zoom_factor: 2 height: 3 width: 3 }", (7, 7), 0),  # a lone factor wins
    ((1, 2, 4, 4), "interp_param { zoom_factor: 2 shrink_factor: 2 height: 3 width: 5 }", (3, 5), 0),
]


@pytest.mark.parametrize(("shape", "params", "size", "crop"), INTERP)
def test_interp_bilinear_corners_aligned(shape, params, size, crop, tmp_path) -> None:
    x = np.random.default_rng(3).standard_normal(shape)
    region = x[:, :, crop : shape[2] - crop, crop : shape[3] - crop]
    got = _one(tmp_path, [shape], _layer("Interp", params), [x])
    np.testing.assert_allclose(got, _interp_expected(region, *size), rtol=0, atol=1e-12)


def test_interp_to_the_size_of_a_second_bottom(tmp_path) -> None:
    x, like = np.random.default_rng(4).standard_normal((1, 2, 3, 5)), np.zeros((1, 1, 8, 4))
    got = _one(tmp_path, [x.shape, like.shape], _layer("Interp", "", 2), [x, like])
    np.testing.assert_allclose(got, _interp_expected(x, 8, 4), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("channels", "group"), [(6, 2), (6, 3), (12, 4), (5, 1)])
def test_shuffle_channel(channels: int, group: int, tmp_path) -> None:
    x = np.random.default_rng(4).standard_normal((2, channels, 3, 2))
    per = channels // group
    expected = np.zeros_like(x)
    for i in range(group):
        for j in range(per):
            expected[:, j * group + i] = x[:, i * per + j]
    got = _one(tmp_path, [x.shape], _layer("ShuffleChannel", f"shuffle_channel_param {{ group: {group} }}"), [x])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (2, 7)])
def test_relu6(shape, tmp_path) -> None:
    x = 5 * np.random.default_rng(5).standard_normal(shape)
    expected = np.array([min(max(v, 0.0), 6.0) for v in x.ravel()]).reshape(shape)
    np.testing.assert_array_equal(_one(tmp_path, [shape], _layer("ReLU6", ""), [x]), expected)


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((2, 3, 4, 5), "INFERENCE"), ((1, 4, 3, 3), "INFERENCE"), ((2, 3, 4, 5), "LEARN"), ((3, 2, 2, 3), None)],
)
def test_segnet_bn(shape, mode, tmp_path) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(0.7, 2.0, shape)
    channels = shape[1]
    scale = rng.normal(1, 0.3, (1, channels, 1, 1)).astype(np.float32).astype(np.float64)  # as stored
    shift = rng.normal(0, 0.3, (1, channels, 1, 1)).astype(np.float32).astype(np.float64)
    expected = np.zeros(shape)
    for c in range(channels):
        plane = x[:, c]
        if mode != "INFERENCE":
            plane = (plane - plane.mean()) / math.sqrt(plane.var() + 1e-9)
        expected[:, c] = scale[0, c, 0, 0] * plane + shift[0, c, 0, 0]
    params = f"bn_param {{ bn_mode: {mode} }}" if mode else 'bn_param { scale_filler { type: "constant" value: 1 } }'
    got = _one(tmp_path, [shape], _layer("BN", params), [x], {"f": [scale, shift]})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def _depthwise_expected(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int, dilation: int
) -> np.ndarray:
    n, c, h, wd = x.shape
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    out = np.zeros((n, c, oh, ow))
    for ch in range(c):
        for i in range(oh):
            for j in range(ow):
                for a in range(k):
                    for q in range(k):
                        out[:, ch, i, j] += (
                            xp[:, ch, i * stride + a * dilation, j * stride + q * dilation] * w[ch, 0, a, q]
                        )
        out[:, ch] += b[ch]
    return out


DEPTHWISE = [("DepthwiseConvolution", 3, 1, 1, 1), ("ConvolutionDepthwise", 3, 2, 1, 1)]
DEPTHWISE += [("DepthwiseConvolution", 3, 1, 2, 2), ("ConvolutionDepthwise", 5, 2, 2, 1)]


@pytest.mark.parametrize(("type_", "k", "stride", "pad", "dilation"), DEPTHWISE)
def test_depthwise_convolution(type_, k, stride, pad, dilation, tmp_path) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 9, 8))
    w, b = rng.normal(0, 0.5, (4, 1, k, k)), rng.normal(0, 0.1, 4)
    geometry = f"kernel_size: {k} stride: {stride} pad: {pad} dilation: {dilation}"
    params = f"convolution_param {{ num_output: 4 group: 4 {geometry} }}"
    got = _one(tmp_path, [x.shape], _layer(type_, params), [x], {"f": [w, b]})
    expected = _depthwise_expected(x, w.astype(np.float32), b.astype(np.float32), stride, pad, dilation)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


# --- (d) unknown types and plug-ins -----------------------------------------------------------------


@pytest.fixture
def clean_registry(monkeypatch) -> None:
    monkeypatch.setattr(reference, "_registered", {})
    monkeypatch.setattr(reference, "_entry_points", {})


def test_unknown_type_is_one_line_naming_type_and_layer(tmp_path, clean_registry) -> None:
    model, weights = _fork_net(tmp_path, [(1, 2)], _layer("Foo", ""))
    with pytest.raises(VerifyError) as caught:
        run_reference(model, weights, {"in0": np.ones((1, 2))}, [("f", "out")])
    message = str(caught.value)
    assert "\n" not in message
    assert "no layer type 'Foo' (layer 'f')" in message and "--layer-plugin FILE.py" in message


def test_plugin_file_makes_the_net_run(tmp_path, clean_registry) -> None:
    model, weights = _fork_net(tmp_path, [(1, 2)], _layer("Foo", ""))
    plugin = tmp_path / "foo_layer.py"
    plugin.write_text(
        "def forward(layer, inputs, blobs):\n    return [inputs[0] * 3 + 1]\n\nLAYERS = {'Foo': forward}\n"
    )
    assert load_plugin(plugin) == ["Foo"]
    got = run_reference(model, weights, {"in0": np.array([[1.0, -2.0]])}, [("f", "out")])[0]
    np.testing.assert_array_equal(got, [[4.0, -5.0]])


def test_plugin_file_without_layers_is_refused(tmp_path, clean_registry) -> None:
    plugin = tmp_path / "empty.py"
    plugin.write_text("x = 1\n")
    with pytest.raises(VerifyError, match="LAYERS"):
        load_plugin(plugin)


def test_register_layer_replaces_a_builtin(tmp_path, clean_registry) -> None:
    model, weights = _fork_net(tmp_path, [(1, 2)], _layer("ReLU", ""))
    register_layer("ReLU", lambda layer, inputs, blobs: [inputs[0] * 0 + 7])
    got = run_reference(model, weights, {"in0": np.array([[1.0, -2.0]])}, [("f", "out")])[0]
    np.testing.assert_array_equal(got, [[7.0, 7.0]])


def test_entry_point_group_supplies_a_type(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reference, "_registered", {})
    monkeypatch.setattr(reference, "_entry_points", None)
    point = importlib.metadata.EntryPoint(
        "Clip6", "caffe_bn_merge.verification.ref_layers:relu6", reference.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [point] if group == point.group else [])
    model, weights = _fork_net(tmp_path, [(1, 3)], _layer("Clip6", ""))
    got = run_reference(model, weights, {"in0": np.array([[-1.0, 3.0, 9.0]])}, [("f", "out")])[0]
    np.testing.assert_array_equal(got, [[0.0, 3.0, 6.0]])


def test_only_the_layers_the_outputs_need_run(tmp_path, clean_registry) -> None:
    text = _layer("ReLU", "") + '\nlayer { name: "g" type: "Foo" bottom: "out" top: "never" }'
    model, weights = _fork_net(tmp_path, [(1, 2)], text)
    got = run_reference(model, weights, {"in0": np.array([[1.0, -2.0]])}, [("f", "out")])[0]
    np.testing.assert_array_equal(got, [[1.0, 0.0]])


def test_in_place_blob_is_the_version_its_layer_wrote(tmp_path) -> None:
    text = (
        'layer { name: "f" type: "ReLU" bottom: "in0" top: "out" }\n'
        'layer { name: "g" type: "Power" bottom: "out" top: "out" power_param { scale: 2 } }\n'
    )
    model, weights = _fork_net(tmp_path, [(1, 2)], text)
    first, second = run_reference(model, weights, {"in0": np.array([[1.0, -2.0]])}, [("f", "out"), ("g", "out")])
    np.testing.assert_array_equal(first, [[1.0, 0.0]])
    np.testing.assert_array_equal(second, [[2.0, 0.0]])


def _stats(channels: int, seed: int = 8) -> tuple[np.ndarray, ...]:
    """mean, variance, gamma, beta as float32 values (what a caffemodel stores)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 0.5, channels), rng.lognormal(0, 0.8, channels), rng.normal(1, 0.3, channels)
    return tuple(v.astype(np.float32).astype(np.float64) for v in (*values, rng.normal(0, 0.3, channels)))


FLAVOURS = {
    # name: (layer type, params, blobs from (mean, var, gamma, beta), eps the formula uses, affine applied)
    "nvcaffe 5 blobs": (
        "BatchNorm",
        "batch_norm_param { scale_bias: true eps: 1e-6 }",
        lambda m, v, g, b: [m, v, np.ones(1), g, b],
        1e-5,
        True,
    ),
    "nvcaffe 3 blobs": (
        "BatchNorm",
        "batch_norm_param { scale_bias: false eps: 0.001 }",
        lambda m, v, g, b: [m, v, np.full(1, 2.0)],
        1e-3,
        False,
    ),
    "nvcaffe 0.15": (
        "BatchNorm",
        "batch_norm_param { eps: 0.0001 }",
        lambda m, v, g, b: [g, b, m, v, np.zeros(1)],
        1e-4,
        True,
    ),
    "pspnet BN": (
        "BN",
        "bn_param { eps: 0.0002 }",
        lambda m, v, g, b: [x.reshape(1, -1, 1, 1) for x in (g, b, m, v)],
        2e-4,
        True,
    ),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_batchnorm_flavours(flavour: str, tmp_path) -> None:
    type_, params, make, eps, affine = FLAVOURS[flavour]
    mean, var, gamma, beta = _stats(5)
    x = np.random.default_rng(9).standard_normal((2, 5, 3, 4))
    expected = np.zeros_like(x)
    for c in range(5):
        expected[:, c] = (x[:, c] - mean[c]) / math.sqrt(var[c] + eps)
        if affine:
            expected[:, c] = expected[:, c] * gamma[c] + beta[c]
    got = _one(tmp_path, [x.shape], _layer(type_, params), [x], {"f": make(mean, var, gamma, beta)})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_run_reference_errors_are_one_line(tmp_path) -> None:
    model, weights = _fork_net(tmp_path, [(1, 2)], _layer("ReLU", ""))
    for outputs, given, words in [
        ([("nope", "out")], {"in0": np.ones((1, 2))}, "no layer 'nope'"),
        ([("f", "nope")], {"in0": np.ones((1, 2))}, "does not write 'nope'"),
        ([("f", "out")], {}, "no value given for the net input 'in0'"),
    ]:
        with pytest.raises(VerifyError, match=words) as caught:
            run_reference(model, weights, given, outputs)
        assert "\n" not in str(caught.value)
