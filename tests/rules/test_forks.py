"""Caffe forks and old formats: BatchNorm variants, conv-like types, V1 nets, fp16 blobs, unknown
fields kept, train_val nets, solvers. Each conversion is checked numerically: on OpenCV where it
implements the variant, else on the float64 evaluation of the fork's documented semantics."""

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from harness import merge_and_check

from caffe_bn_merge import InputError
from caffe_bn_merge.graph import included, inference_state
from caffe_bn_merge.io import proto, wire
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import MergeOptions, merge
from caffe_bn_merge.synthetic.synth import NetBuilder, save_weights_for

ROOT = Path(__file__).resolve().parents[2]


def _conv_with_bn(blobs: list[np.ndarray], layer_type: str = "BatchNorm", **param: object) -> NetBuilder:
    b = NetBuilder("fork", (1, 4, 8, 8), seed=9)
    x = b.relu(b.conv("data", 6, name="c", bias=False))
    x = b.conv(x, 6, name="c2", bias=False)
    layer = b.layer(layer_type, "bn", [x], [x])
    for key, value in param.items():
        setattr(layer.bn_param if layer_type == "BN" else layer.batch_norm_param, key, value)
    b.blobs["bn"] = blobs
    return b


def _stats(seed: int = 4, channels: int = 6) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    mean, var = rng.normal(0, 0.5, channels), rng.lognormal(0, 0.5, channels)
    return mean, var, rng.normal(1, 0.3, channels), rng.normal(0, 0.3, channels)


def test_nvcaffe_scale_bias_on_opencv(tmp_path) -> None:
    mean, var, gamma, beta = _stats()
    b = _conv_with_bn([mean, var, np.ones(1), gamma, beta], scale_bias=True, eps=1e-6)
    merged = merge_and_check(b, tmp_path)  # OpenCV implements NVIDIA Caffe's 5-blob BatchNorm
    assert merged.removed == {"bn"}


def _col(a: np.ndarray) -> np.ndarray:
    return a.reshape(1, -1, 1, 1)


VARIANTS = {
    # name: (blobs from (mean, var, gamma, beta), layer type, params, reference flavour, --bn-flavour)
    "nvcaffe 3 blobs": (
        lambda m, v, g, b: [m, v, np.full(1, 2.0)],
        "BatchNorm",
        {"scale_bias": False},
        "nvcaffe",
        "auto",
    ),
    "nvcaffe 0.15": (lambda m, v, g, b: [g, b, m, v, np.zeros(1)], "BatchNorm", {}, "nvcaffe-0.15", "auto"),
    "pspnet BN": (lambda m, v, g, b: [_col(g), _col(b), _col(m), _col(v)], "BN", {"eps": 1e-4}, "bvlc", "auto"),
    "declared nvcaffe": (lambda m, v, g, b: [m, v, np.full(1, 3.0)], "BatchNorm", {}, "nvcaffe", "nvcaffe"),
    "bvlc factor 3": (lambda m, v, g, b: [m * 3, v * 3, np.full(1, 3.0)], "BatchNorm", {}, "bvlc", "auto"),
}


@pytest.mark.parametrize("case", VARIANTS, ids=list(VARIANTS))
def test_batchnorm_variant(case: str, tmp_path) -> None:
    make, layer_type, params, flavour, override = VARIANTS[case]
    b = _conv_with_bn(make(*_stats()), layer_type, **params)
    merged = merge_and_check(b, tmp_path, options=MergeOptions(bn_flavour=override), flavour=flavour)
    assert merged.removed == {"bn"}


def test_unknown_batchnorm_layout_is_kept(tmp_path) -> None:
    mean, var, gamma, beta = _stats()
    b = _conv_with_bn([mean, var, gamma, beta, np.ones(2)])  # 5 blobs, none of shape [1]
    merged = merge_and_check(b, tmp_path, engine=None)
    assert merged.kept == {"bn": "unknown_layout"}


@pytest.mark.parametrize("layer_type", ["DepthwiseConvolution", "ConvolutionDepthwise", "MyConv"])
def test_conv_like_types_fold(layer_type: str, tmp_path) -> None:
    b = NetBuilder("dw", (1, 4, 8, 8), seed=3)
    b.scale(b.bn(b.conv("data", 4, group=4, bias=False, name="dw"), name="bn"), name="sc")
    b.net.layer[1].type = layer_type
    merged = merge_and_check(
        b, tmp_path, "reference", MergeOptions(conv_like=("DepthwiseConvolution", "ConvolutionDepthwise", "MyConv"))
    )
    assert merged.removed == {"bn", "sc"}


def test_unlisted_custom_type_is_not_a_host(tmp_path) -> None:
    b = NetBuilder("dw", (1, 4, 8, 8), seed=3)
    b.bn(b.conv("data", 4, group=4, bias=False, name="dw"), name="bn")
    b.net.layer[1].type = "MyConv"
    merged = merge_and_check(b, tmp_path, "reference")
    assert "bn" not in merged.removed


