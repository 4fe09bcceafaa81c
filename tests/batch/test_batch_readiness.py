"""`merge-bn batch --quant --benchmark`: a summary of each per deployment, and fleet totals."""

import json
from pathlib import Path

import pytest

from caffe_bn_merge.batch import command
from caffe_bn_merge.synthetic.synth import NetBuilder


def _deployment(folder: Path, seed: int, tiny: bool) -> None:
    b = NetBuilder(f"d{seed}", (1, 3, 8, 8), seed=seed)
    top = b.conv("data", 8, name="conv1")
    b.bn(top, name="bn1")
    b.scale(top, name="scale1")
    b.relu(top)
    top = b.conv(top, 8, name="conv2")
    b.bn(top, name="bn2")
    if tiny:
        b.blobs["bn2"][1][seed % 8] = 0.0
    folder.mkdir(parents=True)
    b.save(folder / "deploy.prototxt", folder / "deploy.caffemodel")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batch_summaries_and_fleet_totals(tmp_path: Path, capsys: pytest.CaptureFixture, jobs: str) -> None:
    flagged = {"a": False, "b": True, "c": True, "d": False}
    for i, (name, tiny) in enumerate(flagged.items()):
        _deployment(tmp_path / "src" / name, i, tiny)
    report = tmp_path / "batch.json"
    argv = [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--jobs", jobs, "--report", str(report)]
    assert command.main([*argv, "--quant", "--benchmark", "2", "--threads", "1"]) == 0
    data = json.loads(report.read_text())
    rows = {Path(d["key"]).parts[0]: d for d in data["deployments"]}
    for name, tiny in flagged.items():
        quant, bench = rows[name]["quant"], rows[name]["benchmark"]
        assert quant["hosts"] == 2 and quant["flagged"] == (["conv2"] if tiny else [])
        assert quant["tiny_variance_channels"] == int(tiny) and quant["constant_channels"] == 0
        assert bench["rounds"] == 2 and bench["ratio"] > 0 and bench["ratio_iqr"][0] <= bench["ratio_iqr"][1]
    assert data["totals"]["quant"] == {"deployments": 4, "deployments_flagged": 2, "flagged_layers": 2}
    assert data["totals"]["benchmark"]["deployments"] == 4
    assert data["quant"] is True and data["benchmark"] == 2
    err = capsys.readouterr().err
    assert "int8 readiness: 2 of 4 deployments have flagged layers (2 layers" in " ".join(err.split())
    assert "speed: merged / original forward time" in err


def test_without_the_flags_nothing_is_measured(tmp_path: Path) -> None:
    _deployment(tmp_path / "src" / "a", 0, True)
    report = tmp_path / "batch.json"
    assert command.main([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["totals"] == {"quant": None, "benchmark": None}
    assert data["deployments"][0]["quant"] is None and data["deployments"][0]["benchmark"] is None


@pytest.mark.parametrize("extra", [[], ["--quant"]], ids=["benchmark", "benchmark and quant"])
def test_a_net_opencv_cannot_time_is_converted_with_a_note(tmp_path: Path, extra: list[str]) -> None:
    """--benchmark runs after the pair is published: a net OpenCV cannot load is converted, with a
    warning saying nothing was timed, not reported failed (nor 'not written') with its outputs there."""
    _deployment(tmp_path / "src" / "a", 0, False)
    model = tmp_path / "src" / "a" / "deploy.prototxt"
    model.write_text(model.read_text() + 'layer { name: "up" type: "Upsample" bottom: "conv2" top: "up" }\n')
    report, out = tmp_path / "batch.json", tmp_path / "out"
    argv = [str(tmp_path / "src"), "--out", str(out), "--jobs", "1", "--report", str(report), "-q"]
    assert command.main([*argv, "--benchmark", "2", *extra]) == 0
    row = json.loads(report.read_text())["deployments"][0]
    assert row["status"] == "converted" and row["benchmark"] is None
    assert any(w.startswith("--benchmark: nothing timed") and "Upsample" in w for w in row["warnings"])
    assert sorted(p.name for p in (out / "a").iterdir()) == ["deploy.caffemodel", "deploy.prototxt"]
