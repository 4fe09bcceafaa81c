"""Signals never leave partial outputs: SIGINT, SIGHUP and SIGTERM at chosen points of the writer
(held there by the CAFFE_BN_MERGE_TEST_PAUSE hook) and after random delays, for `merge-bn` and for
`merge-bn batch` (signal to the parent, or to the whole process group as Slurm and Kubernetes send
it). After any signal: exit 128 + signal, one line on stderr, no temporary file, and every pair of
outputs complete or absent (complete only when the signal came once the pair was published)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import copy_sample, group_gone, start_in_session

from caffe_bn_merge import cli, pipeline
from caffe_bn_merge.batch import pool
from caffe_bn_merge.batch.worklist import WorkItem
from caffe_bn_merge.io.outputs import PAUSE_ENV, Interrupted

ROOT = Path(__file__).resolve().parent.parent
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
OUTPUTS = ("net_merged.prototxt", "net_merged.caffemodel")


def _start(args: list[str], cwd: Path, pause: str | None = None, tag: str = "") -> tuple[subprocess.Popen, Path]:
    """The command line in a session of its own (so the test can signal its process group)."""
    marker = cwd / f"paused-{pause}{tag}"
    Path(f"{marker}.claimed").unlink(missing_ok=True)  # left by an earlier run in this folder
    env = {**os.environ, "PYTHONPATH": str(ROOT), PAUSE_ENV: f"{pause}={marker}" if pause else ""}
    return start_in_session([sys.executable, "-m", "caffe_bn_merge", *args], cwd, env), marker


def _wait_for(marker: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the process never reached the pause point"
        time.sleep(0.005)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


def _complete_or_absent(folder: Path, expected: dict[str, bytes], names: tuple[str, ...]) -> bool:
    """True when the pair `names` in `folder` is complete (bytes as expected), False when absent;
    fails on one file without the other or a file that is not complete."""
    present = [(folder / name).exists() for name in names]
    assert all(present) or not any(present), f"one output without the other in {folder}: {present}"
    if all(present):
        for name in names:
            assert (folder / name).read_bytes() == expected[name], f"{name} is not the complete output"
    return all(present)


def _expect_signalled(code: int, stderr: str, signum: int) -> None:
    assert code == 128 + signum, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert signal.Signals(signum).name in lines[0]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> tuple[dict[str, bytes], float]:
    """The outputs of an uninterrupted run, and how long it took from the point its handlers
    were in place (the longest of three runs)."""
    seconds = 0.0
    for run in range(3):
        folder = tmp_path_factory.mktemp(f"clean{run}")
        copy_sample(folder)
        args = ["--model", "net.prototxt", "--weights", "net.caffemodel", "-q"]
        process, marker = _start(args, folder, "started")
        _wait_for(marker, process)
        start = time.monotonic()
        marker.unlink()
        code, stderr = _finish(process)
        assert code == 0, stderr
        seconds = max(seconds, time.monotonic() - start)
    return {name: (folder / name).read_bytes() for name in OUTPUTS}, seconds


POINTS = {"started": False, "written": False, "staged": False, "publish": True}  # point -> pair published


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_signal_at_each_point_of_the_writer(point: str, signum: int, tmp_path, clean_run) -> None:
    """At every pause point: exit 128 + signal, one line; the pair is absent before the publish,
    complete when the signal came while it was being published (held back until both are there)."""
    copy_sample(tmp_path)
    args = ["--model", "net.prototxt", "--weights", "net.caffemodel", "-q", "--report", "r.json"]
    process, marker = _start(args, tmp_path, point)
    _wait_for(marker, process)
    os.killpg(process.pid, signum)
    marker.unlink()
    code, stderr = _finish(process)
    _expect_signalled(code, stderr, signum)
    assert _complete_or_absent(tmp_path, clean_run[0], OUTPUTS) is POINTS[point]
    assert (tmp_path / "r.json").exists() is POINTS[point]
    assert not _temporaries(tmp_path)


RANDOM_RUNS = 14


def test_signals_after_random_delays(tmp_path, clean_run) -> None:
    """Signals at random moments of whole runs (from the moment the handlers are in place):
    never a partial or lone output, never a temporary file, always 128 + signal or 0."""
    rng = random.Random(16)
    expected, seconds = clean_run
    outcomes = {"absent": 0, "complete": 0, "finished": 0}
    for run in range(RANDOM_RUNS):
        folder = tmp_path / str(run)
        folder.mkdir()
        copy_sample(folder)
        signum = rng.choice(SIGNALS)
        process, marker = _start(["--model", "net.prototxt", "--weights", "net.caffemodel", "-q"], folder, "started")
        _wait_for(marker, process)
        marker.unlink()
        time.sleep(rng.uniform(0, 1.2 * seconds))
        os.killpg(process.pid, signum)
        code, stderr = _finish(process)
        complete = _complete_or_absent(folder, expected, OUTPUTS)
        if code in (0, -signum):  # -signum: in the last moments of the interpreter's exit
            assert complete and not stderr, stderr
            outcomes["finished"] += 1
        else:
            _expect_signalled(code, stderr, signum)
            outcomes["complete" if complete else "absent"] += 1
        assert not _temporaries(folder)
    print("random-delay outcomes:", outcomes)
    assert outcomes["absent"] > 0, outcomes  # the delays reach into the writing


def _wrapped_by_python() -> BaseException:
    """A signal's Interrupted as Python passes it on from a class's `__set_name__` (what a signal
    while a module loads gives): a RuntimeError caused by it (Python 3.11)."""

    class Hook:
        def __set_name__(self, owner: type, name: str) -> None:
            raise Interrupted(signal.SIGTERM)

    try:
        type("Holder", (), {"hook": Hook()})
    except BaseException as err:  # the very error is the point
        return err
    raise AssertionError("__set_name__ was not called")


def test_a_signal_python_wrapped_is_still_a_signal(monkeypatch, capsys) -> None:
    """merge-bn: exit 128 + signal and the one line, not an internal error."""
    error = _wrapped_by_python()
    monkeypatch.setattr(cli, "_run", lambda args: (_ for _ in ()).throw(error))
    assert cli.main(["--model", "m.prototxt", "--weights", "w.caffemodel"]) == 128 + signal.SIGTERM
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "SIGTERM" in stderr and "internal error" not in stderr


def test_a_signal_python_wrapped_stops_a_batch(monkeypatch, tmp_path) -> None:
    """merge-bn batch: the deployment under way does not fail with an internal error, the
    signal ends the run."""
    error = _wrapped_by_python()
    monkeypatch.setattr(pipeline, "merge", lambda *args, **named: (_ for _ in ()).throw(error))
    copy_sample(tmp_path)
    names = ("net.prototxt", "net.caffemodel", "o.prototxt", "o.caffemodel")
    item = WorkItem("net", *(tmp_path / name for name in names))
    with pytest.raises(Interrupted):
        pool.convert_item(item)


def _fleet(folder: Path, count: int) -> Path:
    source = folder / "src"
    for index in range(count):
        (source / f"m{index}").mkdir(parents=True)
        copy_sample(source / f"m{index}")
    return source


def _batch_pairs(out: Path, count: int) -> int:
    """How many deployments under `out` are complete (each complete or absent, never partial)."""
    done = 0
    for index in range(count):
        names = (f"m{index}/net.prototxt", f"m{index}/net.caffemodel")
        present = [(out / name).is_file() for name in names]
        assert all(present) or not any(present), f"m{index}: one output without the other"
        done += all(present)
    return done


BATCH_CASES = [  # every signal to the group, SIGTERM to the parent alone; the publish point with SIGTERM
    (point, signum, group)
    for point in ("written", "publish")
    for signum in SIGNALS
    for group in (True, False)
    if (signum == signal.SIGTERM or group) and (point == "written" or signum == signal.SIGTERM)
]


@pytest.mark.parametrize(
    ("point", "signum", "group"),
    BATCH_CASES,
    ids=[f"{p}-{s.name}-{'group' if g else 'parent'}" for p, s, g in BATCH_CASES],
)
def test_batch_signal_while_workers_write(point: str, signum: int, group: bool, tmp_path) -> None:
    """A worker held inside the writer; the signal to the group or to the parent alone: the
    workers end, no temporary file, every deployment complete or absent, 128 + signal, one line."""
    source = _fleet(tmp_path, 3)
    out = tmp_path / "out"
    process, marker = _start(["batch", str(source), "--out", str(out), "--jobs", "2", "-q"], tmp_path, point)
    _wait_for(marker, process)
    if group:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    marker.unlink()
    code, stderr = _finish(process)
    _expect_signalled(code, stderr, signum)
    _batch_pairs(out, 3)
    assert not _temporaries(out)
    assert group_gone(process.pid), "a worker outlived the batch"


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.08, 0.15])
@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_batch_signal_while_workers_load(signum: int, delay: float, tmp_path) -> None:
    """A signal to the group while the worker processes are still loading (held from their start
    until their handlers are in place): one line, 128 + signal, no worker's traceback."""
    source = _fleet(tmp_path, 2)
    process, marker = _start(
        ["batch", str(source), "--out", str(tmp_path / "out"), "--jobs", "2", "-q"], tmp_path, "workers"
    )
    _wait_for(marker, process)
    time.sleep(delay)
    os.killpg(process.pid, signum)
    marker.unlink()
    code, stderr = _finish(process)
    _expect_signalled(code, stderr, signum)
    assert group_gone(process.pid), "a worker outlived the batch"


