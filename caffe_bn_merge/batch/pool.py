"""Converting deployments: one in this process (`convert_item`, never raises) or many in warm worker
processes (`run_items`), each result reported as it finishes."""

import atexit
import math
import multiprocessing
import os
import pickle
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from multiprocessing.context import BaseContext
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..defaults import DEFAULT_TOLERANCE
from ..errors import MergeError, VerifyError
from ..io.files import net_digest, open_regular
from ..io.outputs import (
    TERMINATING,
    raise_interrupted_within,
    remove_temporaries,
    signals_blocked,
    signals_held,
)
from .worklist import WorkItem

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.synchronize import Lock

    from ..pipeline import NetCache

# Workers start fresh ("spawn"): a forked child inherits the locks of threads it does not have
# (OpenCV's and BLAS's thread pools in a process that verified before), and can hang on them.
START_METHOD = "spawn"


class Status(StrEnum):
    """What became of a deployment."""

    CONVERTED = "converted"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class ItemResult:
    """What became of one deployment: a row of the report."""

    key: str
    prototxt: str | None
    caffemodel: str
    outputs: list[str]
    status: Status
    reason: str | None = None
    layers_before: int | None = None
    layers_after: int | None = None
    folds: dict[str, int] = field(default_factory=dict)  # actions by rule
    max_verify_error: float | None = None  # max relative error of the gating blobs, when verified
    seconds: float = 0.0
    quant: dict | None = None  # int8 readiness summary (--quant)
    benchmark: dict | None = None  # merged / original forward time on OpenCV (--benchmark)
    warnings: list[str] = field(default_factory=list)  # each distinct warning of its merge
    # Where `seconds` went (None when the step was not reached): reading the inputs (the prototxt
    # parse, unless `net_cached`, and the caffemodel index), planning the folds, writing both outputs.
    read_seconds: float | None = None
    plan_seconds: float | None = None
    write_seconds: float | None = None
    net_cached: bool | None = None  # the prototxt was parsed by an earlier deployment of this process
    replayed: bool | None = None  # planned and written from an earlier merge of this net and caffemodel layout
    cpu_seconds: float = 0.0  # CPU time of the process (all its threads) while converting it

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Status) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Readiness:
    """What to measure besides converting: int8 readiness, and forward-pass timing rounds (0: none)."""

    quant: bool = False
    benchmark: int = 0
    threads: int | None = None


def item_result(item: WorkItem, status: Status, reason: str | None = None, **details: object) -> ItemResult:
    """An ItemResult for `item` with the given status (and details)."""
    outputs = [str(item.out_prototxt), str(item.out_caffemodel)]
    prototxt = str(item.prototxt) if item.prototxt is not None else None
    return ItemResult(item.key, prototxt, str(item.caffemodel), outputs, status, reason, **details)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Settings:
    """How each deployment is converted: verified (on which engine, to what tolerance) or not,
    whether existing outputs may be replaced, and what else to measure."""

    verify: bool = False
    backend: str = "auto"
    tolerance: float = DEFAULT_TOLERANCE
    overwrite: bool = True
    readiness: Readiness = Readiness()


