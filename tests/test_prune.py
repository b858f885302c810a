"""Pruning and the replacement / completeness scores, on a hand-built graph and random DAGs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.graph.prune import (
    find_threshold,
    graph_scores,
    node_influence,
    normalize_edges,
    propagate_influence,
    prune,
    prune_masks,
)

F, E, T, L = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT
# Node indices of the hand-built graph.
A, B, C, ERR, EMB4, EMB5, L6, L7 = range(8)


def hand_graph() -> Graph:
    """Two tokens, three features (c weak), one error node, two logits (p = .75, .25).

    emb5 → a (2), emb4 → a (−2), emb4 → c (1), a → b (3), err → b (1),
    b → L6 (4), c → L6 (1), emb5 → L6 (3), b → L7 (1).
    """
    nodes = NodeTable.from_columns(
        kind=[F, F, F, E, T, T, L, L],
        layer=[0, 1, 1, 0, -1, -1, 2, 2],
        pos=[1, 1, 0, 1, 0, 1, 1, 1],
        feature=[3, 5, 2, -1, -1, -1, -1, -1],
        token=[-1, -1, -1, -1, 10, 11, 7, 9],
        activation=[1.5, 2.0, 0.5, 0, 0, 0, 0, 0],
        probability=[0, 0, 0, 0, 0, 0, 0.75, 0.25],
    )
    edges = [(EMB5, A, 2.0), (EMB4, A, -2.0), (EMB4, C, 1.0), (A, B, 3.0), (ERR, B, 1.0),
             (B, L6, 4.0), (C, L6, 1.0), (EMB5, L6, 3.0), (B, L7, 1.0)]
    return Graph.from_edges(nodes, edges, {"n_layers": 2, "prompt": "xy", "tokens": ["x", "y"]})


# By hand: rows of the normalised |A| are a: (emb5 .5, emb4 .5), c: (emb4 1), b: (a .75, err .25),
# L6: (b .5, c .125, emb5 .375), L7: (b 1). With w = (L6 .75, L7 .25):
#   w·A   : b .625, c .09375, emb5 .28125
#   w·A²  : a .46875, err .15625, emb4 .09375
#   w·A³  : emb5 .234375, emb4 .234375;   w·A⁴ = 0.
HAND_INFLUENCE = [0.46875, 0.625, 0.09375, 0.15625, 0.328125, 0.515625, 0.0, 0.0]


def test_hand_influence():
    infl = node_influence(hand_graph())
    assert torch.allclose(infl, torch.tensor(HAND_INFLUENCE), atol=1e-6)


def test_hand_scores():
    rep, comp = graph_scores(hand_graph())
    # Replacement: I_tok / (I_tok + I_err) = (.328125 + .515625) / (.84375 + .15625).
    assert rep == pytest.approx(0.84375, abs=1e-6)
    # Completeness: Σ (1 − error share of input) (influence + w) / Σ (influence + w); only b has
    # error input (.25 of it), weight .625; total weight 2.1875 + 1.
    assert comp == pytest.approx((3.1875 - 0.25 * 0.625) / 3.1875, abs=1e-6)


def test_scores_without_the_bos_error_nodes_equal_those_of_the_graph_without_their_edges():
    """circuit-tracer zeroes position 0's error vectors: scoring with them left out is scoring the
    graph that never had their edges; error nodes elsewhere still count."""
    g = hand_graph()
    assert graph_scores(g, bos_errors=False) == pytest.approx(graph_scores(g))  # its error node is at position 1
    g.nodes.pos[ERR] = 0
    g.nodes.pos[A] = 0  # a second error-free node at 0 keeps its edges
    edges = [(s, t, w) for s, t, w in zip(g.edge_source.tolist(), g.edge_target.tolist(), g.edge_weight.tolist()) if s != ERR]
    without = Graph.from_edges(g.nodes, edges, dict(g.metadata))
    assert graph_scores(g, bos_errors=False) == pytest.approx(graph_scores(without))
    assert graph_scores(without) == pytest.approx((1.0, 1.0)) and graph_scores(g)[0] < 1.0
    _, res = prune(g)
    assert (res.replacement_score_no_bos, res.completeness_score_no_bos) == pytest.approx((1.0, 1.0))
    assert res.as_dict()["replacement_score_no_bos"] == pytest.approx(1.0)


def test_hand_prune_defaults():
    g = hand_graph()
    pruned, res = prune(g)
    # Node influence sorted: b .625, emb5 .515625, a .46875, emb4 .328125 (cumulative share
    # .2857, .5214, .7357, .8857 ≥ .8), so err (.15625) and c (.09375) go; tokens, logits stay.
    assert res.node_mask.tolist() == [True, True, False, False, True, True, True, True]
    # Edge scores on the kept graph: a→b .6786, b→L6 .4286, emb5→a = emb4→a .3393, emb5→L6 .3214,
    # b→L7 .25: the smallest already completes the 98%, so every live edge stays.
    kept_edges = [(s, t) for s, t, m in zip(g.edge_source.tolist(), g.edge_target.tolist(), res.edge_mask.tolist()) if m]
    assert sorted(kept_edges) == sorted([(EMB5, A), (EMB4, A), (A, B), (B, L6), (EMB5, L6), (B, L7)])
    assert (res.n_nodes_before, res.n_nodes_after, res.n_edges_before, res.n_edges_after) == (8, 6, 9, 6)
    assert res.replacement_score == pytest.approx(0.84375, abs=1e-6)
    assert res.pruned_replacement_score == pytest.approx(1.0) and res.pruned_completeness_score == pytest.approx(1.0)
    # The pruned graph: remapped indices, same ids, the edges' weights carried over.
    assert pruned.node_ids() == [g.node_id(i) for i in range(8) if res.node_mask[i]]
    pairs = {(pruned.node_id(s), pruned.node_id(t)): w for s, t, w in
             zip(pruned.edge_source.tolist(), pruned.edge_target.tolist(), pruned.edge_weight.tolist())}
    assert pairs[("0_3_1", "1_5_1")] == 3.0 and pairs[("E_10_0", "0_3_1")] == -2.0
    pruned.validate()
    assert pruned.metadata["pruning"]["n_nodes_after"] == 6
    # Cumulative influence: b first (.625 / 2.1875).
    assert pruned.nodes.influence[pruned.find("1_5_1")].item() == pytest.approx(0.625 / 2.1875, abs=1e-6)


def test_hand_prune_thresholds():
    g = hand_graph()
    # node_threshold .9: err (cumulative .957) is kept, c is not.
    node_mask, edge_mask, _ = prune_masks(g, node_threshold=0.9, edge_threshold=1.0)
    assert node_mask.tolist() == [True, True, False, True, True, True, True, True]
    # edge_threshold .85: b→L7 (.25, the smallest score) is cut; L7 then has no input but logits stay.
    node_mask, edge_mask, _ = prune_masks(g, node_threshold=0.8, edge_threshold=0.85)
    kept = {(s, t) for s, t, m in zip(g.edge_source.tolist(), g.edge_target.tolist(), edge_mask.tolist()) if m}
    assert (B, L7) not in kept and (EMB5, L6) in kept and node_mask[L7]


def test_dangling_features_are_removed():
    # f0 feeds only f1, which reaches no logit; f2 is the real path. f1 must go (no output), and
    # then f0 too (its only output went), even at thresholds that keep every node.
    nodes = NodeTable.from_columns(kind=[F, F, F, T, L], layer=[0, 1, 1, -1, 2], pos=[0, 0, 0, 0, 0],
                                   feature=[0, 1, 2, -1, -1], token=[-1, -1, -1, 5, 6], probability=[0, 0, 0, 0, 1])
    g = Graph.from_edges(nodes, [(3, 0, 1.0), (0, 1, 1.0), (3, 2, 1.0), (2, 4, 1.0)])
    node_mask, edge_mask, _ = prune_masks(g, node_threshold=1.0, edge_threshold=1.0)
    assert node_mask.tolist() == [False, False, True, True, True]
    assert edge_mask.tolist() == [False, False, True, True]


def test_errors():
    g = hand_graph()
    with pytest.raises(CltraceError):
        prune(g, node_threshold=1.5)
    with pytest.raises(CltraceError, match="one value per node"):
        prune_masks(g, influence=torch.zeros(g.n_nodes + 1))
    g.nodes.kind = torch.where(g.nodes.kind == int(L), torch.tensor(int(T), dtype=torch.int8), g.nodes.kind)
    with pytest.raises(CltraceError, match="no logit nodes"):
        prune(g)
    # A cycle is refused rather than looping forever.
    with pytest.raises(CltraceError, match="cycle"):
        propagate_influence(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))


def test_find_threshold():
    s = torch.tensor([0.5, 0.3, 0.2])
    assert find_threshold(s, 0.5) == pytest.approx(0.5)
    assert find_threshold(s, 0.8) == pytest.approx(0.3)
    assert find_threshold(s, 1.0) == pytest.approx(0.2)
    assert find_threshold(torch.zeros(3), 0.8) == math.inf


# ---------------------------------------------------------------------- random DAGs

@st.composite
def random_dag(draw):
    n = draw(st.integers(2, 12))
    pairs = [(s, t) for t in range(n) for s in range(t)]  # s < t in a hidden order
    chosen = draw(st.lists(st.sampled_from(pairs), max_size=40)) if pairs else []
    weights = draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=len(chosen), max_size=len(chosen)))
    perm = draw(st.permutations(list(range(n))))
    w0 = draw(st.lists(st.floats(0, 1, width=32), min_size=n, max_size=n))
    src = torch.tensor([perm[s] for s, _ in chosen], dtype=torch.int64)
    tgt = torch.tensor([perm[t] for _, t in chosen], dtype=torch.int64)
    return n, tgt, src, torch.tensor(weights, dtype=torch.float32), torch.tensor(w0, dtype=torch.float32), perm


@settings(max_examples=150, deadline=None)
@given(random_dag())
def test_influence_matches_dense_inverse(dag):
    n, tgt, src, w, w0, perm = dag
    a = normalize_edges(tgt, w, n)
    got = propagate_influence(tgt, src, a, w0)
    dense = torch.zeros(n, n, dtype=torch.float64)
    dense.index_put_((tgt, src), w.abs().to(torch.float64), accumulate=True)
    dense = dense / dense.sum(1, keepdim=True).clamp(min=1e-10)
    eye = torch.eye(n, dtype=torch.float64)
    expected = w0.to(torch.float64) @ (torch.linalg.inv(eye - dense) - eye)
    assert torch.allclose(got.to(torch.float64), expected, rtol=1e-4, atol=1e-5)
    # One sweep by level: the hidden order as the nodes' levels (edges in no particular order), and
    # levels that do not layer the graph (all equal), where the steps are taken instead.
    hidden = torch.empty(n, dtype=torch.int64)
    hidden[torch.tensor(perm, dtype=torch.int64)] = torch.arange(n)
    for levels in (hidden, torch.zeros(n, dtype=torch.int64)):
        swept = propagate_influence(tgt, src, a, w0, levels=levels)
        assert torch.allclose(swept.to(torch.float64), expected, rtol=1e-4, atol=1e-5)


def _dense_reference(g: Graph, node_threshold: float, edge_threshold: float):
    """circuit-tracer's pruning on a dense float64 matrix, written out independently for comparison.

    Also says whether a cut was ambiguous: the running share within float error of the threshold,
    or two scores within float error of each other, where float32 and float64 may round apart."""
    n = g.n_nodes
    adj = g.to_dense().to(torch.float64)
    w = torch.where(g.nodes.kind == int(L), g.nodes.probability.to(torch.float64), torch.zeros((), dtype=torch.float64))
    eye = torch.eye(n, dtype=torch.float64)
    ambiguous = False

    def influence(m):
        m = m.abs()
        m = m / m.sum(1, keepdim=True).clamp(min=1e-10)
        return m, w @ (torch.linalg.inv(eye - m) - eye)

    def thresh(scores, frac):
        nonlocal ambiguous
        sc = scores.flatten()
        sc = torch.sort(sc[sc > 0], descending=True).values
        cum = torch.cumsum(sc, 0) / sc.sum()
        gaps = sc[:-1] - sc[1:]
        if bool(((cum[:-1] - frac).abs() < 1e-5).any()) or bool(((gaps > 0) & (gaps < 1e-5 * sc[0])).any()):
            ambiguous = True
        return sc[min(int(torch.searchsorted(cum, torch.tensor([frac], dtype=cum.dtype))), sc.numel() - 1)]

    _, infl = influence(adj)
    kind = g.nodes.kind
    always = (kind == int(T)) | (kind == int(L))
    node_mask = (infl >= thresh(infl, node_threshold)) | always
    pm = adj.clone()
    pm[~node_mask] = 0
    pm[:, ~node_mask] = 0
    m, pinf = influence(pm)
    scores = m * (pinf + w)[:, None]
    edge_mask = scores >= thresh(scores, edge_threshold)
    edge_mask &= node_mask[:, None] & node_mask[None, :]
    while True:
        new = node_mask.clone()
        new &= ~(~always & ~edge_mask.any(0))
        new &= ~((kind == int(F)) & ~edge_mask.any(1))
        if torch.equal(new, node_mask):
            break
        node_mask = new
        edge_mask &= node_mask[:, None] & node_mask[None, :]
    return node_mask, edge_mask, infl, ambiguous


@st.composite
def random_graph(draw):
    n_tok = draw(st.integers(1, 3))
    n_layers = draw(st.integers(1, 3))
    feats = [(l, p) for l in range(n_layers) for p in range(n_tok) if draw(st.booleans())]
    errs = [(l, p) for l in range(n_layers) for p in range(n_tok)]
    n_logit = draw(st.integers(1, 3))
    kind = [F] * len(feats) + [E] * len(errs) + [T] * n_tok + [L] * n_logit
    layer = [l for l, _ in feats] + [l for l, _ in errs] + [-1] * n_tok + [n_layers] * n_logit
    pos = [p for _, p in feats] + [p for _, p in errs] + list(range(n_tok)) + [n_tok - 1] * n_logit
    probs = draw(st.lists(st.floats(0.0625, 1.0, width=32), min_size=n_logit, max_size=n_logit))
    n = len(kind)
    nodes = NodeTable.from_columns(kind=kind, layer=layer, pos=pos,
                                   feature=list(range(len(feats))) + [-1] * (n - len(feats)),
                                   token=[-1] * (len(feats) + len(errs)) + list(range(n_tok + n_logit)),
                                   probability=[0.0] * (n - n_logit) + probs)
    edges = []
    for t in range(n):
        if kind[t] in (E, T):
            continue
        for s in range(n):
            if kind[s] == L or s == t:
                continue
            # A source feeds a later layer at the same or an earlier position; errors sit at their layer.
            if layer[s] < layer[t] and pos[s] <= pos[t] and draw(st.integers(0, 2)) > 0:
                edges.append((s, t, draw(st.floats(-2, 2, allow_nan=False, width=32))))
    return Graph.from_edges(nodes, edges, {"n_layers": n_layers})


@settings(max_examples=80, deadline=None)
@given(random_graph(), st.sampled_from([0.5, 0.8, 0.95, 1.0]), st.sampled_from([0.7, 0.98, 1.0]))
def test_prune_matches_dense_reference(g, nt, et):
    if float(node_influence(g).sum()) == 0:
        return  # nothing reaches the logits: thresholds are undefined
    node_mask, edge_mask, infl = prune_masks(g, nt, et)
    # the influence of a pruning at another threshold, given back, gives the same masks
    reused = prune_masks(g, nt, et, influence=prune(g, 0.8)[1].node_influence)
    assert torch.equal(reused[0], node_mask) and torch.equal(reused[1], edge_mask)
    ref_nodes, ref_edges, ref_infl, ambiguous = _dense_reference(g, nt, et)
    assert torch.allclose(infl.to(torch.float64), ref_infl, rtol=1e-4, atol=1e-6)
    if ambiguous:
        return  # a cut within float error: float32 and float64 may legitimately differ
    assert node_mask.tolist() == ref_nodes.tolist()
    dense_mask = torch.zeros(g.n_nodes, g.n_nodes, dtype=torch.bool)
    dense_mask[g.edge_target[edge_mask], g.edge_source[edge_mask]] = True
    assert torch.equal(dense_mask, ref_edges & (g.to_dense() != 0))
