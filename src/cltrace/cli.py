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

from cltrace import cli_global_weights, cli_qk
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
        typer.Option("--transcoder", "-t", help="Also run the local replacement model with this transcoder ('default': the default CLT)."),
    ] = None,
) -> None:
    """Show the model's most probable next tokens for a prompt."""
    import torch

    from cltrace.model import load_model

    loaded = load_model(model)
    replacement = None
    if transcoder is not None:
        from cltrace.replacement import ReplacementModel
        from cltrace.train.default import resolve_transcoder
        from cltrace.transcoder import load_transcoder

        replacement = ReplacementModel(loaded, load_transcoder(resolve_transcoder(transcoder, model, model=loaded)))
    ids = loaded.encode(prompt)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids[None].to(loaded.device), use_cache=False).logits[0]  # [pos, vocab]
    probs, tokens = logits[-1].float().softmax(-1).topk(min(top, logits.shape[-1]))  # a vocabulary may be smaller
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
    src: Annotated[Path, typer.Argument(help="A transcoder directory (native or circuit-tracer), or 'default' (the default CLT, trained on first use).")],
    dst: Annotated[Path, typer.Argument(help="Where to write the converted transcoder (a new directory).")],
    to: Annotated[Format, typer.Option("--to", help="The format to write.")] = Format.native,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it already holds files.")] = False,
) -> None:
    """Convert a transcoder between cltrace's native format and circuit-tracer's."""
    from cltrace.transcoder import detect_format, load_transcoder, save_transcoder

    from cltrace.train.default import resolve_transcoder

    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise CltraceError(f"'{dst}' already exists and is not empty: choose a new directory or pass --force")
    src = resolve_transcoder(src)
    transcoder = load_transcoder(src)
    save_transcoder(transcoder, dst, format=to.value)
    cfg = transcoder.config
    typer.echo(
        f"wrote {cfg.kind.upper()} ({cfg.n_layers} layers x {cfg.n_features} features, {cfg.activation}) "
        f"from {detect_format(src)} to {to.value}: {dst}"
    )


