"""Batch discovery and manifests never crash: symlink loops, unreadable folders, FIFOs, huge
prototxts and broken manifests are reported (the run's exit is 1 when something could not be read,
2 for a manifest it cannot use), each as one line, never a traceback."""

import errno
import json
import os
import random
from pathlib import Path

import pytest
from harness import copy_sample

from caffe_bn_merge.batch import command, discovery
from caffe_bn_merge.batch.discovery import Kind, classify_prototxt, discover

VARIANTS = 12


def _good(folder: Path) -> None:
    """A deployment that converts (net.prototxt + net.caffemodel) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_sample(folder, "no_bn")


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, dict | None]:
    """command.main's status, its stderr, and the report when one was asked for."""
    code = command.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    report = Path(args[args.index("--report") + 1]) if "--report" in args else None
    return code, err, json.loads(report.read_text()) if report and report.exists() else None


def _loops(root: Path, rng: random.Random) -> list[Path]:
    """Symlink loops of random kinds at random depths under `root`; the ones named like inputs."""
    named = []
    for i in range(rng.randint(1, 4)):
        folder = root.joinpath(*(f"d{rng.randint(0, 2)}" for _ in range(rng.randint(0, 3))))
        folder.mkdir(parents=True, exist_ok=True)
        kind = rng.choice(["pair", "self", "ancestor"])
        suffix = rng.choice([".caffemodel", ".prototxt", ""])
        if kind == "pair":
            (folder / f"a{i}{suffix}").symlink_to(f"b{i}{suffix}")
            (folder / f"b{i}{suffix}").symlink_to(f"a{i}{suffix}")
            named += [folder / f"a{i}{suffix}", folder / f"b{i}{suffix}"] if suffix else []
        elif kind == "self":
            (folder / f"s{i}{suffix}").symlink_to(f"s{i}{suffix}")
            named += [folder / f"s{i}{suffix}"] if suffix else []
        else:
            (folder / f"up{i}").symlink_to(root, target_is_directory=True)
    return named


@pytest.mark.parametrize("seed", range(VARIANTS))
def test_symlink_loops_are_reported_not_fatal(tmp_path, seed) -> None:
    rng = random.Random(seed)
    root = tmp_path / "src"
    _good(root / "ok")
    named = _loops(root, rng)
    found = discover(root)
    assert [p.caffemodel for p in found.pairings] == [root / "ok" / "net.caffemodel"]
    assert sorted(found.unread) == sorted(f"{p}: cannot read (symlink loop)" for p in named)


def test_a_run_with_loops_converts_the_rest_and_exits_1(tmp_path, capsys) -> None:
    root, report = tmp_path / "src", tmp_path / "r.json"
    _good(root / "ok")
    (root / "ok" / "x.caffemodel").symlink_to("x.caffemodel")
    (root / "dangling.caffemodel").symlink_to("nowhere.caffemodel")
    code, err, data = _run([str(root), "--out", str(tmp_path / "out"), "--report", str(report), "--jobs", "1"], capsys)
    assert code == 1
    assert f"not read: {root / 'ok' / 'x.caffemodel'}: cannot read (symlink loop)" in err
    assert f"not read: {root / 'dangling.caffemodel'}: cannot read (broken link)" in err
    assert data["counts"]["converted"] == 1 and len(data["unread"]) == 2


