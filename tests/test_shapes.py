"""Shape inference (`shapes.infer_shapes`) checked against OpenCV dnn, and weights generated for nets
that come without a caffemodel (`synth.weights_for` / `save_weights_for`).

OpenCV's shapes come from `Net.getLayersShapes` (no forward pass). Layers not compared there:
Input (OpenCV folds every net input into one `_input` layer) and DetectionOutput without keep_top_k
(Caffe's row count is data-dependent); the Caffe rules OpenCV does not share (`round_mode`, the legacy
`concat_dim`, Pooling's last-window rule with padding on one axis only) are checked by hand.
"""

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT
from google.protobuf import text_format
from harness import REAL_NETS as REAL

from caffe_bn_merge import InputError, merge, verify
from caffe_bn_merge.graph import build_graph, input_shapes
from caffe_bn_merge.io import proto
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.shapes import infer_shapes, num_priors
from caffe_bn_merge.synthetic.synth import NetBuilder, save_weights_for, weights_for

Shape = tuple[int, ...]
SAMPLES = {path.stem: path for path in sorted((ROOT / "sample_nets").glob("*.prototxt"))}
PROTOTXT_ONLY = "prototxt_only"
RESNET_50 = f"{PROTOTXT_ONLY}/kaiminghe_ResNet-50-deploy.prototxt"
DENSENET_121 = f"{PROTOTXT_ONLY}/shicai_DenseNet_121.prototxt"
MOBILENET_SSD = f"{PROTOTXT_ONLY}/chuanqi305_MobileNetSSD_deploy_bn.prototxt"


# --- helpers ---------------------------------------------------------------------------------------


def load_opencv(prototxt: Path, caffemodel: Path) -> cv2.dnn.Net:
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.enableFusion(False)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    return net


def opencv_shapes(net: cv2.dnn.Net, inputs: list[Shape]) -> dict[str, list[Shape]]:
    """Output shapes of every OpenCV layer, by OpenCV's layer name."""
    ids, _, outs = net.getLayersShapes(inputs)
    return {
        net.getLayer(int(np.ravel(layer_id)[0])).name: [tuple(int(d) for d in np.ravel(shape)) for shape in shapes]
        for layer_id, shapes in zip(ids, outs, strict=True)
    }


def assert_shapes_match_opencv(prototxt: Path, caffemodel: Path, cv_net: cv2.dnn.Net | None = None) -> int:
    """Every compared layer's tops have OpenCV's shapes; returns how many layers were compared.
    OpenCV renames a Convolution layer after its top, so a layer is looked up under both names, and
    gives MAX Pooling a second output (the argmax mask) even with one top: extra outputs are ignored."""
    net = caffe_io.read_net(prototxt)
    ours = infer_shapes(net)
    cv_net = cv_net or load_opencv(prototxt, caffemodel)
    theirs = opencv_shapes(cv_net, [tuple(shape) for shape in input_shapes(net).values()])
    compared, wrong = 0, []
    for node in build_graph(net).layers:
        if not _opencv_comparable(node.param):
            continue
        got = theirs.get(node.name, theirs.get(node.param.top[0]))
        assert got is not None, f"OpenCV has no layer '{node.name}' ({node.type})"
        want = [ours[version.name] for version in node.tops]
        if got[: len(want)] != want:
            wrong.append(f"{node.name} ({node.type}): ours {want}, OpenCV {got}")
        compared += 1
    assert not wrong, "\n".join(wrong)
    return compared


def _opencv_comparable(layer: object) -> bool:
    if layer.type == "Input":
        return False
    return layer.type != "DetectionOutput" or layer.detection_output_param.keep_top_k > 0


def forward(cv_net: cv2.dnn.Net, prototxt: Path, blobs: list[str]) -> list[np.ndarray]:
    """One OpenCV forward on seeded standard-normal inputs of the declared shapes."""
    rng = np.random.default_rng(0)
    for name, shape in input_shapes(caffe_io.read_net(prototxt)).items():
        cv_net.setInput(rng.standard_normal(shape).astype(np.float32), name)
    return list(cv_net.forward(blobs))


