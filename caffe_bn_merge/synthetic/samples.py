"""The bundled sample nets, built with `synth.NetBuilder` (deterministic: same bytes every run).

- mobilenet_ssd: MobileNet-SSD (width 0.25, 300x300, 21 classes), in-place BN+Scale, depthwise
  convolutions, the SSD fork's PriorBox / Permute / DetectionOutput layers;
- resnet_mini: residual blocks (conv -> BN -> Scale -> ReLU, Eltwise shortcuts), 1x1 projections,
  a final InnerProduct -> BatchNorm -> Scale;
- deconv_seg: an encoder-decoder with grouped Deconvolution + BatchNorm, not-in-place BN, eps 1e-3;
- no_bn: a control net without BatchNorm, which must come out unchanged.

`sample_nets/make_sample_nets.py` writes them; `fleet` builds MobileNet-SSD fleets from the same code.
"""

from pathlib import Path

from .synth import NetBuilder

SSD_CLASSES = 21


def conv_bn(b: NetBuilder, bottom: str, name: str, out: int, kernel: int = 3, stride: int = 1, group: int = 1) -> str:
    """Convolution without bias -> in-place BatchNorm -> Scale -> ReLU, MobileNet style."""
    top = b.conv(bottom, out, kernel, stride, group=group, bias=False, name=name)
    b.bn(top, name=f"{name}/bn")
    b.scale(top, name=f"{name}/scale")
    b.unary("ReLU", top, name=f"{name}/relu")
    return top


def ssd_head(
    b: NetBuilder, source: str, priors: int, min_size: float, max_size: float | None, classes: int
) -> tuple[str, str, str]:
    """loc / conf convolutions and a PriorBox on one feature map; returns the three flattened blobs."""
    outputs = []
    for kind, per_prior in (("loc", 4), ("conf", classes)):
        conv = b.conv(source, priors * per_prior, kernel=1, name=f"{source}_mbox_{kind}")
        n, c, h, w = b.shapes[conv]
        perm = b.layer("Permute", f"{conv}_perm", [conv], [f"{conv}_perm"], (n, h, w, c))
        perm.permute_param.order.extend([0, 2, 3, 1])
        flat = b.layer("Flatten", f"{conv}_flat", [f"{conv}_perm"], [f"{conv}_flat"], (n, c * h * w))
        flat.flatten_param.axis = 1
        outputs.append(f"{conv}_flat")
    n, c, h, w = b.shapes[source]
    prior = b.layer(
        "PriorBox", f"{source}_mbox_priorbox", [source, "data"], [f"{source}_mbox_priorbox"], (1, 2, h * w * priors * 4)
    )
    p = prior.prior_box_param
    p.min_size.append(min_size)
    if max_size:
        p.max_size.append(max_size)
    p.aspect_ratio.extend([2.0] if priors == 3 else [2.0, 3.0])
    p.flip, p.clip, p.offset = True, False, 0.5
    p.variance.extend([0.1, 0.1, 0.2, 0.2])
    return outputs[0], outputs[1], f"{source}_mbox_priorbox"


