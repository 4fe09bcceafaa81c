"""A termination signal that lands anywhere in the main thread's calls into the thread and process
pools (threading, queue, concurrent.futures: Python-level locks, which an exception raised between
their acquire and release leaves held) or into the import system ends the run as any signal does:
exit 128 + signal, one line, no temporary file, every output pair complete or absent, no process
left, and never a hang. `signal_tracer.py` calls the handler at the chosen event (as Python does
when a signal lands there), so each variant reaches the same point on every run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import copy_sample, group_gone, start_in_session

ROOT = Path(__file__).resolve().parent.parent
TRACER = Path(__file__).with_name("signal_tracer.py")
POOLS = ("threading", "queue", "concurrent.futures._base", "concurrent.futures.process", "concurrent.futures.thread")
IMPORTS = ("importlib._bootstrap", "importlib._bootstrap_external")
PROCESSES = tuple(
    f"multiprocessing.{name}"
    for name in [
        "context",
        "process",
        "popen_spawn_posix",
        "spawn",
        "util",
        "synchronize",
        "resource_tracker",
        "connection",
        "queues",
    ]
)
SECONDS = 60  # a run takes 1-2 s: longer is a hang
OUTPUTS = ("net_merged.prototxt", "net_merged.caffemodel")

# (start, modules, events): the events counted from `start` in a run without the signal (measured:
# ~950, ~4,300, ~70, 2,200-4,500, ~185,000); a point past the end is not reached, and the run must
# then succeed.
BATCH = ("_run_pool", POOLS, 1000)
LIFE = ("start_workers", POOLS + PROCESSES, 4300)  # the pool's whole life: made, used, shut, freed
SHUTDOWN = ("shutdown", POOLS, 70)  # the pool's, once every deployment is done
MERGE = ("_merge", POOLS, 2200)
LOADING = ("_main", IMPORTS, 185_000)  # from when the handlers are in place
POINTS = {BATCH: 24, LIFE: 24, SHUTDOWN: 10, MERGE: 20, LOADING: 16}  # variants of each


def _points(events: int, count: int) -> list[int]:
    """`count` points spread over `events` at uneven steps (golden-ratio sequence), so that they
    meet every phase of the code's repeated calls, not the same one each time."""
    return sorted({1 + int(events * (i * 0.6180339887 % 1)) for i in range(count)})


Where = tuple[str, tuple[str, ...], int]


def _run(args: list[str], folder: Path, where: Where, index: int) -> tuple[int | None, str, bool]:
    """Run merge-bn `args` in `folder` with the signal at the `index`-th event of `where`: exit code
    (None: not ended within SECONDS, then killed), stderr, whether the signal was delivered."""
    start, modules, _ = where
    fired = folder / "fired"
    spec = {"start": start, "modules": modules, "index": index, "signal": int(signal.SIGTERM), "fired": str(fired)}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIGNAL_AT": json.dumps(spec)}
    process = start_in_session([sys.executable, str(TRACER), *args], folder, env)
    try:
        _, stderr = process.communicate(timeout=SECONDS)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        code = None
    assert group_gone(process.pid), "a worker outlived the run"
    return code, stderr, fired.exists()


def _check_ending(code: int | None, stderr: str, fired: bool) -> None:
    assert code is not None, f"hung for {SECONDS} s after the signal: {stderr}"
    if not fired:
        assert code == 0 and not stderr, stderr
        return
    lines = stderr.strip().splitlines()
    assert code == 128 + signal.SIGTERM, stderr
    assert len(lines) == 1 and "Traceback" not in stderr and "SIGTERM" in lines[0], stderr


def _whole_or_absent(folder: Path, names: tuple[str, ...], expected: dict[str, bytes] | None = None) -> None:
    present = [(folder / name).exists() for name in names]
    assert all(present) or not any(present), f"one output without the other in {folder}: {present}"
    if expected and all(present):
        for name in names:
            assert (folder / name).read_bytes() == expected[name], f"{name} is not the complete output"
    assert not [p for p in folder.rglob(".*") if p.name.endswith(".tmp")], "a temporary file was left"


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> dict[str, bytes]:
    """The outputs of the sample net, converted without a signal."""
    folder = tmp_path_factory.mktemp("clean")
    copy_sample(folder)
    code, stderr, _ = _run(["--model", "net.prototxt", "--weights", "net.caffemodel", "-q"], folder, MERGE, 10**9)
    assert code == 0, stderr
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


@pytest.mark.parametrize(
    ("where", "index"),
    [(where, i) for where in (BATCH, LIFE, SHUTDOWN) for i in _points(where[2], POINTS[where])],
    ids=[f"{where[0]}-{i}" for where in (BATCH, LIFE, SHUTDOWN) for i in _points(where[2], POINTS[where])],
)
def test_batch_signal_inside_the_pool(where: tuple, index: int, tmp_path, expected) -> None:
    """`merge-bn batch --jobs 2`, the signal to the parent while it submits to and polls the
    pool, or while it shuts the pool down."""
    for name in ("m0", "m1", "m2"):
        (tmp_path / "src" / name).mkdir(parents=True)
        copy_sample(tmp_path / "src" / name)
    out = tmp_path / "out"
    args = ["batch", "src", "--out", "out", "--jobs", "2", "-q"]
    _check_ending(*_run(args, tmp_path, where, index))
    for name in ("m0", "m1", "m2"):
        pair = (f"{name}/net.prototxt", f"{name}/net.caffemodel")
        _whole_or_absent(out, pair, {pair[0]: expected[OUTPUTS[0]], pair[1]: expected[OUTPUTS[1]]})


@pytest.mark.parametrize(
    ("where", "index"),
    [(where, i) for where in (MERGE, LOADING) for i in _points(where[2], POINTS[where])],
    ids=[f"{where[0]}-{i}" for where in (MERGE, LOADING) for i in _points(where[2], POINTS[where])],
)
def test_merge_signal_inside_threads_or_imports(where: tuple, index: int, tmp_path, expected) -> None:
    """`merge-bn`, the signal while it writes with its threads, or while a module loads."""
    copy_sample(tmp_path)
    _check_ending(*_run(["--model", "net.prototxt", "--weights", "net.caffemodel", "-q"], tmp_path, where, index))
    _whole_or_absent(tmp_path, OUTPUTS, expected)