@app.command()
def train(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Starting config: 'default' (about 30 min here), 'quality' (about 2.3 h) or 'tiny'.")] = "default",
    model: ModelOption = None,
    source: Annotated[
        Optional[str], typer.Option("--source", "-s", help="Text: 'default', a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][:SPLIT].")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (config, checkpoint, metrics, curves, transcoder, eval).")] = Path("cltrace-run"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="A config.json to start from instead of a preset.")] = None,
    overrides: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config field, KEY=VALUE (repeatable), e.g. --set n_features=256.")
    ] = None,
    store: Annotated[
        Optional[Path], typer.Option("--store", help="Train from this activation store (`cltrace harvest`); its model, text and n_ctx are used.")
    ] = None,
    feature_parallel: Annotated[
        int, typer.Option("--feature-parallel", min=0, help="Under torchrun: ranks sharing each layer's features (0: all; the rest split the data).")
    ] = 0,
    dist_timeout: Annotated[
        float, typer.Option("--dist-timeout", min=1.0, help="Under torchrun: seconds a rank waits for a silent rank before stopping.")
    ] = 600.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a cross-layer (or per-layer) transcoder and evaluate it on held-out text (`torchrun ... -m cltrace train`: sharded)."""
    from cltrace.train import TrainConfig, parse_override, train_transcoder
    from cltrace.train import preset as get_preset
    from cltrace.train.distributed import init_layout

    layout = init_layout(feature_parallel or None, dist_timeout)  # None unless started by torchrun
    echo = typer.echo if layout is None or layout.is_main else (lambda text: None)  # rank 0 speaks for all

    if resume and config is None and (out / "config.json").is_file():
        cfg = TrainConfig.load(out / "config.json")
    else:
        cfg = TrainConfig.load(config) if config is not None else get_preset(preset)
    changes = dict(parse_override(o) for o in overrides or [])
    if model is not None:
        changes["model"] = model
    if source is not None:
        changes["source"] = source
    if store is not None:  # the store's model, text and packing, unless given explicitly (then checked)
        from cltrace.train.run import store_defaults

        changes = {**store_defaults(store), **changes}
    cfg = cfg.with_overrides(changes)
    echo(
        f"training a {cfg.kind.upper()} of {cfg.n_features} features per layer on {cfg.model} with text {cfg.source}: "
        f"{cfg.total_steps} steps of {cfg.batch_tokens} tokens -> {out}"
    )
    if layout is not None:
        echo(f"sharded over {layout.describe()}")
    # the estimate times one unsharded step: skipped on several ranks
    result = train_transcoder(cfg, out, resume=resume, progress=not quiet, estimate=layout is None, echo=echo)
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


class ComputeDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


@app.command()
def harvest(
    out: Annotated[Path, typer.Option("--out", "-o", help="The activation store folder (new, or one to resume or extend).")],
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Training tokens to store in all (BOS positions not counted).")],
    model: ModelOption = None,
    source: Annotated[str, typer.Option("--source", "-s", help="Text: 'default', a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][:SPLIT].")] = "default",
    text_column: Annotated[str, typer.Option("--text-column", help="Column/field holding the text (.jsonl, .parquet, hf:).")] = "text",
    dtype: Annotated[StoreDtype, typer.Option("--dtype", help="Dtype of the stored activations.")] = StoreDtype.bfloat16,
    compute_dtype: Annotated[
        ComputeDtype, typer.Option("--compute-dtype", help="Dtype of the model's matrix products (bfloat16: faster, ~3% noise).")
    ] = ComputeDtype.float32,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=2, help="Tokens per context, BOS included.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Contexts per forward pass.")] = 16,
    shard_contexts: Annotated[Optional[int], typer.Option("--shard-contexts", min=1, help="Contexts per shard (default: about 256 MiB).")] = None,
    heldout_fraction: Annotated[float, typer.Option("--heldout-fraction", help="Share of documents held out (never stored).")] = 0.01,
    mix_contexts: Annotated[int, typer.Option(
        "--mix-contexts", min=1, help="Store the contexts in shuffled pools of this many (1: in text order), so that training "
        "reads mixed text (as `cltrace train` does when it harvests on the fly).")] = 4096,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Harvest every layer's transcoder inputs and targets into a sharded activation store (resumes and extends OUT)."""
    from cltrace.data.sources import open_text_source
    from cltrace.data.store import harvest_to_store
    from cltrace.model import load_model

    text = open_text_source(source, text_column=text_column)
    loaded = load_model(model)
    st = harvest_to_store(
        loaded, text, out, tokens, model_spec=model or "default", source_spec=source, text_column=text_column,
        n_ctx=n_ctx, dtype=dtype.value, harvest_dtype=compute_dtype.value, shard_contexts=shard_contexts,
        harvest_batch=batch_size, heldout_fraction=heldout_fraction, mix_contexts=mix_contexts, progress=not quiet,
    )
    note = " (the text ran out: that is all of it)" if st.manifest["source_exhausted"] else ""
    typer.echo(
        f"{out}: {st.tokens:,} tokens{note} of {st.n_layers} layers in {len(st.shards)} shards, "
        f"{st.disk_bytes() / 2**30:.2f} GiB ({st.disk_bytes() / max(1, st.tokens) / 1024:.1f} KiB per token, {dtype.value})"
    )


@app.command(name="eval")
def eval_command(
    transcoder: Annotated[Path, typer.Argument(help="A transcoder directory (native or circuit-tracer), or 'default' (the default CLT, trained on first use).")],
    model: ModelOption = None,
    source: Annotated[str, typer.Option("--source", "-s", help="Text source; its held-out split is used.")] = "default",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Held-out tokens to evaluate on.")] = 4096,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=2, help="Tokens per context, BOS included.")] = 128,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
) -> None:
    """NMSE, L0, dead features and spliced-in KL / top-1 agreement of a transcoder on held-out text."""
    import json

    from cltrace.atomic import atomic_write_text, check_writable
    from cltrace.eval import evaluate, format_table
    from cltrace.model import load_model
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    if json_out is not None:
        check_writable(json_out, "evaluation JSON")  # a bad --json fails now, not after the evaluation
    tc = load_transcoder(resolve_transcoder(transcoder, model))
    loaded = load_model(model)
    result = evaluate(loaded, tc, source, tokens, n_ctx=n_ctx)
    typer.echo(format_table(result))
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n", "evaluation JSON")
        typer.echo(f"wrote {json_out}")


@app.command()
def attribute(
    prompt: Annotated[str, typer.Argument(help="The text whose next token to explain.")],
    transcoder: Annotated[Path, typer.Option("--transcoder", "-t", help="The transcoder directory, or 'default' (the default CLT, trained on first use).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the graph file.")],
    model: ModelOption = None,
    target: Annotated[
        Optional[list[str]], typer.Option("--target", help="A single-token target (repeatable); default: top logits.")
    ] = None,
    max_feature_nodes: Annotated[
        int, typer.Option("--max-feature-nodes", min=1, help="At most this many feature nodes, by influence.")
    ] = 7500,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Target rows per backward pass.")] = 32,
    node_threshold: Annotated[
        float, typer.Option("--node-threshold", min=0.0, max=1.0, help="Pruning: share of influence kept in nodes.")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option("--edge-threshold", min=0.0, max=1.0, help="Pruning: share of influence kept in edges.")
    ] = 0.98,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the estimated time and peak memory, and stop before computing.")
    ] = False,
    max_memory: Annotated[
        Optional[float],
        typer.Option("--max-memory", min=0.1, max=1e9, help="Refuse up front a graph estimated to need more GB (default: available RAM)."),
    ] = None,
) -> None:
    """Build, score and save the attribution graph of a prompt (the full graph; pruning is reported)."""
    from cltrace.graph.attribution import attribute as build_graph
    from cltrace.graph.prune import prune
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoder import load_transcoder

    from cltrace.atomic import check_writable
    from cltrace.train.default import resolve_transcoder

    check_writable(output, "graph")  # a bad -o fails now, not after the whole graph is computed
    loaded = load_model(model)
    transcoder = resolve_transcoder(transcoder, model, model=loaded)  # 'default' -> its folder in the cache
    replacement = ReplacementModel(loaded, load_transcoder(transcoder))
    from cltrace.train.distributed import current_layout, launched

    if launched():  # under torchrun: the target rows are split across the ranks, and rank 0 writes the graph
        from cltrace.graph.distributed import attribute_sharded as build_graph
    from cltrace.graph.attribution import AttributionConfig, estimate_attribution

    targets = list(target) if target else None
    config = AttributionConfig(max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                               max_memory_bytes=int(max_memory * 2**30) if max_memory is not None else None)
    limit = config.memory_limit()
    if dry_run:
        estimate = estimate_attribution(replacement, prompt, targets, config)
        typer.echo(f"estimate: {estimate.summary()}")
        fits = limit is None or estimate.peak_bytes <= limit
        allowed = "no limit known" if limit is None else f"{limit / 2**30:.1f} GB allowed"
        typer.echo(f"memory: {'fits' if fits else 'would be refused'} ({allowed}); nothing computed (--dry-run)")
        return
    graph = build_graph(replacement, prompt, targets=targets, config=config)
    if launched():
        from cltrace.train.distributed import shutdown

        main_rank = current_layout().is_main
        shutdown()
        if not main_rank:
            return
    _, result = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    graph.metadata["scores"] = result.as_dict()  # the graph on disk stays unpruned
    graph.metadata["transcoder_path"] = str(transcoder.resolve())  # so that `cltrace serve` can intervene on it
    graph.save(output)
    targets = ", ".join(
        f"{t['label']!r} {100 * t['probability']:.1f}%" if t.get("probability") is not None else repr(t["label"])
        for t in graph.metadata.get("targets", [])
    )
    typer.echo(f"targets: {targets}")
    typer.echo(
        f"nodes {result.n_nodes_before} -> {result.n_nodes_after} after pruning, "
        f"edges {result.n_edges_before} -> {result.n_edges_after}"
    )
    typer.echo(
        f"replacement score {result.replacement_score:.3f}, completeness score {result.completeness_score:.3f} "
        f"(pruned: {result.pruned_replacement_score:.3f}, {result.pruned_completeness_score:.3f})"
    )
    typer.echo(f"wrote {output}")


