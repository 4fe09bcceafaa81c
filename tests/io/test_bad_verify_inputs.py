"""Bad inputs on the reading side of --verify and the caffemodel's blob shapes: each gives one
line naming the problem and exit 2, never an internal error (issue 16, item 10)."""

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from harness import copy_sample

from caffe_bn_merge.cli import main
from caffe_bn_merge.io import proto

SHAPE = (1, 3, 32, 32)  # resnet_mini's input


def _run(capsys, model: Path, weights: Path, *extra: str) -> tuple[int, str]:
    args = ["--model", str(model), "--weights", str(weights), "-q", "--force", "--backend", "opencv", *extra]
    code = main(args)
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "internal error" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def _npy_object(path: Path) -> None:
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _npy_truncated(path: Path, keep: int) -> None:
    np.save(path, np.zeros(SHAPE, np.float32))
    path.write_bytes(path.read_bytes()[:keep])


def _npy_huge_header(path: Path) -> None:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 32, 32), " + b" " * 200_000 + b"}\n"
    path.write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header)


NPY: dict[str, Callable[[Path], None]] = {
    "object dtype": _npy_object,
    "strings": lambda p: np.save(p, np.full(SHAPE, "x")),
    "complex": lambda p: np.save(p, np.zeros(SHAPE, np.complex64)),
    "structured": lambda p: np.save(p, np.zeros(SHAPE, [("a", "<f4"), ("b", "<i4")])),
    "huge header": _npy_huge_header,
    "not npy": lambda p: p.write_bytes(b"hello, not an array"),
    "empty": lambda p: p.write_bytes(b""),
    "wrong shape": lambda p: np.save(p, np.zeros((1, 3, 31, 32), np.float32)),
    **{f"truncated at {n}": (lambda p, n=n: _npy_truncated(p, n)) for n in (0, 5, 9, 60, 127, 200, 12000)},
}


@pytest.mark.parametrize("case", NPY, ids=list(NPY))
def test_bad_npy_input(case: str, tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    array = tmp_path / "input.npy"
    NPY[case](array)
    code, err = _run(capsys, model, weights, "--verify", "--input", f"data={array}")
    _assert_refused(code, err, re.escape(str(array)))


@pytest.mark.parametrize("seed", [-1, -(2**70)])
def test_negative_seed(seed: int, tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    code, err = _run(capsys, model, weights, "--verify", "--seed", str(seed))
    _assert_refused(code, err, "--seed")


def _shape_param(dims: tuple[int, ...]) -> str:
    return "input_param { shape { " + " ".join(f"dim: {d}" for d in dims) + " } }"


INPUT_SHAPES = {
    "no shape": "input_param { }",
    **{f"dim {d} at {i}": _shape_param((*SHAPE[:i], d, *SHAPE[i + 1 :])) for d in (0, -1, -32) for i in range(4)},
}


@pytest.mark.parametrize("case", INPUT_SHAPES, ids=list(INPUT_SHAPES))
def test_unusable_input_shape_under_verify(case: str, tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    text = model.read_text()
    start = text.index("input_param {")
    end = text.index("}\n}", start) + 1
    model.write_text(text[:start] + INPUT_SHAPES[case] + text[end + 1 :])
    code, err = _run(capsys, model, weights, "--verify")
    _assert_refused(code, err, "input")


OVERFLOWING = [[2**62, 4, 0], [2**63 - 1, 2**63 - 1, 0], [0, 2**40, 2**40, 2**40], [3, 2**62, 2**62, 0]]


@pytest.mark.parametrize("dims", OVERFLOWING, ids=[str(d) for d in OVERFLOWING])
@pytest.mark.parametrize("layer", ["conv1", "conv1/bn"])
def test_blob_dims_whose_product_overflows_keep_their_layer(dims: list[int], layer: str, tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    net = proto.NetParameter.FromString(weights.read_bytes())
    blob = next(item for item in net.layer if item.name == layer).blobs[0]
    del blob.data[:]
    blob.shape.dim[:] = dims
    weights.write_bytes(net.SerializeToString())
    code, err = _run(capsys, model, weights, "--report", str(tmp_path / "r.json"))
    # a blob that does not decode keeps its layer as written (issue 17: never refuse a whole net for it)
    assert code == 0 and "internal error" not in err, err
    reasons = [r for d in json.loads((tmp_path / "r.json").read_text())["decisions"] for r in d["reasons"]]
    assert any(r["code"] == "undecodable_blobs" and f"'{layer}'" in r["text"] for r in reasons)
