"""The `features` group: build a transcoder's feature pages, and read them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cltrace.cli.common import (
    DeviceOption,
    Dtype,
    DtypeOption,
    ModelOption,
    NCtxOption,
    OldTranscoderArgument,
    SourceOption,
    TranscoderOption,
    app,
    deprecated,
    device_given,
    dtype_given,
    required,
    transcoder_feature_store,
    transcoder_given,
)
from cltrace.errors import CltraceError

features_app = typer.Typer(
    name="features", help="Feature pages: build a feature store for a transcoder, and read it.", no_args_is_help=True
)
app.add_typer(features_app, name="features")

FeatureDbOption = Annotated[Path | None, typer.Option(
    "--db", "-d", help="The feature store (SQLite file); default: ./features.db where there is one, else the store "
    "`cltrace trace` built for -t.", show_default=False)]
ReadTranscoderOption = Annotated[Path | None, typer.Option(
    "--transcoder", "-t", help="Read the feature store `cltrace trace` built for this transcoder ('default': the "
    "default CLT's) when --db is not given.", show_default="default")]
DEFAULT_DB = Path("features.db")


def store_path(db: Path | None, transcoder: Path | None) -> Path:
    """The feature store a reading command opens: --db, else ./features.db (unless -t names a transcoder),
    else the store of the transcoder (`trace --features auto` builds it)."""
    if db is not None:
        return db
    if transcoder is None and DEFAULT_DB.is_file():
        return DEFAULT_DB
    return transcoder_feature_store(transcoder or Path("default"))


@features_app.command("build")
def features_build(
    old_transcoder: OldTranscoderArgument = None,
    transcoder: TranscoderOption = None,
    model: ModelOption = None,
    source: SourceOption = "default",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Tokens to analyse in all; more than last time extends the store.")] = 100_000,
    out: Annotated[Path, typer.Option("--out", "-o", help="The feature store to write (SQLite file).")] = Path("features.db"),
    n_ctx: NCtxOption = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Contexts per batch.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Top contexts kept per feature.")] = 20,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing store and start afresh.")] = False,
    compact: Annotated[bool, typer.Option("--compact", help="Drop the build state at the end: smaller, but no longer extendable.")] = False,
    old_bf16: Annotated[bool, typer.Option("--bf16", hidden=True)] = False,
    autolabel: Annotated[bool, typer.Option("--autolabel", help="Then label every feature from measured evidence, "
                                            "as `features autolabel` does.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = Dtype.auto,
) -> None:
    """Run a transcoder over a corpus and store every feature's page (resumes and extends OUT)."""
    import time as _time

    import torch

    from cltrace.features import FeatureStore, build_feature_store
    from cltrace.features.labeller import label_inputs
    from cltrace.model import load_model
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    dev = device_given(device)
    if old_bf16:  # the old spelling of --dtype bfloat16
        dtype = deprecated(None if dtype is Dtype.auto else dtype, Dtype.bfloat16, "--bf16", "--dtype bfloat16") or dtype
    bf16 = dtype_given(dtype, dev) == torch.bfloat16
    tc_path = resolve_transcoder(transcoder_given(transcoder, old_transcoder), model, device=dev)
    tc = load_transcoder(tc_path, device=dev)
    loaded = load_model(model, device=dev)
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
        if autolabel:
            _echo_input_labels(path, label_inputs(store, loaded, tc, source, progress=not quiet, autocast_bf16=bf16))


@features_app.command("show")
def features_show(
    feature: Annotated[str, typer.Argument(help="LAYER:FEATURE, e.g. 3:117.")],
    db: FeatureDbOption = None,
    transcoder: ReadTranscoderOption = None,
    top: Annotated[int, typer.Option("--top", "-k", min=0, help="Top contexts to show.")] = 10,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Sampled contexts to show per quantile band.")] = 2,
    activations: Annotated[bool, typer.Option("--activations/--no-activations", help="List each context's active tokens.")] = False,
) -> None:
    """Print a feature's page: label, density, what it promotes, and the contexts where it fires."""
    from cltrace.features import FeatureStore
    from cltrace.features.global_weights import format_global_weights, read_global_weights
    from cltrace.features.show import format_page, parse_feature

    layer, index = parse_feature(feature)
    path = store_path(db, transcoder)
    with FeatureStore(path) as store:
        typer.echo(format_page(store.page(layer, index), n_top=top, n_samples=samples, activations=activations))
    weights = read_global_weights(path, layer, index)
    if weights:
        typer.echo(format_global_weights(weights))


@features_app.command("label")
def features_label(
    feature: Annotated[str, typer.Argument(help="LAYER:FEATURE, e.g. 3:117.")],
    label: Annotated[str, typer.Argument(help="The label; an empty string removes it.")],
    db: FeatureDbOption = None,
    transcoder: ReadTranscoderOption = None,
) -> None:
    """Set (or, with "", remove) a feature's label."""
    from cltrace.features import FeatureStore
    from cltrace.features.show import parse_feature

    layer, index = parse_feature(feature)
    with FeatureStore(store_path(db, transcoder)) as store:
        store.page(layer, index)  # an unknown feature is an error, not a silent label
        store.set_label(layer, index, label or None)
    typer.echo(f"{layer}:{index} " + (f"labelled {label!r}" if label else "label removed"))


