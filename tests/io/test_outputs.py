"""Every path we write, checked against every input and every other output by file identity, and
the environment problems of writing: each refusal one line and exit 2, nothing touched, nothing
left. Variants: every kind of path (the input itself, a symlink, a hard link, a symlinked folder, a
bind mount, a device node, a FIFO, a folder, a symlink loop, an empty name, a missing folder) in
every writing role (--output-model, --output-weights, --report, --keep-failed), with and without
--force and --dry-run; legal long names; a full disk; a closed stdout."""

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from harness import copy_sample

from caffe_bn_merge.cli import main

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `folder` (symlinks not followed): its file type and, for regular files,
    a digest of its bytes (FIFOs and devices are never opened)."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
        seen[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), digest)
    return seen


@contextlib.contextmanager
def _bind_mount(source: Path, target: Path) -> Iterator[None]:
    target.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"bind mounts need root: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


# Each kind makes, in the test folder `t` holding the inputs net.prototxt + net.caffemodel, a path
# that reaches `victim` (an input's name) or some file that is not a regular file.
KINDS: dict[str, Callable[[Path, str], Path]] = {
    "the input itself": lambda t, victim: t / victim,
    "symlink to the input": lambda t, victim: _symlink(t / "link", t / victim),
    "hard link to the input": lambda t, victim: _hardlink(t / "hard", t / victim),
    "through a symlinked folder": lambda t, victim: _symlink(t / "alias", t) / victim,
    "device node": lambda t, victim: _device(t / "null"),
    "symlink to a device": lambda t, victim: _symlink(t / "dev", _device(t / "null")),
    "FIFO": lambda t, victim: _fifo(t / "fifo"),
    "folder": lambda t, victim: _folder(t / "folder"),
    "symlink loop": lambda t, victim: _symlink(t / "loop", t / "loop"),
    "empty name": lambda t, victim: Path(""),
    "missing folder": lambda t, victim: t / "nope" / "x",
}


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _hardlink(link: Path, target: Path) -> Path:
    os.link(target, link)
    return link


def _device(path: Path) -> Path:
    """A private copy of /dev/null's device node (root only): a broken implementation replacing
    it harms nothing outside the test folder."""
    if not IS_ROOT:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


ROLES = {  # flag -> the input its path reaches
    "--output-model": "net.prototxt",
    "--output-weights": "net.caffemodel",
    "--report": "net.caffemodel",
}
MODES = {"plain": [], "--force": ["--force"], "--dry-run": ["--dry-run"], "--force --dry-run": ["--force", "--dry-run"]}
CASES = [
    (role, kind, mode)
    for role in ROLES
    for kind in KINDS
    for mode in MODES
    if "--dry-run" not in mode or role == "--report"  # a dry run writes only the report
]


def _refused(args: list[str], folder: Path, capsys) -> str:
    """Run merge-bn in-process; it must refuse with exit 2 and one line, touching nothing."""
    before = _snapshot(folder)
    code = main(["--model", str(folder / "net.prototxt"), "--weights", str(folder / "net.caffemodel"), "-q", *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert _snapshot(folder) == before, "a file was created, changed or removed"  # devices and FIFOs too
    return lines[0]


@pytest.mark.parametrize(("role", "kind", "mode"), CASES, ids=[" ".join(c) for c in CASES])
def test_every_written_path_is_checked(role: str, kind: str, mode: str, tmp_path, capsys) -> None:
    copy_sample(tmp_path)
    path = KINDS[kind](tmp_path, ROLES[role])
    _refused([role, str(path), *MODES[mode]], tmp_path, capsys)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_bind_mount_of_the_inputs_folder(role: str, force: bool, tmp_path, capsys) -> None:
    """An output reaching an input through a bind mount (same file, another path, no symlink)."""
    source = tmp_path / "src"
    source.mkdir()
    copy_sample(source)
    with _bind_mount(source, tmp_path / "mnt"):
        message = _refused([role, str(tmp_path / "mnt" / ROLES[role]), *(["--force"] if force else [])], source, capsys)
    assert "same file" in message or "equals an input" in message


# Two written paths that name the same new file: (flag, path) pairs, in folder t.
COLLISIONS: dict[str, Callable[[Path], list[str]]] = {
    "report is the output model": lambda t: ["--output-model", str(t / "o"), "--report", str(t / "o")],
    "report is the output weights via a symlinked folder": lambda t: [
        "--output-weights",
        str(t / "o.caffemodel"),
        "--report",
        str(_symlink(t / "alias", t) / "o.caffemodel"),
    ],
    "model and weights the same path": lambda t: ["--output-model", str(t / "o"), "--output-weights", str(t / "o")],
    "model and weights through relative spellings": lambda t: [
        "--output-model",
        str(t / "o"),
        "--output-weights",
        str(_folder(t / "d") / ".." / "o"),
    ],
    "keep-failed folder holds the outputs": lambda t: ["--verify", "--keep-failed", str(t)],
    "keep-failed is a file": lambda t: ["--verify", "--keep-failed", str(t / "net.prototxt")],
    "keep-failed folder is missing": lambda t: ["--verify", "--keep-failed", str(t / "nope")],
}


@pytest.mark.parametrize("case", COLLISIONS)
@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_written_paths_never_collide(case: str, force: bool, tmp_path, capsys) -> None:
    copy_sample(tmp_path)
    _refused([*COLLISIONS[case](tmp_path), *(["--force"] if force else [])], tmp_path, capsys)


def test_an_existing_report_is_replaced_but_an_existing_output_needs_force(tmp_path, capsys) -> None:
    copy_sample(tmp_path)
    (tmp_path / "r.json").write_text("old")
    assert main(["--model", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "net.caffemodel"),
                 "-q", "--report", str(tmp_path / "r.json")]) == 0  # fmt: skip
    assert (tmp_path / "r.json").read_text().startswith("{")
    message = _refused(["--report", str(tmp_path / "r.json")], tmp_path, capsys)
    assert "exists already; add --force" in message


NAME_BYTES = (200, 240, 243, 251, 252, 253, 254, 255)


@pytest.mark.parametrize("size", NAME_BYTES)
@pytest.mark.parametrize("letter", ["a", "é"], ids=["ascii", "two-byte utf-8"])
def test_legal_long_output_names(size: int, letter: str, tmp_path, capsys) -> None:
    """An output name of up to NAME_MAX bytes is written under that name (the temporary name is
    shortened, never the output's)."""
    copy_sample(tmp_path)
    suffix = ".caffemodel"
    count = (size - len(suffix)) // len(letter.encode())
    name = letter * count + suffix
    model = "m" * (size - len(".prototxt")) + ".prototxt"
    args = ["--output-weights", str(tmp_path / name), "--output-model", str(tmp_path / model), "-q"]
    args += ["--report", str(tmp_path / ("r" * (size - 5) + ".json"))]
    code = main(["--model", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "net.caffemodel"), *args])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / name).stat().st_size > 0 and (tmp_path / model).stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture
