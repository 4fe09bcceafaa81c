"""Each forward-fold pattern and each refusal on a net built for it, checked on OpenCV dnn (fusion
off). Refusals are checked with the forward rule alone; what the other rules make of the layers
left is tested in test_rules.py.

Every positive case has a must-not-fold twin; both check numbers, and both check layer counts."""

import pytest
from harness import CLASSIC, merge_and_check

from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.synthetic.synth import NetBuilder


def net(shape: tuple[int, ...] = (1, 4, 12, 12), seed: int = 3) -> NetBuilder:
    return NetBuilder("t", shape, seed)


# OpenCV 4.x has no Bias layer and rejects scalar or negative-axis Scale: checked in float64 instead.
REFERENCE_ONLY = {
    "conv+bias layer",
    "conv+bn+scale+scale+bias",
    "scalar scale (num_axes 0)",
    "scale axis -1 after innerproduct",
}
FOLDS = {
    "conv+bn": (lambda b: b.bn(b.conv("data", 8)), 1),
    "conv(no bias)+bn+scale": (lambda b: b.scale(b.bn(b.conv("data", 8, bias=False))), 2),
    "conv+scale": (lambda b: b.scale(b.conv("data", 8)), 1),
    "conv+scale(no bias)": (lambda b: b.scale(b.conv("data", 8, bias=False), bias=False), 1),
    "conv+bias layer": (lambda b: b.bias(b.conv("data", 8, bias=False)), 1),
    "conv+bn+scale+scale+bias": (lambda b: b.bias(b.scale(b.scale(b.bn(b.conv("data", 8))))), 4),
    "depthwise conv": (lambda b: b.scale(b.bn(b.conv("data", 4, group=4, bias=False))), 2),
    "grouped conv": (lambda b: b.scale(b.bn(b.conv("data", 6, group=2))), 2),
    "dilated strided conv": (lambda b: b.scale(b.bn(b.conv("data", 6, stride=2, dilation=2))), 2),
    "deconv group 1": (lambda b: b.scale(b.bn(b.conv("data", 6, 4, 2, 1, deconv=True))), 2),
    "deconv group 2": (lambda b: b.scale(b.bn(b.conv("data", 6, 4, 2, 1, group=2, deconv=True))), 2),
    "deconv depthwise": (lambda b: b.scale(b.bn(b.conv("data", 4, 3, 2, 1, group=4, deconv=True, bias=False))), 2),
    "innerproduct+bn+scale": (lambda b: b.scale(b.bn(b.ip("data", 10))), 2),
    "innerproduct(no bias)+bn": (lambda b: b.bn(b.ip("data", 10, bias=False)), 1),
    "not in place": (lambda b: b.scale(b.bn(b.conv("data", 8), top="n"), top="s"), 2),
    "eps 1e-3": (lambda b: b.bn(b.conv("data", 8), eps=1e-3), 1),
    "factor 0 (mean = var = 0)": (lambda b: b.bn(b.conv("data", 8), factor=0.0, eps=1e-2), 1),
    "factor 1": (lambda b: b.bn(b.conv("data", 8), factor=1.0), 1),
    "scalar scale (num_axes 0)": (lambda b: b.scale(b.bn(b.conv("data", 8)), num_axes=0), 2),
    "scale axis -1 after innerproduct": (lambda b: b.scale(b.ip("data", 8), axis=-1), 1),
}


@pytest.mark.parametrize("case", FOLDS, ids=list(FOLDS))
def test_fold(case: str, tmp_path) -> None:
    build, removed = FOLDS[case]
    b = net()
    build(b)
    merged = merge_and_check(b, tmp_path, "reference" if case in REFERENCE_ONLY else "opencv")
    assert len(merged.removed) == removed
    assert merged.kept == {}
    assert merged.layer_count("BatchNorm")[1] == merged.layer_count("Scale")[1] == 0


def test_fold_gives_host_a_bias_and_keeps_output_name(tmp_path) -> None:
    b = net()
    b.scale(b.bn(b.conv("data", 8, bias=False, name="c"), top="n"), top="out")
    merged = merge_and_check(b, tmp_path)
    out = caffe_io.read_net(merged.merged[0])
    conv = next(layer for layer in out.layer if layer.name == "c")
    assert conv.convolution_param.bias_term and list(conv.top) == ["out"]
    assert len(caffe_io.read_weights(merged.merged[1]).layers["c"].blobs) == 2


def _reader_between(b: NetBuilder) -> None:
    x = b.conv("data", 8, name="c")
    b.unary("ReLU", x, top="r", name="r")  # reads the pre-BN value of "c"
    b.bn(x, name="bn")


