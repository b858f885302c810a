"""The one exception type users see, and the small helpers every message and check shares.

Anything raised as `CltraceError` is a problem with the user's input or environment; the command
line prints its message as a single line and exits with status 2, never a stack trace.
"""

from __future__ import annotations

from typing import Any, TypeGuard


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


__all__ = ["CltraceError", "first_line", "is_int"]
