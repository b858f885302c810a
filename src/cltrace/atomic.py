"""Writing files so that a crash never leaves a half-written one: temp file, fsync, rename.

Every file cltrace writes for the user goes through `atomic_write`, so a reader sees either the
old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cltrace.errors import CltraceError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    On any exception the temporary file is removed and `path` is left as it was. The file gets
    the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CltraceError(f"cannot write {what}: directory '{directory}' does not exist; create it first")
    if path.is_dir():  # else os.replace would fail, only after the whole file was written
        raise CltraceError(f"cannot write {what}: '{path}' is a folder; give a file name")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:  # a read-only folder, a name too long, ...
        raise CltraceError(f"cannot write {what} in '{directory}' ({exc.strerror}): pick another place") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str = "file") -> Path:
    """Call `write(tmp)` to produce the file, then move it into place atomically."""
    with atomic_path(path, what) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)