def tiny_disk(tmp_path) -> Iterator[Callable[[int], Path]]:
    """Small tmpfs folders (root only): make(size in KiB) -> its mount point."""
    if not IS_ROOT:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    mounted = []

    def make(kib: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.parametrize("kib", [4, 8, 64, 128, 256, 300])
@pytest.mark.parametrize("what", ["pair", "report", "pair and report"])
def test_a_full_disk_is_one_line_and_leaves_nothing(kib: int, what: str, tiny_disk, tmp_path, capsys) -> None:
    """The outputs on a tmpfs too small for them (the sample's caffemodel is 316 KB; the sizes
    run out during the caffemodel, the prototxt or the report): exit 2, one line, an empty disk."""
    copy_sample(tmp_path)
    disk = tiny_disk(kib)
    args = ["--model", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "net.caffemodel"), "-q"]
    if "pair" in what:
        args += ["--output-model", str(disk / "m.prototxt"), "--output-weights", str(disk / "m.caffemodel")]
    if "report" in what:
        args += ["--report", str(disk / "r.json")]
        (disk / "filler").write_bytes(b"\0" * (kib * 1024 - 4096)) if what == "report" else None
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "No space left" in err, err
    assert sorted(p.name for p in disk.iterdir()) == (["filler"] if what == "report" else [])


def test_a_closed_stdout_is_one_line_and_writes_nothing(tmp_path) -> None:
    """stdout a pipe nobody reads any more (`merge-bn ... | head -c1` once head is gone)."""
    copy_sample(tmp_path)
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run(
            [sys.executable, "-m", "caffe_bn_merge", "--model", "net.prototxt", "--weights", "net.caffemodel"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "broken pipe" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.caffemodel", "net.prototxt"]


def _batch_refused(args: list[str], folder: Path, capsys) -> str:
    from caffe_bn_merge.batch import command

    before = _snapshot(folder)
    code = command.main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert _snapshot(folder) == before, "a file was created, changed or removed"
    return lines[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_the_batch_report_is_checked(kind: str, force: bool, tmp_path, capsys) -> None:
    """`merge-bn batch --report` reaching a source caffemodel, or a path that is no regular file."""
    (tmp_path / "src").mkdir()
    copy_sample(tmp_path / "src")
    (tmp_path / "out").mkdir()
    report = KINDS[kind](tmp_path, "src/net.caffemodel")
    args = [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--jobs", "1", "-q", "--report", str(report)]
    _batch_refused([*args, *(["--force"] if force else [])], tmp_path, capsys)


@pytest.mark.parametrize("kind", ["device node", "FIFO", "folder", "symlink to the input", "hard link to the input"])
@pytest.mark.parametrize("suffix", [".prototxt", ".caffemodel"])
def test_batch_outputs_are_checked(kind: str, suffix: str, tmp_path, capsys) -> None:
    """A batch output that exists as something not a regular file, or that is a source file under
    another name, is refused even with --force."""
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    copy_sample(source)
    made = KINDS[kind](source, "net" + suffix)
    (out / f"net{suffix}").symlink_to(made) if made.parent != source else os.rename(made, out / f"net{suffix}")
    _batch_refused([str(source), "--out", str(out), "--jobs", "1", "-q", "--force"], tmp_path, capsys)