def net_text(layers: str, shape: Shape = (1, 4, 11, 13)) -> str:
    """A deploy prototxt: input blob `data` of `shape`, then `layers`."""
    dims = "".join(f" dim: {d}" for d in shape)
    return (
        f'name: "t"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{{dims} }} }} }}\n{layers}'
    )


def layer(
    type_: str, name: str, bottoms: str | list[str] = "data", params: str = "", top: str | list[str] | None = None
) -> str:
    """One layer in text format; `params` is the body of its parameter message(s)."""
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [top or name] if not isinstance(top, list) else top
    links = "".join(f' bottom: "{b}"' for b in bottoms) + "".join(f' top: "{t}"' for t in tops)
    return f'layer {{ name: "{name}" type: "{type_}"{links} {params} }}\n'


def parse(text: str) -> object:
    return text_format.Parse(text, proto.NetParameter())


def shapes_of(text: str) -> dict[str, Shape]:
    return infer_shapes(parse(text))


# --- (a) infer_shapes agrees with OpenCV ----------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_net_shapes_match_opencv(name: str) -> None:
    prototxt = SAMPLES[name]
    assert assert_shapes_match_opencv(prototxt, prototxt.with_suffix(".caffemodel")) > 0


@pytest.mark.parametrize("name", REAL)
def test_real_net_shapes_match_opencv(name: str, real_nets: Path) -> None:
    prototxt, caffemodel = REAL[name][:2]
    assert assert_shapes_match_opencv(real_nets / prototxt, real_nets / caffemodel) > 0


def test_every_real_caffemodel_is_covered(real_nets: Path) -> None:
    stored = {path.relative_to(real_nets).as_posix() for path in real_nets.glob("*/*.caffemodel")}
    assert stored == {entry[1] for entry in REAL.values()}


