"""Which engine judges `--verify`: `auto` tries real Caffe, then OpenCV, then our float64 reference
engine, passing over any that is missing or cannot run the net, and says which judged."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from caffe_bn_merge.cli import main
from caffe_bn_merge.synthetic.synth import NetBuilder
from caffe_bn_merge.verification.compare import verify

SAMPLE = ROOT / "sample_nets" / "mobilenet_ssd"
NO_PYCAFFE = "/nonexistent/pycaffe-python"  # CAFFE_BN_MERGE_PYCAFFE pointing nowhere: pycaffe "not installed"


def _bias_net(tmp_path, seed: int) -> tuple:
    """A net with a Bias layer after a folded chain: OpenCV dnn 4.x has no Bias layer."""
    b = NetBuilder("bias_net", (1, 3, 12, 12), seed)
    x = b.scale(b.bn(b.conv("data", 6, name="c1"), name="bn1"), name="sc1")
    b.conv(b.bias(b.relu(x), name="b1"), 4, kernel=1, name="c2")
    model, weights = tmp_path / "n.prototxt", tmp_path / "n.caffemodel"
    b.save(model, weights)
    return model, weights


@pytest.mark.parametrize("seed", range(3))
def test_auto_passes_over_engines_that_cannot_run_the_net(seed, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAFFE_BN_MERGE_PYCAFFE", NO_PYCAFFE)
    model, weights = _bias_net(tmp_path, seed)
    out = (tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
    assert main(["--model", str(model), "--weights", str(weights), "--output-model", str(out[0]),
                 "--output-weights", str(out[1]), "-q"]) == 0  # fmt: skip
    checked = verify((model, weights), out)
    assert checked.backend == "reference" and checked.passed
    assert [why.split(":")[0] for why in checked.passed_over] == ["caffe", "opencv"]
    assert checked.max_relative < 1e-5


def test_an_engine_asked_for_by_name_is_not_replaced(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAFFE_BN_MERGE_PYCAFFE", NO_PYCAFFE)
    model, weights = _bias_net(tmp_path, 0)
    report = tmp_path / "r.json"
    args = ["--model", str(model), "--weights", str(weights), "--output-model", str(tmp_path / "m.prototxt"),
            "--output-weights", str(tmp_path / "m.caffemodel"), "--verify", "--report", str(report), "-q"]  # fmt: skip
    assert main([*args, "--backend", "opencv"]) != 0
    assert main([*args, "--backend", "reference", "--force"]) == 0
    assert json.loads(report.read_text())["verify"]["backend"] == "reference"


def test_verify_works_with_the_core_dependencies_alone(tmp_path) -> None:
    """No OpenCV (its import blocked), no pycaffe: the reference engine verifies the sample SSD."""
    code = "import sys; sys.modules['cv2'] = None; from caffe_bn_merge.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["--model", f"{SAMPLE}.prototxt", "--weights", f"{SAMPLE}.caffemodel", "--verify",
            "--output-model", str(tmp_path / "m.prototxt"), "--output-weights", str(tmp_path / "m.caffemodel"),
            "--report", str(tmp_path / "r.json")]  # fmt: skip
    env = {"CAFFE_BN_MERGE_PYCAFFE": NO_PYCAFFE, "PATH": "/usr/bin:/bin", "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    verified = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert verified["backend"] == "reference" and verified["passed"]
    assert [why.split(":")[0] for why in verified["passed_over"]] == ["caffe", "opencv"]
    assert verified["max_relative_error"] < 1e-5


def _net_with_own_type(tmp_path) -> tuple:
    """A foldable net with a layer type of the user's own ("Cube"), unknown to every engine."""
    b = NetBuilder("own_type", (1, 3, 10, 10), 5)
    x = b.scale(b.bn(b.conv("data", 6, name="c1"), name="bn1"), name="sc1")
    b.unary("Cube", x, top="cubed", name="cube")
    b.conv("cubed", 4, kernel=1, name="c2")
    model, weights = tmp_path / "n.prototxt", tmp_path / "n.caffemodel"
    b.save(model, weights)
    return model, weights


