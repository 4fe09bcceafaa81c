"""`--verify`: outputs stay under temporary names until they pass, so a rejected model (a corrupted
fold, a tolerance it cannot meet) or one no engine can run leaves nothing under the output names
(older outputs there stay as they were), exits 3 with one line naming the worst blob or the engine's
real reason, and `--keep-failed DIR` holds the rejected pair. The same for `merge-bn batch --verify`,
which takes --backend and --tolerance."""

import hashlib
import json
from pathlib import Path

import pytest
from harness import copy_sample

from caffe_bn_merge.batch import command
from caffe_bn_merge.cli import main
from caffe_bn_merge.maths import fold_math
from caffe_bn_merge.verification.pycaffe import ENV_PYTHON

pytest.importorskip("cv2")
OUTPUTS = ("net_merged.prototxt", "net_merged.caffemodel")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _corrupt_bias(monkeypatch) -> None:
    """Every folded bias off by 0.5: a wrong fold that still writes a valid model."""
    exact = fold_math._bias64
    monkeypatch.setattr(fold_math, "_bias64", lambda bias, channels: exact(bias, channels) + 0.5)


def _unrunnable(folder: Path, monkeypatch) -> None:
    """A layer type OpenCV does not have, at the end of the net."""
    model = folder / "net.prototxt"
    model.write_text(model.read_text() + 'layer { name: "up" type: "Upsample" bottom: "prob" top: "up" }\n')


def _no_pycaffe(folder: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_PYTHON, str(folder / "no-such-python"))


REJECTIONS = {  # name -> (set-up, extra arguments, what the one line must say)
    "corrupted fold": (lambda f, m: _corrupt_bias(m), ["--backend", "opencv"], r"failed on opencv: blob '"),
    "tolerance 0": (lambda f, m: None, ["--backend", "opencv", "--tolerance", "0"], r"relative error .* > tolerance 0"),
    "tolerance 1e-12": (lambda f, m: None, ["--backend", "opencv", "--tolerance", "1e-12"], r"> tolerance 1e-12"),
    "OpenCV cannot run it": (_unrunnable, ["--backend", "opencv"], r"could not verify.*Upsample"),
    "no pycaffe": (_no_pycaffe, ["--backend", "caffe"], r"could not verify.*no-such-python"),
}
EXTRAS = {
    "alone": [],
    "with --report": ["--report", "r.json"],
    "with --keep-failed": ["--keep-failed", "kept"],
    "--force over older outputs": ["--force"],
}


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("case", REJECTIONS)
def test_a_rejected_model_is_never_written(case: str, extra: str, tmp_path, monkeypatch, capsys) -> None:
    copy_sample(tmp_path)
    setup, args, said = REJECTIONS[case]
    setup(tmp_path, monkeypatch)
    if extra == "with --keep-failed":
        (tmp_path / "kept").mkdir()
    if extra == "--force over older outputs":
        for name in OUTPUTS:
            (tmp_path / name).write_text("an older output")
    monkeypatch.chdir(tmp_path)
    before = _digests(tmp_path)
    code = main(["--model", "net.prototxt", "--weights", "net.caffemodel", "--verify", "-q", *args, *EXTRAS[extra]])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 3, err
    assert len(lines) == 1 and "Traceback" not in err and "is 2" not in err, err
    assert pytest.importorskip("re").search(said, lines[0]), lines[0]
    after = _digests(tmp_path)
    after.pop("r.json", None)
    assert after == before  # no new output, older outputs untouched, no temporary file
    if extra == "with --report":
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["outputs"] is None and (report["verify"] is None or report["verify"]["passed"] is False)
    if extra == "with --keep-failed":
        assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == sorted(OUTPUTS)