CONV = "convolution_param { num_output: 6 %s }"
POOL = "pooling_param { pool: %s }"
# Layer snippets on a 1x4x11x13 input (odd sizes, so that rounding shows); weights from weights_for.
CASES = {
    "conv kernel_h/w stride_h/w pad_h/w": layer("Convolution", "c", params=CONV % "kernel_h: 3 kernel_w: 5 "
                                                "stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0"),
    "conv per-axis repeated": layer("Convolution", "c", params=CONV % "kernel_size: 3 kernel_size: 1 stride: 2 "
                                    "stride: 3 pad: 0 pad: 1 dilation: 2 dilation: 1"),
    "conv group dilation no bias": layer("Convolution", "c", params=CONV % "kernel_size: 3 group: 2 dilation: 3 "
                                         "pad: 1 stride: 2 bias_term: false"),
    "depthwise conv": layer("Convolution", "c", params="convolution_param { num_output: 4 group: 4 kernel_size: 3 }"),
    "deconv": layer("Deconvolution", "d", params=CONV % "kernel_size: 4 stride: 2 pad: 1"),
    "deconv group kernel_h/w": layer("Deconvolution", "d", params=CONV % "kernel_h: 3 kernel_w: 2 stride: 3 "
                                     "group: 2"),
    "pool ceil (default)": layer("Pooling", "p", params=POOL % "MAX kernel_size: 3 stride: 2"),
    "pool ceil, last window clipped": layer("Pooling", "p", params=POOL % "MAX kernel_size: 3 stride: 4 pad: 2"),
    "pool ceil with pad": layer("Pooling", "p", params=POOL % "AVE kernel_size: 2 stride: 2 pad: 1"),
    "pool ceil_mode false": layer("Pooling", "p", params=POOL % "MAX kernel_size: 3 stride: 2 pad: 1 "
                                  "ceil_mode: false"),
    "pool kernel_h/w stride_h/w": layer("Pooling", "p", params=POOL % "MAX kernel_h: 2 kernel_w: 3 stride_h: 3 "
                                        "stride_w: 2"),
    "pool global": layer("Pooling", "p", params=POOL % "AVE global_pooling: true"),
    "innerproduct": layer("InnerProduct", "fc", params="inner_product_param { num_output: 7 }"),
    "innerproduct axis 2": layer("InnerProduct", "fc", params="inner_product_param { num_output: 7 axis: 2 }"),
    "innerproduct transpose": layer("InnerProduct", "fc", params="inner_product_param { num_output: 7 "
                                    "transpose: true }"),
    "concat": layer("Convolution", "c", params=CONV % "kernel_size: 1")
    + layer("Concat", "cat", ["data", "c", "data"]),
    "concat axis 2": layer("Concat", "cat", ["data", "data"], "concat_param { axis: 2 }"),
    "eltwise": layer("ReLU", "r", top="r") + layer("Eltwise", "e", ["data", "r"], "eltwise_param { operation: MAX }"),
    "slice points": layer("Slice", "s", params="slice_param { axis: 1 slice_point: 1 slice_point: 3 }",
                          top=["s1", "s2", "s3"]),
    "split": layer("Split", "sp", top=["a", "b"]) + layer("Eltwise", "e", ["a", "b"]),
    "flatten": layer("Flatten", "f"),
    "flatten axis 2": layer("Flatten", "f", params="flatten_param { axis: 2 }"),
    "flatten end_axis": layer("Flatten", "f", params="flatten_param { axis: 1 end_axis: 2 }"),
    "reshape 0 and -1": layer("Reshape", "r", params="reshape_param { shape { dim: 0 dim: -1 dim: 13 } }"),
    "reshape axis num_axes": layer("Reshape", "r", params="reshape_param { shape { dim: 2 dim: 2 } axis: 1 "
                                   "num_axes: 1 }"),
    "permute": layer("Permute", "p", params="permute_param { order: 0 order: 2 order: 3 order: 1 }"),
    "softmax": layer("Softmax", "s", params="softmax_param { axis: 2 }"),
    "elementwise in place": "".join(
        layer(t, f"l{i}", top="data") for i, t in enumerate(["ReLU", "Sigmoid", "TanH", "Dropout", "Power", "AbsVal"])
    ),
    "batchnorm scale bias": layer("BatchNorm", "bn", top="data") + layer("Scale", "sc", top="data",
                                                                        params="scale_param { bias_term: true }"),
    "lrn": layer("LRN", "n", params="lrn_param { local_size: 3 }"),
    "prelu": layer("PReLU", "pr"),
    "normalize": layer("Normalize", "n", params="norm_param { across_spatial: false channel_shared: false }"),
    "crop": layer("Pooling", "p", params=POOL % "MAX kernel_size: 2 stride: 2")
    + layer("Crop", "cr", ["data", "p"], "crop_param { axis: 2 offset: 1 }"),
    "priorbox max_size flip": layer("PriorBox", "pb", ["data", "data"], "prior_box_param { min_size: 4 "
                                    "max_size: 8 aspect_ratio: 2 aspect_ratio: 3 flip: true variance: 0.1 }"),
    "priorbox two sizes no flip": layer("PriorBox", "pb", ["data", "data"], "prior_box_param { min_size: 3 "
                                        "min_size: 5 max_size: 6 max_size: 9 aspect_ratio: 2 flip: false "
                                        "variance: 0.1 }"),
    "priorbox repeated ratios": layer("PriorBox", "pb", ["data", "data"], "prior_box_param { min_size: 4 "
                                      "aspect_ratio: 1 aspect_ratio: 2 aspect_ratio: 0.5 aspect_ratio: 2 "
                                      "variance: 0.1 }"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_layer_rule_matches_opencv(case: str, tmp_path: Path) -> None:
    prototxt, caffemodel = tmp_path / "t.prototxt", tmp_path / "t.caffemodel"
    prototxt.write_text(net_text(CASES[case]))
    save_weights_for(prototxt, caffemodel)
    assert assert_shapes_match_opencv(prototxt, caffemodel) == len(caffe_io.read_net(prototxt).layer) - 1


# --- rules OpenCV does not share, by hand ---------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("kernel_size: 3 stride: 2", (5, 6)),  # ceil((11-3)/2)+1, ceil((13-3)/2)+1
        ("kernel_size: 2 stride: 2", (6, 7)),  # ceil rounds 4.5 and 5.5 up
        ("kernel_size: 2 stride: 2 round_mode: FLOOR", (5, 6)),
        ("kernel_size: 2 stride: 2 ceil_mode: false", (5, 6)),
        ("kernel_size: 2 stride: 2 round_mode: FLOOR ceil_mode: true", (5, 6)),
        # with padding, a last window starting at or past input + pad is dropped:
        ("kernel_size: 3 stride: 4 pad: 2", (4, 4)),  # height 4 (start 12 < 13); width 5 -> 4 (start 16 >= 15)
        ("kernel_size: 3 stride: 5 pad: 1", (3, 3)),  # height 3 (start 10 < 12); width 4 -> 3 (start 15 >= 14)
        # Caffe checks both axes when either is padded (OpenCV only padded ones): width 4 -> 3 (15 >= 13 + 0)
        ("kernel_h: 2 kernel_w: 1 stride: 5 pad_h: 1 pad_w: 0", (3, 3)),
        ("kernel_h: 2 kernel_w: 1 stride: 5", (3, 4)),  # no padding, no check: the last window starts at 15
        ("kernel_h: 11 kernel_w: 13", (1, 1)),
        ("global_pooling: true", (1, 1)),
    ],
)
def test_pooling_rounding(params: str, expected: tuple[int, int]) -> None:
    shapes = shapes_of(net_text(layer("Pooling", "p", params=f"pooling_param {{ {params} }}")))
    assert shapes["p"] == (1, 4, *expected)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("min_size: 60", 1),
        ("min_size: 60 max_size: 105", 2),
        ("min_size: 60 max_size: 105 aspect_ratio: 2", 4),
        ("min_size: 60 max_size: 105 aspect_ratio: 2 aspect_ratio: 3", 6),  # MobileNet-SSD's heads
        ("min_size: 60 aspect_ratio: 2 aspect_ratio: 3 flip: false", 3),
        ("min_size: 60 aspect_ratio: 1 aspect_ratio: 2 aspect_ratio: 0.5 aspect_ratio: 2", 3),  # repeats skipped
        ("min_size: 30 min_size: 60 max_size: 60 max_size: 90 aspect_ratio: 2", 8),
    ],
)
def test_prior_box_counts_as_the_ssd_fork(params: str, expected: int) -> None:
    assert num_priors(text_format.Parse(f"prior_box_param {{ {params} }}", proto.LayerParameter()).prior_box_param) == (
        expected
    )
    shapes = shapes_of(net_text(layer("PriorBox", "pb", ["data", "data"], f"prior_box_param {{ {params} }}")))
    assert shapes["pb"] == (1, 2, 11 * 13 * expected * 4)