def _v1_net(folder: Path) -> tuple[Path, Path]:
    """A V1 net (`layers`, enum types) and V1 weights: conv -> relu -> dropout -> power(identity) -> conv."""
    b = NetBuilder("v1", (1, 3, 8, 8), seed=2)
    x = b.relu(b.conv("data", 4, name="conv1"))
    b.unary("Dropout", x, top="drop", name="drop")
    b.unary("Power", "drop", top="pow", name="pow")
    b.conv("pow", 5, name="conv2")
    net = proto.NetParameter(name="v1", input=["data"])
    net.input_dim.extend([1, 3, 8, 8])
    weights = proto.NetParameter(name="v1")
    v1_type = {"Convolution": "CONVOLUTION", "ReLU": "RELU", "Dropout": "DROPOUT", "Power": "POWER"}
    for layer in b.net.layer[1:]:
        old = net.layers.add(name=layer.name, bottom=layer.bottom, top=layer.top)
        old.type = proto.V1LayerParameter.LayerType.Value(v1_type[layer.type])
        if layer.type == "Convolution":
            old.convolution_param.CopyFrom(layer.convolution_param)
            record = weights.layers.add(name=layer.name, type=old.type)
            for array in b.blobs[layer.name]:
                n, c, h, w = (1, 1, 1, array.size) if array.ndim == 1 else array.shape  # legacy 4-D dims
                record.blobs.add(num=n, channels=c, height=h, width=w).data.extend(array.ravel().tolist())
    (folder / "v1.prototxt").write_text(text_format.MessageToString(net))
    (folder / "v1.caffemodel").write_bytes(weights.SerializeToString())
    return folder / "v1.prototxt", folder / "v1.caffemodel"


def test_v1_net_and_weights_are_upgraded(tmp_path) -> None:
    merged = merge_and_check(_v1_net(tmp_path), tmp_path)
    assert merged.removed == {"drop", "pow"}
    out = caffe_io.read_net_text(merged.merged[0])
    assert not out.net.layers and [layer.type for layer in out.net.layer] == ["Convolution", "ReLU", "Convolution"]
    records = {field.number for field in wire.iter_fields(memoryview(merged.merged[1].read_bytes()))}
    assert records == {1, 100}  # name and V2 `layer` records only


def test_fp16_raw_data_is_read_and_kept(tmp_path) -> None:
    b = NetBuilder("half", (1, 3, 8, 8), seed=6)
    b.scale(b.bn(b.conv("data", 4, name="c"), name="bn"), name="sc")
    b.save(tmp_path / "half.prototxt", tmp_path / "half.caffemodel", dtype=np.float16)
    stored = caffe_io.read_weights(tmp_path / "half.caffemodel").layers["c"]
    assert stored.blobs[0].dtype == np.float16
    merged = merge_and_check((tmp_path / "half.prototxt", tmp_path / "half.caffemodel"), tmp_path, "reference")
    assert caffe_io.read_weights(merged.merged[1]).layers["c"].blobs[0].dtype == np.float32  # folded: float32
    assert merged.removed == {"bn", "sc"}


def test_unknown_fields_survive_a_fold_elsewhere(tmp_path) -> None:
    b = NetBuilder("unknown", (1, 3, 8, 8), seed=1)
    x = b.relu(b.conv("data", 4, name="c1"))
    b.scale(b.bn(b.conv(x, 4, name="c2"), name="bn"), name="sc")
    prototxt, caffemodel = tmp_path / "u.prototxt", tmp_path / "u.caffemodel"
    b.save(prototxt, caffemodel)
    text = prototxt.read_text().replace('type: "ReLU"', 'type: "ReLU"\n  fork_only_param {\n    mode: 3\n  }  # ours')
    prototxt.write_text(f"# a comment the output keeps\n{text}")
    record = wire.encode_varint_field(9999, 42)  # an unknown field in every caffemodel layer record
    data = caffemodel.read_bytes()
    fields = list(wire.iter_fields(memoryview(data)))
    patched = b"".join(
        wire.encode_length_delimited(100, data[f.value_start : f.end] + record) + data[f.value_start : f.end] + record
        for f in fields
    )
    caffemodel.write_bytes(patched)
    merged = merge_and_check((prototxt, caffemodel), tmp_path, "reference")
    assert merged.removed == {"bn", "sc"}
    out_text = merged.merged[0].read_text()
    assert "fork_only_param {\n    mode: 3\n  }  # ours" in out_text and out_text.startswith("# a comment")
    out = memoryview(merged.merged[1].read_bytes())
    for layer in wire.iter_fields(out):
        assert 9999 in {f.number for f in wire.iter_fields(out, layer.value_start, layer.end)}


