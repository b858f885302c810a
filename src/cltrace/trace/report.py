"""A pruned attribution graph as a person reads it: predictions, scores, and the strongest paths.

For the top target, the report follows the paths from the prompt's token embeddings through
features to that logit with the largest product of row-normalised |edge weights| (the paths
`Graph.top_paths` finds), keeps those that pass through at least one feature, and describes each
feature on the way by what its decoder promotes through the unembedding ("say X") and, when a
feature database is at hand, the contexts where it fires most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cltrace.features.views import summed_decoders, unembedding_directions
from cltrace.graph.graph import Graph, GraphPath, NodeKind


@dataclass
class FeatureNote:
    """What the report says about one feature node."""

    layer: int
    feature: int
    pos: int
    activation: float
    says: list[str]
    """Tokens its decoder promotes most through the unembedding."""
    label: str | None = None
    """The feature database's label (a person's, else the automatic one), when there is a database."""
    fires_on: list[str] = field(default_factory=list)
    """Snippets of its top contexts, the firing token marked «like this», when there is a database."""

    @property
    def name(self) -> str:
        return f"L{self.layer}/{self.feature}"


@dataclass
class TraceReport:
    """The readable summary of one traced prompt."""

    prompt: str
    tokens: list[str]
    targets: list[tuple[str, float | None]]
    """(token, probability) of the graph's logit targets, most probable first."""
    scores: dict[str, float]
    counts: dict[str, int]
    paths: list[tuple[list[str], float]]
    """The strongest paths to the top target: node descriptions from token to logit, and the score."""
    features: list[FeatureNote]
    """Every feature on those paths, in order of first appearance."""
    path_nodes: list[list[int]] = field(default_factory=list)
    """The same paths as node indices into the pruned graph."""
    circuit_text: str = ""
    """The circuit, as `cltrace.trace.circuit.format_circuit` writes it (shown first)."""

    def format(self) -> str:
        """The report as terminal text: the circuit first, then the full graph's paths."""
        lines = [f"prompt: {self.prompt!r}"]
        preds = ", ".join(f"{t!r} {100 * p:.1f}%" if p is not None else repr(t) for t, p in self.targets[:5])
        lines.append(f"top predictions: {preds}")
        if self.circuit_text:
            lines += ["", self.circuit_text, ""]
        s = self.scores
        if s:
            lines.append(
                f"graph: {self.counts.get('nodes_before', 0):,} nodes -> {self.counts.get('nodes_after', 0):,} after "
                f"pruning; replacement score {_score(s, 'replacement_score')}, completeness "
                f"{_score(s, 'completeness_score')} ({_score(s, 'replacement_score_no_bos')} and "
                f"{_score(s, 'completeness_score_no_bos')} without the BOS error nodes, as circuit-tracer scores)"
            )
        if self.paths:
            top = self.targets[0][0] if self.targets else "the top logit"
            lines.append("")
            lines.append(f"paths to {top!r} through its most influential features:")
            for i, (steps, score) in enumerate(self.paths, 1):
                lines.append(f"  {i}. " + " -> ".join(steps) + f"   ({score:.2e})")
        if self.features:
            lines.append("")
            lines.append("features on the way:")
            for f in self.features:
                label = f' "{f.label}"' if f.label else ""
                says = ", ".join(repr(t) for t in f.says[:5])
                lines.append(f"  {f.name} at {self.token_at(f.pos)!r}{label}: act {f.activation:.2f}; says {says}")
                for snippet in f.fires_on[:2]:
                    lines.append(f"      fires on: {snippet}")
        return "\n".join(lines)

    def token_at(self, pos: int) -> str:
        return self.tokens[pos] if 0 <= pos < len(self.tokens) else f"pos {pos}"


@torch.no_grad()
def _score(scores: dict, key: str) -> str:
    """A score of the graph's metadata as text ("n/a" where missing or undefined)."""
    value = scores.get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "n/a"


def promoted_tokens(loaded: Any, transcoder: Any, layer: int, features: list[int], n: int = 5) -> list[list[str]]:
    """For each feature of `layer`, the `n` tokens whose logits its decoder raises most: its decoder
    vectors summed over the layers it writes to, times the final norm's weight and the unembedding
    (the direct "say X" effect; the same view as the feature pages')."""
    if not features:
        return []
    U = unembedding_directions(loaded)  # [d, V]
    idx = torch.tensor(features, device=transcoder.W_enc.device)
    dec = summed_decoders(transcoder, layer, idx).to(U.device)  # [k, d]
    top = (dec @ U).topk(n, dim=-1).indices.tolist()  # [k, n]
    return [[loaded.decode_token(int(t)) for t in row] for row in top]


