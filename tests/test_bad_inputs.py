"""The catalogue of bad inputs: each gets one line on stderr naming the problem, exit 2, no
traceback, no output files, and the inputs untouched (hashes)."""

import gzip
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from harness import copy_sample, merge_and_check

from caffe_bn_merge.cli import main
from caffe_bn_merge.io import proto, wire
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.synthetic.synth import NetBuilder


def _edit_text(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def _weights_of_other_shape(folder: Path) -> None:
    net = proto.NetParameter.FromString((folder / "net.caffemodel").read_bytes())
    conv1 = next(layer for layer in net.layer if layer.name == "conv1")
    conv1.blobs[0].shape.dim[0] = 8  # 16 outputs in the prototxt
    del conv1.blobs[0].data[8 * 27 :]
    (folder / "net.caffemodel").write_bytes(net.SerializeToString())


def _huge_declared_blob(folder: Path) -> None:
    blob = proto.BlobProto()
    blob.shape.dim.extend([100_000, 100_000, 1_000])  # 40 TB declared, a few bytes held
    blob.data.extend([1.0, 2.0])
    layer = proto.LayerParameter(name="conv1", type="Convolution")
    layer.blobs.append(blob)
    (folder / "net.caffemodel").write_bytes(proto.NetParameter(layer=[layer]).SerializeToString())


def _deep_nesting(folder: Path) -> None:
    (folder / "net.prototxt").write_text("layer { " * 20000 + "}" * 20000)


def _merged_weights_unmerged_prototxt(folder: Path) -> None:
    model, weights = folder / "net.prototxt", folder / "net.caffemodel"
    main(["--model", str(model), "--weights", str(weights), "-q", "--output-model", str(folder / "m.prototxt"),
          "--output-weights", str(folder / "m.caffemodel")])  # fmt: skip
    weights.write_bytes((folder / "m.caffemodel").read_bytes())
    for extra in ("m.prototxt", "m.caffemodel"):
        (folder / extra).unlink()


BAD: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty prototxt": (lambda f: (f / "net.prototxt").write_text(""), "defines no layers"),
    "empty caffemodel": (lambda f: (f / "net.caffemodel").write_bytes(b""), "is empty"),
    "prototxt is a folder": (lambda f: ((f / "net.prototxt").unlink(), (f / "net.prototxt").mkdir()), "not a regular"),
    "binary prototxt": (lambda f: (f / "net.prototxt").write_bytes(b"\x00\xff" * 100), "not a text prototxt"),
    "not text format": (lambda f: (f / "net.prototxt").write_text("this is { not : a net"), "not a Caffe net"),
    "solver": (lambda f: (f / "net.prototxt").write_text('net: "t.prototxt"\nbase_lr: 0.1\n'), "solver file"),
    "V0 net": (lambda f: (f / "net.prototxt").write_text("layers { layer { name: 'a' } }"), "V0"),
    "truncated caffemodel": (
        lambda f: (f / "net.caffemodel").write_bytes((f / "net.caffemodel").read_bytes()[:5000]),
        "not a readable caffemodel.*complete",
    ),
    "random bytes": (
        lambda f: (f / "net.caffemodel").write_bytes(np.random.default_rng(0).bytes(4096)),
        "caffemodel|weights|layer",
    ),
    "git lfs pointer": (
        lambda f: (f / "net.caffemodel").write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"
        ),
        "Git LFS pointer",
    ),
    "gzip": (lambda f: (f / "net.caffemodel").write_bytes(gzip.compress(b"x" * 100)), "gzip"),
    "weights of another shape": (_weights_of_other_shape, "do not fit num_output"),
    "absurd declared size": (_huge_declared_blob, "declares shape"),
    "deep nesting": (_deep_nesting, "nested too deeply|not a Caffe net"),
    "blob used before produced": (
        lambda f: _edit_text(f / "net.prototxt", 'bottom: "data"', 'bottom: "later"'),
        "reads blob 'later' before",
    ),
    "merged weights, unmerged prototxt": (_merged_weights_unmerged_prototxt, "looks already merged"),
}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(case: str, tmp_path) -> None:
    make_bad, message = BAD[case]
    model, weights = copy_sample(tmp_path)
    make_bad(tmp_path)
    before = _digest(tmp_path)
    cmd = [sys.executable, "-m", "caffe_bn_merge", "--model", str(model), "--weights", str(weights)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(message, lines[0]), lines[0]
    assert _digest(tmp_path) == before  # no output, inputs untouched


def _bn_net(mean: np.ndarray, var: np.ndarray, eps: float) -> NetBuilder:
    b = NetBuilder("stats", (1, 3, 8, 8), seed=2)
    b.bn(b.conv("data", 3, name="c"), name="bn", eps=eps)
    b.blobs["bn"] = [mean, var, np.ones(1)]
    return b


@pytest.mark.parametrize(
    ("mean", "var", "eps"),
    [
        ([0.0, np.nan, 1.0], [1.0, 1.0, 1.0], 1e-5),
        ([0.0, 0.0, 1.0], [1.0, -2.0, 1.0], 1e-5),
        ([0, 0, 0], [0, 1, 1], 0.0),
    ],
    ids=["nan mean", "variance + eps < 0", "eps 0 with zero variance"],
)
def test_statistics_caffe_cannot_compute_are_kept(mean, var, eps, tmp_path) -> None:
    b = _bn_net(np.array(mean, float), np.array(var, float), eps)
    merged = merge_and_check(b, tmp_path, engine=None)
    assert merged.kept == {"bn": "bad_statistics"}


def test_negative_variance_still_finite_folds_with_a_warning(tmp_path, caplog) -> None:
    caplog.set_level("WARNING")
    b = _bn_net(np.zeros(3), np.array([1.0, -1e-6, 1.0]), 1e-3)
    merged = merge_and_check(b, tmp_path, "reference")
    assert merged.removed == {"bn"}
    assert "negative variance" in caplog.text


def test_existing_output_needs_force(tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    args = ["--model", str(model), "--weights", str(weights), "-q"]
    assert main(args) == 0
    first = _digest(tmp_path)
    assert main(args) == 2
    assert "add --force" in capsys.readouterr().err
    assert _digest(tmp_path) == first
    assert main([*args, "--force"]) == 0


def test_already_merged_model_changes_nothing_and_says_so(tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    assert main(["--model", str(model), "--weights", str(weights), "-q"]) == 0
    merged = (tmp_path / "net_merged.prototxt", tmp_path / "net_merged.caffemodel")
    out = (tmp_path / "again.prototxt", tmp_path / "again.caffemodel")
    argv = [
        "--model",
        str(merged[0]),
        "--weights",
        str(merged[1]),
        "--output-model",
        str(out[0]),
        "--output-weights",
        str(out[1]),
    ]
    assert main(argv) == 0
    assert "nothing to fold" in capsys.readouterr().out
    assert out[0].read_bytes() == merged[0].read_bytes() and out[1].read_bytes() == merged[1].read_bytes()


def _big_model(folder: Path) -> tuple[Path, Path]:
    """A model large enough (about 150 MB) that writing it takes a while."""
    b = NetBuilder("big", (1, 64, 8, 8), seed=0)
    x = "data"
    for i in range(9):
        x = b.bn(b.conv(x, 2048 if i < 8 else 64, kernel=1, name=f"c{i}"), name=f"bn{i}")
    b.save(folder / "big.prototxt", folder / "big.caffemodel")
    return folder / "big.prototxt", folder / "big.caffemodel"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_mid_write_leaves_no_output(sig: int, tmp_path) -> None:
    model, weights = _big_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "caffe_bn_merge", "--model", str(model), "--weights", str(weights), "-q",
           "--output-model", str(out / "m.prototxt"), "--output-weights", str(out / "m.caffemodel")]  # fmt: skip
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(out.iterdir()) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert child.poll() is None, "the conversion finished before it could be interrupted"
    os.kill(child.pid, sig)
    child.wait(timeout=60)
    names = sorted(p.name for p in out.iterdir())
    assert "m.caffemodel" not in names and "m.prototxt" not in names
    if sig == signal.SIGTERM:  # a handled signal also removes the temporary file
        assert names == []


def test_mismatched_record_layouts_are_refused(tmp_path) -> None:
    """A blob field with the wrong wire type is a clean error, not a crash."""
    layer = proto.LayerParameter(name="conv1", type="Convolution").SerializeToString()
    layer += wire.encode_varint(7 << 3 | wire.VARINT) + wire.encode_varint(5)  # blobs as a varint
    (tmp_path / "w.caffemodel").write_bytes(wire.encode_length_delimited(100, layer) + layer)
    stored = caffe_io.read_weights(tmp_path / "w.caffemodel")
    assert stored.layers["conv1"].blobs == []
