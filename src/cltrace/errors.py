"""The one exception type users see.

Anything raised as `CltraceError` is a problem with the user's input or environment; the command
line prints its message as a single line and exits with status 2, never a stack trace.
"""


class CltraceError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""