@pytest.mark.parametrize(
    ("layers", "blob", "expected"),
    [
        (layer("Concat", "cat", ["data", "data"], "concat_param { concat_dim: 3 }"), "cat", (1, 4, 11, 26)),
        (layer("DetectionOutput", "det", ["data"], "detection_output_param { keep_top_k: 50 }"), "det", (1, 1, 50, 7)),
        (layer("DetectionOutput", "det", ["data"], "detection_output_param { num_classes: 2 }"), "det", (1, 1, -1, 7)),
        (layer("ArgMax", "am", params="argmax_param { top_k: 2 out_max_val: true }"), "am", (1, 2, 2, 1)),
        (layer("ArgMax", "am", params="argmax_param { axis: 1 }"), "am", (1, 1, 11, 13)),
        (layer("Slice", "s", top=["s1", "s2"]), "s2", (1, 2, 11, 13)),
        (
            layer("Slice", "s", params="slice_param { slice_dim: 3 slice_point: 4 }", top=["s1", "s2"]),
            "s2",
            (1, 4, 11, 9),
        ),
        (layer("PReLU", "p", params="prelu_param { channel_shared: true }"), "p", (1, 4, 11, 13)),
        (layer("Tile", "t", params="tile_param { axis: -1 tiles: 3 }"), "t", (1, 4, 11, 39)),
        (layer("Reduction", "r", params="reduction_param { axis: 2 }"), "r", (1, 4)),
        (layer("Reduction", "r"), "r", ()),
        (layer("Reshape", "r", params="reshape_param { shape { dim: -1 } axis: -2 }"), "r", (1, 4, 11, 13)),
        (layer("Reshape", "r", params="reshape_param { shape { dim: -1 } axis: 1 num_axes: 2 }"), "r", (1, 44, 13)),
        (layer("Convolution", "c", params=CONV % "kernel_size: 3 axis: 2"), "c", (1, 4, 6, 11)),
        (layer("Split", "s", top=["a", "b", "c"]) + layer("Silence", "x", ["a", "b"], top=[]), "c", (1, 4, 11, 13)),
    ],
)
def test_rules_by_hand(layers: str, blob: str, expected: Shape) -> None:
    assert shapes_of(net_text(layers))[blob] == expected


