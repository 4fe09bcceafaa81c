"""Quantization readiness: flags from nets built for it, and the int8 numbers against a direct numpy
computation written here."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from caffe_bn_merge import merge
from caffe_bn_merge.cli import main
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.maths.quant import SQNR_DROP_DB, input_factors, int8_error, output_rows, range_ratio, readiness
from caffe_bn_merge.synthetic.synth import NetBuilder

SEEDS = range(12)


def _int8_sqnr(w: np.ndarray, axis: int | None) -> tuple[float, float]:
    """Symmetric int8 (per tensor when `axis` is None, else one scale per row), computed directly:
    the median over the rows that are not all zero of each row's noise / signal power."""
    w = w.reshape(w.shape[0], -1).astype(np.float64)
    top = np.abs(w).max() if axis is None else np.abs(w).max(axis=1, keepdims=True)
    s = top / 127.0
    q = np.round(np.divide(w, s, out=np.zeros_like(w), where=s > 0)) * s
    power, noise = (w**2).sum(axis=1), ((w - q) ** 2).sum(axis=1)
    typical = np.median([n / p for n, p in zip(noise, power, strict=True) if p > 0])
    return -10 * np.log10(typical), np.sqrt(typical)


def _conv_bn(seed: int, channels: int = 16, depthwise: bool = False) -> tuple[NetBuilder, str, str]:
    b = NetBuilder(f"q{seed}", (1, channels if depthwise else 3, 8, 8), seed=seed)
    top = b.conv("data", channels, group=channels if depthwise else 1, name="conv")
    b.bn(top, name="bn")
    b.scale(top, name="scale")
    b.relu(top)
    return b, "bn", "scale"


def _readiness(builder: NetBuilder, folder: Path) -> tuple[object, tuple[Path, Path]]:
    model, weights = folder / "net.prototxt", folder / "net.caffemodel"
    builder.save(model, weights)
    out = (folder / "m.prototxt", folder / "m.caffemodel")
    result = merge(model, weights, *out)
    (host,) = result.hosts
    return readiness(host), out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("depthwise", [False, True])
def test_well_conditioned_batchnorm_is_not_flagged(tmp_path: Path, seed: int, depthwise: bool) -> None:
    b, _, _ = _conv_bn(seed, depthwise=depthwise)
    found, _ = _readiness(b, tmp_path)
    assert not found.flagged and found.advice() == ""
    assert found.sqnr_drop_db < SQNR_DROP_DB
    assert found.tiny_variance_channels == {} and found.constant_channels == {}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("depthwise", [False, True])
def test_one_tiny_variance_channel_is_flagged(tmp_path: Path, seed: int, depthwise: bool) -> None:
    b, bn, _ = _conv_bn(seed, depthwise=depthwise)
    channel = seed % 16
    b.blobs[bn][1][channel] = 0.0  # var = 0: the channel is scaled by 1/sqrt(eps)
    found, _ = _readiness(b, tmp_path)
    assert found.flagged and found.sqnr_drop_db > SQNR_DROP_DB
    assert found.tiny_variance_channels == {"bn": (channel,)}
    assert found.ranges_after.argmax() == channel and found.ratio_after > 10 * found.ratio_before
    assert "per channel" in found.advice() and "keep bn + scale unfolded" in found.advice()


