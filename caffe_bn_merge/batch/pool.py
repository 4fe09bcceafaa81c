"""Converting deployments: one in this process (`convert_item`, never raises) or many in warm worker
processes (`run_items`), each result reported as it finishes."""

import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from ..defaults import DEFAULT_TOLERANCE
from ..errors import MergeError
from .worklist import WorkItem

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


def convert_item(
    item: WorkItem, verify: bool = False, tolerance: float = DEFAULT_TOLERANCE, readiness: Readiness = Readiness()
) -> ItemResult:
    """Merge one deployment into its outputs (replacing them if they exist: `main` decides up front
    whether that is wanted), verify it on OpenCV when asked; never raises: any error becomes a failed
    result with a one-line reason. A deployment that fails verification has its outputs removed, so
    that `--skip-existing` retries it."""
    start = time.perf_counter()
    if item.problem is not None:
        return item_result(item, Status.FAILED, item.problem)
    details: dict[str, object] = {}
    try:
        from ..pipeline import merge  # loaded here, so that --help needs no numpy

        item.out_prototxt.parent.mkdir(parents=True, exist_ok=True)
        result = merge(item.prototxt, item.caffemodel, item.out_prototxt, item.out_caffemodel, overwrite=True)
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
        details |= _readiness(item, result, readiness)
    except Exception as err:  # one bad deployment never stops the others
        if "layers_before" in details:  # merged, then verification could not run
            _remove_outputs(item)
        reason = str(err) if isinstance(err, MergeError) else f"internal error: {type(err).__name__}: {err}"
        return _finish(item, Status.FAILED, _one_line(reason), start, details)
    return _finish(item, Status.CONVERTED, None, start, details)


def _finish(item: WorkItem, status: Status, reason: str | None, start: float, details: dict) -> ItemResult:
    return item_result(item, status, reason, seconds=round(time.perf_counter() - start, 4), **details)


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
        timed = benchmark(*pairs, "opencv", wanted.benchmark, wanted.threads)
        ratio = timed.ratio
        details["benchmark"] = {
            "rounds": timed.rounds,
            "original_ms": timed.times("original").median * 1e3,
            "merged_ms": timed.times("merged").median * 1e3,
            "ratio": ratio.median,
            "ratio_iqr": [ratio.q1, ratio.q3],
        }
    return details


def max_verify_error(item: WorkItem) -> float:
    """Max relative error of the merged outputs of `item` against its inputs on OpenCV dnn,
    over the blobs that decide pass / fail."""
    from ..verification.compare import verify

    return verify((item.prototxt, item.caffemodel), (item.out_prototxt, item.out_caffemodel), "opencv").max_relative


def _remove_outputs(item: WorkItem) -> None:
    for out in (item.out_prototxt, item.out_caffemodel):
        out.unlink(missing_ok=True)


def _init_worker(opencv: bool) -> None:
    """Worker processes: one BLAS / OpenMP / OpenCV thread each (unless set otherwise), so that N
    workers use N cores, not N * cores. (The BLAS settings take effect when numpy was not loaded yet,
    as in `merge-bn batch`, whose own process leaves it to the workers.)"""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    if opencv:
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:
            pass  # reported per item by verify


def run_items(
    items: Sequence[WorkItem],
    jobs: int = 1,
    verify: bool = False,
    on_result: Callable[[ItemResult], None] | None = None,
    readiness: Readiness = Readiness(),
) -> list[ItemResult]:
    """Convert `items` (in this process when `jobs` is 1, else in `jobs` worker processes); call
    `on_result` as each finishes; return the results in the order of `items`. Items whose worker
    process died (a crash in native code) are retried alone, each in a fresh process."""
    results: dict[str, ItemResult] = {}

    def done(result: ItemResult) -> None:
        results[result.key] = result
        if on_result is not None:
            on_result(result)

    if jobs <= 1 or len(items) <= 1:
        for item in items:
            done(convert_item(item, verify, readiness=readiness))
    else:
        crashed = _run_pool(items, min(jobs, len(items)), verify, done, readiness)
        for item in crashed:
            again = _run_pool([item], 1, verify, done, readiness)
            if again:
                done(item_result(item, Status.FAILED, "the worker process died converting it (crash in native code?)"))
    return [results[item.key] for item in items]


def _run_pool(
    items: Sequence[WorkItem], jobs: int, verify: bool, done: Callable[[ItemResult], None], readiness: Readiness
) -> list[WorkItem]:
    """Run `items` on a pool of `jobs` processes; return those lost to a dead worker."""
    crashed = []
    context = multiprocessing.get_context(START_METHOD)
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(verify or readiness.benchmark > 0,)
    ) as pool:
        futures = {pool.submit(convert_item, item, verify, DEFAULT_TOLERANCE, readiness): item for item in items}
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
