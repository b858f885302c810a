"""Commands that build and write attribution graphs: `attribute`, `trace`, `export`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cltrace.cli.common import (
    DeviceOption,
    ModelOption,
    OldOutputOption,
    app,
    config_option,
    decoded_prompt,
    deprecated,
    device_given,
    required,
)
from cltrace.fields import field_default
from cltrace.graph.config import AttributionConfig, CircuitConfig

MaxFeatureNodesOption = Annotated[int, config_option(AttributionConfig, "max_feature_nodes", "--max-feature-nodes")]
TargetOption = Annotated[list[str] | None, typer.Option(
    "--target", help="A single-token target (repeatable); default: the top logits. With --versus, the logit difference.")]
VersusOption = Annotated[str | None, typer.Option(
    "--versus", help="Explain logit(--target) − logit(this token), e.g. --target DA --versus DC.")]


def targets_of(target: list[str] | None, versus: str | None) -> list[Any] | None:
    """The attribution targets of --target (repeatable) and --versus (with exactly one --target)."""
    from cltrace.errors import CltraceError
    from cltrace.graph.targets import LogitDifference

    if versus is None:
        return list(target) if target else None
    if not target or len(target) != 1:
        raise CltraceError("--versus compares one target with another: give exactly one --target, e.g. --target DA --versus DC")
    return [LogitDifference(target[0], versus)]


@app.command()
def attribute(
    prompt: Annotated[str, typer.Argument(help="The text whose next token to explain.", callback=decoded_prompt)],
    transcoder: Annotated[Path, typer.Option("--transcoder", "-t", help="The transcoder directory, or 'default' (the default CLT, trained on first use).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the graph file.")] = None,
    old_output: OldOutputOption = None,
    model: ModelOption = None,
    target: TargetOption = None,
    versus: VersusOption = None,
    max_feature_nodes: MaxFeatureNodesOption = field_default(AttributionConfig, "max_feature_nodes"),
    batch_size: Annotated[int, config_option(AttributionConfig, "batch_size", "--batch-size")] = field_default(
        AttributionConfig, "batch_size"),
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
        float | None,
        typer.Option("--max-memory", min=0.1, max=1e9, help="Refuse up front a graph estimated to need more GB "
                     "(default: the memory available on the device: the GPU's free memory, or the host's RAM)."),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Build, score and save the attribution graph of a prompt (the full graph; pruning is reported)."""
    from cltrace.atomic import check_writable
    from cltrace.graph.attribution import attribute as build_graph
    from cltrace.graph.prune import prune
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    output = required(deprecated(out, old_output, "--output", "-o/--out"), "-o/--out", "name the graph file to write")
    check_writable(output, "graph")  # a bad -o fails now, not after the whole graph is computed
    dev = device_given(device)
    targets = targets_of(target, versus)
    loaded = load_model(model, device=dev)
    transcoder = resolve_transcoder(transcoder, model, model=loaded)  # 'default' -> its folder in the cache
    replacement = ReplacementModel(loaded, load_transcoder(transcoder, device=dev))
    from cltrace.train.distributed import current_layout, launched

    if launched():  # under torchrun: the target rows are split across the ranks, and rank 0 writes the graph
        from cltrace.graph.distributed import attribute_sharded as build_graph
    from cltrace.graph.attribution import estimate_attribution

    config = AttributionConfig(max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                               max_memory_bytes=int(max_memory * 2**30) if max_memory is not None else None)
    limit = config.memory_limit(dev)
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

        layout = current_layout()
        main_rank = layout is None or layout.is_main
        shutdown()
        if not main_rank:
            return
    _, result = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    graph.metadata["scores"] = result.as_dict()  # the graph on disk stays unpruned
    graph.metadata["transcoder_path"] = str(transcoder.resolve())  # so that `cltrace serve` can intervene on it
    graph.save(output)
    _echo_scores(graph.metadata.get("targets", []), result)
    typer.echo(f"wrote {output}")


def _echo_scores(targets: list[dict[str, Any]], result: Any) -> None:
    """The graph's targets, and its size and scores before and after pruning."""
    shown = ", ".join(
        f"{t['label']!r} {100 * t['probability']:.1f}%" if t.get("probability") is not None else repr(t["label"])
        for t in targets
    )
    typer.echo(f"targets: {shown}")
    typer.echo(
        f"nodes {result.n_nodes_before} -> {result.n_nodes_after} after pruning, "
        f"edges {result.n_edges_before} -> {result.n_edges_after}"
    )
    typer.echo(
        f"replacement score {result.replacement_score:.3f}, completeness score {result.completeness_score:.3f} "
        f"(pruned: {result.pruned_replacement_score:.3f}, {result.pruned_completeness_score:.3f}; without the BOS error "
        f"nodes, as circuit-tracer scores: {result.replacement_score_no_bos:.3f}, {result.completeness_score_no_bos:.3f})"
    )


