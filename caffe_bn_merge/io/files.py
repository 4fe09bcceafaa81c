"""Opening input files safely, with the standard library only (batch discovery uses it without
loading numpy): regular files only, a FIFO never waited on, a device never read; and what tells
two prototxts apart (`net_digest`)."""

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