@app.command()
def trace(
    prompt: Annotated[str, typer.Argument(help="The text whose next token to explain.")],
    transcoder: Annotated[str, typer.Option("--transcoder", "-t", help="A transcoder directory, or 'default' (the default CLT, trained on first use).")] = "default",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for graph.safetensors, graph.png and report.txt.")] = Path("cltrace-trace"),
    model: ModelOption = None,
    features: Annotated[
        str, typer.Option("--features", help="Feature database for labels and contexts: 'auto' (built in the cache on first use), a .db file, or 'none'.")
    ] = "auto",
    feature_tokens: Annotated[int, typer.Option("--feature-tokens", min=1, help="Tokens the automatic feature database analyses.")] = 50_000,
    max_feature_nodes: Annotated[int, typer.Option("--max-feature-nodes", min=1, help="At most this many feature nodes, by influence.")] = 7500,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Trace a prompt: attribution graph, pruning, scores, the strongest paths with their features, and a picture."""
    from cltrace.features import FeatureStore
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.trace.run import check_trace_folder, ensure_feature_db, trace_prompt
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    check_trace_folder(out)  # a bad --out fails now, not after the model, feature pages and graph
    loaded = load_model(model)
    tc_path = resolve_transcoder(Path(transcoder), model, model=loaded)
    tc = load_transcoder(tc_path)
    replacement = ReplacementModel(loaded, tc)
    db_path: Path | None = None
    if features == "auto":
        db_path = ensure_feature_db(loaded, tc, feature_tokens, progress=not quiet)
    elif features != "none":
        db_path = Path(features)
    store = FeatureStore(db_path) if db_path is not None else None
    try:
        result = trace_prompt(replacement, prompt, out, feature_db=store, transcoder_path=str(Path(tc_path).resolve()),
                              max_feature_nodes=max_feature_nodes, progress=not quiet)
    finally:
        if store is not None:
            store.close()
    typer.echo(result.report.format())
    typer.echo("")
    typer.echo(f"wrote {result.graph_path}, {result.picture_path} and {out / 'report.txt'}")
    typer.echo(f"explore it: cltrace serve {out}")


class ExportFormat(str, Enum):
    neuronpedia = "neuronpedia"


@app.command()
def export(
    graph: Annotated[Path, typer.Argument(help="A graph file written by `cltrace attribute`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the JSON file.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="The schema to write.")] = ExportFormat.neuronpedia,
    slug: Annotated[Optional[str], typer.Option("--slug", help="The graph's name in the front end.")] = None,
    node_threshold: Annotated[float, typer.Option("--node-threshold", min=0.0, max=1.0)] = 0.8,
    edge_threshold: Annotated[float, typer.Option("--edge-threshold", min=0.0, max=1.0)] = 0.98,
) -> None:
    """Export a graph, pruned, to the JSON that circuit-tracer's and Neuronpedia's front ends read."""
    from cltrace.atomic import check_writable
    from cltrace.graph.export import write_neuronpedia_json
    from cltrace.graph.graph import Graph

    check_writable(output, "graph JSON")  # before reading the graph
    data = write_neuronpedia_json(
        Graph.load(graph), output, slug=slug, node_threshold=node_threshold, edge_threshold=edge_threshold
    )
    typer.echo(f"wrote {output}: {len(data['nodes'])} nodes, {len(data['links'])} links ({format.value})")


class InterventionMode(str, Enum):
    iterative = "iterative"
    constrained = "constrained"


@app.command()
def intervene(
    prompt: Annotated[str, typer.Argument(help="The text to run the model on.")],
    transcoder: Annotated[Path, typer.Option("--transcoder", "-t", help="The transcoder directory, or 'default' (the default CLT, trained on first use).")],
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", "-s",
            help="LAYER:FEATURE[@POS]=VALUE to set, or =xFACTOR to scale; POS: 4, 2-5 or 2- (open-ended: also "
            "the generated tokens); no @POS: every position. A supernode name may stand for LAYER:FEATURE. Repeatable.",
        ),
    ] = None,
    model: ModelOption = None,
    mode: Annotated[
        InterventionMode, typer.Option("--mode", help="iterative: downstream features recomputed; constrained: held.")
    ] = InterventionMode.iterative,
    layers: Annotated[
        Optional[str], typer.Option("--layers", help="LO-HI: the layers whose features constrained mode holds (default all).")
    ] = None,
    freeze_attention: Annotated[
        bool, typer.Option("--freeze-attention/--free-attention", help="Replay the prompt's attention patterns and norms.")
    ] = False,
    generate: Annotated[int, typer.Option("--generate", "-g", min=0, max=512, help="Greedy tokens to generate.")] = 0,
    top: Annotated[int, typer.Option("--top", "-k", min=1, max=100, help="How many tokens to show.")] = 5,
    supernodes: Annotated[
        Optional[Path], typer.Option("--supernodes", help="A supernodes JSON file whose names --set may use.")
    ] = None,
    graph: Annotated[
        Optional[Path],
        typer.Option("--graph", help="A graph of this prompt: also show its predicted change beside the measured one."),
    ] = None,
) -> None:
    """Set or scale transcoder features and show how the output changes (and, with --graph, what the graph predicted)."""
    import re as _re

    from cltrace.replacement.interventions import intervene as run_interventions
    from cltrace.replacement.interventions import parse_intervention

    named = None
    if supernodes is not None:
        from cltrace.replacement.supernodes import load_supernodes

        named = load_supernodes(supernodes)
    if not set_:
        raise CltraceError("give at least one intervention: --set LAYER:FEATURE[@POS]=VALUE (or =xFACTOR)")
    specs = [iv for text in set_ for iv in parse_intervention(text, named)]
    layer_range = None
    if layers is not None:
        if mode.value != "constrained":
            raise CltraceError("--layers applies to --mode constrained only: add --mode constrained or drop --layers")
        m = _re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", layers)
        if not m:
            raise CltraceError(f"--layers {layers!r} is not LO-HI, e.g. 0-29")
        layer_range = (int(m.group(1)), int(m.group(2)))
    loaded_graph = None
    if graph is not None:
        from cltrace.graph.graph import Graph

        loaded_graph = Graph.load(graph)

    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.replacement.interventions import check_interventions
    from cltrace.transcoder import load_transcoder

    from cltrace.train.default import resolve_transcoder

    loaded_transcoder = load_transcoder(resolve_transcoder(transcoder, model))
    # layers and features can be checked before the (slow) model load; positions need the prompt's length
    check_interventions(specs, loaded_transcoder.n_layers, loaded_transcoder.n_features, None)
    loaded = load_model(model)
    replacement = ReplacementModel(loaded, loaded_transcoder)
    ids = loaded.encode(prompt)
    if loaded_graph is not None and loaded_graph.metadata.get("input_ids") not in (None, ids.tolist()):
        raise CltraceError(f"the graph '{graph}' was built for another prompt: build one for this prompt")
    result = run_interventions(
        replacement, ids, specs, mode=mode.value, layers=layer_range, freeze_attention=freeze_attention,
        generate=generate, top=top,
    )
    shown = "|".join(loaded.decode_token(t) for t in ids.tolist())
    typer.echo(f"{loaded.name} · {ids.numel()} tokens: {shown}")
    lo, hi = result.layers
    where = f", layers {lo}-{hi} held" if mode.value == "constrained" else ""
    attention = "frozen" if freeze_attention else "free"
    typer.echo(f"interventions ({mode.value}{where}, attention {attention}): {', '.join(str(iv) for iv in specs)}")
    typer.echo(f"     {'before':<28} after")
    for rank, (b, a) in enumerate(zip(result.top_before, result.top_after), start=1):
        typer.echo(f"{rank:>3}. {b.text!r:<18} {100 * b.probability:6.2f}%  {a.text!r:<18} {100 * a.probability:6.2f}%")
    change = result.logit_change
    shown_tokens = list(dict.fromkeys([t.token for t in result.top_before] + [t.token for t in result.top_after]))
    typer.echo(
        "logit change: " + ", ".join(f"{loaded.decode_token(t)!r} {float(change[t]):+.3f}" for t in shown_tokens)
    )
    changed = result.changed_features(k=5)
    typer.echo(
        f"features changed: {result.n_changed_features()}"
        + (" (largest: " + ", ".join(f"{l}:{f}@{p} {b + 0.0:.3f}→{a + 0.0:.3f}" for l, p, f, b, a in changed) + ")" if changed else "")
    )
    if generate:
        typer.echo(f"continuation before: {result.text_before!r}")
        typer.echo(f"continuation after:  {result.text_after!r}")
    if loaded_graph is not None:
        from cltrace.replacement.interventions import compare_with_graph

        rows, _, prediction = compare_with_graph(replacement, loaded_graph, specs, ids)
        typer.echo(
            "graph prediction beside the measured change (constrained, attention frozen; logits: logit − mean "
            "logit, features: pre-activation):"
        )
        typer.echo(f"  {'':<28} {'predicted':>9} {'measured':>9}")
        for row in [r for r in rows if r.kind == "logit"] + [r for r in rows if r.kind == "feature"][:10]:
            label = f"logit {row.label!r}" if row.kind == "logit" else f"feature {row.node_id}"
            typer.echo(f"  {label:<28} {row.predicted:+9.4f} {row.actual:+9.4f}")
        if prediction.missing:
            typer.echo(f"not in the graph (effect not predicted): {', '.join(prediction.missing[:10])}")


# -- features: build and read feature pages --------------------------------------------------------

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
    from cltrace.features.global_weights import format_global_weights, read_global_weights
    from cltrace.features.show import format_page, parse_feature

    layer, index = parse_feature(feature)
    with FeatureStore(db) as store:
        typer.echo(format_page(store.page(layer, index), n_top=top, n_samples=samples, activations=activations))
    weights = read_global_weights(db, layer, index)
    if weights:
        typer.echo(format_global_weights(weights))


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


@app.command()
def serve(
    graph_dir: Annotated[Path, typer.Argument(help="The folder of graph files to explore.")] = Path("."),
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="The port to listen on.")] = 8000,
    host: Annotated[
        str, typer.Option("--host", help="The interface to bind; anything but 127.0.0.1 exposes the app to others.")
    ] = "127.0.0.1",
    features: Annotated[
        Optional[Path], typer.Option("--features", "-d", help="Feature store for the graphs (default: a matching *.db in the folder; 'auto': the one `cltrace trace` built for --transcoder).")
    ] = None,
    model: ModelOption = None,
    transcoder: Annotated[
        Optional[Path], typer.Option("--transcoder", "-t", help="Transcoder for interventions and new graphs (default: the graph's; 'default': the default CLT).")
    ] = None,
) -> None:
    """Explore attribution graphs in the browser: a local web app (graph view, feature pages, interventions)."""
    import ipaddress

    from cltrace.serve import app as serve_app  # the web stack loads only for this command

    if not graph_dir.is_dir():
        raise CltraceError(f"'{graph_dir}' is not a folder: pass the folder holding your graph files")
    if not serve_app.assets_built():
        raise CltraceError(serve_app.BUILD_HINT)
    if not host.strip():  # uvicorn would take "" for every interface
        raise CltraceError("--host is empty: pass the interface to bind, e.g. 127.0.0.1 (the default)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        typer.echo(f"warning: binding {host}: anyone who can reach this machine can read the graphs and run the model", err=True)
    if transcoder is not None:
        from cltrace.train.default import resolve_transcoder

        transcoder = resolve_transcoder(transcoder, model)
    if features is not None and str(features) == "auto":
        if transcoder is None:
            raise CltraceError("--features auto needs --transcoder: the automatic feature store belongs to a transcoder")
        from cltrace.trace.run import feature_db_path
        from cltrace.transcoder import load_transcoder

        features = feature_db_path(load_transcoder(transcoder))
        if not features.is_file():
            raise CltraceError(f"no automatic feature store for {transcoder} yet: run `cltrace trace` with it first")
    typer.echo(f"serving {graph_dir.resolve()} at http://{host}:{port} (Ctrl-C stops)")
    serve_app.serve(graph_dir, host=host, port=port, features=features, model=model, transcoder=transcoder)


app.command("qk")(cli_qk.qk)
features_app.command("global-weights")(cli_global_weights.global_weights_command)


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
