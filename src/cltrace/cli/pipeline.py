"""Commands that produce and score a transcoder: `train`, `harvest`, `eval`."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cltrace.cli.common import (
    DTYPE_HELP,
    SOURCE_HELP,
    DeviceOption,
    Dtype,
    ModelOption,
    NCtxOption,
    OldTranscoderArgument,
    SourceOption,
    TranscoderOption,
    app,
    config_option,
    deprecated,
    device_given,
    dtype_given,
    transcoder_given,
)
from cltrace.fields import field_default
from cltrace.graph.config import PromptSetConfig


@app.command()
def train(
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="Starting config: 'default' (about 30 min here), 'quality' (about 2.3 h) or 'tiny'.")
    ] = "default",
    model: ModelOption = None,
    source: Annotated[
        str | None, typer.Option("--source", "-s", help=SOURCE_HELP)
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (config, checkpoint, metrics, curves, transcoder, eval).")] = Path("cltrace-run"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="A config.json to start from instead of a preset.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config field, KEY=VALUE (repeatable), e.g. --set n_features=256.")
    ] = None,
    store: Annotated[
        Path | None, typer.Option("--store", help="Train from this activation store (`cltrace harvest`); its model, text and n_ctx are used.")
    ] = None,
    feature_parallel: Annotated[
        int, typer.Option("--feature-parallel", min=0, help="Under torchrun: ranks sharing each layer's features (0: all; the rest split the data).")
    ] = 0,
    dist_timeout: Annotated[
        float, typer.Option("--dist-timeout", min=1.0, help="Under torchrun: seconds a rank waits for a silent rank before stopping.")
    ] = 600.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    device: DeviceOption = "auto",
    dtype: Annotated[Dtype | None, typer.Option(
        "--dtype", help="Precision of training and harvesting (the config's dtype and harvest_dtype; default: the "
        "preset's, bfloat16 for 'default'): auto (bfloat16 on a CUDA GPU, float32 elsewhere), float32 or bfloat16.",
        show_default=False)] = None,
) -> None:
    """Train a cross-layer (or per-layer) transcoder and evaluate it on held-out text (`torchrun ... -m cltrace train`: sharded)."""
    from cltrace.train import TrainConfig, parse_override, train_transcoder
    from cltrace.train import preset as get_preset
    from cltrace.train.distributed import init_layout

    dev = device_given(device)  # a device this machine lacks is refused before anything starts
    layout = init_layout(feature_parallel or None, dist_timeout, dev)  # None unless started by torchrun

    def silent(_text: str) -> None:
        """Rank 0 speaks for all."""

    echo: Callable[[str], None] = typer.echo if layout is None or layout.is_main else silent

    if resume and config is None and (out / "config.json").is_file():
        cfg = TrainConfig.load(out / "config.json")
    else:
        cfg = TrainConfig.load(config) if config is not None else get_preset(preset)
    changes = dict(parse_override(o) for o in overrides or [])
    if model is not None:
        changes["model"] = model
    if source is not None:
        changes["source"] = source
    if dtype is not None:
        changes["dtype"] = changes["harvest_dtype"] = str(dtype_given(dtype, dev)).removeprefix("torch.")
    if store is not None:  # the store's model, text and packing, unless given explicitly (then checked)
        from cltrace.train.run import store_defaults

        changes = {**store_defaults(store), **changes}
    cfg = cfg.with_overrides(changes)
    echo(
        f"training a {cfg.kind.upper()} of {cfg.n_features} features per layer on {cfg.model} with text {cfg.source}: "
        f"{cfg.total_steps} steps of {cfg.batch_tokens} tokens in {cfg.dtype} on {dev} -> {out}"
    )
    if layout is not None:
        echo(f"sharded over {layout.describe()}")
    # the estimate times one unsharded step: skipped on several ranks
    result = train_transcoder(cfg, out, resume=resume, progress=not quiet, estimate=layout is None, echo=echo,
                              device=dev)
    if result:
        from cltrace.eval import format_table

        echo(format_table(result))
    echo(f"transcoder: {out / 'transcoder'}")
    if layout is not None:
        from cltrace.train.distributed import shutdown

        shutdown()


class StoreDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"


@app.command()
def harvest(
    out: Annotated[Path, typer.Option("--out", "-o", help="The activation store folder (new, or one to resume or extend).")],
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Training tokens to store in all (BOS positions not counted).")],
    model: ModelOption = None,
    source: SourceOption = "default",
    text_column: Annotated[str, typer.Option("--text-column", help="Column/field holding the text (.jsonl, .parquet, hf:).")] = "text",
    dtype: Annotated[StoreDtype, typer.Option("--dtype", help="Dtype of the stored activations.")] = StoreDtype.bfloat16,
    compute_dtype: Annotated[Dtype, typer.Option("--compute-dtype", help=DTYPE_HELP)] = Dtype.auto,
    n_ctx: NCtxOption = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Contexts per forward pass.")] = 16,
    shard_contexts: Annotated[int | None, typer.Option("--shard-contexts", min=1, help="Contexts per shard (default: about 256 MiB).")] = None,
    heldout_fraction: Annotated[float, typer.Option("--heldout-fraction", help="Share of documents held out (never stored).")] = 0.01,
    mix_contexts: Annotated[int, typer.Option(
        "--mix-contexts", min=1, help="Store the contexts in shuffled pools of this many (1: in text order), so that training "
        "reads mixed text (as `cltrace train` does when it harvests on the fly).")] = 4096,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Harvest every layer's transcoder inputs and targets into a sharded activation store (resumes and extends OUT)."""
    from cltrace.data.sources import open_text_source
    from cltrace.data.store import harvest_to_store
    from cltrace.model import load_model

    dev = device_given(device)
    compute = str(dtype_given(compute_dtype, dev)).removeprefix("torch.")
    text = open_text_source(source, text_column=text_column)
    loaded = load_model(model, device=dev)
    st = harvest_to_store(
        loaded, text, out, tokens, model_spec=model or "default", source_spec=source, text_column=text_column,
        n_ctx=n_ctx, dtype=dtype.value, harvest_dtype=compute, shard_contexts=shard_contexts,
        harvest_batch=batch_size, heldout_fraction=heldout_fraction, mix_contexts=mix_contexts, progress=not quiet,
    )
    note = " (the text ran out: that is all of it)" if st.manifest["source_exhausted"] else ""
    typer.echo(
        f"{out}: {st.tokens:,} tokens{note} of {st.n_layers} layers in {len(st.shards)} shards, "
        f"{st.disk_bytes() / 2**30:.2f} GiB ({st.disk_bytes() / max(1, st.tokens) / 1024:.1f} KiB per token, {dtype.value})"
    )


