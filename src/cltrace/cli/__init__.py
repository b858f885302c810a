"""The `cltrace` command line.

Each command is a thin layer over the Python API. Problems with the user's input surface as
`CltraceError`s, printed as one line on stderr with exit status 2; results go to stdout.
"""

from __future__ import annotations

import logging
import sys

import typer

# each module registers its commands on `app` when imported, in the order `--help` lists them
from cltrace.cli import circuits, features, global_weights, graphs, interventions, pipeline, qk, tools  # noqa: F401, I001
from cltrace.cli.common import app
from cltrace.errors import CltraceError

app.command("qk")(qk.qk)
features.features_app.command("global-weights")(global_weights.global_weights_command)

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cltrace` command: user errors become one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        app(args=argv, standalone_mode=True)
    except CltraceError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