def convert_item(item: WorkItem, settings: Settings = Settings(), cache: "NetCache | None" = None) -> ItemResult:
    """Merge one deployment into temporary files, verify them when asked, then publish the pair
    (replacing existing outputs only with `settings.overwrite`); never raises: any error becomes a
    failed result with a one-line reason. A deployment that fails or cannot run verification
    publishes nothing, so that `--skip-existing` retries it. `cache` (a `pipeline.NetCache`) is
    shared by the deployments of one process."""
    start = time.perf_counter(), time.process_time()
    if item.problem is not None:
        return item_result(item, Status.FAILED, item.problem)
    details: dict[str, object] = {}
    staged = None
    try:
        from ..pipeline import merge  # loaded here, so that --help needs no numpy

        item.out_prototxt.parent.mkdir(parents=True, exist_ok=True)
        steps = StepTimer(details)
        hits = cache.hits if cache is not None else 0
        result = merge(
            item.prototxt, item.caffemodel, item.out_prototxt, item.out_caffemodel,
            overwrite=settings.overwrite, stage=True, on_step=steps.step, cache=cache,
        )  # fmt: skip
        steps.step(None)
        staged = result.staged
        details["net_cached"] = cache is not None and cache.hits > hits
        details["replayed"] = result.replayed
        details["layers_before"] = sum(result.layers_before.values())
        details["layers_after"] = sum(result.layers_after.values())
        details["folds"] = dict(sorted(Counter(str(a.rule) for a in result.plan.actions).items()))
        details["warnings"] = list(result.warnings)
        if settings.verify:
            merged = (staged.temporary(item.out_prototxt), staged.temporary(item.out_caffemodel))
            error = max_verify_error(item, merged, settings.backend)
            details["max_verify_error"] = error if math.isfinite(error) else None  # JSON has no NaN
            if not error <= settings.tolerance:
                reason = f"verification failed: max relative error {error:.3g} > {settings.tolerance:g} (not written)"
                return _finish(item, Status.FAILED, reason, start, details)
        staged.publish(settings.overwrite)
        details |= _readiness(item, result, settings.readiness)
    except Exception as err:  # one bad deployment never stops the others
        raise_interrupted_within(err)  # a signal stops them all, even one Python wrapped
        reason = str(err) if isinstance(err, MergeError) else f"internal error: {type(err).__name__}: {err}"
        if isinstance(err, VerifyError):
            reason = f"could not verify (not written): {reason}"
        return _finish(item, Status.FAILED, _one_line(reason), start, details)
    finally:
        if staged is not None:
            staged.discard()
    return _finish(item, Status.CONVERTED, None, start, details)


STEP_FIELDS = {"reading": "read_seconds", "folding": "plan_seconds", "writing": "write_seconds"}


class StepTimer:
    """Seconds of merge's steps ("reading", "folding", "writing"), into `details` as `<field>_seconds`."""

    def __init__(self, details: dict[str, object]) -> None:
        self.details, self.current, self.since = details, None, time.perf_counter()

    def step(self, name: str | None) -> None:
        """Close the running step (if any) and start `name` (None: only close)."""
        now = time.perf_counter()
        if self.current in STEP_FIELDS:
            self.details[STEP_FIELDS[self.current]] = round(now - self.since, 4)
        self.current, self.since = name, now


def _finish(
    item: WorkItem, status: Status, reason: str | None, start: tuple[float, float], details: dict
) -> ItemResult:
    wall, cpu = round(time.perf_counter() - start[0], 4), round(time.process_time() - start[1], 4)
    return item_result(item, status, reason, seconds=wall, cpu_seconds=cpu, **details)


def _readiness(item: WorkItem, result: object, wanted: Readiness) -> dict[str, dict]:
    """The summaries of --quant and --benchmark for one converted deployment."""
    details = {}
    if wanted.quant:
        from ..maths.quant import readiness

        hosts = [readiness(host) for host in result.hosts]
        details["quant"] = {
            "hosts": len(hosts),
            "flagged": [h.host for h in hosts if h.flagged],
            "constant_channels": sum(len(c) for h in hosts for c in h.constant_channels.values()),
            "tiny_variance_channels": sum(len(c) for h in hosts for c in h.tiny_variance_channels.values()),
        }
    if wanted.benchmark:
        from ..verification.benchmark import benchmark

        pairs = (item.prototxt, item.caffemodel), (item.out_prototxt, item.out_caffemodel)
        try:
            timed = benchmark(*pairs, "opencv", wanted.benchmark, wanted.threads)
        except VerifyError as err:  # the pair is published already: a note, not a failure
            details["warnings"] = [*result.warnings, _one_line(f"--benchmark: nothing timed: {err}")]
            return details
        ratio = timed.ratio
        details["benchmark"] = {
            "rounds": timed.rounds,
            "original_ms": timed.times("original").median * 1e3,
            "merged_ms": timed.times("merged").median * 1e3,
            "ratio": ratio.median,
            "ratio_iqr": [ratio.q1, ratio.q3],
        }
    return details