def test_layer_with_unknown_fields_is_never_changed(tmp_path) -> None:
    b = NetBuilder("frozen", (1, 3, 8, 8), seed=1)
    b.bn(b.conv("data", 4, name="c"), name="bn")
    prototxt, caffemodel = tmp_path / "f.prototxt", tmp_path / "f.caffemodel"
    b.save(prototxt, caffemodel)
    prototxt.write_text(prototxt.read_text().replace('type: "BatchNorm"', 'type: "BatchNorm"\n  fork_bn_field: 2'))
    result = merge(prototxt, caffemodel, tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
    assert result.plan.removed == set()
    assert "fork_bn_field: 2" in (tmp_path / "m.prototxt").read_text()


def test_caffe_proto_fork_fields_our_schema_does_not_name_keep_their_layer(tmp_path) -> None:
    """Read by name through the fork's schema, but of a meaning we do not know: the BatchNorm stays."""
    pytest.importorskip("grpc_tools")
    schema = (ROOT / "caffe_bn_merge" / "io" / "proto" / "caffe.proto").read_text()
    schema = schema.replace(
        "message BatchNormParameter {", "message BatchNormParameter {\n  optional int32 fork_mode = 900;", 1
    )
    (tmp_path / "caffe.proto").write_text(schema)
    b = NetBuilder("fork", (1, 3, 8, 8), seed=1)
    b.bn(b.conv("data", 4, name="c"), name="bn")
    prototxt, caffemodel = tmp_path / "f.prototxt", tmp_path / "f.caffemodel"
    b.save(prototxt, caffemodel)
    prototxt.write_text(
        prototxt.read_text().replace(
            'type: "BatchNorm"', 'type: "BatchNorm"\n  batch_norm_param {\n    fork_mode: 2\n  }'
        )
    )
    merged = merge_and_check(
        (prototxt, caffemodel), tmp_path, "reference", MergeOptions(caffe_proto=tmp_path / "caffe.proto")
    )
    assert merged.removed == set() and merged.kept == {"bn": "unknown_fields"}
    assert "fork_mode: 2" in (tmp_path / "merged.prototxt").read_text()


def test_train_val_folds_in_test_phase(real_nets, tmp_path) -> None:
    folder = real_nets / "cifar10_resnet20"
    result = merge(
        folder / "res20_cifar_train_test.prototxt",
        folder / "cifar10_res20_iter_64000.caffemodel",
        tmp_path / "m.prototxt",
        tmp_path / "m.caffemodel",
    )
    assert result.layers_after["BatchNorm"] == 0 and result.layers_after["Data"] == result.layers_before["Data"] == 2
    out = (tmp_path / "m.prototxt").read_text()
    assert out.count("phase: TRAIN") == (folder / "res20_cifar_train_test.prototxt").read_text().count("phase: TRAIN")


def _deploy_from_train_val(net: object, shape: tuple[int, ...]) -> object:
    """The TEST-phase net with its data layer as an Input layer and no loss/accuracy layers."""
    deploy = proto.NetParameter(name=net.name)
    for layer in net.layer:
        if not included(layer, inference_state(net)) or layer.type in ("Accuracy", "SoftmaxWithLoss"):
            continue
        if layer.type == "Data":
            deploy.layer.add(name=layer.name, type="Input", top=layer.top[:1]).input_param.shape.add(dim=shape)
            continue
        deploy.layer.add().CopyFrom(layer)
        del deploy.layer[-1].include[:]
    return deploy


def test_nvcaffe_train_val_scale_bias(real_nets, tmp_path) -> None:
    train_val = real_nets / "prototxt_only" / "nvcaffe_resnet50_train_val_scale_bias.prototxt"
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(
        text_format.MessageToString(_deploy_from_train_val(caffe_io.read_net(train_val), (1, 3, 224, 224)))
    )
    save_weights_for(deploy, tmp_path / "w.caffemodel")
    result = merge(train_val, tmp_path / "w.caffemodel", tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
    assert result.layers_before["BatchNorm"] > 50 and result.layers_after["BatchNorm"] == 0
    merged = merge_and_check((deploy, tmp_path / "w.caffemodel"), tmp_path)  # OpenCV reads scale_bias
    assert merged.layer_count("BatchNorm")[1] == 0


def test_solver_and_v0_files_are_refused_with_a_hint(tmp_path) -> None:
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "train_val.prototxt"\nbase_lr: 0.01\nmax_iter: 100\n')
    with pytest.raises(InputError, match=r"solver file.*train_val\.prototxt"):
        caffe_io.read_net(solver)
    v0 = tmp_path / "v0.prototxt"
    v0.write_text('name: "x"\nlayers {\n  layer {\n    name: "conv1"\n    type: "conv"\n  }\n}\n')
    with pytest.raises(InputError, match="V0"):
        caffe_io.read_net(v0)


def test_caffe_proto_that_does_not_compile_is_one_line(tmp_path, capfd) -> None:
    pytest.importorskip("grpc_tools")
    (tmp_path / "caffe.proto").write_text(
        'syntax = "proto2";\npackage caffe;\nmessage NetParameter { optional int32 = 1; }\n'
    )
    options = MergeOptions(caffe_proto=tmp_path / "caffe.proto")
    sample = ROOT / "sample_nets" / "no_bn"
    with pytest.raises(InputError, match=r"protoc cannot compile it: .*caffe\.proto:3:\d+: Expected field name"):
        merge(
            sample.with_suffix(".prototxt"),
            sample.with_suffix(".caffemodel"),
            tmp_path / "o.prototxt",
            tmp_path / "o.caffemodel",
            options,
        )
    assert capfd.readouterr().err == ""


def _fork_schema(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """Our caffe.proto with `edits` (old, new) applied: a fork numbering some fields its own way."""
    schema = (ROOT / "caffe_bn_merge" / "io" / "proto" / "caffe.proto").read_text()
    for old, new in edits:
        assert old in schema
        schema = schema.replace(old, new, 1)
    (tmp_path / "caffe.proto").write_text(schema)
    return tmp_path / "caffe.proto"


PSPNET_NUMBERS = (
    ("optional EmbedParameter embed_param = 137;", "optional EmbedParameter embed_param = 1999;"),
    ("optional BNParameter bn_param = 1137;", "optional BNParameter bn_param = 137;"),
)


@pytest.mark.parametrize("eps", [0.5, 1e-3, 2.0])
def test_caffe_proto_numbering_a_field_otherwise_is_read_by_name(eps: float, tmp_path) -> None:
    """PSPNet's caffe.proto numbers `bn_param` 137 (ours 1137): its eps must reach the fold."""
    pytest.importorskip("grpc_tools")
    options = MergeOptions(caffe_proto=_fork_schema(tmp_path, *PSPNET_NUMBERS))
    mean, var, gamma, beta = _stats()
    b = _conv_with_bn([_col(gamma), _col(beta), _col(mean), _col(var)], "BN", eps=eps)
    merged = merge_and_check(b, tmp_path, options=options, flavour="bvlc")
    assert merged.removed == {"bn"}
    assert "bn_param" not in (tmp_path / "merged.prototxt").read_text()


def test_caffe_proto_field_colliding_with_ours_keeps_its_layer(tmp_path) -> None:
    """A fork field we do not know, under a number that means something else to us, cannot be
    carried: its layer is kept exactly as written."""
    pytest.importorskip("grpc_tools")
    options = MergeOptions(
        caffe_proto=_fork_schema(
            tmp_path,
            ("optional EmbedParameter embed_param = 137;", "optional ForkParameter fork_param = 137;"),
            (
                "message BNParameter {",
                "message ForkParameter {\n  optional int32 mode = 1;\n}\n\nmessage BNParameter {",
            ),
        )
    )
    mean, var, *_ = _stats()
    b = _conv_with_bn([mean, var, np.ones(1)])
    prototxt, caffemodel = tmp_path / "f.prototxt", tmp_path / "f.caffemodel"
    b.save(prototxt, caffemodel)
    text = prototxt.read_text().replace('type: "BatchNorm"', 'type: "BatchNorm"\n  fork_param {\n    mode: 3\n  }')
    prototxt.write_text(text)
    merged = merge_and_check((prototxt, caffemodel), tmp_path, engine=None, options=options)
    assert merged.removed == set() and "fork_param {\n    mode: 3\n  }" in (tmp_path / "merged.prototxt").read_text()


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_caffe_proto_fork_dropout_that_scales_at_test_is_kept(ratio: float, tmp_path) -> None:
    pytest.importorskip("grpc_tools")
    fork = _fork_schema(
        tmp_path,
        ("message DropoutParameter {", "message DropoutParameter {\n  optional bool scale_train = 3 [default = true];"),
    )
    b = NetBuilder("fork", (1, 3, 8, 8), seed=2)
    top = b.conv("data", 4, name="c")
    b.layer("Dropout", "drop", [top], [top]).dropout_param.dropout_ratio = ratio
    prototxt, caffemodel = tmp_path / "f.prototxt", tmp_path / "f.caffemodel"
    b.save(prototxt, caffemodel)
    prototxt.write_text(
        prototxt.read_text().replace(f"dropout_ratio: {ratio}", f"dropout_ratio: {ratio}\n    scale_train: false")
    )
    assert "scale_train: false" in prototxt.read_text()
    result = merge(
        prototxt, caffemodel, tmp_path / "m.prototxt", tmp_path / "m.caffemodel", MergeOptions(caffe_proto=fork)
    )
    assert "drop" not in result.plan.removed