def test_legacy_input_dim_and_train_only_layers() -> None:
    text = (
        'input: "data" input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8\n'
        + layer("Convolution", "c", params=CONV % "kernel_size: 3")
        + layer("Weird", "train_only", "c", "include { phase: TRAIN }")
        + layer("InnerProduct", "fc", "c", "inner_product_param { num_output: 5 }")
    )
    assert shapes_of(text) == {"data": (2, 3, 8, 8), "c": (2, 6, 6, 6), "fc": (2, 5)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (net_text(layer("Upsample", "up")), "layer 'up' has type 'Upsample'"),
        (layer("ReLU", "r"), "reads blob 'data' before any layer produces it"),
        ('input: "data"\n' + layer("ReLU", "r"), "net input 'data' has no shape"),
        (net_text(layer("Convolution", "big", params=CONV % "kernel_size: 13")), "layer 'big' (Convolution)"),
        (net_text(layer("Convolution", "g", params=CONV % "kernel_size: 1 group: 3")), "do not fit group 3"),
        (net_text(layer("Pooling", "p", params="pooling_param { pool: MAX }")), "kernel_size"),
        (
            net_text(
                layer("Pooling", "p", params=POOL % "MAX global_pooling: true") + layer("Eltwise", "e", ["data", "p"])
            ),
            "layer 'e' (Eltwise): bottoms of different shapes",
        ),
        (net_text(layer("Flatten", "f") + layer("Concat", "c", ["data", "f"])), "differ outside the concat axis 1"),
        (net_text(layer("Reshape", "r", params="reshape_param { shape { dim: 5 dim: -1 } }")), "cannot infer"),
        (net_text(layer("Permute", "p", params="permute_param { order: 0 order: 0 }")), "not a permutation"),
        (net_text(layer("Flatten", "f", params="flatten_param { axis: 4 }")), "axis 4 is out of range"),
        (net_text(layer("Slice", "s", params="slice_param { slice_point: 2 }", top=["a", "b", "c"])), "slice points"),
        (layer("Data", "d", [], top="data"), "is a Data layer"),
    ],
)
def test_bad_nets_raise_input_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shapes_of(text)


# --- weights_for -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_generated_blobs_have_the_sample_nets_layout(name: str) -> None:
    """The blobs NetBuilder wrote for a sample net and those weights_for makes for its prototxt have
    the same layers and shapes."""
    _assert_layout_of(SAMPLES[name], SAMPLES[name].with_suffix(".caffemodel"))


@pytest.mark.parametrize("name", REAL)
def test_generated_blobs_have_the_trained_models_layout(name: str, real_nets: Path) -> None:
    prototxt, caffemodel = REAL[name][:2]
    _assert_layout_of(real_nets / prototxt, real_nets / caffemodel)


def _assert_layout_of(prototxt: Path, caffemodel: Path) -> None:
    ours = weights_for(caffe_io.read_net(prototxt))
    stored = {name: w for name, w in caffe_io.read_weights(caffemodel).layers.items() if w.blobs}
    assert list(ours) == [name for name in stored if name in ours]
    assert set(ours) == set(stored)
    for name, blobs in ours.items():
        assert [b.shape for b in blobs] == [b.shape for b in stored[name].blobs], name
        assert all(b.dtype == np.float32 for b in blobs)