def max_verify_error(item: WorkItem, merged: tuple[Path, Path], backend: str = "auto") -> float:
    """Max relative error of the `merged` pair against the inputs of `item` on `backend`, over the
    blobs that decide pass / fail."""
    from ..verification.compare import verify

    return verify((item.prototxt, item.caffemodel), merged, backend).max_relative


def new_cache() -> "NetCache":
    """A `pipeline.NetCache` for the deployments converted in one process."""
    from ..pipeline import NetCache

    return NetCache()


_worker_cache: "NetCache | None" = None  # this worker process's NetCache (set by `_init_worker`)
_channel: "tuple[Connection, Lock] | None" = None  # where this worker sends to its parent (`_send`)
_HEADER = 8  # bytes of each message's length, before it


class Workers(ProcessPoolExecutor):
    """A pool of worker processes that send back, as they go, the key of each deployment they
    start and then its result (`_convert_in_worker`), read here by `received`."""

    def __init__(self, jobs: int, context: BaseContext, opencv: bool) -> None:
        self._reader, writer = context.Pipe(duplex=False)
        super().__init__(jobs, mp_context=context, initializer=_init_worker, initargs=(opencv, writer, context.Lock()))
        os.set_blocking(self._reader.fileno(), False)
        self._unread = bytearray()

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        """Shut the pool down. After an error or a signal, or a signal while it shuts down, its
        processes are ended first (each removes its temporary files): never left running. Then
        the pool's own thread ends, which sees them gone: left running, it would keep the pool's
        semaphores past the exit (multiprocessing's resource tracker warns of each on stderr) and
        close its wake-up pipe while the interpreter's exit writes to it (a traceback)."""
        try:
            if error is not None:
                _end_workers()
            self.shutdown(wait=True, cancel_futures=True)
        except BaseException:
            _end_workers()
            with signals_held():  # a further signal waits until it is done
                self.shutdown(wait=True, cancel_futures=True)
            raise

    def received(self) -> Iterator[str | ItemResult]:
        """What the workers sent that this process has not read yet, whole messages only. The pipe
        is read without waiting: a worker ended halfway through a message leaves a part that is
        never completed, on which `multiprocessing`'s own reading would wait for ever."""
        fd = self._reader.fileno()
        while chunk := _read_some(fd):
            self._unread += chunk
        while len(self._unread) >= _HEADER:
            end = _HEADER + int.from_bytes(self._unread[:_HEADER], "big")
            if len(self._unread) < end:
                break
            message = pickle.loads(self._unread[_HEADER:end])
            del self._unread[:end]
            yield message


def _read_some(fd: int) -> bytes:
    """What the non-blocking `fd` holds now (up to 1 MiB; empty when nothing)."""
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def _send(message: object) -> None:
    """Send `message` to the parent (`Workers.received`), whole: the lock keeps the workers' writes
    apart. Raises before sending anything when it cannot be pickled."""
    data = pickle.dumps(message)
    frame = memoryview(len(data).to_bytes(_HEADER, "big") + data)
    writer, lock = _channel
    with lock:
        while frame:
            frame = frame[os.write(writer.fileno(), frame) :]


def _init_worker(opencv: bool, writer: "Connection", lock: "Lock") -> None:
    """Worker processes: messages sent on `writer` (`_send`); one BLAS / OpenMP / OpenCV thread
    each (unless set otherwise), so that N workers use N cores, not N * cores; then the worker's
    NetCache, made once. (The BLAS settings take effect when numpy was not loaded yet, as in
    `merge-bn batch`, whose own process leaves it to the workers.) A termination signal (SIGTERM to
    the process group, or from the parent) removes the worker's temporary files and ends it at once
    with 128 + signal. At the pool's shutdown a worker ends with exit status 0 without tearing down
    its modules: every file it wrote is closed by then, and it prints nothing."""
    global _worker_cache, _channel
    _channel = writer, lock
    for signum in TERMINATING:
        signal.signal(signum, _end_worker)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATING)  # blocked by `start_workers`: one held comes now
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    _worker_cache = new_cache()
    atexit.register(os._exit, 0)  # skip tearing down numpy and the rest (~0.1 s): nothing is left open
    if opencv:
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:
            pass  # reported per item by verify