def mobilenet_ssd(width: float = 0.25, classes: int = SSD_CLASSES) -> NetBuilder:
    """MobileNet-SSD as in the popular Caffe deploy, channels scaled by `width`."""
    b = NetBuilder("MobileNet-SSD", (1, 3, 300, 300), seed=300)
    ch = lambda c: max(8, int(c * width))  # noqa: E731
    x = conv_bn(b, "data", "conv0", ch(32), stride=2)
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for i, (out, stride) in enumerate(plan, start=1):
        x = conv_bn(b, x, f"conv{i}/dw", b.shapes[x][1], stride=stride, group=b.shapes[x][1])
        x = conv_bn(b, x, f"conv{i}", ch(out), kernel=1)
        if i == 11:
            sources = [x]
    sources.append(x)
    for i, (mid, out) in enumerate([(256, 512), (128, 256), (128, 256), (64, 128)], start=14):
        x = conv_bn(b, x, f"conv{i}_1", ch(mid), kernel=1)
        x = conv_bn(b, x, f"conv{i}_2", ch(out), stride=2)
        sources.append(x)
    sizes = [60.0, 105.0, 150.0, 195.0, 240.0, 285.0, 300.0]
    heads = [
        ssd_head(b, s, 3 if i == 0 else 6, sizes[i], None if i == 0 else sizes[i + 1], classes)
        for i, s in enumerate(sources)
    ]
    for k, name in enumerate(("mbox_loc", "mbox_conf", "mbox_priorbox")):
        b.concat([h[k] for h in heads], name=name, axis=2 if k == 2 else 1)
    n, total = b.shapes["mbox_conf"]
    reshape = b.layer(
        "Reshape", "mbox_conf_reshape", ["mbox_conf"], ["mbox_conf_reshape"], (n, total // classes, classes)
    )
    reshape.reshape_param.shape.dim.extend([0, -1, classes])
    b.layer("Softmax", "mbox_conf_softmax", ["mbox_conf_reshape"], ["mbox_conf_softmax"]).softmax_param.axis = 2
    b.layer(
        "Flatten", "mbox_conf_flatten", ["mbox_conf_softmax"], ["mbox_conf_flatten"], (n, total)
    ).flatten_param.axis = 1
    det = b.layer(
        "DetectionOutput",
        "detection_out",
        ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"],
        ["detection_out"],
        (1, 1, 100, 7),
    )
    d = det.detection_output_param
    d.num_classes, d.share_location, d.background_label_id = classes, True, 0
    d.nms_param.nms_threshold, d.nms_param.top_k = 0.45, 100
    d.code_type = 2  # PriorBoxParameter.CodeType CENTER_SIZE
    d.keep_top_k, d.confidence_threshold = 100, 0.25
    return b


def resnet_mini() -> NetBuilder:
    """A small ResNet: conv-BN-Scale-ReLU blocks with shortcuts, and an InnerProduct -> BN -> Scale head."""
    b = NetBuilder("resnet_mini", (1, 3, 32, 32), seed=20)
    x = conv_bn(b, "data", "conv1", 16)
    for stage, (out, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=2):
        name = f"res{stage}"
        y = conv_bn(b, x, f"{name}a", out, stride=stride)
        y = b.conv(y, out, name=f"{name}b", bias=False)
        b.bn(y, name=f"{name}b/bn")
        b.scale(y, name=f"{name}b/scale")
        if stride != 1 or b.shapes[x][1] != out:
            x = b.conv(x, out, kernel=1, stride=stride, bias=False, name=f"{name}_proj")
            b.bn(x, name=f"{name}_proj/bn")
            b.scale(x, name=f"{name}_proj/scale")
        x = b.eltwise([x, y], name=name)
        b.unary("ReLU", x, name=f"{name}/relu")
    x = b.pool(x, global_pool=True, method="AVE", name="pool")
    x = b.ip(x, 10, name="fc")
    b.bn(x, name="fc/bn", top="fc_bn")
    b.scale("fc_bn", name="fc/scale", top="logits")
    b.unary("Softmax", "logits", top="prob", name="prob")
    return b


def deconv_seg() -> NetBuilder:
    """Encoder-decoder: grouped Deconvolution + BatchNorm (not in place, eps 1e-3) + Scale."""
    b = NetBuilder("deconv_seg", (1, 3, 32, 32), seed=7)
    x = conv_bn(b, "data", "enc1", 16, stride=2)
    x = conv_bn(b, x, "enc2", 32, stride=2)
    for i, group in enumerate((2, 4), start=1):
        y = b.conv(x, b.shapes[x][1] // 2, kernel=4, stride=2, pad=1, group=group, deconv=True, name=f"up{i}")
        y = b.bn(y, top=f"up{i}_bn", name=f"up{i}/bn", eps=1e-3)
        y = b.scale(y, top=f"up{i}_scale", name=f"up{i}/scale")
        x = b.relu(y, top=f"up{i}_relu")
    b.conv(x, 5, kernel=1, name="score")
    return b


def no_bn() -> NetBuilder:
    """Control: convolutions, ReLU and pooling only."""
    b = NetBuilder("no_bn", (1, 3, 32, 32), seed=1)
    x = b.relu(b.conv("data", 16, name="conv1"))
    x = b.pool(x, name="pool1")
    x = b.relu(b.conv(x, 32, name="conv2"))
    b.ip(b.pool(x, name="pool2"), 10, name="fc")
    return b


SAMPLES = {"mobilenet_ssd": mobilenet_ssd, "resnet_mini": resnet_mini, "deconv_seg": deconv_seg, "no_bn": no_bn}


def write_samples(outdir: Path) -> list[Path]:
    """Write every sample as `<name>.prototxt` + `<name>.caffemodel` in `outdir`."""
    outdir.mkdir(parents=True, exist_ok=True)
    for name, make in SAMPLES.items():
        make().save(outdir / f"{name}.prototxt", outdir / f"{name}.caffemodel")
    return [outdir / name for name in SAMPLES]
