"""The rules beyond the classic forward fold: backward, standalone, identity, and their switches.
Each case is checked numerically (OpenCV dnn, fusion off) and by the layers it removes."""

import pytest
from harness import merge_and_check

from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import MergeOptions
from caffe_bn_merge.rules.plan import Rule
from caffe_bn_merge.synthetic.synth import NetBuilder


def net(shape: tuple[int, ...] = (1, 4, 10, 10), seed: int = 11) -> NetBuilder:
    return NetBuilder("t", shape, seed)


def _input_bn_1x1(b: NetBuilder) -> None:
    b.conv(b.scale(b.bn("data", top="n", name="bn"), top="s", name="sc"), 8, kernel=1, name="c")


def _concat_bn_relu_conv(b: NetBuilder) -> None:
    x = b.concat([b.conv("data", 4, name="c1"), b.conv("data", 4, name="c2")], name="cat")
    x = b.scale(b.bn(x, name="bn", top="n"), name="sc", top="n")
    b.conv(b.relu(x), 8, kernel=1, name="c3")


def _eltwise_bn_conv(b: NetBuilder) -> None:
    x = b.eltwise([b.conv("data", 4, name="c1"), b.conv("data", 4, name="c2")], name="sum")
    b.conv(b.scale(b.bn(x, name="bn"), name="sc"), 6, kernel=3, pad=0, name="c3")


def _relu_bn_conv(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 6, name="c1"))
    b.conv(b.scale(b.bn(x, name="bn"), name="sc"), 8, kernel=1, name="c2")


def _bn_padded_conv(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 6, name="c1"))
    b.conv(b.scale(b.bn(x, name="bn"), name="sc"), 8, kernel=3, pad=1, name="c2")


def _bn_innerproduct(b: NetBuilder) -> None:
    x = b.pool(b.relu(b.conv("data", 6, name="c1")), name="pool")
    b.ip(b.bn(x, name="bn"), 5, name="fc")


def _bn_grouped_consumer(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 6, name="c1"))
    b.conv(b.bn(x, name="bn"), 6, kernel=1, group=3, name="c2")


def _bn_depthwise_consumer(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 6, name="c1"))
    b.conv(b.bn(x, name="bn"), 6, kernel=3, pad=0, group=6, name="c2")


def _dropout_not_in_place(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 6, name="c1"))
    b.unary("Dropout", x, top="d", name="drop").dropout_param.dropout_ratio = 0.3
    b.conv("d", 8, name="c2")


def _dropout_as_output(b: NetBuilder) -> None:
    b.unary("Dropout", b.conv("data", 6, name="c1"), top="out", name="drop")


def _split(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 6, name="c1"))
    b.layer("Split", "split", [x], ["s1", "s2"])
    b.eltwise([b.conv("s1", 6, name="c2"), b.conv("s2", 6, name="c3")], name="sum")


def _identity_scale_and_power(b: NetBuilder) -> None:
    x = b.relu(b.conv("data", 6, name="c1"))
    b.scale(x, name="one", bias=False)
    b.blobs["one"][0][:] = 1.0
    b.unary("Power", x, name="pow")
    b.conv(x, 8, name="c2")


def _power_affine(b: NetBuilder) -> None:
    x = b.conv("data", 6, name="c1")
    power = b.unary("Power", x, name="pow").power_param
    power.scale, power.shift = 2.0, 0.5


def _rewritten_source(b: NetBuilder) -> None:
    x = b.conv("data", 6, name="c1")
    b.bn(x, top="n", name="bn")
    b.relu(x)  # rewrites c1 in place after the BatchNorm read it
    b.eltwise([b.conv("n", 6, kernel=1, name="c2"), x], name="sum")


