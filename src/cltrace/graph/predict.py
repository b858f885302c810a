"""An attribution graph's prediction of an intervention's effects, beside the measured effects.

`predict_effects` reads an attribution graph's node table and COO edges only, and predicts each
target's change as Σ_s Δa_s · edge(s → t) / a_s (direct effects, linear); `compare_with_graph`
puts that beside the change measured by a constrained, frozen-attention intervention over all
layers, where the two agree exactly for an unpruned graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind
from cltrace.replacement import ReplacementModel
from cltrace.replacement.intervention import Intervention
from cltrace.replacement.interventions import InterventionResult, intervene


@dataclass
class Prediction:
    """The graph's linear prediction of an intervention's direct effects."""

    source_change: dict[int, float]
    """Graph node index → Δ activation of each intervened feature node."""
    change: dict[int, float]
    """Graph node index → predicted change of its target value (a feature's pre-activation, a logit
    node's demeaned logit), for every node with an edge from an intervened node."""
    missing: list[str]
    """Intervened (layer, feature, pos) that change but are not nodes of the graph (inactive, at
    the BOS position or pruned): their effect is not in the prediction."""


def predict_effects(graph: Graph, interventions: Sequence[Intervention]) -> Prediction:
    """Predict each target's change from the graph's edges: Σ_s Δa_s · edge(s → t) / a_s.

    Uses only the graph's node table and COO edges (and, to count positions, the number of
    embedding nodes or the largest position), so it works whatever built the graph. Exact for a
    constrained intervention over all layers with frozen attention on an unpruned graph.
    """
    nodes = graph.nodes
    is_feat = nodes.kind == int(NodeKind.FEATURE)
    idx = is_feat.nonzero(as_tuple=True)[0].tolist()
    key = {
        (int(nodes.layer[i]), int(nodes.feature[i]), int(nodes.pos[i])): i for i in idx
    }
    n_pos = int(nodes.pos.max()) + 1 if graph.n_nodes else 0
    if isinstance(graph.metadata.get("input_ids"), list):
        n_pos = len(graph.metadata["input_ids"])
    source_change: dict[int, float] = {}
    missing: list[str] = []
    for iv in interventions:
        positions = range(n_pos) if iv.start is None else range(iv.start, n_pos if iv.end is None else min(iv.end + 1, n_pos))
        for p in positions:
            node = key.get((iv.layer, iv.feature, p))
            if node is None:
                if iv.value is not None and iv.value != 0:
                    missing.append(f"{iv.layer}_{iv.feature}_{p}")
                continue
            a = float(nodes.activation[node])
            current = a + source_change.get(node, 0.0)
            source_change[node] = iv.apply(current) - a
    change: dict[int, float] = {}
    if source_change:
        src = torch.tensor(list(source_change), dtype=torch.long)
        ratio = torch.zeros(graph.n_nodes, dtype=torch.float64)
        ratio[src] = torch.tensor(
            [source_change[int(s)] / float(nodes.activation[int(s)]) if float(nodes.activation[int(s)]) != 0 else 0.0 for s in src],
            dtype=torch.float64,
        )
        hit = ratio[graph.edge_source] != 0
        contrib = graph.edge_weight[hit].double() * ratio[graph.edge_source[hit]]
        total = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, graph.edge_target[hit], contrib)
        touched = torch.zeros(graph.n_nodes, dtype=torch.bool)
        touched[graph.edge_target[hit]] = True
        change = {int(i): float(total[i]) for i in touched.nonzero(as_tuple=True)[0]}
    return Prediction(source_change, change, missing)


@dataclass
class EffectRow:
    node: int
    node_id: str
    kind: str  # "logit" | "feature"
    label: str
    predicted: float
    actual: float


def compare_with_graph(
    replacement: ReplacementModel,
    graph: Graph,
    interventions: Sequence[Intervention],
    prompt: str | torch.Tensor | None = None,
) -> tuple[list[EffectRow], InterventionResult, Prediction]:
    """The graph's predicted change of each logit node and downstream feature node beside the
    measured change from a constrained (all layers), frozen-attention intervention.

    Logit nodes: the change of the demeaned logit (logit − mean logit; for a logit-difference
    target, as in its metadata). Feature nodes: the change of the pre-activation. Rows sorted by
    |predicted|, logit nodes first.
    """
    if prompt is None:
        ids = graph.metadata.get("input_ids")
        if not isinstance(ids, list):
            raise CltraceError("the graph's metadata has no input_ids: pass the prompt")
        prompt = torch.tensor(ids, dtype=torch.long)
    prediction = predict_effects(graph, interventions)
    result = intervene(replacement, prompt, interventions, mode="constrained", freeze_attention=True)
    nodes = graph.nodes
    targets = graph.metadata.get("targets")
    logit_nodes = (nodes.kind == int(NodeKind.LOGIT)).nonzero(as_tuple=True)[0].tolist()
    before, after = result.raw_logits_before.double(), result.raw_logits_after.double()
    rows: list[EffectRow] = []
    ids_text = graph.node_ids()
    for k, i in enumerate(logit_nodes):
        if isinstance(targets, list) and k < len(targets) and isinstance(targets[k], dict):
            tokens, coefs = targets[k]["tokens"], targets[k]["coefs"]
            label = str(targets[k].get("label", tokens[0]))
        else:
            tokens, coefs = [int(nodes.token[i])], [1.0]
            label = replacement.model.decode_token(tokens[0])

        def value(logits: torch.Tensor, tokens: list = tokens, coefs: list = coefs) -> float:
            mean = logits.mean()
            return float(sum(c * (logits[t] - mean) for t, c in zip(tokens, coefs)))

        rows.append(EffectRow(i, ids_text[i], "logit", label, prediction.change.get(i, 0.0), value(after) - value(before)))
    feature_rows = []
    for i, predicted in prediction.change.items():
        if int(nodes.kind[i]) != int(NodeKind.FEATURE):
            continue
        layer, pos, feat = int(nodes.layer[i]), int(nodes.pos[i]), int(nodes.feature[i])
        actual = float(result.pre_activations_after[pos, layer, feat]) - float(result.pre_activations_before[pos, layer, feat])
        feature_rows.append(EffectRow(i, ids_text[i], "feature", ids_text[i], predicted, actual))
    rows.sort(key=lambda r: -abs(r.predicted))
    feature_rows.sort(key=lambda r: -abs(r.predicted))
    return rows + feature_rows, result, prediction


__all__ = ["EffectRow", "Prediction", "compare_with_graph", "predict_effects"]