@app.command()
def trace(
    prompt: Annotated[str, typer.Argument(help="The text whose next token to explain.", callback=decoded_prompt)],
    transcoder: Annotated[
        str, typer.Option("--transcoder", "-t", help="A transcoder directory, or 'default' (the default CLT, trained on first use).")
    ] = "default",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the graph, the circuit, their pictures and report.txt.")] = Path("cltrace-trace"),
    model: ModelOption = None,
    target: TargetOption = None,
    versus: VersusOption = None,
    features: Annotated[
        str, typer.Option("--features", help="Feature database for labels and contexts: 'auto' (built in the cache on first use), a .db file, or 'none'.")
    ] = "auto",
    feature_tokens: Annotated[int, typer.Option("--feature-tokens", min=1, help="Tokens the automatic feature database analyses.")] = 50_000,
    max_feature_nodes: MaxFeatureNodesOption = field_default(AttributionConfig, "max_feature_nodes"),
    max_supernodes: Annotated[int, config_option(CircuitConfig, "max_supernodes", "--max-supernodes")] = field_default(
        CircuitConfig, "max_supernodes"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Trace a prompt: its circuit (labelled supernodes, signed effects, validated by intervening), the attribution graph, pictures."""
    from cltrace.features import FeatureStore
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.trace.run import check_trace_folder, ensure_feature_db, trace_prompt
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    check_trace_folder(out)  # a bad --out fails now, not after the model, feature pages and graph
    dev = device_given(device)
    targets = targets_of(target, versus)
    loaded = load_model(model, device=dev)
    tc_path = resolve_transcoder(Path(transcoder), model, model=loaded)
    tc = load_transcoder(tc_path, device=dev)
    replacement = ReplacementModel(loaded, tc)
    db_path: Path | None = None
    if features == "auto":
        db_path = ensure_feature_db(loaded, tc, feature_tokens, progress=not quiet)
    elif features != "none":
        db_path = Path(features)
    store = FeatureStore(db_path) if db_path is not None else None
    try:
        result = trace_prompt(replacement, prompt, out, feature_db=store, transcoder_path=str(Path(tc_path).resolve()),
                              targets=targets, max_feature_nodes=max_feature_nodes, progress=not quiet,
                              circuit=CircuitConfig(max_supernodes=max_supernodes))
    finally:
        if store is not None:
            store.close()
    typer.echo(result.report.format())
    typer.echo("")
    typer.echo(f"wrote {out / 'circuit.json'}, {out / 'circuit.png'}, {result.graph_path}, {result.picture_path} and "
               f"{out / 'report.txt'}")
    typer.echo(f"explore it: cltrace serve {out}")


class ExportFormat(str, Enum):
    neuronpedia = "neuronpedia"


@app.command()
def export(
    graph: Annotated[Path, typer.Argument(help="A graph file written by `cltrace attribute`.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the JSON file.")] = None,
    old_output: OldOutputOption = None,
    format: Annotated[ExportFormat, typer.Option("--format", help="The schema to write.")] = ExportFormat.neuronpedia,
    slug: Annotated[str | None, typer.Option("--slug", help="The graph's name in the front end.")] = None,
    node_threshold: Annotated[float, typer.Option("--node-threshold", min=0.0, max=1.0)] = 0.8,
    edge_threshold: Annotated[float, typer.Option("--edge-threshold", min=0.0, max=1.0)] = 0.98,
    supernodes: Annotated[Path | None, typer.Option(
        "--supernodes", help="A supernodes JSON file: exported as qParams (the members pinned).")] = None,
) -> None:
    """Export a graph, pruned, to the JSON that circuit-tracer's and Neuronpedia's front ends read."""
    from cltrace.atomic import check_writable
    from cltrace.graph.export import write_neuronpedia_json
    from cltrace.graph.graph import Graph
    from cltrace.replacement.supernodes import load_supernodes

    output = required(deprecated(out, old_output, "--output", "-o/--out"), "-o/--out", "name the JSON file to write")
    check_writable(output, "graph JSON")  # before reading the graph
    groups = list(load_supernodes(supernodes).values()) if supernodes is not None else []
    data = write_neuronpedia_json(
        Graph.load(graph), output, slug=slug, node_threshold=node_threshold, edge_threshold=edge_threshold,
        supernodes=groups,
    )
    shown = f", {len(data['qParams']['supernodes'])} of {len(groups)} supernodes" if supernodes is not None else ""
    typer.echo(f"wrote {output}: {len(data['nodes'])} nodes, {len(data['links'])} links{shown} ({format.value})")