def _end_worker(signum: int, frame: object) -> None:
    remove_temporaries()
    os._exit(128 + signum)


def _convert_in_worker(items: list[WorkItem], settings: Settings) -> None:
    """Convert a run of deployments in this worker, sending the key of each as it starts, then
    its result."""
    for item in items:
        _send(item.key)
        result = convert_item(item, settings, _worker_cache)
        try:
            _send(result)
        except Exception as err:  # a result that cannot be pickled: nothing of it was sent
            reason = _one_line(f"internal error: its result could not be sent back: {type(err).__name__}: {err}")
            _send(item_result(item, Status.FAILED, reason))


CHUNK = 32  # deployments of one net sent to a worker at once, at most
NET_KEY_BYTES = 16 << 20


def chunks(items: Sequence[WorkItem], jobs: int = 1) -> list[list[WorkItem]]:
    """`items` in runs of the same prototxt bytes (the same net), largest first: each worker
    parses and plans a net once for many deployments (its `NetCache`), not every worker for every
    net. Runs hold at most CHUNK deployments, fewer when there is little work for `jobs` workers."""
    size = max(1, min(CHUNK, math.ceil(len(items) / (4 * jobs))))
    nets: dict[object, list[WorkItem]] = {}
    for item in items:
        nets.setdefault(item.net or _net_key(item), []).append(item)
    runs = [same[i : i + size] for same in nets.values() for i in range(0, len(same), size)]
    return sorted(runs, key=len, reverse=True)


def _net_key(item: WorkItem) -> object:
    """What tells the nets of two deployments apart, to group them, when discovery did not say
    (`WorkItem.net`): the `net_digest` of the prototxt's first `NET_KEY_BYTES` (its path when it
    cannot be read: converting it says why)."""
    try:
        with open(open_regular(item.prototxt, "--model"), "rb") as handle:
            return net_digest(handle.read(NET_KEY_BYTES))
    except (MergeError, OSError, TypeError):
        return item.prototxt


def start_workers(jobs: int, settings: Settings) -> Workers:
    """A pool of `jobs` worker processes, launched now: they load while this process goes on (e.g.
    finding the deployments). The caller shuts it down (it is a context manager). They start with
    the termination signals blocked, held until their own handlers are in place (`_init_worker`):
    a signal while they load (to the process group) then ends them in one line, as later."""
    context = multiprocessing.get_context(START_METHOD)
    with ExitStack() as if_raised:
        with signals_held():  # a pool half made leaks semaphores and threads
            _start_resource_tracker()
            pool = Workers(jobs, context, opencv=settings.verify or settings.readiness.benchmark > 0)
            if_raised.push(pool)  # a signal raised at the end of this block ends the workers started
            with signals_blocked():  # and so in the workers started now
                for _ in range(jobs):  # a pool that does not fork starts a process per task while none is idle
                    pool.submit(int)
        if_raised.pop_all()
    return pool


