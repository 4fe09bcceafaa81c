"""--verify, the decision log, the JSON report and --dry-run, through the command line."""

import json
import math
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import ROOT
from harness import REAL_NETS as REAL
from hypothesis import given, settings
from hypothesis import strategies as st

from caffe_bn_merge.cli import main
from caffe_bn_merge.report import report_schema
from caffe_bn_merge.rules import rewrite
from caffe_bn_merge.verification import compare
from caffe_bn_merge.verification.compare import BlobError, VerifyResult

SAMPLES = ROOT / "sample_nets"


def _args(model: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--weights", str(weights), "--output-model", str(out / "m.prototxt"),
            "--output-weights", str(out / "m.caffemodel"), "--force", *extra]  # fmt: skip


@pytest.mark.parametrize("name", ["mobilenet_ssd", "resnet_mini", "deconv_seg", "no_bn"])
def test_verify_sample_nets(name: str, tmp_path, capsys) -> None:
    model, weights = SAMPLES / f"{name}.prototxt", SAMPLES / f"{name}.caffemodel"
    assert main(_args(model, weights, tmp_path, "--verify", "--backend", "opencv")) == 0
    out = capsys.readouterr().out
    assert "verify on opencv: passed" in out
    wrote = f"wrote {tmp_path / 'm.prototxt'} and {tmp_path / 'm.caffemodel'}"
    assert wrote in out.splitlines()  # piped: the paths are never broken, however long
    assert max(len(line) for line in out.splitlines() if line != wrote) <= 100


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("backend", ["opencv", "caffe", "reference"])
def test_verify_real_nets(name: str, backend: str, real_nets, tmp_path, capsys, request) -> None:
    if backend == "caffe":
        request.getfixturevalue("pycaffe")
    model, weights = (real_nets / path for path in REAL[name][:2])
    report = tmp_path / "r.json"
    assert main(_args(model, weights, tmp_path, "--verify", "--backend", backend, "--report", str(report))) == 0
    assert f"verify on {backend}: passed" in capsys.readouterr().out
    if backend == "reference":  # float64 end to end: only our float32 rounding of folded weights is left
        assert json.loads(report.read_text())["verify"]["max_relative_error"] < 1e-5


def test_ssd_verify_reports_detection_output_as_information(tmp_path, capsys) -> None:
    model, weights = SAMPLES / "mobilenet_ssd.prototxt", SAMPLES / "mobilenet_ssd.caffemodel"
    report = tmp_path / "r.json"
    assert main(_args(model, weights, tmp_path, "--verify", "--backend", "opencv", "--report", str(report))) == 0
    blobs = {b["blob"].split(" ")[0]: b["gating"] for b in json.loads(report.read_text())["verify"]["blobs"]}
    assert blobs == {"mbox_loc": True, "mbox_conf_reshape": True, "mbox_priorbox": True, "detection_out": False}


def test_corrupted_merge_fails_verify_with_exit_3(tmp_path, capsys, monkeypatch) -> None:
    original = rewrite.fold_forward_lazy

    def corrupted(*args, **kwargs):
        weights, bias = original(*args, **kwargs)
        return np.asarray(weights) * 1.01, bias

    monkeypatch.setattr(rewrite, "fold_forward_lazy", corrupted)
    model, weights = SAMPLES / "resnet_mini.prototxt", SAMPLES / "resnet_mini.caffemodel"
    assert main(_args(model, weights, tmp_path, "--verify", "--backend", "opencv")) == 3
    assert "FAILED" in capsys.readouterr().out


def test_report_follows_its_schema_and_logs_every_layer(tmp_path) -> None:
    model, weights = SAMPLES / "deconv_seg.prototxt", SAMPLES / "deconv_seg.caffemodel"
    report = tmp_path / "report.json"
    assert main(_args(model, weights, tmp_path, "--verify", "--backend", "opencv", "--report", str(report), "-q")) == 0
    data = json.loads(report.read_text())
    jsonschema.validate(data, report_schema())
    decided = {d["layer"]: d["action"] for d in data["decisions"]}
    assert decided["up1/bn"] == "folded" and len(decided) == 8
    assert data["verify"]["passed"] and data["layers"]["after"].get("BatchNorm", 0) == 0


