"""Influence-based pruning and the replacement / completeness scores of an attribution graph.

Semantics follow circuit-tracer (and the "Circuit Tracing" paper), on COO edges:

* A[t, s] = |weight(s → t)| / Σ_s' |weight(s' → t)|: the row-normalised absolute adjacency
  (row = target).
* Influence on the logits: with w the logit probabilities on the logit nodes (0 elsewhere),
  influence = w · (A + A² + A³ + …) = w · ((I − A)⁻¹ − I). The graph is a DAG, so A is nilpotent
  and the series is finite; it is evaluated as repeated vector–matrix products over the edges
  (O(edges × depth), never a dense N×N matrix).
* Nodes: keep those whose influence, sorted in decreasing order, makes up the first
  `node_threshold` of the total (ties at the cut are kept); token embeddings and logits always
  stay. Error nodes are pruned like features.
* Edges: on the graph restricted to the kept nodes, re-normalise, recompute the influence
  (plus w itself, so edges into logits count), score each edge as A[t, s] · influence'[t] and keep
  those making up `edge_threshold` of the total.
* Then, repeatedly until nothing changes: drop features and error nodes with no kept outgoing
  edge, and features with no kept incoming edge, and the edges touching dropped nodes.
* Replacement score: I_tok / (I_tok + I_err), the summed influence of token nodes over that of
  token plus error nodes. Completeness score: Σ_n (1 − Σ_{s error} A[n, s]) · (influence[n] + w[n])
  / Σ_n (influence[n] + w[n]), the influence-weighted share of each node's input that comes from
  non-error nodes (nodes with no inputs count as complete).
* Both scores are also given with the error nodes at position 0 (the BOS token) left out, as
  circuit-tracer computes them (it zeroes the first position's error vectors), so that they compare
  with published figures: ``replacement_score_no_bos``, ``completeness_score_no_bos``.
* Over a prompt set, the mean and median of both scores in both definitions, unpruned:
  `cltrace.graph.prompt_scores` (what `cltrace eval` reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind

DEFAULT_NODE_THRESHOLD = 0.8
DEFAULT_EDGE_THRESHOLD = 0.98


@dataclass
class PruneResult:
    """What `prune` kept and how the graph scores. Masks index the *input* graph."""

    node_mask: torch.Tensor  # [node] bool, kept nodes
    edge_mask: torch.Tensor  # [edge] bool, kept edges (both ends kept)
    node_influence: torch.Tensor  # [node] float32, influence on the logits in the unpruned graph
    cumulative_scores: torch.Tensor  # [node] float32, cumulative share of influence (circuit-tracer's "influence")
    replacement_score: float  # of the unpruned graph
    completeness_score: float  # of the unpruned graph
    pruned_replacement_score: float  # of the pruned graph
    pruned_completeness_score: float  # of the pruned graph
    replacement_score_no_bos: float  # of the unpruned graph, position 0's error nodes left out (circuit-tracer's)
    completeness_score_no_bos: float  # likewise
    n_nodes_before: int
    n_nodes_after: int
    n_edges_before: int
    n_edges_after: int
    node_threshold: float
    edge_threshold: float

    def as_dict(self) -> dict:
        """The scalar fields, JSON-ready (NaN written as None)."""
        out = {}
        for name in ("replacement_score", "completeness_score", "pruned_replacement_score",
                     "pruned_completeness_score", "replacement_score_no_bos", "completeness_score_no_bos", "n_nodes_before", "n_nodes_after", "n_edges_before",
                     "n_edges_after", "node_threshold", "edge_threshold"):
            v = getattr(self, name)
            out[name] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


# ---------------------------------------------------------------------- building blocks

def normalize_edges(edge_target: torch.Tensor, edge_weight: torch.Tensor, n_nodes: int,
                    edge_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[edge] |w| / Σ |w| over the same target's edges (only edges in `edge_mask` count; the
    others get 0)."""
    a = edge_weight.abs().to(torch.float32)
    if edge_mask is not None:
        a = torch.where(edge_mask, a, torch.zeros((), dtype=a.dtype))
    rowsum = torch.zeros(n_nodes, dtype=a.dtype).index_add_(0, edge_target, a)
    return a / rowsum.clamp(min=1e-10)[edge_target]


def propagate_influence(edge_target: torch.Tensor, edge_source: torch.Tensor, a: torch.Tensor,
                        weights: torch.Tensor, max_iter: int | None = None,
                        levels: torch.Tensor | None = None) -> torch.Tensor:
    """weights · (A + A² + …) for the sparse A given by (edge_target, edge_source, a).

    With `levels` [node] (the nodes' layers) on a layered graph, every edge going to a higher
    level, one sweep from the top level down sums every path exactly: each edge once. Otherwise
    each step is one scatter over the edges; a DAG ends after (longest path) steps, when the
    running product is exactly zero. More than `max_iter` (default n_nodes + 1) steps means a
    cycle: CltraceError.
    """
    n = weights.shape[0]
    max_iter = n + 1 if max_iter is None else max_iter
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(weights).all()):
        raise CltraceError("graph has non-finite edge weights or logit probabilities (NaN/inf); re-run attribution")
    current = weights.to(a.dtype)
    nz = a != 0
    t, s, a = edge_target[nz], edge_source[nz], a[nz]
    if levels is not None and bool((levels[s] < levels[t]).all()):
        return _sweep(t, s, a, current, levels[t])
    influence = torch.zeros(n, dtype=a.dtype)
    for _ in range(max_iter):
        current = torch.zeros(n, dtype=a.dtype).index_add_(0, s, current[t] * a)
        if not bool(current.any()):
            return influence
        influence += current
    raise CltraceError("influence did not converge: the graph has a cycle; attribution graphs must be acyclic")