def run_items(
    items: Sequence[WorkItem],
    jobs: int = 1,
    settings: Settings = Settings(),
    on_result: Callable[[ItemResult], None] | None = None,
    workers: Workers | None = None,
) -> list[ItemResult]:
    """Convert `items` (in this process when `jobs` is 1, else in `jobs` worker processes: those of
    `workers`, from `start_workers`, if given); call `on_result` as each finishes; return the
    results in the order of `items`. When a worker process dies (a crash in native code), the
    deployments the workers were converting are retried alone, each in a fresh process (the one
    that kills its process again fails), and those not started yet in a fresh pool."""
    results: dict[str, ItemResult] = {}

    def done(result: ItemResult) -> None:
        results[result.key] = result
        if on_result is not None:
            on_result(result)

    if jobs <= 1 or len(items) <= 1:
        cache = new_cache()
        for item in items:
            done(convert_item(item, settings, cache))
        return [results[item.key] for item in items]
    suspects, left = _run_pool(items, min(jobs, len(items)), settings, done, workers)
    while suspects or left:
        for item in suspects:
            # its worker may have published it before it died: the outputs are ours to replace
            if _run_pool([item], 1, replace(settings, overwrite=True), done) != ([], []):
                done(item_result(item, Status.FAILED, "the worker process died converting it (crash in native code?)"))
        suspects, left = _run_pool(left, min(jobs, len(left)), settings, done) if left else ([], [])
    return [results[item.key] for item in items]


POLL_SECONDS = 0.02  # how often results and the ends of runs are looked for


def _run_pool(
    items: Sequence[WorkItem],
    jobs: int,
    settings: Settings,
    done: Callable[[ItemResult], None],
    workers: Workers | None = None,
) -> tuple[list[WorkItem], list[WorkItem]]:
    """Run `items` on `workers`, else on a pool of `jobs` processes of its own, each result passed
    to `done` as it arrives. Returns what a worker's death left unfinished (else nothing): the
    deployments being converted then, and those not started (all as the first when none was being
    converted). Interrupted (a signal) or failing, it ends with the pool (`Workers.__exit__`).

    It waits by sleeping, and asks the pool and its futures with the signals held back
    (`signals_held`): their locks are Python code, and an `Interrupted` raised inside one leaves it
    held, on which the pool's thread hangs for ever."""
    started: set[str] = set()
    finished: set[str] = set()

    def receive(pool: Workers) -> None:
        for message in pool.received():
            if isinstance(message, str):
                started.add(message)
            else:
                finished.add(message.key)
                done(message)

    with nullcontext(workers) if workers is not None else start_workers(jobs, settings) as pool:
        with signals_held():
            pending = {pool.submit(_convert_in_worker, run, settings): run for run in chunks(items, jobs)}
        while pending:
            time.sleep(POLL_SECONDS)
            ended = _ended(pending)
            if any(isinstance(error, BrokenProcessPool) for error in ended.values()):
                pool.shutdown(wait=True, cancel_futures=True)  # every worker ended: all they sent is here
                receive(pool)
                unfinished = [item for run in pending.values() for item in run if item.key not in finished]
                suspects = [item for item in unfinished if item.key in started]
                return (suspects, [i for i in unfinished if i.key not in started]) if suspects else (unfinished, [])
            receive(pool)  # an ended run sent all it had to send before it ended
            for future, error in ended.items():
                unfinished = [item for item in pending.pop(future) if item.key not in finished]
                if error is not None:  # e.g. a run that could not be sent to the worker
                    reason = _one_line(f"internal error: {type(error).__name__}: {error}")
                    for item in unfinished:
                        done(item_result(item, Status.FAILED, reason))
    return [], []


def _ended(futures: Iterable[Future]) -> dict[Future, BaseException | None]:
    """The done ones of `futures`, each with its error (None: none; BrokenProcessPool: a worker
    process died)."""
    with signals_held():
        return {future: None if future.cancelled() else future.exception() for future in futures if future.done()}


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with the termination signals blocked: it ignores
    SIGINT and SIGTERM itself and unblocks only those, so a SIGHUP to the process group stays
    pending there and does not kill it (its restart forgets the semaphores of the pool and prints
    tracebacks). Blocked, not ignored, in this process: a SIGHUP meanwhile is delivered after."""
    from multiprocessing import resource_tracker

    with signals_blocked():
        resource_tracker.ensure_running()


def _end_workers() -> None:
    """Send SIGTERM to every worker process still running and wait for it to end, with the
    signals held back: a second signal leaves none running (one inside a long call of native
    code ends when the call returns)."""
    with signals_held():
        workers = multiprocessing.active_children()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()