def test_a_layer_plugin_lets_the_reference_engine_run_the_net(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CAFFE_BN_MERGE_PYCAFFE", NO_PYCAFFE)
    model, weights = _net_with_own_type(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--model", str(model), "--weights", str(weights), "--output-model", str(out / "m.prototxt"), "--verify"]
    assert main(args) == 3
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no layer type 'Cube'" in error and "--layer-plugin" in error
    assert sorted(p.name for p in out.iterdir()) == []  # unverified: nothing under the output names
    plugin = tmp_path / "cube.py"
    plugin.write_text("def forward(layer, inputs, blobs):\n    return [inputs[0] ** 3]\n\nLAYERS = {'Cube': forward}\n")
    assert main([*args, "--layer-plugin", str(plugin), "--report", str(tmp_path / "r.json")]) == 0
    verified = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert verified["backend"] == "reference" and verified["max_relative_error"] < 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["m.caffemodel", "m.prototxt"]


def test_a_broken_layer_plugin_is_bad_input(tmp_path, capsys) -> None:
    model, weights = _net_with_own_type(tmp_path)
    plugin = tmp_path / "broken.py"
    plugin.write_text("raise RuntimeError('boom')\n")
    args = ["--model", str(model), "--weights", str(weights), "--verify", "--layer-plugin", str(plugin)]
    assert main(args) == 2
    assert "boom" in capsys.readouterr().err


@pytest.mark.parametrize("refusing", ["caffe", "opencv"])
@pytest.mark.parametrize("backend", ["auto", "refusing"])
def test_an_engine_that_runs_the_original_but_not_the_merged_model_fails_it(
    refusing, backend, tmp_path, monkeypatch, capsys
) -> None:
    """A merged model that an engine refuses while it runs the original (a Caffe user could not
    load it) fails --verify on that engine: `auto` must not pass it on the next, more lenient one
    (it did: exit 0 'passed on reference')."""
    from caffe_bn_merge.errors import VerifyError
    from caffe_bn_merge.verification import compare

    def missing(*args: object) -> None:
        raise VerifyError("not installed")

    engines = ["caffe", "opencv", "reference"]
    for engine in engines[: engines.index(refusing)]:
        monkeypatch.setitem(compare.BACKENDS, engine, missing)
    calls = []

    def refuses_merged(model, weights, inputs, points):
        calls.append(model)
        if len(calls) == 2:
            raise VerifyError(f"{refusing} cannot load {model}")
        return compare.BACKENDS["reference"](model, weights, inputs, points)

    monkeypatch.setitem(compare.BACKENDS, refusing, refuses_merged)
    model, weights = _bias_net(tmp_path, 0)
    code = main(["--model", str(model), "--weights", str(weights), "--verify", "--backend",
                 refusing if backend == "refusing" else "auto", "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3 and f"{refusing} runs the original model but not the merged one" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.caffemodel", "n.prototxt"]


@pytest.mark.parametrize(
    "extra", [[], ["--threads", "1"], ["--backend", "opencv"], ["--verify"]], ids=["auto", "threads", "cv", "verify"]
)
def test_benchmark_with_the_core_dependencies_alone(extra, tmp_path) -> None:
    """No OpenCV, no pycaffe: --benchmark times nothing and says why in a warning; the pair is still
    written, exit 0 (it was an internal error: ModuleNotFoundError, exit 1)."""
    code = "import sys; sys.modules['cv2'] = None; from caffe_bn_merge.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["--model", f"{SAMPLE}.prototxt", "--weights", f"{SAMPLE}.caffemodel", "--benchmark", "2", "-q",
            "--output-model", str(tmp_path / "m.prototxt"), "--report", str(tmp_path / "r.json"), *extra]  # fmt: skip
    env = {"CAFFE_BN_MERGE_PYCAFFE": NO_PYCAFFE, "PATH": "/usr/bin:/bin", "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["benchmark"] is None and any("OpenCV is not installed" in w for w in report["warnings"])
    assert (tmp_path / "m.prototxt").is_file() and (tmp_path / "m.caffemodel").is_file()