def test_report_lists_kept_layers_with_reasons(tmp_path) -> None:
    report = tmp_path / "r.json"
    model, weights = SAMPLES / "resnet_mini.prototxt", SAMPLES / "resnet_mini.caffemodel"
    assert main(_args(model, weights, tmp_path, "--dry-run", "--keep-standalone", "--report", str(report), "-q")) == 0
    data = json.loads(report.read_text())
    jsonschema.validate(data, report_schema())
    assert data["outputs"] is None


def test_dry_run_writes_nothing(tmp_path, capsys) -> None:
    model, weights = tmp_path / "n.prototxt", tmp_path / "n.caffemodel"
    shutil.copy(SAMPLES / "resnet_mini.prototxt", model)
    shutil.copy(SAMPLES / "resnet_mini.caffemodel", weights)
    assert main(["--model", str(model), "--weights", str(weights), "--dry-run"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.caffemodel", "n.prototxt"]
    assert "decisions" in capsys.readouterr().out


def test_verify_with_npy_and_image_inputs(real_nets, tmp_path, capsys) -> None:
    folder = real_nets / "yoloface50k"
    model, weights = folder / "yoloface-50k.prototxt", folder / "yoloface-50k.caffemodel"
    assert (
        main(_args(model, weights, tmp_path, "--verify", "--backend", "opencv", "--input", str(folder / "test.jpeg")))
        == 0
    )
    assert f"verify inputs: {folder / 'test.jpeg'}" in capsys.readouterr().out.splitlines()  # never broken
    array = tmp_path / "x.npy"
    np.save(array, np.random.default_rng(1).uniform(0, 1, (1, 3, 56, 56)).astype(np.float32))
    assert main(_args(model, weights, tmp_path, "--verify", "--backend", "opencv", "--input", f"data={array}")) == 0
    assert main(_args(model, weights, tmp_path, "--verify", "--backend", "opencv", "--input", f"nope={array}")) == 2


def test_readme_library_example_runs_twice(tmp_path, monkeypatch) -> None:
    """As a user pasting it, then running it again over the outputs of the first run."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("### As a library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    shutil.copy(SAMPLES / "resnet_mini.prototxt", tmp_path / "deploy.prototxt")
    shutil.copy(SAMPLES / "resnet_mini.caffemodel", tmp_path / "model.caffemodel")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        exec(compile(code, "README.md", "exec"), {})
        assert (tmp_path / "deploy_merged.prototxt").is_file() and (tmp_path / "classic.caffemodel").is_file()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e-5), min_size=1, max_size=6), st.data())
def test_a_nan_in_any_gating_blob_fails_verification(errors: list[float], data) -> None:
    """Any non-finite difference fails, wherever its blob comes (Python's max skipped a NaN that was
    not first)."""
    at = data.draw(st.integers(0, len(errors)))
    values = [*errors[:at], float("nan"), *errors[at:]]
    result = VerifyResult("reference", 1e-4, "", tuple(BlobError(f"b{i}", v, 1.0) for i, v in enumerate(values)))
    assert not result.passed and math.isnan(result.max_relative)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_nan_in_the_merged_outputs_is_exit_3_naming_its_blob(which: int, tmp_path, capsys, monkeypatch) -> None:
    """End to end: any of the SSD's three gating blobs turned NaN in the merged model is rejected,
    and the one line names that blob (a NaN not first passed with exit 0)."""
    run, calls = compare.BACKENDS["reference"], []

    def spoiled(model, weights, inputs, points):
        outputs = run(model, weights, inputs, points)
        calls.append(points[which])
        if len(calls) == 2:  # the merged model
            outputs[which] = np.full_like(outputs[which], np.nan)
        return outputs

    monkeypatch.setitem(compare.BACKENDS, "reference", spoiled)
    model, weights = SAMPLES / "mobilenet_ssd.prototxt", SAMPLES / "mobilenet_ssd.caffemodel"
    report = tmp_path / "r.json"
    args = _args(model, weights, tmp_path, "--verify", "--backend", "reference", "-q", "--report", str(report))
    assert main(args) == 3
    err = capsys.readouterr().err
    data = json.loads(report.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON report"))
    jsonschema.validate(data, report_schema())
    assert data["verify"]["passed"] is False and data["verify"]["max_relative_error"] is None
    assert f"blob '{calls[1][1]}" in err and "relative error nan" in err, err
