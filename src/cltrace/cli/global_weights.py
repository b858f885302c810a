"""`cltrace features global-weights`: a transcoder's global weights, into its feature store.

A plain function with typer annotations; the command line registers it under `features`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cltrace.cli.common import DeviceOption, device_given


def global_weights_command(
    transcoder: Annotated[Path, typer.Option("--transcoder", "-t", help="The transcoder directory, or 'default'.")],
    db: Annotated[Path, typer.Option("--db", "-d", help="The transcoder's feature store (SQLite file).")] = Path("features.db"),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Hub id, local directory or .gguf file.")] = None,
    source: Annotated[str, typer.Option("--source", "-s", help="Text for the co-activation statistics ('default', a file or folder, hf:NAME).")] = "default",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=0, help="Tokens of co-activation statistics; 0: virtual weights only.")] = 20_000,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=2, help="Tokens per context, BOS included.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Contexts per batch.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=1000, help="Partners kept per feature and direction.")] = 10,
    device: DeviceOption = "auto",
) -> None:
    """Compute every feature's strongest upstream and downstream features by global weight and store them."""
    from cltrace.data import open_text_source
    from cltrace.data.harvest import Harvester
    from cltrace.data.packing import model_packing, pack_batches
    from cltrace.features.global_weights import (
        check_store,
        gather_coactivation,
        global_weights,
        write_global_weights,
    )
    from cltrace.model import load_model
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    t0 = time.perf_counter()
    dev = device_given(device)
    tc = load_transcoder(resolve_transcoder(transcoder, model, device=dev), device=dev)
    check_store(db, tc)  # before the long part
    stats = None
    if tokens:
        loaded = load_model(model, device=dev)
        tokenize, pack = model_packing(loaded, n_ctx, batch_size, split="train", heldout_fraction=0.0)
        batches = (batch.tokens for batch in pack_batches(open_text_source(source), tokenize, pack))
        stats = gather_coactivation(tc, batches, Harvester(loaded, first_position=1, out_device=dev), tokens)
        typer.echo(f"co-activation statistics over {stats.n_tokens:,} tokens ({time.perf_counter() - t0:.1f} s)")
    weights = global_weights(tc, top_k=top_k, coactivation=stats)
    n = write_global_weights(db, tc, weights)
    typer.echo(f"wrote {n:,} global weights to {db} ({time.perf_counter() - t0:.1f} s)")
