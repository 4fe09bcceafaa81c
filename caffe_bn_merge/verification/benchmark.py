"""How much faster the merged model runs: the forward pass of the original and the merged model timed
on one engine (OpenCV dnn with its run-time fusion off, or pycaffe), in interleaved rounds after a
warm-up, so that a shared machine's drift hits both alike. Numbers only; nothing is printed.

Each round times one forward pass of each model, alternating which goes first; the ratio of a round
is merged / original, and the result is the median ratio with its interquartile range.

An engine is one entry of `BENCHMARKS`. One that runs in this process needs only a loader,
`loader(model, weights, inputs) -> forward` (a function running one forward pass), and optionally a
thread pin: `"name": in_process(loader, pin)`.
"""

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VerifyError
from .compare import BACKENDS, _import_cv2, first_engine, load_inputs, opencv_net
from .pycaffe import time_caffe

Forward = Callable[[], object]
# (model, weights, inputs) -> a function running one forward pass, inside `threads` pinning
Loader = Callable[[Path, Path, dict[str, np.ndarray]], Forward]
# (original, merged, inputs, rounds, warmup, threads) -> per-round seconds (original, merged)
Timer = Callable[
    [tuple[Path, Path], tuple[Path, Path], dict[str, np.ndarray], int, int, int | None],
    tuple[list[float], list[float]],
]
DEFAULT_ROUNDS = 20
WARMUP = 3


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of some numbers (seconds or ratios)."""

    median: float
    q1: float
    q3: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        return cls(median, q1, q3, min(values), max(values))


@dataclass(frozen=True)
class BenchmarkResult:
    """Per-round forward-pass times of both models on one backend."""

    backend: str
    threads: int | None  # None: the engine's default
    warmup: int
    original: tuple[float, ...]  # seconds, one per round
    merged: tuple[float, ...]

    @property
    def rounds(self) -> int:
        return len(self.original)

    @property
    def ratio(self) -> Spread:
        """merged / original, round by round (below 1: the merged model is faster)."""
        return Spread.of([m / o for o, m in zip(self.original, self.merged, strict=True)])

    def times(self, which: str) -> Spread:
        return Spread.of(list(getattr(self, which)))


def interleave(forwards: tuple[Forward, Forward], rounds: int, warmup: int) -> tuple[list[float], list[float]]:
    """Time one call of each function per round, after `warmup` untimed calls of each; the order
    alternates from round to round."""
    for _ in range(warmup):
        for forward in forwards:
            forward()
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(rounds):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for i in order:
            start = time.perf_counter()
            forwards[i]()
            times[i].append(time.perf_counter() - start)
    return times


def _load_opencv(model: Path, weights: Path, inputs: dict[str, np.ndarray]) -> Forward:
    """One OpenCV dnn forward pass of all the net's outputs (fusion off, inputs set once)."""
    cv2 = _import_cv2()

    try:
        net = opencv_net(model, weights)
        for name, value in inputs.items():
            net.setInput(value, name)
        outputs = net.getUnconnectedOutLayersNames()
        net.forward(outputs)  # fails here, not in a timed round, when OpenCV cannot run it
    except cv2.error as err:
        raise VerifyError(f"OpenCV could not run {model}: {str(err).strip().splitlines()[-1]}") from err
    return lambda: net.forward(outputs)


@contextmanager
def _opencv_threads(threads: int | None) -> Iterator[None]:
    """cv2.setNumThreads(threads) for the duration, then back to what it was (None: unchanged)."""
    if threads is None:
        yield
        return
    cv2 = _import_cv2()

    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def in_process(loader: Loader, pin: Callable[[int | None], AbstractContextManager] = lambda t: nullcontext()) -> Timer:
    """A Timer for an engine that runs in this process: `loader` makes each model's forward pass,
    `pin` holds the thread count while both load and run."""

    def timer(
        original: tuple[Path, Path],
        merged: tuple[Path, Path],
        inputs: dict[str, np.ndarray],
        rounds: int,
        warmup: int,
        threads: int | None,
    ) -> tuple[list[float], list[float]]:
        with pin(threads):
            forwards = (loader(*original, inputs), loader(*merged, inputs))
            return interleave(forwards, rounds, warmup)

    return timer


# One line per engine. pycaffe times inside its own process (`_caffe_child.py`, timing mode).
BENCHMARKS: dict[str, Timer] = {
    "opencv": in_process(_load_opencv, _opencv_threads),
    "caffe": time_caffe,
}


def benchmark(
    original: tuple[Path, Path],
    merged: tuple[Path, Path],
    backend: str = "auto",
    rounds: int = DEFAULT_ROUNDS,
    threads: int | None = None,
    input_specs: list[str] | None = None,
    seed: int = 0,
    warmup: int = WARMUP,
) -> BenchmarkResult:
    """Time `rounds` interleaved forward passes of both models (each a (prototxt, caffemodel) pair)
    on `backend` with `threads` threads, on the inputs `verify` would use. `auto` takes the first
    engine, in `verify`'s order, that runs both models."""
    original, merged = (Path(original[0]), Path(original[1])), (Path(merged[0]), Path(merged[1]))
    inputs = load_inputs(original[0], input_specs or [], seed)
    engines = tuple(e for e in BACKENDS if e in BENCHMARKS)

    def time_on(engine: str) -> tuple[list[float], list[float]]:
        return BENCHMARKS[engine](original, merged, inputs, rounds, warmup, threads)

    engine, (before, after), _ = first_engine(backend, engines, time_on, "time")
    return BenchmarkResult(engine, threads, warmup, tuple(before), tuple(after))
