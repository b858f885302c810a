"""What every command module shares: the `cltrace` app itself and the options several commands take."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="cltrace",
    help="Cross-layer transcoders, attribution graphs and interventions for language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id, local directory or .gguf file; default: SmolLM2-135M-Instruct."),
]