def level_runs(level: torch.Tensor) -> tuple[torch.Tensor | None, list[tuple[int, int, int]]]:
    """Edges grouped by a level each [edge]: the stable order that sorts them (None where they are
    in level order already, as attribution's target-sorted edges are by their target's layer) and
    (level, start, end) of each run of one level in that order, lowest first."""
    order = torch.argsort(level, stable=True) if bool((level[1:] < level[:-1]).any()) else None
    values, counts = torch.unique_consecutive(level if order is None else level[order], return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    return order, [(v, e - c, e) for v, c, e in zip(values.tolist(), counts.tolist(), ends)]


def _sweep(t: torch.Tensor, s: torch.Tensor, a: torch.Tensor, weights: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """`propagate_influence` on a layered graph: edges (t, s, a) grouped by their target's level
    [edge], the highest first, so that a node's mass is complete before it flows on."""
    order, runs = level_runs(level)
    if order is not None:
        t, s, a = t[order], s[order], a[order]
    mass = weights.clone()  # [node]
    for _, lo, hi in reversed(runs):
        mass.index_add_(0, s[lo:hi], mass[t[lo:hi]] * a[lo:hi])
    return mass - weights


def logit_weights(graph: Graph) -> torch.Tensor:
    """[node] float32: each logit node's probability, 0 elsewhere; CltraceError without logits."""
    is_logit = graph.nodes.kind == int(NodeKind.LOGIT)
    if not bool(is_logit.any()):
        raise CltraceError("graph has no logit nodes; pruning and scores need at least one target logit")
    w = torch.where(is_logit, graph.nodes.probability.to(torch.float32), torch.zeros((), dtype=torch.float32))
    if not bool((w > 0).any()):
        raise CltraceError("the graph's logit nodes all have probability 0; set nodes.probability for the logit nodes")
    return w


def node_influence(graph: Graph) -> torch.Tensor:
    """[node] float32: each node's influence on the logits (probability-weighted), unpruned graph."""
    a = normalize_edges(graph.edge_target, graph.edge_weight, graph.n_nodes)
    return propagate_influence(graph.edge_target, graph.edge_source, a, logit_weights(graph), levels=graph.nodes.layer)


def find_threshold(scores: torch.Tensor, fraction: float) -> float:
    """The score at which the scores sorted in decreasing order first reach `fraction` of their
    total; keeping every score >= it keeps at least that fraction. +inf when there is nothing to keep.

    As circuit-tracer's, except that the cut never falls below the smallest positive score: where
    rounding leaves the running share just under 1.0, circuit-tracer's cut can land on 0 and keep
    every zero-influence node and zero-weight edge."""
    scores = scores[scores > 0]
    if scores.numel() == 0:
        return math.inf
    sorted_scores = torch.sort(scores, descending=True).values
    total = sorted_scores.sum()
    cumulative = torch.cumsum(sorted_scores, 0) / total
    idx = int(torch.searchsorted(cumulative, torch.tensor([fraction], dtype=cumulative.dtype)).item())
    idx = min(idx, sorted_scores.numel() - 1)
    return float(sorted_scores[idx])


def cumulative_scores(influence: torch.Tensor) -> torch.Tensor:
    """[node] the running share of the total influence at each node, nodes sorted by decreasing
    influence (the most influential node has the smallest value)."""
    order = torch.sort(influence, descending=True, stable=True).indices
    total = influence.sum()
    cum = torch.cumsum(influence[order], 0) / (total if bool(total > 0) else 1.0)
    out = torch.zeros_like(influence)
    out[order] = cum
    return out


def graph_scores(graph: Graph, _influence: torch.Tensor | None = None, bos_errors: bool = True) -> tuple[float, float]:
    """(replacement score, completeness score) of `graph`; NaN where undefined (no influence).

    `bos_errors=False` leaves out the error nodes at position 0 (their edges dropped before the
    rows are normalised), as circuit-tracer, which zeroes the first position's error vectors, scores."""
    n = graph.n_nodes
    w = logit_weights(graph)
    kind = graph.nodes.kind
    is_err = kind == int(NodeKind.ERROR)
    keep = None if bos_errors else ~(is_err & (graph.nodes.pos == 0))[graph.edge_source]  # [edge]
    a = normalize_edges(graph.edge_target, graph.edge_weight, n, edge_mask=keep)
    infl = (propagate_influence(graph.edge_target, graph.edge_source, a, w, levels=graph.nodes.layer)
            if _influence is None or not bos_errors else _influence)
    if not bos_errors:
        is_err = is_err & (graph.nodes.pos != 0)
    i_tok = float(infl[kind == int(NodeKind.EMBEDDING)].sum())
    i_err = float(infl[is_err].sum())
    replacement = i_tok / (i_tok + i_err) if i_tok + i_err > 0 else math.nan
    err_in = torch.zeros(n, dtype=a.dtype).index_add_(
        0, graph.edge_target, torch.where(is_err[graph.edge_source], a, torch.zeros((), dtype=a.dtype))
    )
    out_infl = infl + w
    total = float(out_infl.sum())
    completeness = float(((1 - err_in) * out_infl).sum()) / total if total > 0 else math.nan
    return replacement, completeness


# ---------------------------------------------------------------------- pruning

def prune_masks(graph: Graph, node_threshold: float = DEFAULT_NODE_THRESHOLD,
                edge_threshold: float = DEFAULT_EDGE_THRESHOLD,
                influence: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(node_mask, edge_mask, node_influence) of circuit-tracer's pruning, on the input graph.

    `influence` [node]: the graph's node influence where already computed (`PruneResult.node_influence`
    of a pruning at another threshold), which saves propagating it again."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= float(v) <= 1.0:
            raise CltraceError(f"{name} must be between 0 and 1, got {v}")
    n = graph.n_nodes
    kind = graph.nodes.kind
    t, s = graph.edge_target, graph.edge_source
    w = logit_weights(graph)
    if influence is not None and influence.shape != (n,):
        raise CltraceError(f"influence has shape {tuple(influence.shape)}, expected one value per node ({n})")
    levels = graph.nodes.layer
    infl = (propagate_influence(t, s, normalize_edges(t, graph.edge_weight, n), w, levels=levels)
            if influence is None else influence)

    always = (kind == int(NodeKind.EMBEDDING)) | (kind == int(NodeKind.LOGIT))
    node_mask = (infl >= find_threshold(infl, node_threshold)) | always

    # Edge scores on the graph restricted to the kept nodes.
    live = node_mask[t] & node_mask[s]
    a = normalize_edges(t, graph.edge_weight, n, edge_mask=live)
    pruned_infl = propagate_influence(t, s, a, w, levels=levels) + w
    edge_scores = a * pruned_infl[t]
    edge_mask = (edge_scores >= find_threshold(edge_scores, edge_threshold)) & live

    # Features and errors need a kept outgoing edge, features a kept incoming one; iterate.
    is_feat = kind == int(NodeKind.FEATURE)
    needs_out = ~always
    while True:
        has_out = torch.zeros(n, dtype=torch.bool)
        has_out[s[edge_mask]] = True
        has_in = torch.zeros(n, dtype=torch.bool)
        has_in[t[edge_mask]] = True
        new_mask = node_mask & ~(needs_out & ~has_out) & ~(is_feat & ~has_in)
        if torch.equal(new_mask, node_mask):
            break
        node_mask = new_mask
        edge_mask = edge_mask & node_mask[t] & node_mask[s]
    return node_mask, edge_mask, infl


def prune(graph: Graph, node_threshold: float = DEFAULT_NODE_THRESHOLD,
          edge_threshold: float = DEFAULT_EDGE_THRESHOLD) -> tuple[Graph, PruneResult]:
    """Prune `graph` to the nodes and edges carrying most of the influence on the logits.

    Returns the pruned graph (node indices remapped; its node table gets the `influence` column,
    the cumulative influence share from the unpruned graph; its metadata gets a ``pruning`` entry
    with the thresholds, counts and scores) and a `PruneResult`.
    """
    node_mask, edge_mask, infl = prune_masks(graph, node_threshold, edge_threshold)
    cum = cumulative_scores(infl).to(torch.float32)
    rep, comp = graph_scores(graph, _influence=infl)
    pruned = graph.subgraph(node_mask, edge_mask)
    pruned.nodes.influence = cum[node_mask].clone()
    p_rep, p_comp = graph_scores(pruned)
    ct_rep, ct_comp = graph_scores(graph, bos_errors=False)
    result = PruneResult(
        node_mask=node_mask, edge_mask=edge_mask, node_influence=infl.to(torch.float32), cumulative_scores=cum,
        replacement_score=rep, completeness_score=comp,
        pruned_replacement_score=p_rep, pruned_completeness_score=p_comp,
        replacement_score_no_bos=ct_rep, completeness_score_no_bos=ct_comp,
        n_nodes_before=graph.n_nodes, n_nodes_after=pruned.n_nodes,
        n_edges_before=graph.n_edges, n_edges_after=pruned.n_edges,
        node_threshold=float(node_threshold), edge_threshold=float(edge_threshold),
    )
    pruned.metadata["pruning"] = result.as_dict()
    return pruned, result


__all__ = [
    "DEFAULT_EDGE_THRESHOLD",
    "DEFAULT_NODE_THRESHOLD",
    "PruneResult",
    "cumulative_scores",
    "find_threshold",
    "graph_scores",
    "logit_weights",
    "node_influence",
    "normalize_edges",
    "level_runs",
    "propagate_influence",
    "prune",
    "prune_masks",
]