def test_weights_per_layer_kind() -> None:
    text = net_text(
        layer("Convolution", "conv", params=CONV % "kernel_size: 3 group: 2 bias_term: false")
        + layer("Deconvolution", "deconv", "conv", "convolution_param { num_output: 4 kernel_size: 2 stride: 2 "
                "group: 2 }")
        + layer("BatchNorm", "bn", "deconv", top="deconv")
        + layer("Scale", "scale", "deconv", "scale_param { bias_term: true }", top="deconv")
        + layer("Scale", "scale_hw", "deconv", "scale_param { axis: 2 num_axes: -1 }", top="deconv")
        + layer("Bias", "bias", "deconv", top="deconv")
        + layer("PReLU", "prelu", "deconv")
        + layer("PReLU", "prelu_shared", "prelu", "prelu_param { channel_shared: true }")
        + layer("Scale", "scale2", ["prelu_shared", "prelu"], "scale_param { axis: 0 bias_term: true }")
        + layer("Scale", "scale2_nobias", ["prelu_shared", "prelu"], "scale_param { axis: 0 }")
        + layer("InnerProduct", "ip", "scale2", "inner_product_param { num_output: 3 transpose: true }")
        + layer("InnerProduct", "ip2", "ip", "inner_product_param { num_output: 2 }")
        + layer("BatchNorm", "nv_bn", "ip2", "batch_norm_param { scale_bias: true }")
    )  # fmt: skip
    weights = weights_for(parse(text))
    shapes = {name: [b.shape for b in blobs] for name, blobs in weights.items()}
    assert shapes == {
        "conv": [(6, 2, 3, 3)],
        "deconv": [(6, 2, 2, 2), (4,)],  # (C_in, C_out / group, kh, kw)
        "bn": [(4,), (4,), (1,)],
        "scale": [(4,), (4,)],
        "scale_hw": [(18, 22)],
        "bias": [(4,)],
        "prelu": [(4,)],
        "prelu_shared": [()],  # Caffe's shared slope is a 0-d blob
        "scale2": [(1, 4, 18, 22)],  # gamma is the second bottom: only the bias blob is learned
        "ip": [(4 * 18 * 22, 3), (3,)],  # transpose: (K, N)
        "ip2": [(2, 3), (2,)],
        "nv_bn": [(2,), (2,), (1,), (2,), (2,)],
    }
    assert weights["bn"][2][0] == np.float32(999.982)
    mean, var = weights["bn"][0] / weights["bn"][2][0], weights["bn"][1] / weights["bn"][2][0]
    assert np.all(var > 0) and np.all(np.abs(mean) < 3)
    assert 0.1 < float(np.mean(weights["prelu"][0])) < 0.4


def test_weights_are_realistic_and_seeded() -> None:
    net = caffe_io.read_net(SAMPLES["resnet_mini"])
    first, again, other = weights_for(net), weights_for(net, seed=0), weights_for(net, seed=1)
    assert all(np.array_equal(a, b) for name in first for a, b in zip(first[name], again[name], strict=True))
    assert not np.array_equal(first["conv1"][0], other["conv1"][0])
    conv = first["res3b"][0]  # 32 outputs, 32 inputs, 3x3: He std sqrt(2 / 288)
    assert conv.std() == pytest.approx(math.sqrt(2 / 288), rel=0.1)
    gamma, beta = first["res3b/scale"]
    assert gamma.mean() == pytest.approx(1.0, abs=0.2) and abs(beta.mean()) < 0.2


def test_shared_params_get_one_blob() -> None:
    shared = 'param { name: "w" } param { name: "b" }'
    text = net_text(
        layer("Convolution", "a", params=f"{shared} " + CONV % "kernel_size: 1")
        + layer("Convolution", "b", params=f"{shared} " + CONV % "kernel_size: 1")
    )
    weights = weights_for(parse(text))
    assert weights["a"][0] is weights["b"][0] and weights["a"][1] is weights["b"][1]


def test_net_builder_statistics_are_unchanged() -> None:
    """NetBuilder and weights_for share the statistics helpers; NetBuilder's stream stays as it was."""
    b = NetBuilder("t", (1, 2, 4, 4), seed=5)
    b.scale(b.bn(b.conv("data", 3, name="c"), name="bn"), name="s")
    rng = np.random.default_rng(5)
    expected_w, expected_b = rng.normal(0, math.sqrt(2 / 18), (3, 2, 3, 3)), rng.normal(0, 0.1, 3)
    mean, var = rng.normal(0.0, 0.5, 3), rng.lognormal(0.0, 0.6, 3)
    gamma, beta = rng.normal(1.0, 0.3, (3,)), rng.normal(0.0, 0.3, (3,))
    assert np.array_equal(b.blobs["c"][0], expected_w) and np.array_equal(b.blobs["c"][1], expected_b)
    assert np.array_equal(b.blobs["bn"][0], mean * 999.982) and np.array_equal(b.blobs["bn"][1], var * 999.982)
    assert np.array_equal(b.blobs["s"][0], gamma) and np.array_equal(b.blobs["s"][1], beta)


