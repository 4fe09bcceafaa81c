"""`merge-bn batch` with stdout or stderr a pipe its reader closed (`merge-bn batch ... | head`),
from the start or after a few bytes: one line on stderr (when stderr is not the closed one), exit 2
once a write has failed, no traceback, no temporary file, every output pair whole or absent, the
inputs untouched, and the report written when only stdout went; `merge-bn batch-report` with
stderr closed writes the merged report, then exits 2."""

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT
from harness import copy_sample

BROKEN = "broken pipe"


def _fleet(root: Path) -> Path:
    """Five deployments that convert and one that fails (a caffemodel of another net)."""
    for i, name in enumerate(["no_bn", "resnet_mini", "no_bn", "deconv_seg", "resnet_mini", "no_bn"]):
        (root / f"d{i}").mkdir(parents=True)
        copy_sample(root / f"d{i}", name)
    bad = root / "d5"
    (bad / "net.caffemodel").write_bytes((ROOT / "sample_nets" / "resnet_mini.caffemodel").read_bytes())
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.*")}


def _closing_reader(fd: int, keep: int) -> threading.Thread:
    """A thread reading up to `keep` bytes of pipe `fd`, then closing it (0: closed at once)."""

    def read() -> None:
        taken = 0
        while taken < keep and (chunk := os.read(fd, keep - taken)):
            taken += len(chunk)
        os.close(fd)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


VARIANTS = list(itertools.product(["stdout", "stderr"], [1, 2], ["-v", "", "-q"], [0, 40, 400]))


@pytest.mark.parametrize(("stream", "jobs", "verbosity", "keep"), VARIANTS)
def test_a_closed_stream_ends_the_run_in_one_line(tmp_path: Path, stream: str, jobs: int, verbosity: str, keep: int):
    fleet, out, report = _fleet(tmp_path / "fleet"), tmp_path / "out", tmp_path / "report.json"
    before = _digest(fleet)
    read, write = os.pipe()
    reader = _closing_reader(read, keep)
    if keep == 0:
        reader.join()  # closed before the run starts
    other = subprocess.PIPE
    args = [sys.executable, "-m", "caffe_bn_merge", "batch", str(fleet), "--out", str(out), "--jobs", str(jobs)]
    args += ["--report", str(report), *([verbosity] if verbosity else [])]
    done = subprocess.run(
        args,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"},
        stdout=write if stream == "stdout" else other,
        stderr=write if stream == "stderr" else other,
        text=True,
        timeout=120,
        check=False,
    )
    os.close(write)
    reader.join()
    err = done.stderr if stream == "stdout" else ""
    assert "Traceback" not in err, err
    quiet_stdout = stream == "stdout" and verbosity == "-q"  # nothing is written to it
    if keep == 0 and not quiet_stdout:
        assert done.returncode == 2, err  # the first write failed
    else:
        assert done.returncode in (1, 2), err  # 1: one deployment failed, the stream was never written to after
    if done.returncode == 2 and stream == "stdout":
        assert err.strip().splitlines()[-1].startswith("merge-bn batch: error:") and BROKEN in err, err
        assert err.count(BROKEN) == 1, err
    if done.returncode == 1:
        assert BROKEN not in err and report.is_file(), err
    if stream == "stdout":
        assert report.is_file()  # written before the table
    assert _digest(fleet) == before
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []
    pairs = {name.rsplit(".", 1)[0] for name in written}
    assert written == sorted(f"{pair}.{suffix}" for pair in pairs for suffix in ("caffemodel", "prototxt")), written
    assert all(name.startswith(("d0/", "d1/", "d2/", "d3/", "d4/")) for name in written), written
    assert all((out / name).stat().st_size > 0 for name in written)


@pytest.mark.parametrize(("quiet", "shards"), list(itertools.product([False, True], [(1, 2), (1,)])))
def test_batch_report_with_stderr_closed_still_writes_the_merged_report(tmp_path: Path, quiet: bool, shards: tuple):
    """`merge-bn batch-report` says only on stderr (failures, missing shards, its summary): with
    stderr closed it writes the merged report, then exits 2 without a traceback."""
    fleet, env = _fleet(tmp_path / "fleet"), {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "caffe_bn_merge"]
    for i in shards:
        args = [str(fleet), "--out", str(tmp_path / "out"), "--shard", f"{i}/2"]
        args += ["--report", str(tmp_path / f"{i}.json")]
        subprocess.run([*command, "batch", *args, "-q"], env=env, check=False, capture_output=True)
    reports = [str(tmp_path / f"{i}.json") for i in shards]
    merged = tmp_path / "fleet.json"
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run(
        [*command, "batch-report", *reports, "-o", str(merged), *(["-q"] if quiet else [])],
        env=env, stdout=subprocess.PIPE, stderr=write, check=False,
    )  # fmt: skip
    os.close(write)
    assert done.returncode == 2 and done.stdout == b""
    assert json.loads(merged.read_text())["counts"]["total"] == 3 * len(shards)  # each shard has 3 of the 6