def test_a_passing_model_is_published(tmp_path, monkeypatch, capsys) -> None:
    copy_sample(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["--model", "net.prototxt", "--weights", "net.caffemodel", "--verify", "--backend", "opencv", "-q"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["net.prototxt", "net.caffemodel", *OUTPUTS])


@pytest.mark.parametrize(
    ("args", "status", "reason"),
    [
        (["--tolerance", "0"], "failed", "verification failed: max relative error"),
        (["--tolerance", "1e-3"], "converted", None),
        (["--backend", "caffe"], "failed", "could not verify (not written)"),
    ],
    ids=["tolerance 0", "tolerance 1e-3", "no pycaffe"],
)
def test_batch_verify_takes_backend_and_tolerance(args, status, reason, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_PYTHON, str(tmp_path / "no-such-python"))
    for stem in "ab":
        (tmp_path / "src" / stem).mkdir(parents=True)
        copy_sample(tmp_path / "src" / stem)
    out, report = tmp_path / "out", tmp_path / "r.json"
    code = command.main([str(tmp_path / "src"), "--out", str(out), "--verify", "--jobs", "1", "-q",
                         "--report", str(report), *args])  # fmt: skip
    rows = json.loads(report.read_text())["deployments"]
    assert code == (0 if status == "converted" else 1)
    assert {row["status"] for row in rows} == {status}
    assert all(reason in row["reason"] for row in rows) if reason else True
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    pairs = [f"{stem}/net.{suffix}" for stem in "ab" for suffix in ("caffemodel", "prototxt")]
    assert written == (pairs if status == "converted" else [])


@pytest.mark.parametrize(
    ("given", "clash"),
    [
        (["--output-model", "out/w.prototxt"], "w.caffemodel"),  # the caffemodel beside it: w.caffemodel
        (["--output-weights", "out/net.caffemodel"], "net.prototxt"),  # the prototxt beside it: net.prototxt
        (["--output-model", "out/w.prototxt", "--output-weights", "out/w.caffemodel"], "w.caffemodel"),
    ],
    ids=["model given", "weights given", "both given"],
)
def test_keep_failed_never_replaces_an_input(given, clash, tmp_path, monkeypatch, capsys) -> None:
    """--keep-failed DIR keeps the pair under the names it would have had: those names are the ones
    checked against the inputs, also when one output is given and the other goes beside it."""
    (tmp_path / "out").mkdir()
    model, weights = copy_sample(tmp_path)
    weights = weights.rename(tmp_path / "w.caffemodel")
    monkeypatch.chdir(tmp_path)
    before = _digests(tmp_path)
    code = main(["--model", model.name, "--weights", weights.name, *given, "--verify", "--backend", "reference",
                 "--tolerance", "0", "--keep-failed", ".", "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and clash in err and "--keep-failed equals an input" in err, err
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("kept", [False, True], ids=["all folded", "one kept as written"])
@pytest.mark.parametrize("backend", ["reference", "opencv"])
@pytest.mark.parametrize("spelling", ["use_global_stats: false", "use_global_stats:0", "use_global_stats :False"])
def test_assume_global_stats_verifies_what_it_folded(backend, spelling, kept, tmp_path, monkeypatch, capsys) -> None:
    """--assume-global-stats folds the stored statistics; --verify checks that fold against the
    original read the same way (it compared with batch statistics: exit 3 and 'please report it'),
    also when a BatchNorm is kept (a field we do not know) and still uses batch statistics."""
    model, weights = copy_sample(tmp_path)
    text = model.read_text().replace('type: "BatchNorm"', f'type: "BatchNorm"\n  batch_norm_param {{ {spelling} }}')
    if kept:
        text = text.replace('type: "BatchNorm"', 'type: "BatchNorm"\n  fork_field: 1', 1)
    model.write_text(text)
    before = model.read_bytes()
    code = main(["--model", str(model), "--weights", str(weights), "--assume-global-stats", "--verify",
                 "--backend", backend, "--report", str(tmp_path / "r.json"), "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["passed"] and report["assume_global_stats"] and model.read_bytes() == before
