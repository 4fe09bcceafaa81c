"""A caffemodel truncated or overwritten (`cp new old`) while merge-bn reads it: never a signal
death (SIGBUS from the memory map), never exit 1, never a partial output. Each run either finished
before the change (its outputs are the right ones) or stops with one line and exit 2, leaving
nothing under the output names and no temporary file (issue 16, item 4)."""

import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caffe_bn_merge.synthetic.synth import NetBuilder

TIMINGS = [0.0, 0.01, 0.03, 0.08, 0.2, 0.4]  # seconds after the child opened the caffemodel
HOW = ["truncate", "cp"]  # ftruncate(2) to a size, or open with O_TRUNC and write that many bytes


def _big_net() -> NetBuilder:
    """About 60 MB: wide convolutions, each with BatchNorm + Scale, so reading and writing take a while."""
    b = NetBuilder("wide", (1, 256, 8, 8), seed=5)
    top = "data"
    for i in range(6):
        top = b.relu(b.scale(b.bn(b.conv(top, 512 if i % 2 == 0 else 256, name=f"c{i}"))))
    return b


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("pristine")
    model, weights = folder / "net.prototxt", folder / "net.caffemodel"
    _big_net().save(model, weights)
    outputs = _outputs(folder)
    done = subprocess.run(_command(model, weights, outputs), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return model, weights, {p.name: p.read_bytes() for p in outputs}


def _outputs(folder: Path) -> tuple[Path, Path]:
    return folder / "merged.prototxt", folder / "merged.caffemodel"


def _command(model: Path, weights: Path, outputs: tuple[Path, Path]) -> list[str]:
    args = ["--model", model, "--weights", weights, "--output-model", outputs[0], "--output-weights", outputs[1]]
    return [sys.executable, "-m", "caffe_bn_merge", "-q", *map(str, args)]


def _wait_until_open(child: subprocess.Popen, path: Path) -> None:
    """Return once `child` has `path` open (or has ended)."""
    fds = Path(f"/proc/{child.pid}/fd")
    while child.poll() is None:
        try:
            if any(os.readlink(fd) == str(path) for fd in fds.iterdir()):
                return
        except OSError:  # a descriptor closed while we looked
            pass
        time.sleep(0.001)


def _change(path: Path, how: str, size: int, original: bytes, writer: int | None) -> None:
    if writer is not None:  # a descriptor open for writing since before the child started
        os.ftruncate(writer, size)
    elif how == "truncate":
        os.truncate(path, size)
    else:
        with path.open("wb") as handle:
            handle.write(original[:size])


def _check(code: int, err: str, folder: Path, expected: dict[str, bytes]) -> None:
    assert code >= 0, f"killed by signal {-code}: {err}"
    assert code in (0, 2), err
    left = {p.name for p in folder.iterdir()} - {"net.prototxt", "net.caffemodel"}
    if code == 0:
        assert left == set(expected)
        for name, data in expected.items():
            assert (folder / name).read_bytes() == data, f"{name} differs from the right output"
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert left == set(), f"left behind: {left}"


@pytest.mark.parametrize(("how", "held_open"), [("truncate", False), ("cp", False), ("truncate", True)])
def test_caffemodel_changed_while_read(how: str, held_open: bool, pristine, tmp_path) -> None:
    """`held_open`: another process has the file open for writing all along, so no lease can be
    taken and the private-copy path is the one tested."""
    model, weights, expected = pristine
    original = weights.read_bytes()
    sizes = [0, len(original) // 2, len(original) - 1]
    codes, said = [], []
    for timing, size in itertools.product(TIMINGS, sizes):
        for path in tmp_path.iterdir():
            path.unlink()
        shutil.copyfile(model, tmp_path / "net.prototxt")
        shutil.copyfile(weights, tmp_path / "net.caffemodel")
        target = tmp_path / "net.caffemodel"
        writer = os.open(target, os.O_WRONLY) if held_open else None
        try:
            cmd = _command(tmp_path / "net.prototxt", target, _outputs(tmp_path))
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _wait_until_open(child, target)
            time.sleep(timing)
            _change(target, how, size, original, writer)
            err = child.communicate(timeout=300)[1]
        finally:
            if writer is not None:
                os.close(writer)
        _check(child.returncode, err, tmp_path, expected)
        codes.append(child.returncode)
        said.append(err)
    assert 2 in codes  # some changes did land while the model was read
    assert any("net.caffemodel: the caffemodel changed while it was being read" in e for e in said), said
