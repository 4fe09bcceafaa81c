"""--benchmark: the interleaving and statistics, and the command line on the sample SSD (no timing
assertions: only that times, a ratio and its spread are shown and reported)."""

import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import ROOT
from harness import copy_sample

from caffe_bn_merge.cli import main
from caffe_bn_merge.report import report_schema
from caffe_bn_merge.verification.benchmark import BenchmarkResult, Spread, interleave

SSD = ROOT / "sample_nets" / "mobilenet_ssd"


@pytest.mark.parametrize("rounds", [1, 2, 5, 8])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_rounds_interleave_after_warmup(rounds: int, warmup: int) -> None:
    calls: list[str] = []
    times = interleave((lambda: calls.append("o"), lambda: calls.append("m")), rounds, warmup)
    assert [len(t) for t in times] == [rounds, rounds]
    assert calls[: 2 * warmup] == ["o", "m"] * warmup
    timed = calls[2 * warmup :]
    assert timed == [c for r in range(rounds) for c in (("o", "m") if r % 2 == 0 else ("m", "o"))]


@pytest.mark.parametrize("seed", range(10))
def test_spread_and_ratio_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    original = rng.lognormal(-4, 0.3, 3 + seed)
    merged = original * rng.uniform(0.6, 1.2, original.size)
    result = BenchmarkResult("opencv", 1, 0, tuple(original), tuple(merged))
    ratios = merged / original
    want = Spread(*(float(np.percentile(ratios, q)) for q in (50, 25, 75)), ratios.min(), ratios.max())
    for got, expected in zip(vars(result.ratio).values(), vars(want).values(), strict=True):
        assert got == pytest.approx(expected, rel=1e-12)
    assert result.times("merged").median == pytest.approx(np.median(merged), rel=1e-12)
    assert result.rounds == original.size


def _copy_ssd(folder: Path) -> tuple[Path, Path]:
    model, weights = folder / "ssd.prototxt", folder / "ssd.caffemodel"
    shutil.copyfile(SSD.with_suffix(".prototxt"), model)
    shutil.copyfile(SSD.with_suffix(".caffemodel"), weights)
    return model, weights