CASES = {
    # name: (build, {rule: layers it takes away}, layers kept with their reason code)
    "input bn -> 1x1 conv": (_input_bn_1x1, {Rule.BACKWARD: {"bn", "sc"}}, {}),
    "concat -> bn -> relu -> conv": (_concat_bn_relu_conv, {Rule.STANDALONE: {"sc"}}, {}),
    "eltwise -> bn -> pad-0 conv": (_eltwise_bn_conv, {Rule.BACKWARD: {"bn", "sc"}}, {}),
    "relu -> bn -> pad-0 conv": (_relu_bn_conv, {Rule.BACKWARD: {"bn", "sc"}}, {}),
    "bn -> padded conv collapses": (_bn_padded_conv, {Rule.STANDALONE: {"sc"}}, {}),
    "bn -> innerproduct": (_bn_innerproduct, {Rule.BACKWARD: {"bn"}}, {}),
    "bn -> grouped conv": (_bn_grouped_consumer, {Rule.BACKWARD: {"bn"}}, {}),
    "bn -> depthwise pad-0 conv": (_bn_depthwise_consumer, {Rule.BACKWARD: {"bn"}}, {}),
    "dropout not in place": (_dropout_not_in_place, {Rule.IDENTITY: {"drop"}}, {}),
    "dropout writing a net output": (_dropout_as_output, {Rule.IDENTITY: {"drop"}}, {}),
    "split": (_split, {Rule.IDENTITY: {"split"}}, {}),
    "identity scale and power": (_identity_scale_and_power, {Rule.IDENTITY: {"one", "pow"}}, {}),
    "power 1 folds forward": (_power_affine, {Rule.FORWARD: {"pow"}}, {}),
    "blob rewritten before the consumer": (_rewritten_source, {}, {}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_rule(case: str, tmp_path) -> None:
    build, removed, kept = CASES[case]
    b = net()
    build(b)
    merged = merge_and_check(b, tmp_path)
    plan = merged.result.plan
    assert {rule: set(n for a in plan.by_rule(rule) for n in a.removed) for rule in removed} == removed
    assert merged.removed == set().union(*removed.values())
    assert merged.kept == kept


def test_padded_consumer_is_refused_backward(tmp_path) -> None:
    b = net()
    _bn_padded_conv(b)
    merged = merge_and_check(b, tmp_path, options=MergeOptions(standalone=False))
    assert merged.removed == set()
    assert merged.kept == {"bn": "nonlinear_between", "sc": "behind_kept"}
    assert "padded" in str(next(k for k in merged.result.plan.kept if k.layer == "sc"))


def test_rewritten_source_collapses_instead(tmp_path) -> None:
    b = net()
    _rewritten_source(b)
    merged = merge_and_check(b, tmp_path)
    assert [a.rule for a in merged.result.plan.actions] == [Rule.STANDALONE]  # the lone BatchNorm -> Scale
    assert merged.layer_count("BatchNorm") == (1, 0) and merged.layer_count("Scale") == (0, 1)


def test_collapsed_chain_keeps_output_name_and_is_one_scale(tmp_path) -> None:
    b = net()
    x = b.concat([b.conv("data", 4, name="c1"), b.conv("data", 4, name="c2")], name="cat")
    b.scale(b.scale(b.bn(x, name="bn", top="n"), name="s1", top="m"), name="s2", top="out")
    merged = merge_and_check(b, tmp_path)
    layers = [layer for layer in caffe_io.read_net(merged.merged[0]).layer if layer.type == "Scale"]
    assert [(layer.name, list(layer.bottom), list(layer.top)) for layer in layers] == [("bn", ["cat"], ["out"])]
    assert len(caffe_io.read_weights(merged.merged[1]).layers["bn"].blobs) == 2


SWITCHES = {
    "--no-backward": (_input_bn_1x1, MergeOptions(backward=False), {Rule.STANDALONE: {"sc"}}),
    "--keep-standalone": (_concat_bn_relu_conv, MergeOptions(standalone=False), {}),
    "--keep-identity": (_dropout_not_in_place, MergeOptions(identity=False), {}),
}


@pytest.mark.parametrize("switch", SWITCHES, ids=list(SWITCHES))
def test_switches_turn_rules_off(switch: str, tmp_path) -> None:
    build, options, removed = SWITCHES[switch]
    b = net()
    build(b)
    merged = merge_and_check(b, tmp_path, options=options)
    assert merged.removed == set().union(*removed.values())


def test_a_host_folded_both_ways_computes_each_fold_once(tmp_path, monkeypatch) -> None:
    from caffe_bn_merge.rules import rewrite

    calls = {"forward": 0, "backward": 0}

    def counting(name, original):
        def wrapped(*args):
            calls[name] += 1
            return original(*args)

        return wrapped

    monkeypatch.setattr(rewrite, "fold_forward_lazy", counting("forward", rewrite.fold_forward_lazy))
    monkeypatch.setattr(rewrite, "fold_backward", counting("backward", rewrite.fold_backward))
    b = net()
    x = b.relu(b.conv("data", 6, name="c1"))
    b.scale(b.bn(b.conv(b.bn(x, name="bn1"), 8, kernel=1, name="c2"), name="bn2"), name="sc2")
    merge_and_check(b, tmp_path)
    assert calls == {"forward": 1, "backward": 1}
