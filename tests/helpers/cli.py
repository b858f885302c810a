"""Running the `cltrace` command in-process and checking its one-line errors."""

from __future__ import annotations

import pytest


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `cltrace ARGS` in-process; returns (exit code, stdout, stderr)."""
    from cltrace.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """The command failed with exit 2 and exactly one `error:` line holding every needle, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