def test_batch_sigterm_to_the_group_after_random_delays(tmp_path) -> None:
    """SIGTERM to the whole process group at random moments of a batch run."""
    rng = random.Random(17)
    source = _fleet(tmp_path, 4)
    for run in range(3):
        out = tmp_path / f"out{run}"
        process, marker = _start(["batch", str(source), "--out", str(out), "--jobs", "2", "-q"], tmp_path, "started")
        _wait_for(marker, process)
        marker.unlink()
        time.sleep(rng.uniform(0.2, 2.5))
        os.killpg(process.pid, signal.SIGTERM)
        code, stderr = _finish(process)
        done = _batch_pairs(out, 4)
        if code in (0, -signal.SIGTERM):  # -SIGTERM: in the last moments of the interpreter's exit
            assert done == 4
        else:
            _expect_signalled(code, stderr, signal.SIGTERM)
        assert not _temporaries(out) if out.exists() else True
        assert group_gone(process.pid)


def _two_nets(folder: Path) -> dict[str, dict[str, bytes]]:
    """resnet_mini as a.*, no_bn as b.*, and the merged pair each gives (o.prototxt, o.caffemodel)."""
    expected = {}
    for name, sample in (("a", "resnet_mini"), ("b", "no_bn")):
        for suffix in (".prototxt", ".caffemodel"):
            (folder / f"{name}{suffix}").write_bytes((ROOT / "sample_nets" / f"{sample}{suffix}").read_bytes())
        process, _ = _start(_args_writing_o(name, "x"), folder)
        assert _finish(process)[0] == 0
        expected[name] = {f"o{suffix}": (folder / f"x{suffix}").read_bytes() for suffix in (".prototxt", ".caffemodel")}
        for suffix in (".prototxt", ".caffemodel"):
            (folder / f"x{suffix}").unlink()
    return expected


