"""Converting deployments: one in this process (`convert_item`, never raises) or many in warm worker
processes (`run_items`), each result reported as it finishes."""

import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from ..defaults import DEFAULT_TOLERANCE
from ..errors import MergeError
from .worklist import WorkItem

if TYPE_CHECKING:
    from ..pipeline import NetCache  # loaded by the workers only, so that --help needs no numpy

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
    # Where `seconds` went (None when the step was not reached): reading the inputs (the prototxt
    # parse, unless `net_cached`, and the caffemodel index), planning the folds, writing both outputs.
    read_seconds: float | None = None
    plan_seconds: float | None = None
    write_seconds: float | None = None
    net_cached: bool | None = None  # the prototxt was parsed by an earlier deployment of this process
    cpu_seconds: float = 0.0  # CPU time of the process (all its threads) while converting it

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Status) else v) for k, v in asdict(self).items()}


def item_result(item: WorkItem, status: Status, reason: str | None = None, **details: object) -> ItemResult:
    """An ItemResult for `item` with the given status (and details)."""
    outputs = [str(item.out_prototxt), str(item.out_caffemodel)]
    prototxt = str(item.prototxt) if item.prototxt is not None else None
    return ItemResult(item.key, prototxt, str(item.caffemodel), outputs, status, reason, **details)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def convert_item(
    item: WorkItem, verify: bool = False, tolerance: float = DEFAULT_TOLERANCE, cache: "NetCache | None" = None
) -> ItemResult:
    """Merge one deployment into its outputs (replacing them if they exist: `main` decides up front
    whether that is wanted), verify it on OpenCV when asked; never raises: any error becomes a failed
    result with a one-line reason. A deployment that fails verification has its outputs removed, so
    that `--skip-existing` retries it. `cache` (a `pipeline.NetCache`) is shared by the deployments
    of one process."""
    start = time.perf_counter(), time.process_time()
    if item.problem is not None:
        return item_result(item, Status.FAILED, item.problem)
    details: dict[str, object] = {}
    try:
        from ..pipeline import merge  # loaded here, so that --help needs no numpy

        item.out_prototxt.parent.mkdir(parents=True, exist_ok=True)
        steps = StepTimer(details)
        hits = cache.hits if cache is not None else 0
        result = merge(
            item.prototxt,
            item.caffemodel,
            item.out_prototxt,
            item.out_caffemodel,
            overwrite=True,
            on_step=steps.step,
            cache=cache,
        )
        steps.step(None)
        details["net_cached"] = cache is not None and cache.hits > hits
        details["layers_before"] = sum(result.layers_before.values())
        details["layers_after"] = sum(result.layers_after.values())
        details["folds"] = dict(sorted(Counter(str(a.rule) for a in result.plan.actions).items()))
        if verify:
            error = max_verify_error(item)
            details["max_verify_error"] = error
            if not error <= tolerance:
                _remove_outputs(item)
                reason = f"verification failed: max relative error {error:.3g} > {tolerance:g} (outputs removed)"
                return _finish(item, Status.FAILED, reason, start, details)
    except Exception as err:  # one bad deployment never stops the others
        if "layers_before" in details:  # merged, then verification could not run
            _remove_outputs(item)
        reason = str(err) if isinstance(err, MergeError) else f"internal error: {type(err).__name__}: {err}"
        return _finish(item, Status.FAILED, _one_line(reason), start, details)
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


def max_verify_error(item: WorkItem) -> float:
    """Max relative error of the merged outputs of `item` against its inputs on OpenCV dnn,
    over the blobs that decide pass / fail."""
    from ..verification.compare import verify

    return verify((item.prototxt, item.caffemodel), (item.out_prototxt, item.out_caffemodel), "opencv").max_relative


def _remove_outputs(item: WorkItem) -> None:
    for out in (item.out_prototxt, item.out_caffemodel):
        out.unlink(missing_ok=True)


def new_cache() -> "NetCache":
    """A `pipeline.NetCache` for the deployments converted in one process."""
    from ..pipeline import NetCache

    return NetCache()


_worker_cache: "NetCache | None" = None  # this worker process's NetCache (set by `_init_worker`)


def _init_worker(verify: bool) -> None:
    """Worker processes: one BLAS / OpenMP / OpenCV thread each (unless set otherwise), so that N
    workers use N cores, not N * cores; then load the pipeline and make the worker's NetCache, once.
    (The BLAS settings take effect when numpy was not loaded yet, as in `merge-bn batch`, whose own
    process leaves it to the workers.)"""
    global _worker_cache
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    _worker_cache = new_cache()
    if verify:
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:
            pass  # reported per item by verify


def _convert_in_worker(item: WorkItem, verify: bool) -> ItemResult:
    return convert_item(item, verify, cache=_worker_cache)


def start_workers(jobs: int, verify: bool) -> ProcessPoolExecutor:
    """A pool of `jobs` worker processes, launched now: they load the pipeline while this process
    goes on (e.g. finding the deployments). The caller shuts it down (it is a context manager)."""
    context = multiprocessing.get_context(START_METHOD)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(verify,))
    pool.submit(int)  # a pool that does not fork starts all its processes on the first task
    return pool


def run_items(
    items: Sequence[WorkItem],
    jobs: int = 1,
    verify: bool = False,
    on_result: Callable[[ItemResult], None] | None = None,
    workers: ProcessPoolExecutor | None = None,
) -> list[ItemResult]:
    """Convert `items` (in this process when `jobs` is 1, else in `jobs` worker processes: those of
    `workers`, from `start_workers`, if given); call `on_result` as each finishes; return the
    results in the order of `items`. Items whose worker process died (a crash in native code) are
    retried alone, each in a fresh process."""
    results: dict[str, ItemResult] = {}

    def done(result: ItemResult) -> None:
        results[result.key] = result
        if on_result is not None:
            on_result(result)

    if jobs <= 1 or len(items) <= 1:
        cache = new_cache()
        for item in items:
            done(convert_item(item, verify, cache=cache))
    else:
        crashed = _run_pool(items, min(jobs, len(items)), verify, done, workers)
        for item in crashed:
            again = _run_pool([item], 1, verify, done)
            if again:
                done(item_result(item, Status.FAILED, "the worker process died converting it (crash in native code?)"))
    return [results[item.key] for item in items]


def _run_pool(
    items: Sequence[WorkItem],
    jobs: int,
    verify: bool,
    done: Callable[[ItemResult], None],
    workers: ProcessPoolExecutor | None = None,
) -> list[WorkItem]:
    """Run `items` on `workers`, else on a pool of `jobs` processes of its own; return the items
    lost to a dead worker."""
    crashed = []
    with nullcontext(workers) if workers is not None else start_workers(jobs, verify) as pool:
        futures = {pool.submit(_convert_in_worker, item, verify): item for item in items}
        try:
            for future in as_completed(futures):
                item = futures[future]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    crashed.append(item)
                    continue
                except Exception as err:  # e.g. a result that cannot be sent back
                    result = item_result(item, Status.FAILED, _one_line(f"internal error: {type(err).__name__}: {err}"))
                done(result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return crashed
