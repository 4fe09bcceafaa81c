"""Writing a file strictly in order while the blocks of folded blobs are computed ahead on worker
threads: numpy lets go of the GIL while it multiplies, and so does the file write, so on two cores
computing block k+1 overlaps writing block k."""

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from types import TracebackType
from typing import BinaryIO

from .outputs import signals_held

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS = min(4, CPUS)
AHEAD = 2 * WORKERS  # blocks computed or being computed but not yet written, at most
HELD_BYTES = 16 << 20  # other data waiting behind blocks still being computed, at most
KERNEL_COPY_BYTES = 1 << 16  # smaller copies are written from memory: fewer system calls


class OrderedWriter:
    """`write`, `copy`, `compute` and `then` queue work that reaches the file in the order it was
    queued."""

    def __init__(self, handle: BinaryIO, check: Callable[[], None] = lambda: None) -> None:
        self._handle, self._check = handle, check  # `check` runs before each block is written
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="fold")
        self._queue: deque[bytes | memoryview | Future | Callable[[], None]] = deque()
        self._free: list[bytearray] = []  # buffers of written blocks, to reuse
        self._buffers = 0  # buffers made (free, or holding a block not yet written)
        self._held = 0  # bytes of queued `write` data
        self._copy_in_kernel = hasattr(os, "copy_file_range")

    def write(self, data: bytes | memoryview) -> None:
        """Write `data` now, or once the blocks queued before it are written (kept by reference
        until then: do not change it)."""
        self._write_ready()
        if not self._queue:
            self._handle.write(data)
            return
        self._queue.append(data)
        self._held += memoryview(data).nbytes
        while self._held > HELD_BYTES:
            self._flush_one()

    def copy(self, source: int | None, offset: int, data: memoryview) -> None:
        """Write `data`, which are the bytes at `offset` in file `source`: copied from file to
        file inside the kernel (never read into our memory) unless that fails or `source` is None."""
        if source is None or not self._copy_in_kernel or len(data) < KERNEL_COPY_BYTES:
            self.write(data)
        else:
            self.then(partial(self._copy_now, source, offset, data))

    def _copy_now(self, source: int, offset: int, data: memoryview) -> None:
        done = 0
        self._handle.flush()  # the copy writes at the file's offset, after what is written so far
        try:
            while done < len(data):
                copied = os.copy_file_range(source, self._handle.fileno(), len(data) - done, offset + done)
                if not copied:
                    break
                done += copied
        except OSError:  # not between these two files (other file systems, old kernels)
            self._copy_in_kernel = False
        self._handle.write(data[done:])

    def compute(self, size: int, fill: Callable[[memoryview], object]) -> None:
        """Write `size` bytes that `fill(buffer)` puts into `buffer`; it runs on a worker thread."""
        buffer = self._buffer(size)
        with signals_held():  # the pool and its futures take Python-level locks
            self._queue.append(self._pool.submit(_filled, fill, memoryview(buffer)[:size], buffer))

    def then(self, action: Callable[[], None]) -> None:
        """Run `action` once everything queued before it is written."""
        self._write_ready()
        if self._queue:
            self._queue.append(action)
        else:
            action()

    def _write_ready(self) -> None:
        """Write what is queued up to the first block not computed yet."""
        while self._queue and _ready(self._queue[0]):
            self._flush_one()

    def _buffer(self, size: int) -> bytearray:
        """A free buffer of at least `size` bytes (one of at most AHEAD, reused)."""
        while not self._free and self._buffers >= AHEAD:
            self._flush_one()
        if self._free and len(self._free[-1]) >= size:
            return self._free.pop()
        if self._free:
            self._free.pop()  # too small for this block: replaced
        else:
            self._buffers += 1
        return bytearray(size)

    def _flush_one(self) -> None:
        self._check()
        item = self._queue.popleft()
        if isinstance(item, Future):
            with signals_held():
                view, buffer = item.result()
            self._handle.write(view)
            self._free.append(buffer)
        elif callable(item):
            item()
        else:
            self._held -= memoryview(item).nbytes
            self._handle.write(item)

    def __enter__(self) -> "OrderedWriter":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        try:
            if error is None:
                while self._queue:
                    self._flush_one()
        finally:
            with signals_held():  # raised once the threads are gone
                self._pool.shutdown(wait=False, cancel_futures=True)
                _join(self._pool)


def _ready(item: object) -> bool:
    """Whether a queued `item` can be written now: anything but a block still being computed."""
    with signals_held():
        return not isinstance(item, Future) or item.done()


def _join(pool: ThreadPoolExecutor) -> None:
    """Wait for the threads of `pool` to end, even when a signal handler raises meanwhile (then
    raised once they have): they read the input's memory map, which must outlive them (the
    caller lets other processes truncate the file once this returns)."""
    raised = None
    while True:
        try:
            pool.shutdown(wait=True)
            break
        except BaseException as err:  # e.g. Interrupted (the lease only marks itself broken)
            raised = raised or err
    if raised is not None:
        raise raised


def _filled(fill: Callable[[memoryview], object], view: memoryview, buffer: bytearray) -> tuple[memoryview, bytearray]:
    fill(view)
    return view, buffer
