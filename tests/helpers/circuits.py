"""Hand-built attribution graphs for the circuit tests: random layered ones, one whose roles are known,
and a slow naive simulation of removing nodes from a graph."""

from __future__ import annotations

import random

from cltrace.graph.graph import Graph, NodeKind, NodeTable

F, E, T, L = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT


def random_graph(seed: int, n_layers: int = 4, n_pos: int = 3, per_cell: int = 2, density: float = 0.6) -> Graph:
    """A random layered attribution graph: features (layer, pos) with positive activations, an error
    node per (layer, pos), embeddings, one logit at the last position; edges from lower layers only."""
    rng = random.Random(seed)
    kind, layer, pos, feat, act = [], [], [], [], []
    for l in range(n_layers):
        for p in range(n_pos):
            for k in range(per_cell):
                kind.append(F), layer.append(l), pos.append(p), feat.append(10 * k + p), act.append(rng.uniform(0.5, 3))
    n_feat = len(kind)
    for l in range(n_layers):
        for p in range(n_pos):
            kind.append(E), layer.append(l), pos.append(p), feat.append(-1), act.append(0.0)
    for p in range(n_pos):
        kind.append(T), layer.append(-1), pos.append(p), feat.append(-1), act.append(0.0)
    kind.append(L), layer.append(n_layers), pos.append(n_pos - 1), feat.append(-1), act.append(0.0)
    n = len(kind)
    nodes = NodeTable.from_columns(kind, layer, pos, feat, token=[-1] * (n - 1) + [7], activation=act,
                                   probability=[0.0] * (n - 1) + [0.5])
    edges = []
    for t in list(range(n_feat)) + [n - 1]:
        for s in range(n - 1):
            if kind[s] == F and not (layer[s] < layer[t]):
                continue
            if kind[s] == E and not (layer[s] < layer[t]):
                continue
            if pos[s] > pos[t] or rng.random() > density:
                continue
            edges.append((s, t, rng.uniform(-1, 1)))
    return Graph.from_edges(nodes, edges, {"n_layers": n_layers, "tokens": [f"t{p}" for p in range(n_pos)]})


def simulate(graph: Graph, removed: set[int], frozen: set[int] = frozenset()) -> list[float]:
    """Naive: every node's value with the nodes in `removed` outputting nothing and those in `frozen`
    keeping their original activation; other features move one for one with their pre-activation
    (linear JumpReLU), each edge scaling with its source's share of its original output."""
    nodes, n = graph.nodes, graph.n_nodes
    act = nodes.activation.tolist()
    kind = nodes.kind.tolist()
    ins: dict[int, list[tuple[int, float]]] = {}
    for s, t, w in zip(graph.edge_source.tolist(), graph.edge_target.tolist(), graph.edge_weight.tolist()):
        ins.setdefault(t, []).append((s, w))
    base = {t: sum(w for _, w in ins.get(t, [])) for t in range(n)}
    share = [0.0 if i in removed else 1.0 for i in range(n)]
    value = [0.0] * n
    for i in sorted(range(n), key=lambda i: (kind[i] != F and kind[i] != L, kind[i] == L, int(nodes.layer[i]))):
        if kind[i] not in (F, L):
            continue
        total = sum(w * share[s] for s, w in ins.get(i, []))
        value[i] = total - base[i] + (act[i] if kind[i] == F else 0.0)
        if kind[i] == F and i not in removed and i not in frozen:
            share[i] = value[i] / act[i]
    return value


def role_graph(scale: float = 1.0) -> tuple[Graph, dict[str, list[int]]]:
    """Known roles at position 2 (and one feature at position 1): two detectors (layers 1, 2) driven by
    token 2 and feeding two 'say' features (layers 5, 6) that push the logit up, an inhibitor (layer 6)
    driven by token 1 that pushes it down, a far 'say' feature at layer 15, and a feature at position 1.
    `scale` multiplies the edges into the logit."""
    #        det1 det2 say1 say2 inh  far  other err  e0 e1 e2 logit
    kind = [F, F, F, F, F, F, F, E, T, T, T, L]
    layer = [1, 2, 5, 6, 6, 15, 3, 0, -1, -1, -1, 16]
    pos = [2, 2, 2, 2, 2, 2, 1, 2, 0, 1, 2, 2]
    act = [2.0, 1.5, 3.0, 2.5, 1.0, 2.0, 1.0, 0, 0, 0, 0, 0]
    nodes = NodeTable.from_columns(kind, layer, pos, feature=[1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1, -1],
                                   token=[-1] * 8 + [5, 6, 7, 9], activation=act, probability=[0] * 11 + [0.6])
    det1, det2, say1, say2, inh, far, other, err, e0, e1, e2, logit = range(12)
    edges = [(e2, det1, 2.0), (e2, det2, 1.4), (err, det2, 0.1),
             (det1, say1, 1.5), (det2, say1, 1.2), (det1, say2, 1.2), (det2, say2, 1.0), (e2, say1, 0.3), (e2, say2, 0.3),
             (say1, logit, 3.0), (say2, logit, 2.4),
             (e1, inh, 1.0), (inh, logit, -1.5),
             (det1, far, 1.0), (det2, far, 0.8), (far, logit, 2.0),
             (e1, other, 1.0), (other, say1, 0.2)]
    edges = [(s, t, w * scale if t == logit else w) for s, t, w in edges]
    g = Graph.from_edges(nodes, edges, {"n_layers": 16, "tokens": ["a", "b", "c"], "prompt": "abc",
                                        "targets": [{"tokens": [9], "coefs": [1.0], "label": "X", "probability": 0.6}]})
    return g, {"det": [det1, det2], "say": [say1, say2], "inh": [inh], "far": [far], "other": [other]}