def _node_text(graph: Graph, i: int, tokens: list[str], decode: Any) -> str:
    nodes = graph.nodes
    kind, layer, pos = int(nodes.kind[i]), int(nodes.layer[i]), int(nodes.pos[i])
    tok = tokens[pos] if 0 <= pos < len(tokens) else f"pos {pos}"
    if kind == NodeKind.EMBEDDING:
        return f"{tok!r}"
    if kind == NodeKind.FEATURE:
        return f"L{layer}/{int(nodes.feature[i])}"
    if kind == NodeKind.ERROR:
        return f"error L{layer}@{tok!r}"
    return f"logit {decode(int(nodes.token[i]))!r}"


def strongest_paths(graph: Graph, target: int, k: int = 5, per_source: int = 5) -> list[GraphPath]:
    """The `k` best paths from any token embedding to node `target` that pass through a feature."""
    kind = graph.nodes.kind
    found: list[GraphPath] = []
    for s in (kind == int(NodeKind.EMBEDDING)).nonzero().flatten().tolist():
        for p in graph.top_paths(s, target, k=per_source):
            if any(int(kind[v]) == NodeKind.FEATURE for v in p.nodes[1:-1]):
                found.append(p)
    found.sort(key=lambda p: -p.score)
    return found[:k]


def influential_paths(graph: Graph, target: int, k: int = 5) -> list[GraphPath]:
    """For each of the `k` features with the most influence on the logits (the pruned graph's
    `influence` column, smallest cumulative share first), the best path from a token embedding up to
    it joined to its best path on to node `target`. Unlike `strongest_paths`, whose products favour
    two-hop paths through layer-0 features, these go through the features that matter most; falls
    back to `strongest_paths` for a graph without the column."""
    nodes = graph.nodes
    if nodes.influence is None:
        return strongest_paths(graph, target, k=k)
    rows = (nodes.kind == int(NodeKind.FEATURE)).nonzero().flatten()
    feats = rows[torch.argsort(nodes.influence[rows], stable=True)].tolist()
    embeddings = (nodes.kind == int(NodeKind.EMBEDDING)).nonzero().flatten().tolist()
    out: list[GraphPath] = []
    for f in feats:
        down = graph.top_paths(f, target, k=1)
        ups = [p for e in embeddings for p in graph.top_paths(e, f, k=1)]
        if not down or not ups:
            continue
        up = max(ups, key=lambda p: p.score)
        out.append(GraphPath(up.nodes + down[0].nodes[1:], up.score * down[0].score))
        if len(out) == k:
            break
    return out


def trace_report(
    graph: Graph, pruned: Graph, loaded: Any, transcoder: Any, feature_db: Any = None, n_paths: int = 5
) -> TraceReport:
    """Summarise `pruned` (the pruned version of `graph`): the targets, scores, the strongest paths to
    the top target and the features on them. `feature_db` is an open `FeatureStore` or None."""
    meta = graph.metadata
    tokens = list(meta.get("tokens") or [])
    targets = [(t.get("label", "?"), t.get("probability")) for t in meta.get("targets", [])]
    scores = dict(meta.get("scores") or {})
    counts = {"nodes_before": graph.n_nodes, "nodes_after": pruned.n_nodes,
              "edges_before": graph.n_edges, "edges_after": pruned.n_edges}
    logits = (pruned.nodes.kind == int(NodeKind.LOGIT)).nonzero().flatten().tolist()
    paths = influential_paths(pruned, logits[0], k=n_paths) if logits else []

    order: list[int] = []
    for p in paths:
        for v in p.nodes:
            if int(pruned.nodes.kind[v]) == NodeKind.FEATURE and v not in order:
                order.append(v)
    by_layer: dict[int, list[int]] = {}
    for v in order:
        by_layer.setdefault(int(pruned.nodes.layer[v]), []).append(int(pruned.nodes.feature[v]))
    says = {layer: dict(zip(fs, promoted_tokens(loaded, transcoder, layer, fs))) for layer, fs in by_layer.items()}
    notes = []
    for v in order:
        layer, feat = int(pruned.nodes.layer[v]), int(pruned.nodes.feature[v])
        note = FeatureNote(layer, feat, int(pruned.nodes.pos[v]), float(pruned.nodes.activation[v]), says[layer][feat])
        if feature_db is not None:
            page = feature_db.page(layer, feat)
            note.label = page.display_label
            note.fires_on = [ex.render() for ex in page.top[:2]]
        notes.append(note)
    path_texts = [([_node_text(pruned, v, tokens, loaded.decode_token) for v in p.nodes], p.score) for p in paths]
    return TraceReport(meta.get("prompt") or "", tokens, targets, scores, counts, path_texts, notes,
                       [p.nodes for p in paths])


__all__ = ["FeatureNote", "TraceReport", "influential_paths", "promoted_tokens", "strongest_paths", "trace_report"]
