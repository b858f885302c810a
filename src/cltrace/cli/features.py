"""The `features` group: build a transcoder's feature pages, and read them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cltrace.cli.common import ModelOption, app


features_app = typer.Typer(
    name="features", help="Feature pages: build a feature store for a transcoder, and read it.", no_args_is_help=True
)
app.add_typer(features_app, name="features")

FeatureDbOption = Annotated[Path, typer.Option("--db", "-d", help="The feature store (SQLite file).")]


@features_app.command("build")
def features_build(
    transcoder: Annotated[Path, typer.Argument(help="A transcoder directory (native or circuit-tracer), or 'default' (the default CLT, trained on first use).")],
    model: ModelOption = None,
    source: Annotated[str, typer.Option("--source", "-s", help="Text: 'default', a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][:SPLIT].")] = "default",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Tokens to analyse in all; more than last time extends the store.")] = 100_000,
    out: Annotated[Path, typer.Option("--out", "-o", help="The feature store to write (SQLite file).")] = Path("features.db"),
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=2, help="Tokens per context, BOS included.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Contexts per batch.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Top contexts kept per feature.")] = 20,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing store and start afresh.")] = False,
    compact: Annotated[bool, typer.Option("--compact", help="Drop the build state at the end: smaller, but no longer extendable.")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="Run the model's products in bfloat16 (about 3x faster on CPUs that have it).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run a transcoder over a corpus and store every feature's page (resumes and extends OUT)."""
    import time as _time

    from cltrace.features import FeatureStore, build_feature_store
    from cltrace.model import load_model
    from cltrace.transcoder import load_transcoder

    from cltrace.train.default import resolve_transcoder

    tc = load_transcoder(resolve_transcoder(transcoder, model))
    loaded = load_model(model)
    start = _time.monotonic()
    path = build_feature_store(
        loaded, tc, source, tokens, out, n_ctx=n_ctx, batch_size=batch_size, top_k=top_k,
        resume=True, overwrite=overwrite, progress=not quiet, keep_state=not compact, autocast_bf16=bf16,
    )
    with FeatureStore(path) as store:
        s = store.stats()
    typer.echo(
        f"{path}: {s['tokens']:,} tokens, {s['features']:,} features ({s['dead']:,} dead), "
        f"mean density {100 * s['mean_density']:.3f}%, {s['bytes'] / 2**20:.1f} MiB, {_time.monotonic() - start:.1f} s"
    )


@features_app.command("show")
def features_show(
    feature: Annotated[str, typer.Argument(help="LAYER:FEATURE, e.g. 3:117.")],
    db: FeatureDbOption = Path("features.db"),
    top: Annotated[int, typer.Option("--top", "-k", min=0, help="Top contexts to show.")] = 10,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Sampled contexts to show per quantile band.")] = 2,
    activations: Annotated[bool, typer.Option("--activations/--no-activations", help="List each context's active tokens.")] = False,
) -> None:
    """Print a feature's page: label, density, what it promotes, and the contexts where it fires."""
    from cltrace.features import FeatureStore
    from cltrace.features.show import format_page, parse_feature

    layer, index = parse_feature(feature)
    with FeatureStore(db) as store:
        typer.echo(format_page(store.page(layer, index), n_top=top, n_samples=samples, activations=activations))


@features_app.command("label")
def features_label(
    feature: Annotated[str, typer.Argument(help="LAYER:FEATURE, e.g. 3:117.")],
    label: Annotated[str, typer.Argument(help="The label; an empty string removes it.")],
    db: FeatureDbOption = Path("features.db"),
) -> None:
    """Set (or, with "", remove) a feature's label."""
    from cltrace.features import FeatureStore
    from cltrace.features.show import parse_feature

    layer, index = parse_feature(feature)
    with FeatureStore(db) as store:
        store.page(layer, index)  # an unknown feature is an error, not a silent label
        store.set_label(layer, index, label or None)
    typer.echo(f"{layer}:{index} " + (f"labelled {label!r}" if label else "label removed"))


@features_app.command("search")
def features_search(
    text: Annotated[str, typer.Argument(help="Text to find in labels (case-insensitive).")],
    db: FeatureDbOption = Path("features.db"),
    limit: Annotated[int, typer.Option("--limit", min=1, max=10**9, help="Most features to list.")] = 50,
) -> None:
    """List the features whose label (or automatic label) contains TEXT."""
    from cltrace.features import FeatureStore

    with FeatureStore(db) as store:
        hits = store.search(text, limit=limit)
    for layer, index, shown in hits:
        typer.echo(f"{f'{layer}:{index}':>10}  {shown}")
    if not hits:
        typer.echo(f"no feature label contains {text!r}")


@features_app.command("stats")
def features_stats(db: FeatureDbOption = Path("features.db")) -> None:
    """Summary of a feature store: model, transcoder, tokens, dead features, size."""
    from cltrace.features import FeatureStore

    with FeatureStore(db) as store:
        for key, value in store.stats().items():
            typer.echo(f"{key:<15} {value}")


@features_app.command("export")
def features_export(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write features/{scan}/{feature}.json into.")],
    db: FeatureDbOption = Path("features.db"),
    scan: Annotated[Optional[str], typer.Option("--scan", help="The scan name graphs refer to (default: the model).")] = None,
) -> None:
    """Export every feature page as the JSON files circuit-tracer's front end reads."""
    from cltrace.features.export import export_feature_files

    folder = export_feature_files(db, out_dir, scan=scan)
    typer.echo(f"wrote {sum(1 for _ in folder.glob('*.json')):,} feature files to {folder}")
