"""`cltrace qk`: why a head attends where it does (QK attribution), and which heads carry an edge.

A plain function with typer annotations; the command line registers it as `qk`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cltrace.errors import CltraceError


def node_text(node: dict[str, Any], tokens: list[str]) -> str:
    """A short label of a QK node: `F 3:120@5 (1.93)`, `emb 'Harry'@5`, `attn L2@5`, `err L2@5`, …"""
    kind, layer, pos = node["kind"], node["layer"], node["pos"]
    if kind == "feature":
        return f"F {layer}:{node['feature']}@{pos} ({node['activation']:.2f})"
    if kind == "embedding":
        return f"emb {tokens[pos]!r}@{pos}"
    if kind in ("attention", "error", "skip"):
        return f"{ {'attention': 'attn', 'error': 'err', 'skip': 'skip'}[kind]} L{layer}@{pos}"
    return {"position": f"pos-emb@{pos}", "decoder_bias": "dec-bias", "constant": "bias"}[kind]


def _default_out(graph: Path | None, layer: int, head: int, query: int | None) -> Path:
    name = f"qk_L{layer}_H{head}_q{'last' if query is None else query}.json"
    return graph.with_name(f"{graph.stem}.{name}") if graph is not None else Path(name)


def qk(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    layer: Annotated[int, typer.Option("--layer", "-l", help="The attention layer.")],
    head: Annotated[int, typer.Option("--head", help="The (query) head.")],
    transcoder: Annotated[Path, typer.Option("--transcoder", "-t", help="The transcoder directory, or 'default'.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Hub id, local directory or .gguf file.")] = None,
    query: Annotated[int | None, typer.Option("--query", help="The query position (default: the last).")] = None,
    keys: Annotated[int, typer.Option("--keys", min=1, help="Key positions to decompose, most attended first.")] = 3,
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="Pairs shown per key position.")] = 10,
    graph: Annotated[Path | None, typer.Option("--graph", help="The prompt's graph: the JSON goes beside it.")] = None,
    edge: Annotated[
        str | None, typer.Option("--edge", help="SOURCE,TARGET node ids of the graph: also show the edge's heads.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the JSON.")] = None,
) -> None:
    """Decompose a head's attention scores at a query position into (query node, key node) pairs."""
    from cltrace.atomic import atomic_write_text, check_writable
    from cltrace.graph.graph import Graph
    from cltrace.graph.heads import graph_node, head_loadings
    from cltrace.graph.qk import qk_attribution
    from cltrace.graph.qk_sites import AttentionSites
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    if edge is not None and graph is None:
        raise CltraceError("--edge names nodes of a graph: add --graph GRAPH")
    out = out or _default_out(graph, layer, head, query)
    check_writable(out, "QK attribution JSON")
    loaded_graph = Graph.load(graph) if graph is not None else None
    replacement = ReplacementModel(load_model(model), load_transcoder(resolve_transcoder(transcoder, model)))
    ids = replacement.input_ids(prompt)
    if loaded_graph is not None and loaded_graph.metadata.get("input_ids") not in (None, ids.tolist()):
        raise CltraceError(f"the graph '{graph}' was built for another prompt: give this prompt's graph")
    run = replacement.run(ids)
    sites = AttentionSites(replacement, run)
    q = run.n_pos - 1 if query is None else query
    result = qk_attribution(replacement, run, layer, head, q, n_keys=keys, sites=sites)
    tokens = [replacement.model.decode_token(t) for t in ids.tolist()]
    data: dict[str, Any] = {"prompt": prompt, "tokens": tokens, **result.to_json(top)}
    cap = f", soft-capped at {result.softcap:g}" if result.softcap else ""
    typer.echo(f"layer {layer} head {head}, query {q} {tokens[q]!r}: scores before softmax{cap}")
    for key, shown in zip(result.keys, data["keys"]):
        typer.echo(f"  key {key.key_pos} {tokens[key.key_pos]!r}: weight {key.weight:.3f}, score {key.score:+.3f}")
        for pair in shown["pairs"]:
            typer.echo(f"    {pair['value']:+8.3f}  {node_text(pair['query'], tokens):<28} × {node_text(pair['key'], tokens)}")
    if edge is not None and loaded_graph is not None:  # --edge comes with --graph (checked above)
        source_id, _, target_id = edge.partition(",")
        source, target = (graph_node(loaded_graph, loaded_graph.find(i.strip())) for i in (source_id, target_id))
        loads = head_loadings(replacement, run, source, target, sites)
        data["edge"] = {"source": source_id.strip(), "target": target_id.strip(), "total": loads.total,
                        "heads": loads.top(10)}
        typer.echo(f"edge {edge}: {loads.total:+.4f} through attention; heads:")
        for row in loads.top(5):
            typer.echo(f"    L{row['layer']} H{row['head']}: {row['loading']:+.4f}")
    atomic_write_text(out, json.dumps(data, indent=1) + "\n", "QK attribution JSON")
    typer.echo(f"wrote {out}")
