"""The `cltrace` command line.

Each command is a thin layer over the Python API. Problems with the user's input surface as
`CltraceError`s, printed as one line on stderr with exit status 2; results go to stdout.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cltrace.errors import CltraceError

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


@app.command()
def info(model: Annotated[Optional[str], typer.Argument(help="Hub id, local directory or .gguf file.")] = None) -> None:
    """Show a model's family and dimensions."""
    from cltrace.model import load_model

    loaded = load_model(model)
    cfg = loaded.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    bos = loaded.bos_id()
    rows = [
        ("model", loaded.name),
        ("family", loaded.adapter.family),
        ("layers", loaded.n_layers),
        ("d_model", loaded.d_model),
        ("d_mlp", loaded.d_mlp),
        ("heads", getattr(cfg, "num_attention_heads", None) or cfg.n_head),
        ("vocab", loaded.vocab_size),
        ("context", loaded.max_context),
        ("parameters", f"{n_params / 1e6:.1f}M"),
        ("dtype", str(next(loaded.model.parameters()).dtype).removeprefix("torch.")),
        ("BOS token", "none" if bos is None else f"{loaded.decode_token(bos)!r} ({bos})"),
    ]
    for key, value in rows:
        typer.echo(f"{key:<11} {value}")


@app.command()
def predict(
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    model: ModelOption = None,
    top: Annotated[int, typer.Option("--top", "-k", min=1, max=100, help="How many tokens to show.")] = 10,
    transcoder: Annotated[
        Optional[Path],
        typer.Option("--transcoder", "-t", help="Also run the local replacement model with this transcoder."),
    ] = None,
) -> None:
    """Show the model's most probable next tokens for a prompt."""
    import torch

    from cltrace.model import load_model

    loaded = load_model(model)
    replacement = None
    if transcoder is not None:
        from cltrace.replacement import ReplacementModel
        from cltrace.transcoder import load_transcoder

        replacement = ReplacementModel(loaded, load_transcoder(transcoder))
    ids = loaded.encode(prompt)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids[None].to(loaded.device), use_cache=False).logits[0]  # [pos, vocab]
    probs, tokens = logits[-1].float().softmax(-1).topk(top)
    shown = "|".join(loaded.decode_token(t) for t in ids.tolist())
    typer.echo(f"{loaded.name} · {ids.numel()} tokens: {shown}")
    for rank, (p, t) in enumerate(zip(probs.tolist(), tokens.tolist()), start=1):
        typer.echo(f"{rank:>3}. {loaded.decode_token(t)!r:<20} {100 * p:6.2f}%")
    if replacement is not None:
        run = replacement.run(ids)
        l0 = (run.activations[1:] > 0).sum(-1).float().mean(0)  # [layer], BOS position left out
        mse = (run.error[1:] ** 2).sum((0, 2))  # [layer]
        var = ((run.mlp_out[1:] - run.mlp_out[1:].mean(0)) ** 2).sum((0, 2)).clamp_min(1e-12)
        typer.echo(
            f"replacement model: max |logit difference| {float((run.logits - logits).abs().max()):.2e}, "
            f"mean L0 per layer {float(l0.mean()):.1f}, mean NMSE on this prompt {float((mse / var).mean()):.3f}"
        )


class Format(str, Enum):
    native = "native"
    circuit_tracer = "circuit-tracer"


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A transcoder directory (native or circuit-tracer).")],
    dst: Annotated[Path, typer.Argument(help="Where to write the converted transcoder (a new directory).")],
    to: Annotated[Format, typer.Option("--to", help="The format to write.")] = Format.native,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it already holds files.")] = False,
) -> None:
    """Convert a transcoder between cltrace's native format and circuit-tracer's."""
    from cltrace.transcoder import detect_format, load_transcoder, save_transcoder

    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise CltraceError(f"'{dst}' already exists and is not empty: choose a new directory or pass --force")
    transcoder = load_transcoder(src)
    save_transcoder(transcoder, dst, format=to.value)
    cfg = transcoder.config
    typer.echo(
        f"wrote {cfg.kind.upper()} ({cfg.n_layers} layers x {cfg.n_features} features, {cfg.activation}) "
        f"from {detect_format(src)} to {to.value}: {dst}"
    )


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