@pytest.mark.parametrize("seed", SEEDS)
def test_gamma_zero_channels_are_listed(tmp_path: Path, seed: int) -> None:
    b, _, scale = _conv_bn(seed)
    zeros = sorted(np.random.default_rng(seed).choice(16, size=1 + seed % 4, replace=False).tolist())
    b.blobs[scale][0][zeros] = 0.0
    found, _ = _readiness(b, tmp_path)
    assert found.constant_channels == {"bn + scale": tuple(zeros)}
    assert np.all(found.ranges_after[zeros] == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_int8_numbers_match_a_direct_computation(tmp_path: Path, seed: int) -> None:
    b, bn, _ = _conv_bn(seed)
    if seed % 2:
        b.blobs[bn][1][seed % 16] = 1e-9
    original = np.asarray(b.blobs["conv"][0], np.float32)
    found, (_, merged_weights) = _readiness(b, tmp_path)
    folded = np.asarray(caffe_io.read_weights(merged_weights).layers["conv"].blobs[0])
    for got, (w, axis) in (
        (found.tensor_before, (original, None)),
        (found.tensor_after, (folded, None)),
        (found.channel_after, (folded, 1)),
    ):
        sqnr, rms = _int8_sqnr(w, axis)
        assert got.sqnr_db == pytest.approx(sqnr, rel=1e-9)
        assert got.relative_rms == pytest.approx(rms, rel=1e-9)
    ranges = np.abs(folded.reshape(16, -1).astype(np.float64)).max(axis=1)
    assert found.ratio_after == pytest.approx(ranges.max() / np.median(ranges), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_int8_error_of_arrays(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 1, (1 + seed, 5 + seed)) * rng.lognormal(0, 2, (1 + seed, 1))
    for per_channel, axis in ((False, None), (True, 1)):
        sqnr, rms = _int8_sqnr(rows, axis)
        got = int8_error(rows, per_channel)
        assert got.sqnr_db == pytest.approx(sqnr, rel=1e-12) and got.relative_rms == pytest.approx(rms, rel=1e-12)


def test_degenerate_tensors() -> None:
    assert int8_error(np.zeros((3, 4)), False).sqnr_db == math.inf
    assert int8_error(np.full((2, 2), 0.5), True).relative_rms == 0.0
    assert range_ratio(np.zeros(4)) == 1.0 and range_ratio(np.array([0.0, 0.0, 2.0])) == math.inf


def test_backward_fold_advises_keeping_it(tmp_path: Path) -> None:
    """A BatchNorm folded into the layer reading it scales input columns: the advice names --no-backward."""
    b = NetBuilder("back", (1, 8, 6, 6), seed=3)
    top = b.pool("data", kernel=1, stride=1, name="pool")
    b.bn(top, name="bn")
    b.scale(top, name="scale")
    b.conv(top, 8, kernel=1, pad=0, name="conv")
    b.blobs["bn"][1][2] = 0.0
    found, _ = _readiness(b, tmp_path)
    assert found.backward and found.flagged and found.tiny_variance_channels == {"bn": (2,)}
    assert "--no-backward" in found.advice()


def test_command_line_shows_flagged_layers_and_advice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    b, bn, scale = _conv_bn(7)
    b.blobs[bn][1][5] = 0.0
    b.blobs[scale][0][[1, 9]] = 0.0
    model, weights = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    b.save(model, weights)
    assert main(["--model", str(model), "--weights", str(weights), "--dry-run", "--quant"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("int8 readiness: 1 of 1 folded layers flagged") :]
    notes = [line for line in section.splitlines() if line.startswith("conv:")]  # piped: never broken
    assert max(len(line) for line in section.splitlines() if line not in notes) <= 80
    row = re.search(r"│ conv +│ ([^│]+)│ ([^│]+)│ ([^│]+)│ ([^│]+)│", section)
    assert row and re.fullmatch(r"[\d.]+ -> \d{3}", row[1].strip()) and row[4].strip().startswith("FLAGGED")
    assert all(word in section for word in ("2 constant", "1 tiny-var"))
    assert "conv: folding costs per-tensor int8" in section and "per channel" in section
    assert main(["--model", str(model), "--weights", str(weights), "--dry-run", "--quant", "-v"]) == 0
    out = capsys.readouterr().out
    assert "conv: constant channels of bn + scale (gamma == 0, prunable): [1, 9]" in out
    assert "conv: tiny var + eps channels of bn: [5]" in out


def _layouts(seed: int) -> NetBuilder:
    """Hosts of every layout, forward and backward folds: conv (grouped), deconv (grouped), ip,
    ip with transpose, a BatchNorm folded backward into an InnerProduct and into a 1x1 conv."""
    rng = np.random.default_rng(seed)
    b = NetBuilder(f"layouts{seed}", (1, 4, 6, 6), seed=seed)
    x = b.conv("data", 6, group=2, name="conv")
    b.scale(b.bn(x, name="bn_conv"), name="sc_conv")
    x = b.conv(x, 4, kernel=2, stride=2, pad=0, group=2, deconv=True, name="deconv")
    b.bn(x, name="bn_deconv")
    x = b.pool(x, kernel=1, stride=1, name="pool")
    x = b.conv(b.bn(x, name="bn_back_conv"), 4, kernel=1, pad=0, name="conv1x1")
    x = b.pool(x, kernel=1, stride=1, name="pool2")
    x = b.ip(b.bn(x, name="bn_back_ip"), 7, transpose=bool(seed % 2), name="fc")
    b.bn(x, name="bn_fc")
    for name, blobs in b.blobs.items():
        if name.startswith("bn_"):
            blobs[1][rng.integers(blobs[1].size)] *= 1e-7  # a tiny variance somewhere in every layer
    return b


@pytest.mark.parametrize("seed", SEEDS)
def test_fold_factors_map_stored_to_folded_weights(tmp_path: Path, seed: int) -> None:
    """For every layout, original weights times the forward chains' scales (rows) and `input_factors`
    (columns) are the folded weights (to float32 rounding), and every tiny-variance channel is found."""
    model, weights = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    _layouts(seed).save(model, weights)
    result = merge(model, weights, write=False)
    assert {h.name for h in result.hosts} == {"conv", "deconv", "conv1x1", "fc"}
    for host in result.hosts:
        before = output_rows(host.original, host.layout, host.groups, host.c_out)
        after = output_rows(host.folded.blobs[0], host.layout, host.groups, host.c_out)
        rows = np.prod([np.ones(host.c_out)] + [c.scale for c in host.chains if c.rule == "forward"], axis=0)
        columns = input_factors(host)
        assert (columns is None) == (host.name in ("conv", "deconv"))
        folded = before * rows[:, None] * (1 if columns is None else columns)
        np.testing.assert_allclose(folded, after, rtol=1e-6, atol=0)
        found = readiness(host)
        norms = [bn for chain in host.chains for bn in chain.variance_eps]
        assert {bn: len(c) for bn, c in found.tiny_variance_channels.items()} == dict.fromkeys(norms, 1)
        assert found.backward == (host.name in ("conv1x1", "fc"))


def test_real_mobilenet_ssd_depthwise_layers_are_flagged(real_nets: Path) -> None:
    """The real MobileNet-SSD 0.5's first depthwise BatchNorms have near-zero variances (dead
    channels): folding them ruins per-tensor int8, per-channel int8 recovers it."""
    folder = real_nets / "mobilenet_ssd_0.5_hx"
    result = merge(folder / "MobileNetSSD_deploy_bn.DERIVED.prototxt", folder / "mobilenet_0.5.caffemodel", write=False)
    found = {h.host: h for h in map(readiness, result.hosts)}
    flagged = sorted(name for name, h in found.items() if h.flagged)
    assert flagged == ["conv1/dw", "conv2/dw", "conv3/dw"]
    for name in flagged:
        h = found[name]
        assert h.tiny_variance_channels and h.sqnr_drop_db > 20
        assert h.channel_after.sqnr_db > h.tensor_before.sqnr_db
