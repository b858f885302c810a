"""The one exception type users see, and the small helpers every message and check shares.

Anything raised as `CltraceError` is a problem with the user's input or environment; the command
line prints its message as a single line and exits with status 2, never a stack trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

T = TypeVar("T")


class CltraceError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages can span several), or its type's
    name when it has no message."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def is_int(value: Any) -> TypeGuard[int]:
    """Whether `value` is an int proper (JSON's `true` is a bool, not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def load_json_file(path: str | os.PathLike, what: str, missing_hint: str, parse: Callable[[Any], T]) -> T:
    """`parse` of the JSON in a `what` file (e.g. "circuit"), every failure one CltraceError line
    naming the file: missing (then `missing_hint`), unreadable, not JSON, or refused by `parse`."""
    path = Path(path)
    if not path.is_file():
        raise CltraceError(f"{what} file '{path}' does not exist; {missing_hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CltraceError(f"cannot read {what} file '{path}': {first_line(exc)}") from None
    try:
        return parse(data)
    except CltraceError as exc:
        raise CltraceError(f"{what} file '{path}': {exc}") from None


__all__ = ["CltraceError", "first_line", "is_int", "load_json_file"]
