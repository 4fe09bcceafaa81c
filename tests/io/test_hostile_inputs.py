"""Hostile inputs on the reading side (issue 16, items 5 and 6): files that are not regular files
(FIFOs, devices, folders) are refused at once instead of blocking or reading forever; small files
that would expand into huge memory are refused by a documented limit naming the flag that raises
it; each run ends with one line and exit 2, its peak memory well under 300 MB."""

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from harness import copy_sample

from caffe_bn_merge.io import wire

PEAK_MB = 300  # the bound on the memory any hostile input may cost
ADDRESS_SPACE = 3 << 30  # children may map at most this much: a regression fails, it does not swap


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_cli(*args: str | Path, timeout: float = 120) -> tuple[int, str, float]:
    """merge-bn in a child process: exit status (negative: killed by that signal), stderr and its
    own peak resident memory in MB (`wait4`, so no other child counts)."""
    cmd = [sys.executable, "-m", "caffe_bn_merge", *map(str, args)]
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_limit_memory)
        deadline = time.monotonic() + timeout
        while (done := os.wait4(child.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                child.kill()
                os.wait4(child.pid, 0)
                child.returncode = -9
                pytest.fail(f"merge-bn {args} still running after {timeout} s")
            time.sleep(0.02)
        child.returncode = os.waitstatus_to_exitcode(done[1])
        err.seek(0)
        return child.returncode, err.read().decode(errors="replace"), done[2].ru_maxrss / 1024


def assert_refused(code: int, err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert len(lines) == 1 and "internal error" not in err, err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]


# --- not regular files ------------------------------------------------------------------------


def _special(kind: str, folder: Path) -> Path:
    if kind == "fifo":
        path = folder / "pipe"
        os.mkfifo(path)
        return path
    if kind == "folder":
        path = folder / "sub"
        path.mkdir()
        return path
    return Path(kind)  # a character device


KINDS = ["fifo", "folder", "/dev/zero", "/dev/urandom"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flag", ["--model", "--weights", "--input", "--caffe-proto"])
def test_not_a_regular_file_is_refused_at_once(flag: str, kind: str, tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    special = _special(kind, tmp_path)
    paths = {"--model": model, "--weights": weights}
    if flag in paths:
        paths[flag] = special
    args = ["--model", paths["--model"], "--weights", paths["--weights"], "--force", "-q"]
    if flag == "--input":
        args += ["--verify", "--backend", "opencv", "--input", f"data={special}"]
    if flag == "--caffe-proto":
        pytest.importorskip("grpc_tools")
        args += ["--caffe-proto", special]
    code, err, peak = run_cli(*args, timeout=60)
    assert_refused(code, err, re.escape(str(special)) + r".*(not a regular file|no such)")
    assert peak < PEAK_MB


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_not_a_regular_file_is_refused_at_once(kind: str, tmp_path) -> None:
    special = _special(kind, tmp_path)
    code, err, peak = run_cli("batch", "--manifest", special, "--out", tmp_path / "out", "-q", timeout=60)
    assert code == 2, err
    assert re.search(re.escape(str(special)) + ".*not a regular file", err), err
    assert peak < PEAK_MB


# --- prototxt size ----------------------------------------------------------------------------


@pytest.mark.parametrize("size_mb", [65, 200, 4096])
def test_huge_prototxt_is_refused_by_its_limit(size_mb: int, tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    with model.open("r+b") as handle:  # sparse: costs no disk
        handle.truncate(size_mb << 20)
    code, err, peak = run_cli("--model", model, "--weights", weights, "-q")
    assert_refused(code, err, r"64 MB.*--max-prototxt-mb")
    assert peak < PEAK_MB


@pytest.mark.parametrize(("limit", "accepted"), [(1, False), (2, False), (3, True)])
def test_max_prototxt_mb_raises_the_limit(limit: int, accepted: bool, tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    text = model.read_text()
    model.write_text(text + "#" * ((2 << 20) + 10 - len(text)) + "\n")
    code, err, _ = run_cli("--model", model, "--weights", weights, "-q", "--max-prototxt-mb", limit)
    if accepted:
        assert code == 0, err
    else:
        assert_refused(code, err, f"{limit} MB.*--max-prototxt-mb")


# --- inputs for --verify ----------------------------------------------------------------------


def _png(path: Path, width: int, height: int, channels: int) -> None:
    """A PNG of zeros streamed row by row: a few hundred KB that decode to width * height * channels."""
    color = {1: 0, 3: 2}[channels]
    raw = zlib.compressobj(9)
    row = b"\0" * (1 + width * channels)
    body = bytearray()
    for _ in range(height):
        body += raw.compress(row)
    body += raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, color, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(body)) + chunk(b"IEND", b""))


def _patched_header(path: Path, width: int, height: int, kind: str) -> None:
    """A small real image whose header then claims `width` x `height`."""
    import cv2

    encoded = cv2.imencode(f".{kind}", np.zeros((8, 8, 3), np.uint8))[1]
    data = bytearray(encoded.tobytes())
    if kind == "png":
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    else:
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


BOMBS = {
    "png 30000x30000 gray": lambda p: _png(p, 30_000, 30_000, 1),
    "png 12000x12000 color": lambda p: _png(p, 12_000, 12_000, 3),
    "png 200000x2000 gray": lambda p: _png(p, 200_000, 2_000, 1),
    **{f"{k} header {w}x{h}": (lambda p, w=w, h=h, k=k: _patched_header(p, w, h, k))
       for k in ("png", "jpg") for w, h in ((65_000, 65_000), (60_000, 9_000), (9_000, 60_000))},
}  # fmt: skip


@pytest.mark.parametrize("case", BOMBS, ids=list(BOMBS))
def test_image_bomb_is_refused_before_decoding(case: str, tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    image = tmp_path / ("input.jpg" if "jpg" in case else "input.png")
    BOMBS[case](image)
    code, err, peak = run_cli("--model", model, "--weights", weights, "-q", "--force", "--verify",
                              "--backend", "opencv", "--input", f"data={image}")  # fmt: skip
    assert_refused(code, err, re.escape(str(image)) + r".*--max-input-elements")
    assert peak < PEAK_MB


def _input_shape(model: Path, dims: tuple[int, ...]) -> None:
    text = model.read_text()
    start = text.index("input_param {")
    end = text.index("}\n}", start) + 1
    shape = "input_param { shape { " + " ".join(f"dim: {d}" for d in dims) + " } }"
    model.write_text(text[:start] + shape + text[end + 1 :])


@pytest.mark.parametrize("dims", [(1, 3, 8000, 8000), (64, 3, 1024, 1024), (1, 3, 2**31, 2**31), (1, 3, 6000, 6000)])
def test_huge_declared_input_is_refused_under_verify(dims: tuple[int, ...], tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    _input_shape(model, dims)
    code, err, peak = run_cli("--model", model, "--weights", weights, "-q", "--verify", "--backend", "opencv")
    assert_refused(code, err, r"--max-input-elements")
    assert peak < PEAK_MB


@pytest.mark.parametrize(("limit", "accepted"), [(100, False), (3071, False), (3072, True)])
def test_max_input_elements_sets_the_limit(limit: int, accepted: bool, tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    args = ("--model", model, "--weights", weights, "-q", "--verify", "--backend", "opencv")
    code, err, _ = run_cli(*args, "--max-input-elements", limit)
    if accepted:
        assert code == 0, err
    else:
        assert_refused(code, err, f"{limit:,}.*--max-input-elements")


# --- millions of tiny unknown fields in a caffemodel --------------------------------------------

TINY = {"varint": b"\xb8\x3e\x01", "empty string": b"\xba\x3e\x00", "fixed32": b"\xbd\x3e\0\0\0\0"}  # field 999


def _grow(payload: bytes, unknown: bytes, name: str | None, where: str) -> bytes:
    """`payload` of a layer record named `name`, with `unknown` added where `where` says."""
    if where == name:
        return payload + unknown
    if where != f"blob of {name}":
        return payload
    fields = list(wire.iter_fields(memoryview(payload)))
    first = next(f for f in fields if f.number == 7)
    blob = payload[first.value_start : first.end] + unknown
    return payload[: first.start] + wire.encode_length_header(7, len(blob)) + blob + payload[first.end :]


def _with_unknown_fields(data: bytes, unknown: bytes, where: str) -> bytes:
    """The caffemodel `data` with `unknown` at the top level or inside a layer or blob record."""
    if where == "top level":
        return data + unknown
    out = bytearray()
    for record in wire.iter_fields(memoryview(data)):
        payload = data[record.value_start : record.end]
        names = [f for f in wire.iter_fields(memoryview(payload)) if f.number == 1] if record.number == 100 else []
        name = payload[names[0].value_start : names[0].end].decode() if names else None
        grown = _grow(payload, unknown, name, where)
        out += wire.encode_length_header(record.number, len(grown)) + grown
    return bytes(out)


@pytest.mark.parametrize(
    ("where", "kind"),
    [("top level", "varint"), ("conv1", "varint"), ("conv1", "empty string"), ("conv1/bn", "fixed32"),
     ("blob of conv1", "empty string"), ("fc/scale", "varint")],
)  # fmt: skip
def test_millions_of_tiny_unknown_fields(where: str, kind: str, tmp_path) -> None:
    """Legal protobuf (unknown fields are kept), so the merge succeeds, in bounded memory: conv1 is
    re-encoded (folded), conv1/bn dropped, fc copied as it is."""
    model, weights = copy_sample(tmp_path)
    count = (6 << 20) // len(TINY[kind])  # 6 MB of them: 1-2 million fields
    weights.write_bytes(_with_unknown_fields(weights.read_bytes(), TINY[kind] * count, where))
    code, err, peak = run_cli("--model", model, "--weights", weights, "-q", timeout=600)
    assert code == 0, err
    assert peak < PEAK_MB, f"{peak:.0f} MB"


# --- hostile files in a batch tree --------------------------------------------------------------


def _hostile_prototxt(kind: str, path: Path) -> None:
    if kind == "sparse 200 MB":
        with path.open("wb") as handle:
            handle.truncate(200 << 20)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(kind)


@pytest.mark.parametrize("kind", ["sparse 200 MB", "fifo", "/dev/zero", "/dev/urandom"])
def test_batch_tree_with_a_hostile_prototxt(kind: str, tmp_path) -> None:
    """Discovery reads each prototxt to classify it: a huge one, a FIFO or a device among them is
    skipped with its reason, quickly and in bounded memory, and the real deployment converts."""
    source = tmp_path / "src"
    source.mkdir()
    copy_sample(source)
    _hostile_prototxt(kind, source / "other.prototxt")
    code, err, peak = run_cli("batch", source, "--out", tmp_path / "out", "-q", "--jobs", "1", timeout=120)
    assert code == 0, err
    assert (tmp_path / "out" / "net.caffemodel").is_file()
    assert peak < PEAK_MB
