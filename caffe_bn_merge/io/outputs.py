"""Where outputs may go and how they appear: every output path checked against every input and every
other output by file identity (device, inode), never by spelling; temporary names that fit NAME_MAX
and are remembered from before the file exists (so an interruption can always remove them); and
`Staged` files published together: all new files or none.

Publishing without `overwrite` links each temporary file to its final name (`os.link` fails when the
name exists, so of two processes writing the same outputs exactly one wins); with `overwrite` it
renames over. The termination signals are held back while a group is published, so a handled
signal never leaves one file of a pair without the other (the window left: SIGKILL or power loss
between two `link` calls). `signals_raise` turns SIGINT, SIGTERM and SIGHUP into `Interrupted`,
held back (`signals_held`) where raising it would leave a lock held; `pause_point` is the hook the
signal tests use to stop the writer at a chosen point.
"""

import errno
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType, TracebackType

from ..errors import OutputError
from .files import RealPaths

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # handled: cleaned up, exit 128 + signal
TEMPORARY: set[Path] = set()  # temporary files of this process not yet published or removed
PAUSE_ENV = "CAFFE_BN_MERGE_TEST_PAUSE"  # `point=marker-file`: tests pause the writer at `point`
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class Output:
    """A path to write, the flag that named it, and whether an existing file there may be replaced."""

    path: Path
    flag: str
    replaceable: bool = False


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path`, registered in TEMPORARY before anything is created under
    it; the output's name is shortened in it, never the output itself, to stay within NAME_MAX."""
    suffix = f".{os.urandom(6).hex()}.tmp"
    limit = _name_max(path.parent) - len(suffix) - 1
    stem = os.fsencode(path.name)[:limit].decode(errors="ignore") if limit > 0 else ""
    name = path.with_name(f".{stem}{suffix}")
    TEMPORARY.add(name)
    return name


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def forget(path: Path) -> None:
    """Remove a temporary file (if it is there) and forget it."""
    path.unlink(missing_ok=True)
    TEMPORARY.discard(path)


def remove_temporaries() -> None:
    """Remove every temporary file of this process (after an interruption)."""
    for path in list(TEMPORARY):
        try:
            forget(path)
        except OSError:
            TEMPORARY.discard(path)


def pause_point(point: str) -> None:
    """Test hook: when $CAFFE_BN_MERGE_TEST_PAUSE is `point=FILE`, the first process to reach
    `point` creates FILE and waits until the test removes it (at most a minute), so that a test can
    send a signal at exactly this point."""
    wanted, _, marker = os.environ.get(PAUSE_ENV, "").partition("=")
    if wanted != point or not marker:
        return
    try:
        os.close(os.open(f"{marker}.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # another process (a batch worker) paused here already
    Path(marker).touch()
    deadline = time.monotonic() + 60
    while Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.005)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a full disk (or quota) met while writing `path` into one clear OutputError."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        raise OutputError(f"{path}: cannot write in {path.parent} ({err.strerror}); nothing was written") from None


def _identity(path: Path) -> tuple[object, ...] | None:
    """(device, inode) of the file `path` reaches, or of its folder plus its name when it does not
    exist yet; None when even the folder does not exist, or the path cannot be followed."""
    try:
        info = os.stat(path)
        return ("file", info.st_dev, info.st_ino)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        folder = os.stat(path.parent)
    except OSError:
        return None
    return ("new", folder.st_dev, folder.st_ino, path.name)


def file_key(path: Path, real: RealPaths | None = None) -> tuple[object, ...]:
    """What names one file: its (device, inode) when it exists, else its resolved path (by `real`,
    when given, for the many paths of one tree)."""
    try:
        info = os.stat(path)
    except OSError:  # realpath, unlike resolve, accepts symlink loops
        return ("path", Path(real.realpath(path) if real is not None else os.path.realpath(path)))
    return ("file", info.st_dev, info.st_ino)


def check_outputs(inputs: Sequence[Path], outputs: Sequence[Output], overwrite: bool) -> None:
    """Refuse (OutputError) an output that is an input or another output (the same file by device
    and inode, whatever the path: hard links, symlinks, bind mounts), that is not a regular file
    (device, FIFO, folder: even with `overwrite`), or that exists when it may not be replaced."""
    taken: dict[tuple[object, ...], str] = {}
    for source in inputs:
        key = _identity(Path(source))
        if key is not None and key[0] == "file":
            taken[key] = f"equals an input (the same file as {source})"
    for output in outputs:
        path, flag = output.path, output.flag
        info = _stat_output(output)
        key = _identity(path)
        if key is None or not path.parent.is_dir():
            raise OutputError(f"{path}: folder {path.parent} does not exist")
        if key in taken:
            raise OutputError(f"{path}: {flag} {taken[key]}; choose another path")
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise OutputError(f"{path}: {flag} exists and is not a regular file; not replaced, even with --force")
        if (info is not None or path.is_symlink()) and not (overwrite or output.replaceable):
            raise OutputError(f"{path}: {flag} exists already; add --force to replace it")
        taken[key] = f"is the same file as {flag} {path}"


def _stat_output(output: Output) -> os.stat_result | None:
    """The output's file status (None when nothing is there); refuses names that are no file name,
    folders and paths that cannot be followed (a symlink loop)."""
    path, flag = output.path, output.flag
    if not str(path) or not path.name or path.name in (".", ".."):
        raise OutputError(f"{flag} '{path}': not a file name; give the path of a file to write")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise OutputError(f"{path}: cannot use as {flag} ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{path}: {flag} is a folder; give a file name in it")
    return info


class Staged:
    """Files written under temporary names, to be published together (`publish`) or removed
    (`discard`). Use `stage(final)` to get the temporary path of each file before writing it."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path, bool]] = []  # (temporary, final, replaceable)

    def stage(self, final: Path, replaceable: bool = False) -> Path:
        """The temporary path under which `final` is to be written; a `replaceable` file replaces an
        existing one even when publishing without `overwrite`."""
        temporary = temporary_name(Path(final))
        self.files.append((temporary, Path(final), replaceable))
        return temporary

    def temporary(self, final: Path) -> Path:
        """The temporary path staged for `final`."""
        return next(t for t, f, _ in self.files if f == Path(final))

    def only(self, final: Path) -> "Staged":
        """Split off the file staged for `final` into a Staged of its own."""
        alone = Staged()
        alone.files = [entry for entry in self.files if entry[1] == Path(final)]
        self.files = [entry for entry in self.files if entry[1] != Path(final)]
        return alone

    def publish(self, overwrite: bool = False) -> None:
        """Give every file its final name, with the termination signals blocked: all or none.
        Without `overwrite` an existing final name (another process was faster) is an
        OutputError and the files published so far are taken back."""
        published: list[tuple[Path, Path]] = []
        raise_pending_signal()  # one that Python dropped on the way here publishes nothing
        with deferred_signals():
            try:
                for index, (temporary, final, replaceable) in enumerate(self.files):
                    if index == 1:
                        pause_point("publish")
                    _publish_one(temporary, final, overwrite or replaceable)
                    published.append((temporary, final))
            except BaseException:
                for temporary, final in published:
                    _take_back(temporary, final)
                raise
            for temporary, _, _ in self.files:
                forget(temporary)
        self.files = []

    def discard(self) -> None:
        """Remove the temporary files."""
        for temporary, _, _ in self.files:
            forget(temporary)
        self.files = []

    def keep_in(self, folder: Path) -> list[Path]:
        """Move the temporary files into `folder` under their final names (for inspection; copied
        when `folder` is on another file system); replaces files there (the caller checked them)."""
        kept = []
        for temporary, final, _ in self.files:
            target = Path(folder) / final.name
            try:
                shutil.move(temporary, target)
            except OSError as err:
                raise OutputError(f"{target}: cannot keep the rejected file there ({err.strerror})") from None
            TEMPORARY.discard(temporary)
            kept.append(target)
        self.files = []
        return kept


def _publish_one(temporary: Path, final: Path, overwrite: bool) -> None:
    if overwrite:
        _rename(temporary, final)
        return
    try:
        os.link(temporary, final)
    except FileExistsError:
        raise OutputError(
            f"{final}: appeared while we were writing it (another run?); add --force to replace it"
        ) from None
    except OSError as err:
        raise OutputError(f"{final}: cannot publish ({err.strerror})") from None


def _take_back(temporary: Path, final: Path) -> None:
    """Undo the publishing of `final` when it still is our file (linked, or renamed from temporary)."""
    try:
        if temporary.exists():
            if os.path.samefile(temporary, final):
                final.unlink()
        else:
            final.rename(temporary)  # the rename over an old file cannot be undone; leave no new file
            forget(temporary)
    except OSError:
        pass


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as err:
        raise OutputError(f"{target}: cannot publish ({err.strerror})") from None


class Interrupted(BaseException):
    """A termination signal arrived (`signals_raise`); not an Exception, so that no `except
    Exception` swallows it while every clean-up on the way out runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: int | None = None  # a signal held back, or whose Interrupted Python dropped: not raised yet
# Modules whose code runs at any moment (weakref callbacks, finalizers) and must finish: the import
# system (its module locks) and multiprocessing's finalizers and resource tracker (a semaphore
# unlinked but still registered, or the reverse: the tracker warns of it on stderr at the exit).
_MUST_FINISH = frozenset(
    {
        "importlib._bootstrap",
        "importlib._bootstrap_external",
        "multiprocessing.util",
        "multiprocessing.synchronize",
        "multiprocessing.resource_tracker",
    }
)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """`signals_raise`'s handler: raise Interrupted where the main thread is, unless it is within
    `signals_held` or in one of `_MUST_FINISH`: then the signal is noted and raised at the next
    check."""
    global _pending
    if _HELD.depth or (frame is not None and frame.f_globals.get("__name__") in _MUST_FINISH):
        _pending = signum
        return
    raise Interrupted(signum)


def raise_pending_signal() -> None:
    """Raise the Interrupted of a signal not raised yet: one that came while held back (see
    `_interrupt`), or whose Interrupted Python dropped where it cannot pass exceptions on (a weakref
    callback, a `__del__`). Outside `signals_held` blocks only."""
    global _pending
    if _pending is not None and not _HELD.depth:
        signum, _pending = _pending, None
        raise Interrupted(signum)


class _SignalsHeld:
    """See `signals_held`."""

    depth = 0  # blocks entered and not left, in the main thread (where signal handlers run)

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.depth += 1

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if threading.current_thread() is threading.main_thread():
            self.depth -= 1
            raise_pending_signal()


_HELD = _SignalsHeld()


def signals_held() -> _SignalsHeld:
    """A block (reentrant, cheap; as it is outside the main thread) in which `signals_raise`'s
    handler only notes a termination signal, raised at the end of the outermost such block. For
    calls into Python-level locks (threading.Condition and what is built on it: concurrent.futures'
    Future and submit, queue.Queue, Event, Thread.start): raised inside one, between its acquire
    and release, the Interrupted leaves the lock held, and a thread that needs it hangs for ever."""
    return _HELD


def _keep_signal(previous: Callable[[object], object], unraisable: "sys.UnraisableHookArgs") -> None:
    """sys.unraisablehook: an Interrupted Python could not pass on is not printed; its signal is
    raised at the next check (`raise_pending_signal`)."""
    global _pending
    if isinstance(unraisable.exc_value, Interrupted):
        _pending = unraisable.exc_value.signum
    else:
        previous(unraisable)


def raise_interrupted_within(error: BaseException) -> None:
    """Raise the `Interrupted` that `error` came from, if any: Python turns an exception raised
    where it runs hooks into another one (a signal while a module loads, inside a class's
    `__set_name__`, gives a RuntimeError caused by it), which must still end the run as a signal."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, Interrupted):
            raise cause from None
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


@contextmanager
def signals_raise(restore: bool = True, program: str = "merge-bn") -> Iterator[None]:
    """Within the block SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread, where it is
    or at the next check (`_interrupt`, `raise_pending_signal`; at the latest when the block ends);
    an Interrupted that Python drops is not printed (`_keep_signal`). After the block the previous
    handlers come back, or (`restore` False: the process ends once the block is done, with nothing
    left to clean) a signal ends the process at once with 128 + signal and one line on stderr
    naming `program` and the signal."""
    previous = {signum: signal.getsignal(signum) for signum in TERMINATING}
    for signum in TERMINATING:
        signal.signal(signum, _interrupt)
    sys.unraisablehook = partial(_keep_signal, unraisable_hook := sys.unraisablehook)
    try:
        try:
            yield
        finally:
            raise_pending_signal()
    finally:
        sys.unraisablehook = unraisable_hook
        pause_point("restoring")
        with signals_blocked():  # all three handlers change at once
            for signum, handler in previous.items():
                signal.signal(signum, handler if restore else partial(_exit_at_once, program))


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Block the termination signals during the block (this thread; a process started meanwhile
    starts with them blocked); one that arrives is delivered when it ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _exit_at_once(program: str, signum: int, frame: object) -> None:
    os.write(2, f"{program}: interrupted by {signal.Signals(signum).name} while exiting\n".encode())
    os._exit(128 + signum)


def clean_up_interrupted() -> None:
    """After an Interrupted: ignore further signals (the clean-up must finish; `signals_raise`
    restores the handlers) and remove every temporary file of this process."""
    global _pending
    for signum in TERMINATING:
        signal.signal(signum, signal.SIG_IGN)
    _pending = None
    remove_temporaries()


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold the termination signals back during the block, then deliver the first one to the
    handler in place before it. (A handler flag rather than a signal mask: any thread of the
    process, a BLAS thread say, may receive a process-directed signal.) Outside the main thread,
    where Python runs no signal handler, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in TERMINATING}
    for signum in TERMINATING:
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])