@pytest.mark.parametrize(
    ("loop", "manifest"), [(loop, m) for loop in ("self", "self/o", "pair/o", "up/self") for m in (False, True)]
)
def test_an_outdir_in_a_symlink_loop_is_one_line_and_exit_2(tmp_path, capsys, loop, manifest) -> None:
    """--out through a symlink loop (itself, below one, through a pair, or a link to a loop)."""
    root = tmp_path / "src"
    _good(root / "ok")
    (tmp_path / "self").symlink_to("self")
    (tmp_path / "pair").symlink_to("mate")
    (tmp_path / "mate").symlink_to("pair")
    (tmp_path / "up").symlink_to(tmp_path, target_is_directory=True)
    if manifest:
        (tmp_path / "m.csv").write_text("prototxt,caffemodel\nsrc/ok/net.prototxt,src/ok/net.caffemodel\n")
    before = sorted(tmp_path.rglob("*"))
    source = ["--manifest", str(tmp_path / "m.csv")] if manifest else [str(root)]
    code, err, _ = _run([*source, "--out", str(tmp_path / loop), "--jobs", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "symlink loop" in err, err
    assert sorted(tmp_path.rglob("*")) == before


def _deny(monkeypatch: pytest.MonkeyPatch, denied: set[Path]) -> None:
    """os.scandir fails with EACCES on the `denied` folders (as for a non-root user without x/r)."""
    scandir = os.scandir

    def guarded(path: object = ".") -> object:
        if Path(os.fsdecode(path)) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)


@pytest.mark.parametrize("seed", range(VARIANTS))
def test_unreadable_folders_are_reported_and_fail_the_run(tmp_path, capsys, monkeypatch, seed) -> None:
    rng = random.Random(seed)
    root, report = tmp_path / "src", tmp_path / "r.json"
    folders = [root.joinpath(*(f"f{rng.randint(0, 3)}" for _ in range(rng.randint(1, 3)))) for _ in range(5)]
    for folder in folders:
        _good(folder)
    denied = set(rng.sample(folders, rng.randint(1, 3)))
    reachable = [f for f in folders if not any(d == f or d in f.parents for d in denied)]
    _deny(monkeypatch, denied)
    args = [str(root), "--out", str(tmp_path / "out"), "--report", str(report), "--jobs", "1"]
    code, err, data = _run(args, capsys)
    denied_listed = sorted(str(d) for d in denied if not any(o in d.parents for o in denied))
    if not reachable:
        assert code == 2 and "not read" in err
        return
    assert code == 1
    assert sorted(line.split(":")[0] for line in data["unread"]) == denied_listed
    assert all(f"not read: {d}: cannot read the folder (Permission denied)" in err for d in denied_listed)
    assert data["counts"]["converted"] == len({str(f) for f in reachable})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder; the os.scandir variant above covers it")
def test_a_really_unreadable_folder(tmp_path, capsys) -> None:
    root = tmp_path / "src"
    _good(root / "ok")
    _good(root / "locked")
    (root / "locked").chmod(0)
    try:
        code, err, _ = _run([str(root), "--out", str(tmp_path / "out"), "--jobs", "1"], capsys)
    finally:
        (root / "locked").chmod(0o755)
    assert code == 1 and f"not read: {root / 'locked'}" in err


def test_a_fifo_named_like_an_input_is_skipped_without_blocking(tmp_path) -> None:
    root = tmp_path / "src"
    _good(root)
    os.mkfifo(root / "stream.caffemodel")
    os.mkfifo(root / "stream.prototxt")
    found = discover(root)
    assert [p.caffemodel.name for p in found.pairings] == ["net.caffemodel"]
    assert {f"skipped {root / n}: not a regular file" for n in ("stream.caffemodel", "stream.prototxt")} <= set(
        found.notes
    )


@pytest.mark.parametrize("extra", [-1, 0, 1, 4096])
def test_discovery_reads_a_bounded_head_of_each_prototxt(tmp_path, monkeypatch, extra) -> None:
    """A deploy prototxt padded to the limit (+ extra bytes): classified by content up to the
    limit, not read at all beyond it."""
    deploy = 'layer { name: "data" type: "Input" top: "data" }\n'
    limit = 4096
    monkeypatch.setattr(discovery, "MAX_CLASSIFIED_BYTES", limit)
    path = tmp_path / "big.prototxt"
    path.write_text(deploy + "#" * (limit + extra - len(deploy) - 1) + "\n")
    found = classify_prototxt(path)
    assert (found.kind is Kind.DEPLOY) == (extra <= 0)
    assert extra <= 0 or "not read" in found.why


@pytest.mark.parametrize("seen", [0, 1, 2000, 4095])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_a_prototxt_growing_while_it_is_read_is_read_up_to_the_limit(tmp_path, monkeypatch, seen, extra) -> None:
    """The size found on opening (`seen` bytes) is smaller than the file has when it is read:
    classified, and not read beyond the limit, as if it had been that size all along."""
    limit = 4096
    monkeypatch.setattr(discovery, "MAX_CLASSIFIED_BYTES", limit)
    path = tmp_path / "growing.prototxt"
    deploy = 'layer { name: "data" type: "Input" top: "data" }\n'
    path.write_text(deploy + "#" * (limit + extra - len(deploy) - 1) + "\n")
    whole = classify_prototxt(path)
    fstat = os.fstat

    def earlier(fd: int) -> os.stat_result:
        found = list(fstat(fd))
        found[6] = min(found[6], seen)  # st_size
        return os.stat_result(found)

    monkeypatch.setattr(os, "fstat", earlier)
    assert classify_prototxt(path) == whole and (whole.kind is Kind.DEPLOY) == (extra <= 0)


def test_a_200_mb_prototxt_is_not_read(tmp_path) -> None:
    root = tmp_path / "src"
    _good(root / "ok")
    with (root / "huge.prototxt").open("wb") as handle:
        handle.truncate(200 << 20)  # sparse: costs no disk
    found = discover(root)
    assert any(n.startswith(f"skipped {root / 'huge.prototxt'}: larger than") for n in found.notes)


# --- manifests ---------------------------------------------------------------------------------------


def _manifest_variants(tmp_path: Path, seed: int) -> list[tuple[Path, str]]:
    """Broken manifests (path, what the one line must say), generated around a valid one."""
    rng = random.Random(seed)
    valid = b"prototxt,caffemodel\nnet.prototxt,net.caffemodel\n"
    at = rng.randrange(len(valid))
    cases = {
        "nul.csv": (valid[:at] + b"\0" + valid[at:], "NUL byte"),
        "utf8.csv": (valid[:at] + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xFE])]) + valid[at:], "not UTF-8"),
        "deep.json": (b"[" * rng.randint(10_000, 200_000), "nested too deeply"),
        "nulpath.json": (json.dumps([{"prototxt": "a\u0000b", "caffemodel": "c"}]).encode(), "NUL character"),
        "trunc.json": (json.dumps([{"prototxt": "a", "caffemodel": "b"}]).encode()[: rng.randint(1, 30)], "JSON"),
    }
    made = []
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        made.append((tmp_path / name, message))
    os.mkfifo(tmp_path / "fifo.csv")
    made.append((tmp_path / "fifo.csv", "not a regular file"))
    return made


@pytest.mark.parametrize("seed", range(4))
def test_broken_manifests_are_one_line(tmp_path, capsys, seed) -> None:
    for manifest, message in _manifest_variants(tmp_path, seed):
        code, err, _ = _run(["--manifest", str(manifest), "--out", str(tmp_path / "out")], capsys)
        assert code == 2, manifest
        assert message in err and len(err.strip().splitlines()) == 1, (manifest, err)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_manifest_with_a_bom_is_accepted(tmp_path, capsys, suffix) -> None:
    _good(tmp_path / "m")
    rows = [{"prototxt": "m/net.prototxt", "caffemodel": "m/net.caffemodel"}]
    text = json.dumps(rows) if suffix == ".json" else "prototxt,caffemodel\nm/net.prototxt,m/net.caffemodel\n"
    manifest = tmp_path / f"pairs{suffix}"
    manifest.write_bytes(b"\xef\xbb\xbf" + text.encode())
    code, _, _ = _run(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--jobs", "1", "-q"], capsys)
    assert code == 0 and (tmp_path / "out" / "m" / "net.caffemodel").is_file()
