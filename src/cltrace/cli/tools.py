"""Commands around the pipeline: `serve`, `convert`, `info`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cltrace.cli.common import (
    DeviceOption,
    ModelOption,
    OldTranscoderArgument,
    TranscoderOption,
    app,
    deprecated,
    device_given,
    required,
    transcoder_feature_store,
    transcoder_given,
)
from cltrace.errors import CltraceError


@app.command()
def serve(
    graph_dir: Annotated[Path, typer.Argument(help="The folder of graph files to explore.")] = Path("."),
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="The port to listen on.")] = 8000,
    host: Annotated[
        str, typer.Option("--host", help="The interface to bind; anything but 127.0.0.1 exposes the app to others.")
    ] = "127.0.0.1",
    features: Annotated[
        Path | None,
        typer.Option("--features", help="Feature store for the graphs (default: a matching *.db in the folder; "
                     "'auto': the one `cltrace trace` built for --transcoder)."),
    ] = None,
    model: ModelOption = None,
    transcoder: Annotated[
        Path | None,
        typer.Option("--transcoder", "-t", help="Transcoder for interventions and new graphs (default: the graph's; 'default': the default CLT)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="CLTRACE_TOKEN",
                     help="Require this token on every request (default: none on loopback, a new one printed with the URL beyond it)."),
    ] = None,
    max_jobs: Annotated[
        int | None,
        typer.Option("--max-jobs", min=1, max=64, help="New graphs queued or running at once; more are refused until one ends (default: a few)."),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Explore attribution graphs in the browser: a local web app (graph view, feature pages, interventions)."""
    from cltrace.serve import app as serve_app  # the web stack loads only for this command
    from cltrace.serve import security

    dev = device_given(device)  # the model loads on first use: a missing device is refused now
    if not graph_dir.is_dir():
        raise CltraceError(f"'{graph_dir}' is not a folder: pass the folder holding your graph files")
    if not serve_app.assets_built():
        raise CltraceError(serve_app.BUILD_HINT)
    if not host.strip():  # uvicorn would take "" for every interface
        raise CltraceError("--host is empty: pass the interface to bind, e.g. 127.0.0.1 (the default)")
    token = security.access_token(host, token)
    if not security.is_loopback(host):
        typer.echo(f"warning: binding {host}: anyone who can reach this machine can read the graphs and run the model", err=True)
    if transcoder is not None:
        from cltrace.train.default import resolve_transcoder

        transcoder = resolve_transcoder(transcoder, model, device=dev)
    if features is not None and str(features) == "auto":
        if transcoder is None:
            raise CltraceError("--features auto needs --transcoder: the automatic feature store belongs to a transcoder")
        features = transcoder_feature_store(transcoder, model)
    typer.echo(f"serving {graph_dir.resolve()} at {security.url(host, port, token)} (Ctrl-C stops)")
    serve_app.serve(graph_dir, host=host, port=port, features=features, model=model, transcoder=transcoder,
                    token=token, max_running=max_jobs or serve_app.MAX_RUNNING, device=dev)


class Format(str, Enum):
    native = "native"
    circuit_tracer = "circuit-tracer"


@app.command()
def convert(
    old_src: OldTranscoderArgument = None,
    old_dst: Annotated[Path | None, typer.Argument(hidden=True, show_default=False)] = None,
    transcoder: TranscoderOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the converted transcoder (a new directory).")] = None,
    to: Annotated[Format, typer.Option("--to", help="The format to write.")] = Format.native,
    force: Annotated[bool, typer.Option("--force", help="Replace the -o folder if it already holds files.")] = False,
) -> None:
    """Convert a transcoder between cltrace's native format and circuit-tracer's."""
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import detect_format, load_transcoder, save_transcoder

    src = transcoder_given(transcoder, old_src)
    dst = deprecated(out, old_dst, "the output folder as a positional argument", "-o/--out")
    dst = required(dst, "-o/--out", "name the new folder to write the converted transcoder into")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise CltraceError(f"'{dst}' already exists and is not empty: choose a new directory or pass --force")
    src = resolve_transcoder(src)
    loaded = load_transcoder(src)
    save_transcoder(loaded, dst, format=to.value)
    cfg = loaded.config
    typer.echo(
        f"wrote {cfg.kind.upper()} ({cfg.n_layers} layers x {cfg.n_features} features, {cfg.activation}) "
        f"from {detect_format(src)} to {to.value}: {dst}"
    )


@app.command()
def info(
    model: Annotated[str | None, typer.Argument(help="Hub id, local directory or .gguf file.")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Show a model's family and dimensions, and where it runs."""
    from cltrace.model import load_model

    loaded = load_model(model, device=device_given(device))
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
        ("device", str(loaded.device)),
        ("BOS token", "none" if bos is None else f"{loaded.decode_token(bos)!r} ({bos})"),
    ]
    for key, value in rows:
        typer.echo(f"{key:<11} {value}")
