"""Writing files so that a crash never leaves a half-written one: temp file, fsync, rename.

Every file cltrace writes for the user goes through `atomic_write`, so a reader sees either the
old file or the complete new one. A write killed midway leaves its hidden temporary file
(`.NAME.PID-XXXXXXXX.tmp`) beside the target; the next successful write of that target removes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cltrace.errors import CltraceError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Seconds after which a temporary file left beside a target counts as abandoned (unless the pid
#: in its name is still running): `remove_stale_temps` never takes a write that is under way.
STALE_TEMP_AGE = 60.0


def _temp_name_pattern(name: str) -> re.Pattern[str]:
    """The names `atomic_path` gives the temporary files of a target called `name`:
    `.NAME.PID-XXXXXXXX.tmp`, or `.NAME.XXXXXXXX.tmp` as written before the pid was added
    (XXXXXXXX: mkstemp's random part). No other target's temporary file has such a name."""
    return re.compile(rf"\.{re.escape(name)}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.tmp")


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs here (when in doubt, yes: its file is then kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process, or no pid we can ask about
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that earlier, killed writes of `path` left beside it; returns them.

    Only regular files named like `atomic_path`'s temporaries of this very target are candidates,
    and only those older than `STALE_TEMP_AGE` whose writer (the pid in the name, when there is one)
    is not running. Best effort: what cannot be listed or removed stays.
    """
    path = Path(path)
    pattern = _temp_name_pattern(path.name)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < STALE_TEMP_AGE:
            continue
        if match.group(1) is not None and _pid_alive(int(match.group(1))):
            continue  # a live writer (or a reused pid): leave it for a later write
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def check_writable(path: str | os.PathLike, what: str = "file", *, folder: bool = False) -> Path:
    """Refuse, in one line, an output `path` that a write could not create; returns it as a Path.

    Commands call this before their slow work, so that a bad output path fails at once instead of
    after it. A file: its folder must exist and be writable, and `path` must not be a folder. With
    `folder`, `path` is a folder to fill (created with its parents where missing): it must not be a
    file, and it, or while missing its nearest existing parent, must be a writable folder.
    """
    path = Path(path)
    if folder:
        directory = path
        while not directory.exists() and directory != directory.parent:  # mkdir(parents=True) makes the rest
            directory = directory.parent
        if not directory.is_dir():
            raise CltraceError(f"cannot write {what} in '{path}': '{directory}' is a file, not a folder; give another folder")
    else:
        directory = path.parent if str(path.parent) else Path(".")
        if not directory.is_dir():
            raise CltraceError(f"cannot write {what} '{path}': directory '{directory}' does not exist; create it first")
        if path.is_dir():  # else os.replace would fail, only after the whole file was written
            raise CltraceError(f"cannot write {what}: '{path}' is a folder; give a file name")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CltraceError(
            f"cannot write {what} '{path}': the folder '{directory}' is not writable; pick another place or fix its permissions"
        )
    return path


def fsync_directory(directory: Path, files: bool = False) -> None:
    """Make a rename inside `directory` durable (best effort: not every filesystem allows it); with
    `files`, flush every file in it to disk first."""
    if files:
        for child in directory.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
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
    the usual permissions (0666 less the umask), not mkstemp's private 0600. Its name carries this
    process's pid, so that a later write can tell the file of a killed writer from a live one's;
    after the rename, the stale ones of `path` go (`remove_stale_temps`).
    """
    path = check_writable(path, what)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=directory)
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
    remove_stale_temps(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], what: str = "file") -> Path:
    """Call `write(tmp)` to produce the file, then move it into place atomically."""
    with atomic_path(path, what) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)
