"""Nets from the wild that must convert although they hold what we do not change: duplicate names
of weightless layers, layers whose blobs do not decode as floats (forks' encodings), BatchNorm
layouts we do not fold, and the SegNet-era `BN` layer (folded in `bn_mode: INFERENCE`, kept in
`LEARN`). Untouched layers come out byte for byte (caffemodel records) and verbatim (prototxt text);
what folds is checked numerically on the float64 reference evaluator."""

from pathlib import Path

import numpy as np
import pytest
import reference
from google.protobuf import text_format
from harness import CLASSIC, copy_sample, merge_and_check, save

from caffe_bn_merge import InputError, verify
from caffe_bn_merge.io import proto, prototxt, wire
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import MergeOptions, merge
from caffe_bn_merge.rules.plan import FoldPlan
from caffe_bn_merge.synthetic.synth import NetBuilder

# --- what "untouched" means, checked on both files ------------------------------------------------


def _field(number: int, payload: bytes) -> bytes:
    return wire.encode_length_delimited(number, payload) + payload


def _records(path: Path) -> list[tuple[str, bytes]]:
    """(layer name, whole record bytes) of every `layer` record of a caffemodel, in order."""
    data = memoryview(path.read_bytes())
    found = []
    for record in wire.iter_fields(data):
        if record.number != 100:
            continue
        name = next(f for f in wire.iter_fields(data, record.value_start, record.end) if f.number == 1)
        found.append((bytes(data[name.value_start : name.end]).decode(), bytes(data[record.start : record.end])))
    return found


def _blocks(path: Path) -> list[str]:
    text = path.read_text()
    return [text[b.start : b.end] for b in prototxt.layer_blocks(text)]


def _assert_untouched(original: tuple[Path, Path], merged: tuple[Path, Path], changed: set[str]) -> None:
    """Every caffemodel record and prototxt block of a layer not in `changed` is in the output as it was."""
    out_records = _records(merged[1])
    kept = [r for r in _records(original[1]) if r[0] not in changed]
    assert [r for r in out_records if r[0] not in changed] == kept
    out_text = merged[0].read_text()
    names = [layer.name for layer in caffe_io.read_net(original[0]).layer]
    for name, block in zip(names, _blocks(original[0]), strict=True):
        if name not in changed:
            assert block in out_text, block


def _changed(plan: FoldPlan) -> set[str]:
    """The layers a merge removed or rewrote."""
    return plan.removed | {action.target for action in plan.actions}


def _with_records(caffemodel: Path, extra: dict[str, bytes]) -> None:
    """Append `extra[name]` (raw LayerParameter fields) to each named layer record."""
    data = memoryview(caffemodel.read_bytes())
    out = []
    for record in wire.iter_fields(data):
        body = bytes(data[record.value_start : record.end])
        name = next(f for f in wire.iter_fields(data, record.value_start, record.end) if f.number == 1)
        body += extra.get(bytes(data[name.value_start : name.end]).decode(), b"")
        out.append(_field(record.number, body))
    caffemodel.write_bytes(b"".join(out))


def _empty_records(caffemodel: Path, layers: list[tuple[str, str]]) -> None:
    """Add blob-less records (name, type) as Caffe writes them for every layer it saves."""
    head = b"".join(_field(100, proto.LayerParameter(name=n, type=t).SerializeToString()) for n, t in layers)
    caffemodel.write_bytes(head + caffemodel.read_bytes())


def _merge(original: tuple[Path, Path], folder: Path, options: MergeOptions = MergeOptions()):  # noqa: B008
    merged = (folder / "out.prototxt", folder / "out.caffemodel")
    return merge(*original, *merged, options), merged


# --- duplicate names of weightless layers ---------------------------------------------------------


def _relu_names(b: NetBuilder, x: str) -> str:
    """conv-bn-scale-relu twice, both ReLUs named `relu`."""
    for i in range(2):
        x = b.scale(b.bn(b.conv(x, 6, name=f"c{i}", bias=False), name=f"bn{i}"), name=f"sc{i}")
        b.unary("ReLU", x, name="relu")
    return x


def _split_dropout_names(b: NetBuilder, x: str) -> str:
    """Two Splits named `fork`, two Dropouts named `drop`, then a chain that folds."""
    x = b.relu(b.conv(x, 6, name="c0"))
    b.layer("Split", "fork", [x], ["s1", "s2"])
    ends = []
    for i, top in enumerate(("s1", "s2")):
        b.unary("Dropout", top, top=f"d{i}", name="drop")
        ends.append(b.conv(f"d{i}", 6, name=f"c{i + 1}"))
    b.layer("Split", "fork", [ends[0]], ["t1", "t2"])
    return b.scale(b.bn(b.conv("t1", 4, name="c3", bias=False), name="bn"), name="sc")