# --- (b) nets that come without weights -------------------------------------------------------------


def _assert_live(values: np.ndarray, name: str) -> None:
    assert np.all(np.isfinite(values)), f"{name}: non-finite values"
    assert float(np.std(values)) > 0, f"{name}: constant output"


def test_resnet50_gets_weights_that_opencv_runs_and_we_merge(real_nets: Path, tmp_path: Path) -> None:
    prototxt, caffemodel = real_nets / RESNET_50, tmp_path / "resnet50.caffemodel"
    save_weights_for(prototxt, caffemodel)
    assert caffemodel.stat().st_size > 90_000_000
    cv_net = load_opencv(prototxt, caffemodel)
    assert assert_shapes_match_opencv(prototxt, caffemodel, cv_net) > 200  # CEIL pooling: pool1 is 56x56
    assert infer_shapes(caffe_io.read_net(prototxt))["pool1"] == (1, 64, 56, 56)
    logits, prob = forward(cv_net, prototxt, ["fc1000", "prob"])  # the only forward
    _assert_live(logits, "fc1000")
    _assert_live(prob, "prob")
    result = merge(prototxt, caffemodel, tmp_path / "merged.prototxt", tmp_path / "merged.caffemodel")
    assert (result.layers_before["BatchNorm"], result.layers_before["Scale"]) == (53, 53)
    assert result.layers_after["BatchNorm"] == result.layers_after["Scale"] == 0
    assert result.output_weights.stat().st_size > 90_000_000


def test_densenet121_gets_weights_that_opencv_runs_and_we_merge(real_nets: Path, tmp_path: Path) -> None:
    prototxt, caffemodel = real_nets / DENSENET_121, tmp_path / "densenet.caffemodel"
    save_weights_for(prototxt, caffemodel)
    cv_net = load_opencv(prototxt, caffemodel)
    assert assert_shapes_match_opencv(prototxt, caffemodel, cv_net) > 500  # ceil_mode: false on pool1
    assert infer_shapes(caffe_io.read_net(prototxt))["pool1"] == (1, 64, 56, 56)
    _assert_live(forward(cv_net, prototxt, ["fc6"])[0], "fc6")
    merged = (tmp_path / "merged.prototxt", tmp_path / "merged.caffemodel")
    result = merge(prototxt, caffemodel, *merged)
    assert result.layers_after["BatchNorm"] < result.layers_before["BatchNorm"] == 121
    checked = verify((prototxt, caffemodel), merged, backend="opencv", tolerance=1e-5)
    assert checked.passed and checked.errors, checked
    assert all(error.scale > 1 for error in checked.errors)


def test_mobilenet_ssd_gets_weights_that_opencv_runs(real_nets: Path, tmp_path: Path) -> None:
    prototxt, caffemodel = real_nets / MOBILENET_SSD, tmp_path / "ssd.caffemodel"
    save_weights_for(prototxt, caffemodel)
    cv_net = load_opencv(prototxt, caffemodel)
    assert assert_shapes_match_opencv(prototxt, caffemodel, cv_net) > 150
    for name, values in zip(
        ("mbox_loc", "mbox_conf"), forward(cv_net, prototxt, ["mbox_loc", "mbox_conf"]), strict=True
    ):
        _assert_live(values, name)


@pytest.mark.parametrize(
    ("name", "blobs"),
    [
        ("kaiminghe_ResNet-101-deploy", {"pool1": (1, 64, 56, 56), "pool5": (1, 2048, 1, 1), "prob": (1, 1000)}),
        ("kaiminghe_ResNet-152-deploy", {"res5c": (1, 2048, 7, 7), "fc1000": (1, 1000)}),
        (
            "chuanqi305_MobileNetSSD_deploy_merged_nobn",
            {"mbox_priorbox": (1, 2, 7668), "detection_out": (1, 1, 100, 7)},
        ),
    ],
)
def test_big_nets_without_weights_have_shapes(name: str, blobs: dict[str, Shape], real_nets: Path) -> None:
    shapes = infer_shapes(caffe_io.read_net(real_nets / PROTOTXT_ONLY / f"{name}.prototxt"))
    assert {blob: shapes[blob] for blob in blobs} == blobs