def _two_readers(b: NetBuilder) -> None:
    x = b.conv("data", 8, name="c")
    b.bn(x, top="b1", name="bn")
    b.bn(x, top="b2", name="bn2")


def _relu_between(b: NetBuilder) -> None:
    b.bn(b.relu(b.conv("data", 8)), name="bn")


def _batch_stats(b: NetBuilder) -> None:
    b.scale(b.bn(b.conv("data", 8), name="bn", use_global_stats=False), name="sc")


def _scale_two_bottoms(b: NetBuilder) -> None:
    x = b.conv("data", 8, name="c")
    y = b.conv("data", 8, name="c2")
    layer = b.layer("Scale", "bn", [x, y], ["s"])
    layer.scale_param.axis = 0


def _net_input(b: NetBuilder) -> None:
    b.conv(b.scale(b.bn("data", top="n", name="bn"), top="s", name="sc"), 8, pad=0)


def _not_per_channel(b: NetBuilder) -> None:
    b.scale(b.conv("data", 8), axis=2, name="bn")


def _negative_axis_unknown_rank(b: NetBuilder) -> None:
    b.scale(b.conv("data", 8), axis=-3, name="bn")  # `kernel_size: 3` does not pin the blob's rank


REFUSALS = {
    "reader between conv and in-place bn": (_reader_between, {"bn": "shared_input"}),
    "conv output read by two bns": (_two_readers, {"bn": "shared_input", "bn2": "shared_input"}),
    "relu between": (_relu_between, {"bn": "nonlinear_between"}),
    "use_global_stats false": (_batch_stats, {"bn": "batch_stats", "sc": "behind_kept"}),
    "scale with two bottoms": (_scale_two_bottoms, {"bn": "two_bottoms"}),
    "bn on the net input": (_net_input, {"bn": "net_input", "sc": "behind_kept"}),
    "scale on axis 2": (_not_per_channel, {"bn": "not_per_channel"}),
    "scale axis -3, rank unknown": (_negative_axis_unknown_rank, {"bn": "not_per_channel"}),
}
REFUSAL_REFERENCE_ONLY = {"scale axis -3, rank unknown"}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusal(case: str, tmp_path) -> None:
    build, kept = REFUSALS[case]
    b = net()
    build(b)
    merged = merge_and_check(b, tmp_path, "reference" if case in REFUSAL_REFERENCE_ONLY else "opencv", CLASSIC)
    assert merged.removed == set()
    assert merged.kept == kept
    assert merged.result.layers_before == merged.result.layers_after


def _shared_pair(b: NetBuilder, fold_second: bool) -> None:
    b.bn(b.conv("data", 8, name="c1"), name="bn1")
    b.conv("data", 8, name="c2")
    if fold_second:
        b.bn("c2", name="bn2")
    b.blobs["c2"] = b.blobs["c1"]
    for name in ("c1", "c2"):
        layer = next(layer for layer in b.net.layer if layer.name == name)
        layer.param.add(name="shared_w")
        layer.param.add(name="shared_b")


@pytest.mark.parametrize("fold_second", [True, False])
def test_shared_weights_are_untied(fold_second: bool, tmp_path) -> None:
    b = net()
    _shared_pair(b, fold_second)
    merged = merge_and_check(b, tmp_path)
    assert merged.removed == ({"bn1", "bn2"} if fold_second else {"bn1"})
    layers = {layer.name: layer for layer in caffe_io.read_net(merged.merged[0]).layer}
    assert [p.name for p in layers["c1"].param] == ["", ""]
    assert [p.name for p in layers["c2"].param] == (["", ""] if fold_second else ["shared_w", "shared_b"])


def test_host_with_two_tops_is_refused(tmp_path) -> None:
    b = net()
    b.conv("data", 8, name="c")
    layer = b.net.layer[-1]
    layer.bottom.append("data")
    layer.top.append("c_second")
    b.shapes["c_second"] = b.shapes["c"]
    b.bn("c", name="bn")
    merged = merge_and_check(b, tmp_path, None, CLASSIC)
    assert merged.kept == {"bn": "host_unsuitable"}


def test_innerproduct_transpose_against_float64(tmp_path) -> None:
    """OpenCV 4.x ignores `transpose: true`, so this case is checked against Caffe's formula directly."""
    b = net((1, 3, 4, 4))
    b.scale(b.bn(b.ip("data", 10, transpose=True, name="fc")))
    merged = merge_and_check(b, tmp_path, "reference")
    assert len(merged.removed) == 2
