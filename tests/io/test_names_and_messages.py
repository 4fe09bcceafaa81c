"""Layer names are compared as bytes, as Caffe does (a caffemodel name that is not valid UTF-8
matches nothing in the prototxt and collides with no other name), and every error line is
capped, its head and tail kept (issue 16, item 11)."""

import itertools
import re
from pathlib import Path

import pytest
from harness import copy_sample, save

from caffe_bn_merge.cli import main
from caffe_bn_merge.errors import MismatchError
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import merge
from caffe_bn_merge.synthetic.synth import NetBuilder

INVALID = [b"\xff", b"\xfe\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
PLACES = ["start", "middle", "end"]


def _bad_name(invalid: bytes, place: str) -> bytes:
    return {"start": invalid + b"bn", "middle": b"b" + invalid + b"n", "end": b"bn" + invalid}[place]


def _net_with_bn_named(folder: Path, stored: bytes) -> tuple[Path, Path]:
    """A conv + BatchNorm net whose caffemodel names the BatchNorm `stored` (raw bytes) and whose
    prototxt names it as those bytes read with errors='replace' (a loose match)."""
    placeholder = "Q" * len(stored)
    b = NetBuilder("names", (1, 3, 8, 8), seed=1)
    b.bn(b.conv("data", 4, name="c"), name=placeholder)
    model, weights = save(b, folder)
    data = weights.read_bytes()
    assert data.count(placeholder.encode()) == 1
    weights.write_bytes(data.replace(placeholder.encode(), stored))
    loose = stored.decode("utf-8", "replace")
    model.write_text(model.read_text(encoding="utf-8").replace(placeholder, loose), encoding="utf-8")
    return model, weights


@pytest.mark.parametrize(("invalid", "place"), list(itertools.product(INVALID, PLACES)))
def test_invalid_utf8_names_match_nothing_loosely(invalid: bytes, place: str, tmp_path) -> None:
    model, weights = _net_with_bn_named(tmp_path, _bad_name(invalid, place))
    with pytest.raises(MismatchError):
        merge(model, weights, tmp_path / "m.prototxt", tmp_path / "m.caffemodel")


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(INVALID, 2)))
def test_distinct_byte_names_stay_distinct(first: bytes, second: bytes, tmp_path) -> None:
    stored = [b"first/" + first, b"second/" + second]
    placeholders = [b"first/" + b"P" * len(first), b"second/" + b"R" * len(second)]
    b = NetBuilder("two", (1, 3, 8, 8), seed=1)
    b.bn(b.conv("data", 4, name="c"), name=placeholders[0].decode())
    b.bn("c", name=placeholders[1].decode())
    weights = save(b, tmp_path)[1]
    data = weights.read_bytes()
    for placeholder, name in zip(placeholders, stored, strict=True):
        assert data.count(placeholder) == 1
        data = data.replace(placeholder, name)
    weights.write_bytes(data)
    names = set(caffe_io.read_weights(weights).layers)
    assert len(names) == 3, names


@pytest.mark.parametrize("size", [301, 5_000, 400_000])
@pytest.mark.parametrize("case", ["duplicate", "unknown blob", "path"])
def test_error_lines_are_capped_with_head_and_tail(case: str, size: int, tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    name = "H" + "x" * size + "T"
    text = model.read_text()
    if case == "duplicate":
        text = text.replace('name: "conv1"', f'name: "{name}"').replace('name: "conv1/bn"', f'name: "{name}"')
    elif case == "unknown blob":
        text = text.replace('bottom: "data"', f'bottom: "{name}"', 1)
    model.write_text(text)
    if case == "path":
        weights = tmp_path / ("H" + "x" * 200 + "T") / ".." / ("H" + "y" * 200 + "T") / "missing.caffemodel"
    code = main(["--model", str(model), "--weights", str(weights), "-q"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert len(lines[0]) <= 320 and "…" in lines[0], lines[0][:400]
    assert lines[0].startswith("merge-bn: error: ") and re.search(r"H|/", lines[0][:60])
