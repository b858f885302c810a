"""Exclusive locks (flock) so that two processes never write the same run at once.

The kernel drops a process's locks when it exits, however it exits, so a killed run never leaves a
lock behind. On a filesystem without flock the lock is skipped (as before locks existed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from cltrace.errors import CltraceError


def acquire(path: str | os.PathLike, what: str, *, wait: bool = False, on_wait: Callable[[], None] | None = None) -> int | None:
    """Lock `path` (a folder, or a file created if missing) for this process; returns the descriptor
    to `release`, or None where the filesystem has no locks.

    Held by another process: a one-line CltraceError naming `what`, or with `wait`, `on_wait()` and
    then block until it is free.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            raise CltraceError(
                f"{what} is in use by another process (another run on the same folder); wait for it to finish "
                "or choose another folder"
            ) from None
        if on_wait is not None:
            on_wait()
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # no flock on this filesystem
        os.close(fd)
        return None
    return fd


def release(fd: int | None) -> None:
    """Give back a lock from `acquire` (None: nothing to give back)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str, *, wait: bool = False, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """`acquire` for the length of a `with` block."""
    fd = acquire(path, what, wait=wait, on_wait=on_wait)
    try:
        yield
    finally:
        release(fd)


__all__ = ["acquire", "locked", "release"]