def _args_writing_o(name: str, output: str = "o") -> list[str]:
    return ["--model", f"{name}.prototxt", "--weights", f"{name}.caffemodel", "-q",
            "--output-model", f"{output}.prototxt", "--output-weights", f"{output}.caffemodel"]  # fmt: skip


@pytest.mark.parametrize("force", [False, True], ids=["no-clobber", "--force"])
def test_two_runs_writing_the_same_outputs(force: bool, tmp_path) -> None:
    """Two runs (different nets) held just before publishing the same output names, released
    together in both orders, several rounds: without --force exactly one wins and the pair is
    wholly the winner's; the loser exits 2 in one line. With --force both succeed."""
    expected = _two_nets(tmp_path)
    for round_ in range(3):
        runs = {}
        for name in "ab":
            args = _args_writing_o(name) + (["--force"] if force else [])
            runs[name] = _start(args, tmp_path, "staged", tag=name)
        for process, marker in runs.values():
            _wait_for(marker, process)
        for name in "ab" if round_ % 2 else "ba":
            runs[name][1].unlink()
        results = {name: _finish(process) for name, (process, _) in runs.items()}
        outputs = {f"o{s}": (tmp_path / f"o{s}").read_bytes() for s in (".prototxt", ".caffemodel")}
        assert not _temporaries(tmp_path)
        if force:
            assert all(code == 0 for code, _ in results.values()), results
            assert all(value in (expected["a"][key], expected["b"][key]) for key, value in outputs.items())
        else:
            winners = [name for name, (code, _) in results.items() if code == 0]
            assert len(winners) == 1, results
            (loser,) = set("ab") - set(winners)
            code, stderr = results[loser]
            assert code == 2 and len(stderr.strip().splitlines()) == 1 and "another run" in stderr, stderr
            assert outputs == expected[winners[0]]
        for suffix in (".prototxt", ".caffemodel"):
            (tmp_path / f"o{suffix}").unlink()


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_exiting_is_one_line_too(signum) -> None:
    """After the work (the handlers' block is over, the interpreter is ending): still exit
    128 + signal with one line naming it, no traceback."""
    code = (
        "import os, time\n"
        "from caffe_bn_merge.io.outputs import signals_raise\n"
        "with signals_raise(restore=False):\n"
        "    pass\n"
        f"os.kill(os.getpid(), {int(signum)})\n"
        "time.sleep(30)\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    _expect_signalled(process.returncode, process.stderr, signum)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_the_handlers_are_put_back(tmp_path, clean_run, signum) -> None:
    """The work done and published, the handlers being put back: still one line, 128 + signal,
    and the outputs complete."""
    expected, _ = clean_run
    copy_sample(tmp_path)
    process, marker = _start(["--model", "net.prototxt", "--weights", "net.caffemodel", "-q"], tmp_path, "restoring")
    _wait_for(marker, process)
    os.killpg(process.pid, signum)
    marker.unlink()
    code, stderr = _finish(process)
    _expect_signalled(code, stderr, signum)
    assert _complete_or_absent(tmp_path, expected, OUTPUTS) and not _temporaries(tmp_path)