def _phase_names(b: NetBuilder, x: str) -> str:
    """A TRAIN-only Dropout and a TEST ReLU of the same name, and a TEST Dropout named like a ReLU."""
    x = b.scale(b.bn(b.conv(x, 6, name="c0", bias=False), name="bn0"), name="sc0")
    b.unary("ReLU", x, top="r", name="act")
    b.unary("Dropout", "r", name="act").include.add(phase=proto.TRAIN)
    b.unary("Dropout", "r", top="drop", name="relu2")
    y = b.conv("drop", 5, name="c1", bias=False)
    b.unary("ReLU", y, name="relu2")
    return b.bn(y, name="bn1")


LAYOUTS = {"relu": _relu_names, "split_dropout": _split_dropout_names, "phases": _phase_names}


@pytest.mark.parametrize("caffe_records", [False, True], ids=["weights_only", "every_layer_recorded"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_duplicate_weightless_names_convert(layout: str, caffe_records: bool, tmp_path) -> None:
    b = NetBuilder(layout, (1, 3, 10, 10), seed=len(layout))
    LAYOUTS[layout](b, "data")
    original = save(b, tmp_path)
    names = [layer.name for layer in b.net.layer]
    duplicated = {n for n in names if names.count(n) > 1}
    assert duplicated
    if caffe_records:
        _empty_records(original[1], [(layer.name, layer.type) for layer in b.net.layer if layer.name not in b.blobs])
    merged = merge_and_check(original, tmp_path, "reference")
    assert merged.removed and not merged.removed & duplicated
    _assert_untouched(original, merged.merged, _changed(merged.result.plan))
    assert all(merged.kept[name] == "duplicate_name" for name in duplicated if name in merged.kept)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_duplicate_weightless_names_on_real_caffe(layout: str, pycaffe: Path, tmp_path) -> None:
    """Caffe itself runs nets whose weightless layers share names, and the merged one matches."""
    b = NetBuilder(layout, (1, 3, 10, 10), seed=len(layout))
    LAYOUTS[layout](b, "data")
    original = save(b, tmp_path)
    result, merged = _merge(original, tmp_path)
    assert result.plan.removed
    checked = verify(original, merged, backend="caffe", tolerance=1e-5)
    assert checked.passed and checked.backend == "caffe", checked.max_relative


def test_duplicate_names_of_weighted_layers_are_kept_as_they_are(tmp_path) -> None:
    """Two convolutions of one name: Caffe gives the first the weights; we touch neither."""
    b = NetBuilder("twins", (1, 3, 8, 8), seed=5)
    x = b.bn(b.conv("data", 4, name="conv", bias=False), name="bn_a")
    b.bn(b.conv(x, 4, name="conv", top="conv_b", bias=False), name="bn_b")
    original = save(b, tmp_path)
    result, merged = _merge(original, tmp_path, CLASSIC)
    assert result.plan.removed == set()
    assert {k.layer: k.refusal.reason.code for k in result.plan.kept} == {
        "bn_a": "duplicate_name",
        "bn_b": "duplicate_name",
    }
    _assert_untouched(original, merged, set())


def test_a_sample_with_a_relu_named_like_its_first_conv_converts(tmp_path) -> None:
    original = copy_sample(tmp_path)
    text = original[0].read_text()
    original[0].write_text(text.replace('name: "res2a/relu"', 'name: "conv1"', 1))
    result, merged = _merge(original, tmp_path)
    assert result.plan.reasons["conv1/bn"][0].reason.code == "duplicate_name"
    assert "conv1/bn" not in result.plan.removed and result.plan.removed
    _assert_untouched(original, merged, _changed(result.plan))


# --- layers whose blobs do not decode as floats ----------------------------------------------------


def _blob(shape: tuple[int, ...], fields: bytes, legacy: bool = False) -> bytes:
    if legacy:
        dims = b"".join(wire.encode_varint_field(n, d) for n, d in zip((1, 2, 3, 4), shape, strict=True))
    else:
        dims = _field(7, _field(1, b"".join(wire.encode_varint(d) for d in shape)))
    return dims + fields


ENCODINGS = {
    # name: BlobProto fields after the shape (the values in a form we cannot read as floats)
    "raw int8 (type 3)": lambda n, legacy: _blob(
        n, wire.encode_varint_field(10, 3) + _field(12, bytes(n[0] * 27)), legacy
    ),
    "raw bool (type 5)": lambda n, legacy: _blob(
        n, wire.encode_varint_field(10, 5) + _field(12, bytes(n[0] * 27)), legacy
    ),
    "raw type 17": lambda n, legacy: _blob(
        n, wire.encode_varint_field(10, 17) + _field(12, bytes(4 * n[0] * 27)), legacy
    ),
    "packed bits in field 20": lambda n, legacy: _blob(n, _field(20, bytes((n[0] * 27 + 7) // 8)), legacy),
    "odd data length": lambda n, legacy: _blob(n, _field(5, bytes(4 * n[0] * 27 + 2)), legacy),
    "float16 of the wrong length": lambda n, legacy: _blob(
        n, wire.encode_varint_field(10, 2) + _field(12, bytes(3)), legacy
    ),
}


def _binarised(record: bytes, encoding: str, channels: int, legacy: bool) -> bytes:
    """The record with its weight blob (blob 0) re-encoded as `encoding`."""
    data = memoryview(record)
    layer = next(wire.iter_fields(data))
    body, first = [], True
    for item in wire.iter_fields(data, layer.value_start, layer.end):
        if item.number == 7 and first:
            body.append(_field(7, ENCODINGS[encoding]((channels, 3, 3, 3), legacy)))
            first = False
        else:
            body.append(bytes(data[item.start : item.end]))
    return _field(100, b"".join(body))


def _binary_net(folder: Path, where: str) -> tuple[Path, Path]:
    """A net with a binarised 3x3 conv `bin` (3 input channels): untouched (`side`: nothing folds into
    it), a host whose BatchNorm would fold (`host`), or a fork's own layer type with a parameter our
    schema does not know (`custom`); the rest folds."""
    b = NetBuilder(f"bin_{where}", (1, 3, 8, 8), seed=11)
    x = b.conv("data", 5, name="bin", kernel=3)
    x = b.bn(x, name="bin_bn") if where == "host" else b.relu(x)
    b.scale(b.bn(b.conv(x, 4, name="c1", bias=False), name="bn1"), name="sc1")
    model, weights = save(b, folder)
    if where == "custom":
        text = model.read_text().replace(
            'type: "Convolution"', 'type: "BinaryConvolution"\n  binary_param {\n    bits: 1\n  }', 1
        )
        model.write_text(text)
    return model, weights


@pytest.mark.parametrize("legacy", [False, True], ids=["shape", "legacy_dims"])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("where", ["side", "host", "custom"])
def test_undecodable_blobs_pass_through(where: str, encoding: str, legacy: bool, tmp_path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "fork").mkdir()
    plain = _binary_net(tmp_path / "plain", where)
    reference = merge_and_check(plain, tmp_path / "plain", "reference", CLASSIC)  # the same net, all floats
    fork = _binary_net(tmp_path / "fork", where)
    records = [r if name != "bin" else _binarised(r, encoding, 5, legacy) for name, r in _records(fork[1])]
    fork[1].write_bytes(b"".join(records))
    result, merged = _merge(fork, tmp_path / "fork", CLASSIC)
    if where == "host":
        assert {k.layer: k.refusal.reason.code for k in result.plan.kept} == {"bin_bn": "undecodable_blobs"}
        assert reference.removed == {"bin_bn", "bn1", "sc1"} and result.plan.removed == {"bn1", "sc1"}
    else:
        assert result.plan.removed == reference.removed == {"bn1", "sc1"}
    _assert_untouched(fork, merged, {"c1", "bn1", "sc1"})
    # what folded is what folds when the same net holds plain floats
    assert dict(_records(merged[1]))["c1"] == dict(_records(reference.merged[1]))["c1"]


def test_undecodable_blobs_of_a_folded_batchnorm_keep_it(tmp_path) -> None:
    b = NetBuilder("bn_fork", (1, 3, 8, 8), seed=2)
    b.scale(b.bn(b.conv("data", 5, name="c", bias=False), name="bn"), name="sc")
    original = save(b, tmp_path)
    records = []
    for name, record in _records(original[1]):
        if name == "bn":
            layer = proto.LayerParameter(name="bn", type="BatchNorm").SerializeToString()
            record = _field(100, layer + 3 * _field(7, ENCODINGS["raw type 17"]((5, 1, 1, 1), False)))
        records.append(record)
    original[1].write_bytes(b"".join(records))
    result, merged = _merge(original, tmp_path)
    assert result.plan.reasons["bn"][0].reason.code == "undecodable_blobs"
    assert "bn" not in result.plan.removed
    _assert_untouched(original, merged, {"c", "sc"})


def test_v1_record_with_undecodable_blobs_is_one_clear_error(tmp_path) -> None:
    """A V1 caffemodel is written anew in today's form, which needs every blob's values."""
    old = proto.V1LayerParameter(name="c", type=proto.V1LayerParameter.LayerType.Value("CONVOLUTION"))
    blob = _field(6, ENCODINGS["raw type 17"]((1, 3, 1, 1), False))  # V1 `blobs` is field 6
    (tmp_path / "w.caffemodel").write_bytes(_field(2, old.SerializeToString() + blob))
    net = proto.NetParameter(name="v1", input=["data"], input_dim=[1, 3, 4, 4])
    net.layer.add(name="c", type="Convolution", bottom=["data"], top=["c"]).convolution_param.num_output = 1
    (tmp_path / "n.prototxt").write_text(text_format.MessageToString(net))
    with pytest.raises(InputError, match=r"raw_data of type 17"):
        _merge((tmp_path / "n.prototxt", tmp_path / "w.caffemodel"), tmp_path)


@pytest.mark.parametrize("fork", ["pspnet", "segnet"])
def test_a_bn_chain_made_one_scale_keeps_no_bn_param(fork: str, tmp_path) -> None:
    """BN + Scale after a ReLU become one Scale, which must not carry the BN's parameters (BVLC
    Caffe's schema has no bn_param)."""
    b = NetBuilder(f"{fork}_chain", (1, 3, 8, 8), seed=4)
    x = b.relu(b.conv("data", 5, name="c"))
    if fork == "segnet":
        _segnet_bn(b, x, "bn")
        mode = "bn_mode: INFERENCE"
    else:
        b.layer("BN", "bn", [x], [x])
        b.blobs["bn"] = [b.rng.normal(1, 0.2, (1, 5, 1, 1)) for _ in range(3)] + [b.rng.lognormal(0, 0.3, (1, 5, 1, 1))]
        mode = "eps: 0.0001"
    b.scale(x, name="sc")
    model, weights = save(b, tmp_path)
    model.write_text(model.read_text().replace('type: "BN"\n', f'type: "BN"\n  bn_param {{ {mode} }}\n'))
    merged = merge_and_check((model, weights), tmp_path, "reference")
    assert merged.removed == {"sc"} and merged.layer_count("BN") == (1, 0)
    assert "bn_param" not in merged.merged[0].read_text()


# --- BatchNorm layouts we do not fold ------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer_type", "count"), [("BatchNorm", 1), ("BatchNorm", 2), ("BatchNorm", 6), ("BN", 3), ("BN", 5)]
)
def test_unknown_batchnorm_layout_is_kept(layer_type: str, count: int, tmp_path) -> None:
    b = NetBuilder("odd", (1, 3, 8, 8), seed=count)
    x = b.bn(b.conv("data", 4, name="c", bias=False), name="odd")
    b.net.layer[-1].type = layer_type
    b.blobs["odd"] = [np.full(4, 0.5 + i) for i in range(count)]
    b.scale(b.bn(b.conv(x, 4, name="c2", bias=False), name="bn"), name="sc")
    original = save(b, tmp_path)
    result, merged = _merge(original, tmp_path)
    assert result.plan.removed == {"bn", "sc"}
    assert {k.layer: k.refusal.reason.code for k in result.plan.kept} == {"odd": "unknown_layout"}
    _assert_untouched(original, merged, {"c2", "bn", "sc"})


def test_a_sample_batchnorm_with_a_blob_missing_is_kept(tmp_path) -> None:
    original = copy_sample(tmp_path)
    net = proto.NetParameter.FromString(original[1].read_bytes())
    bn = next(layer for layer in net.layer if layer.name == "conv1/bn")
    del bn.blobs[2]
    original[1].write_bytes(net.SerializeToString())
    result, merged = _merge(original, tmp_path)
    assert result.plan.reasons["conv1/bn"][0].reason.code == "unknown_layout"
    assert result.layers_after["BatchNorm"] == 1 and result.plan.removed
    _assert_untouched(original, merged, _changed(result.plan))


# --- SegNet's BN -----------------------------------------------------------------------------------

SEGNET_PARAM = """bn_param {{
    {mode}scale_filler {{
      type: "constant"
      value: 1
    }}
    shift_filler {{
      type: "constant"
      value: 0.001
    }}
  }}"""


def _segnet_bn(b: NetBuilder, bottom: str, name: str, top: str | None = None) -> str:
    """A SegNet BN: scale and shift, each of shape [1, C, 1, 1]."""
    channels = b.shapes[bottom][1]
    b.layer("BN", name, [bottom], [top or bottom])
    b.blobs[name] = [b.rng.normal(1, 0.3, (1, channels, 1, 1)), b.rng.normal(0, 0.3, (1, channels, 1, 1))]
    return top or bottom


def _segnet(folder: Path, channels: int, mode: str) -> tuple[Path, Path]:
    """SegNet's pattern (conv -> BN -> ReLU), a BN not in place, one before an unpadded conv, one
    after a non-linear layer, as SegNet's deploy nets write them (`mode`: INFERENCE, LEARN, unset)."""
    b = NetBuilder(f"segnet_{channels}_{mode or 'unset'}", (2, 3, 12, 12), seed=channels)
    x = b.relu(_segnet_bn(b, b.conv("data", channels, name="conv1_1"), "conv1_1_bn"))
    x = b.relu(_segnet_bn(b, b.conv(x, channels, name="conv1_2"), "conv1_2_bn", top="bn_out"))
    b.unary("Power", x, top="sq", name="square").power_param.power = 2
    x = _segnet_bn(b, "sq", "lone_bn")
    x = _segnet_bn(b, b.relu(x, top="act"), "pre_bn", top="pre")
    b.conv(x, 3, kernel=1, pad=0, name="score")
    prototxt_path, caffemodel = save(b, folder)
    text = prototxt_path.read_text().replace(
        'type: "BN"\n', 'type: "BN"\n  ' + SEGNET_PARAM.format(mode=f"bn_mode: {mode}\n    " if mode else "") + "\n"
    )
    prototxt_path.write_text(text)
    segnet_param = _field(45, wire.encode_varint_field(3, 1 if mode == "INFERENCE" else 0))  # SegNet's field number
    _with_records(caffemodel, dict.fromkeys(["conv1_1_bn", "conv1_2_bn", "lone_bn", "pre_bn"], segnet_param))
    return prototxt_path, caffemodel


@pytest.mark.parametrize("channels", [1, 3, 8])
def test_segnet_bn_inference_folds_like_a_scale(channels: int, tmp_path) -> None:
    original = _segnet(tmp_path, channels, "INFERENCE")
    merged = merge_and_check(original, tmp_path, "reference")
    assert merged.removed == {"conv1_1_bn", "conv1_2_bn", "pre_bn"}  # forward, forward, backward
    assert "lone_bn" in merged.kept  # folds nowhere, and already is one scale-and-shift layer
    _assert_untouched(original, merged.merged, {"conv1_1", "conv1_2", "conv1_1_bn", "conv1_2_bn", "pre_bn", "score"})
    assert merged.layer_count("BN") == (4, 1) and merged.layer_count("Scale") == (0, 0)


@pytest.mark.parametrize("mode", ["LEARN", ""], ids=["learn", "unset"])
@pytest.mark.parametrize("channels", [1, 3, 8])
def test_segnet_bn_learn_is_kept(channels: int, mode: str, tmp_path) -> None:
    original = _segnet(tmp_path, channels, mode)
    merged = merge_and_check(original, tmp_path, "reference")
    assert merged.removed == set()
    reasons = merged.result.plan.reasons
    for name in ("conv1_1_bn", "conv1_2_bn", "lone_bn", "pre_bn"):
        assert reasons[name][0].reason.code == "batch_stats", name
    assert original[0].read_bytes() == merged.merged[0].read_bytes()
    assert original[1].read_bytes() == merged.merged[1].read_bytes()


@pytest.mark.parametrize("mode", ["INFERENCE", "LEARN"])
def test_reference_segnet_bn_is_segnet_s(mode: str, tmp_path) -> None:
    """The evaluator the folds are checked on computes SegNet's BN: scale * x + shift (INFERENCE),
    or normalised by the batch's own statistics first, var_eps 1e-9 (LEARN)."""
    b = NetBuilder("one_bn", (3, 2, 4, 5), seed=8)
    _segnet_bn(b, "data", "bn", top="out")
    model, weights = save(b, tmp_path)
    model.write_text(model.read_text().replace('type: "BN"\n', f'type: "BN"\n  bn_param {{ bn_mode: {mode} }}\n'))
    x = np.random.default_rng(1).normal(2, 3, (3, 2, 4, 5))
    scale, shift = b.blobs["bn"]
    if mode == "LEARN":
        mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
        want = (x - mean) / np.sqrt(var + 1e-9) * scale + shift
    else:
        want = x * scale + shift
    np.testing.assert_allclose(reference.evaluate(model, weights, {"data": x})["out"], want, rtol=1e-6, atol=1e-6)