def _echo_input_labels(path: Path, s: dict) -> None:
    q = "  ".join(f"{k}: {v:.2f}" for k, v in s["quantiles"].items())
    typer.echo(f"{path}: {s['features']:,} features labelled, {s['scored']:,} scored (held-out balanced "
               f"accuracy mean {s['mean_score'] or 0:.3f}; quantiles {q}), {s['unclear']:,} unclear, {s['seconds']:.0f} s")


@features_app.command("autolabel")
def features_autolabel(
    db: FeatureDbOption = None,
    transcoder: ReadTranscoderOption = None,
    model: ModelOption = None,
    source: SourceOption = "default",
    steer: Annotated[list[str] | None, typer.Option(
        "--steer", help="Measure the output label of this feature (LAYER:FEATURE; repeat it) by steering, "
        "instead of labelling every feature's input.", show_default=False)] = None,
    contexts: Annotated[int | None, typer.Option(
        "--contexts", min=1, help="Contexts of held-out text to run over (default: LabelConfig.heldout_contexts).",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", "-b", min=1, help="Contexts per batch of the held-out pass (default: LabelConfig.batch_size).",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="With --steer: measure again features already measured.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Label features from measured evidence: every feature's input pattern, scored on held-out text
    (one pass of the model), or with --steer the output label of some features, scored by steering."""
    import dataclasses

    from cltrace.features import FeatureStore
    from cltrace.features.labeller import label_inputs, measure_outputs
    from cltrace.features.labels import LabelConfig
    from cltrace.features.show import parse_feature
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.train.default import DEFAULT_NAME, default_paths, resolve_transcoder
    from cltrace.transcoder import load_transcoder

    dev = device_given(device)
    keys = [parse_feature(f) for f in steer or []]
    path = store_path(db, transcoder)
    spec = transcoder or Path("default")
    if str(spec) == DEFAULT_NAME and not Path(DEFAULT_NAME).is_dir() and not default_paths()[0].is_dir():
        raise CltraceError("the default transcoder is not trained yet: pass the store's transcoder with -t")
    given = {"heldout_contexts": contexts, "batch_size": batch_size}
    config = dataclasses.replace(LabelConfig(), **{k: v for k, v in given.items() if v is not None})
    tc = load_transcoder(resolve_transcoder(spec, model, device=dev), device=dev)
    loaded = load_model(model, device=dev)
    with FeatureStore(path) as store:
        if not keys:
            _echo_input_labels(path, label_inputs(store, loaded, tc, source, config, progress=not quiet))
            return
        for (layer, index), label in measure_outputs(store, ReplacementModel(loaded, tc), keys, config, force,
                                                     progress=not quiet).items():
            typer.echo(f"{f'{layer}:{index}':>10}  {label.text()}  [input {label.input_score}, steering z {label.output_score}]")


@features_app.command("search")
def features_search(
    text: Annotated[str, typer.Argument(help="Text to find in labels (case-insensitive).")],
    db: FeatureDbOption = None,
    transcoder: ReadTranscoderOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10**9, help="Most features to list.")] = 50,
) -> None:
    """List the features whose label (or automatic label) contains TEXT."""
    from cltrace.features import FeatureStore

    with FeatureStore(store_path(db, transcoder)) as store:
        hits = store.search(text, limit=limit)
    for layer, index, shown in hits:
        typer.echo(f"{f'{layer}:{index}':>10}  {shown}")
    if not hits:
        typer.echo(f"no feature label contains {text!r}")


@features_app.command("stats")
def features_stats(db: FeatureDbOption = None, transcoder: ReadTranscoderOption = None) -> None:
    """Summary of a feature store: model, transcoder, tokens, dead features, size."""
    from cltrace.features import FeatureStore

    with FeatureStore(store_path(db, transcoder)) as store:
        for key, value in store.stats().items():
            typer.echo(f"{key:<15} {value}")


@features_app.command("export")
def features_export(
    old_out: Annotated[Path | None, typer.Argument(hidden=True, show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder to write features/{scan}/{feature}.json into.")] = None,
    db: FeatureDbOption = None,
    transcoder: ReadTranscoderOption = None,
    scan: Annotated[str | None, typer.Option("--scan", help="The scan name graphs refer to (default: the model).")] = None,
) -> None:
    """Export every feature page as the JSON files circuit-tracer's front end reads."""
    from cltrace.features.export import export_feature_files

    out_dir = deprecated(out, old_out, "the output folder as a positional argument", "-o/--out")
    out_dir = required(out_dir, "-o/--out", "name the folder to write the feature files into")
    folder = export_feature_files(store_path(db, transcoder), out_dir, scan=scan)
    typer.echo(f"wrote {sum(1 for _ in folder.glob('*.json')):,} feature files to {folder}")