PROMPTS_HELP = ("Prompts whose attribution graphs are scored (replacement and completeness): 'default' (the committed "
                "set), a JSON Lines file with one {\"prompt\": ...} object per line, or 'none' (no graphs).")


@app.command(name="eval")
def eval_command(
    old_transcoder: OldTranscoderArgument = None,
    transcoder: TranscoderOption = None,
    model: ModelOption = None,
    source: Annotated[str, typer.Option("--source", "-s", help="Text source; its held-out split is used.")] = "default",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Held-out tokens to evaluate on.")] = 4096,
    n_ctx: NCtxOption = 128,
    prompts: Annotated[str, typer.Option("--prompts", help=PROMPTS_HELP)] = "default",
    max_prompts: Annotated[int, config_option(PromptSetConfig, "max_prompts", "--max-prompts")] = field_default(
        PromptSetConfig, "max_prompts"),
    max_prompt_tokens: Annotated[int, config_option(PromptSetConfig, "max_prompt_tokens", "--max-prompt-tokens")] = (
        field_default(PromptSetConfig, "max_prompt_tokens")),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the results as JSON to this file.")] = None,
    old_json: Annotated[Path | None, typer.Option("--json", hidden=True)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """NMSE, L0, dead features and spliced-in KL / top-1 agreement of a transcoder on held-out text, and the mean
    replacement and completeness scores of attribution graphs over a prompt set."""
    import json

    from cltrace.atomic import atomic_write_text, check_writable
    from cltrace.eval import evaluate, format_table
    from cltrace.graph.prompt_scores import encode_prompts, format_prompt_scores, load_prompts, prompt_set_scores
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    dev = device_given(device)
    transcoder = transcoder_given(transcoder, old_transcoder)
    json_out = deprecated(out, old_json, "--json", "-o/--out")
    if json_out is not None:
        check_writable(json_out, "evaluation JSON")  # a bad -o fails now, not after the evaluation
    # a bad prompts file or prompt fails now too, not after the held-out evaluation
    prompt_set = None if prompts == "none" else load_prompts(None if prompts == "default" else prompts)
    set_config = PromptSetConfig(max_prompts=max_prompts, max_prompt_tokens=max_prompt_tokens)
    tc = load_transcoder(resolve_transcoder(transcoder, model, device=dev), device=dev)
    loaded = load_model(model, device=dev)
    encoded = encode_prompts(loaded, prompt_set, set_config) if prompt_set is not None else None
    result = evaluate(loaded, tc, source, tokens, n_ctx=n_ctx)
    typer.echo(format_table(result))
    if prompt_set is not None:
        graphs = prompt_set_scores(ReplacementModel(loaded, tc), prompt_set, set_config, progress=not quiet,
                                   encoded=encoded)
        result["graphs"] = {"prompts_file": prompts, **graphs}
        typer.echo("")
        typer.echo(format_prompt_scores(graphs))
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n", "evaluation JSON")
        typer.echo(f"wrote {json_out}")
