"""Nets built to break the rewiring: Split and in-place identities next to net outputs, layers of
other phases or stages reading folded blobs, axes that are not the channel axis, ambiguous
layouts. Each must come out computing the same function, or be refused."""

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from harness import merge_and_check

from caffe_bn_merge import InputError
from caffe_bn_merge.io import proto
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import merge
from caffe_bn_merge.synthetic.synth import NetBuilder


def _net() -> NetBuilder:
    return NetBuilder("adv", (1, 4, 6, 6), seed=8)


def _split(b: NetBuilder, bottom: str, tops: list[str]) -> None:
    b.layer("Split", "split", [bottom], tops)


def _split_in_place_top_unread_other(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 4, name="c1"))
    _split(b, x, [x, "s2"])  # s2 is never read: a net output
    b.conv(x, 4, name="c2")


def _split_first_top_unread(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 4, name="c1"))
    _split(b, x, ["s1", "s2"])
    b.conv("s2", 4, name="c2")


def _split_without_relu(b: NetBuilder) -> None:
    x = b.conv("data", 4, name="c1")
    _split(b, x, [x, "s2"])
    b.conv(x, 4, name="c2")


def _split_two_unread_tops(b: NetBuilder) -> None:
    _split(b, b.conv("data", 4, name="c1"), ["s1", "s2"])


def _trailing_in_place_dropout(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 4, name="c0"), top="r")
    b.bn(x, name="bn")
    b.conv(x, 4, kernel=1, name="c1")
    b.unary("Dropout", x, name="drop")  # makes the post-BatchNorm `r` a net output


CASES = {
    "split: in-place top, other top unread": _split_in_place_top_unread_other,
    "split: first top unread": _split_first_top_unread,
    "split: in place, no relu": _split_without_relu,
    "split: two unread tops": _split_two_unread_tops,
    "in-place dropout making a net output": _trailing_in_place_dropout,
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_rewiring_keeps_function_and_outputs(case: str, tmp_path) -> None:
    b = _net()
    CASES[case](b)
    merged = merge_and_check(b, tmp_path, "reference")
    before = {v.name for v in __import__("caffe_bn_merge.graph").graph.build_graph(b.net).outputs}
    after = {
        v.name
        for v in __import__("caffe_bn_merge.graph").graph.build_graph(caffe_io.read_net(merged.merged[0])).outputs
    }
    assert before == after


def test_innerproduct_axis_minus_one_is_refused(tmp_path) -> None:
    b = _net()
    b.bn(b.ip("data", 4, name="fc"), name="bn")
    b.net.layer[1].inner_product_param.axis = -1
    merged = merge_and_check(b, tmp_path, None)
    assert "bn" not in merged.removed


def test_convolution_on_another_axis_is_refused(tmp_path) -> None:
    b = _net()
    b.bn(b.conv("data", 4, name="c"), name="bn")
    b.net.layer[1].convolution_param.axis = 2
    merged = merge_and_check(b, tmp_path, None)
    assert "bn" not in merged.removed


def test_stage_rules_follow_the_nets_state(tmp_path) -> None:
    b = _net()
    x = b.bn(b.conv("data", 4, name="c1"), name="bn")
    tap = b.unary("Sigmoid", x, top="tap", name="tap")  # reads the BatchNorm's output, in stage "deploy"
    tap.include.add(stage=["deploy"])
    b.scale(x, name="sc")
    b.net.state.stage.append("deploy")
    merged = merge_and_check(b, tmp_path, "opencv")
    assert "sc" not in merged.removed  # the Scale's input is also read by `tap`


def test_blob_read_by_a_train_only_layer_keeps_its_name(tmp_path) -> None:
    b = _net()
    x = b.conv("data", 4, name="c1")
    b.bn(x, top="bnout", name="bn")
    b.unary("Sigmoid", x, top="t", name="train_tap").include.add(phase=proto.TRAIN)
    merged = merge_and_check(b, tmp_path, "reference")
    tops = {top for layer in caffe_io.read_net(merged.merged[0]).layer for top in layer.top}
    assert "c1" in tops


def test_one_channel_five_blob_batchnorm_is_ambiguous(tmp_path) -> None:
    b = NetBuilder("one", (1, 3, 6, 6), seed=1)
    b.layer("BatchNorm", "bn", [b.conv("data", 1, name="c")], ["c"])
    b.blobs["bn"] = [np.ones(1), np.zeros(1), np.ones(1), np.full(1, 2.0), np.ones(1)]
    merged = merge_and_check(b, tmp_path, None)
    assert merged.kept == {"bn": "unknown_layout"}


def test_v1_net_with_unknown_fields_is_refused(tmp_path) -> None:
    net = proto.NetParameter(name="v1", input=["data"], input_dim=[1, 3, 4, 4])
    net.layers.add(name="relu", type=proto.V1LayerParameter.LayerType.Value("RELU"), bottom=["data"], top=["data"])
    text = text_format.MessageToString(net).replace('name: "relu"', 'name: "relu"\n  fork_field: 1')
    (tmp_path / "v1.prototxt").write_text(text)
    with pytest.raises(InputError, match="--caffe-proto"):
        caffe_io.read_net_text(tmp_path / "v1.prototxt")


def test_a_blob_with_two_producers_is_refused(tmp_path: Path) -> None:
    b = _net()
    b.conv("data", 4, name="c1", top="x")
    b.conv("data", 4, name="c2", top="x")
    b.save(tmp_path / "n.prototxt", tmp_path / "n.caffemodel")
    with pytest.raises(InputError, match="already produced"):
        merge(tmp_path / "n.prototxt", tmp_path / "n.caffemodel", tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