def _run_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture, backend: str) -> dict:
    model, weights = _copy_ssd(tmp_path)
    report = tmp_path / "report.json"
    argv = ["--model", str(model), "--weights", str(weights), "--benchmark", "4", "--threads", "1"]
    assert main([*argv, "--backend", backend, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"speed on {backend} \(1 thread\(s\), 4 rounds", out)
    row = re.search(r"merged / original\s*│\s*(\d\.\d{3})\s*│\s*(\d\.\d{3}) - (\d\.\d{3})", out)
    assert row, out
    median, q1, q3 = map(float, row.groups())
    assert 0 < q1 <= median <= q3
    data = json.loads(report.read_text())
    jsonschema.validate(data, report_schema())
    bench = data["benchmark"]
    assert bench["backend"] == backend and bench["rounds"] == 4 and bench["threads"] == 1
    assert bench["ratio"]["median"] == pytest.approx(median, abs=5e-4)
    for which in ("original_seconds", "merged_seconds"):
        spread = bench[which]
        assert 0 < spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"]
    return data


def test_benchmark_on_opencv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _run_benchmark(tmp_path, capsys, "opencv")
    assert data["quantization"] is None


def test_benchmark_on_pycaffe(tmp_path: Path, capsys: pytest.CaptureFixture, pycaffe: Path) -> None:
    _run_benchmark(tmp_path, capsys, "caffe")


def test_benchmark_and_quant_need_nothing_written_in_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, weights = _copy_ssd(tmp_path)
    report = tmp_path / "report.json"
    argv = ["--model", str(model), "--weights", str(weights), "--dry-run", "--benchmark", "--quant"]
    assert main([*argv, "--report", str(report)]) == 0
    captured = capsys.readouterr()
    assert "nothing timed in a --dry-run" in captured.err
    assert "int8 readiness: 0 of 35 folded layers flagged" in captured.out
    data = json.loads(report.read_text())
    jsonschema.validate(data, report_schema())
    assert data["benchmark"] is None and len(data["quantization"]["hosts"]) == 35
    section = captured.out[captured.out.index("int8 readiness") :]
    assert max(len(line) for line in section.splitlines()) <= 80


@pytest.mark.parametrize("bad", ["0", "-2", "x"])
def test_benchmark_rounds_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture, bad: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--weights", "w", "--benchmark", bad])
    assert exit_info.value.code == 2
    assert "positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["opencv", "caffe"])
def test_benchmark_on_a_real_net(backend: str, real_nets: Path, tmp_path: Path, capsys, request) -> None:
    if backend == "caffe":
        request.getfixturevalue("pycaffe")
    folder = real_nets / "mobilenet_ssd_0.5_hx"
    model, weights = folder / "MobileNetSSD_deploy_bn.DERIVED.prototxt", folder / "mobilenet_0.5.caffemodel"
    out = ["--output-model", str(tmp_path / "m.prototxt"), "--output-weights", str(tmp_path / "m.caffemodel")]
    argv = ["--model", str(model), "--weights", str(weights), *out, "--benchmark", "2", "--backend", backend]
    assert main(argv) == 0
    assert re.search(r"merged / original\s*│\s*\d\.\d{3}\s*│\s*\d\.\d{3} - \d\.\d{3}", capsys.readouterr().out)


@pytest.mark.parametrize("extra", [[], ["--verify"], ["--dry-run"]], ids=["alone", "with --verify", "dry run"])
def test_benchmark_on_an_engine_that_cannot_time_is_a_usage_error(tmp_path: Path, capsys, extra) -> None:
    """--backend reference verifies but does not time: one line, exit 2, nothing written (it was
    an internal error, KeyError 'reference')."""
    model, weights = copy_sample(tmp_path)
    code = main(["--model", str(model), "--weights", str(weights), "--benchmark", "2", "--backend", "reference",
                 *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--benchmark times on caffe or opencv, not on --backend reference" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.caffemodel", "net.prototxt"]


@pytest.mark.parametrize("verify", [[], ["--verify"]], ids=["alone", "with --verify"])
def test_a_net_no_engine_can_time_is_still_written(tmp_path: Path, capsys, monkeypatch, verify) -> None:
    """Only the reference engine runs this net (no pycaffe; OpenCV has no Upsample): --verify passes
    on it, --benchmark times nothing and says so; the merged pair is written, exit 0 (it was exit 3,
    nothing written)."""
    from caffe_bn_merge.synthetic.synth import NetBuilder
    from caffe_bn_merge.verification.pycaffe import ENV_PYTHON

    monkeypatch.setenv(ENV_PYTHON, str(tmp_path / "no-such-python"))
    b = NetBuilder("up", (1, 3, 8, 8), seed=3)
    top = b.conv("data", 4, name="conv1")
    b.bn(top, name="bn1")
    b.scale(top, name="scale1")
    model, weights, report = tmp_path / "net.prototxt", tmp_path / "net.caffemodel", tmp_path / "r.json"
    b.save(model, weights)
    upsample = 'layer { name: "up" type: "Upsample" bottom: "conv1" top: "up" upsample_param { scale: 2 } }\n'
    model.write_text(model.read_text() + upsample)
    code = main(["--model", str(model), "--weights", str(weights), "--benchmark", "2", "--report", str(report),
                 "-q", *verify])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["benchmark"] is None and any(w.startswith("--benchmark: nothing timed") for w in data["warnings"])
    assert (data["verify"] or {"backend": "reference"})["backend"] == "reference"
    assert (tmp_path / "net_merged.prototxt").is_file() and (tmp_path / "net_merged.caffemodel").is_file()
