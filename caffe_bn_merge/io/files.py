"""Opening input files safely, with the standard library only (batch discovery uses it without
loading numpy): regular files only, a FIFO never waited on, a device never read; what tells two
prototxts apart (`net_digest`); and resolving the paths of a whole tree (`RealPaths`)."""

import errno
import hashlib
import os
import stat
from pathlib import Path

from ..errors import InputError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def open_regular(path: Path, flag: str) -> int:
    """A read-only descriptor of `path`, refused at once (InputError) unless it is a regular file:
    a FIFO is opened without waiting for a writer, a device is never read. Other failures to open
    are the OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise InputError(f"{path}: not a regular file ({kind}), given as {flag}; pass the file itself")
    os.set_blocking(fd, True)
    return fd


def net_digest(content: bytes) -> bytes:
    """What tells two prototxts apart: the hash of their bytes (batch runs and `NetCache` alike)."""
    return hashlib.blake2b(content, digest_size=20).digest()


class RealPaths:
    """`os.path.realpath` and `Path.resolve` for the many files of a few folders (one batch work
    list): each folder is resolved once, and a name that is not a symbolic link in the resolved
    folder resolves to the two joined, which is what realpath finds component by component, for
    one lstat. For one pass over a tree from one working folder: a folder relinked meanwhile is not
    looked at again, and relative paths are taken from the working folder they were first seen in."""

    def __init__(self) -> None:
        self._folders: dict[str, tuple[str, bool]] = {}  # folder -> its realpath, whether that loops

    def realpath(self, path: str | os.PathLike[str]) -> str:
        """`os.path.realpath(path)`."""
        return self._lookup(os.fspath(path))[0]

    def resolve(self, path: Path) -> Path:
        """`path.resolve()`, and as in Python 3.11, RuntimeError when it ends in a symlink loop."""
        resolved, loops = self._lookup(os.fspath(path))
        if loops:
            raise RuntimeError(f"Symlink loop from {str(path)!r}")
        return Path(resolved)

    def _lookup(self, text: str) -> tuple[str, bool]:
        folder, name = os.path.split(text)
        if name in ("", os.curdir, os.pardir):
            return _realpath_loops(text)
        if folder not in self._folders:
            self._folders[folder] = _realpath_loops(folder)
        real, loops = self._folders[folder]
        path = os.path.join(real, name)
        return (path, loops) if _is_link(path) is False else _realpath_loops(text)


def _is_link(path: str) -> bool | None:
    """Whether realpath, having resolved the folder of `path`, follows its name; None when that
    cannot be told from `path` (an unreadable or overlong absolute path, a loop: realpath may look
    at a relative one)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False  # a new name: nothing to follow
    except OSError:
        return None


def _realpath_loops(text: str) -> tuple[str, bool]:
    """realpath of `text`, and whether following it ends in a symlink loop (what `Path.resolve`
    checks with a stat of the result)."""
    real = os.path.realpath(text)
    try:
        os.stat(real)
    except OSError as err:
        return real, err.errno == errno.ELOOP
    return real, False
