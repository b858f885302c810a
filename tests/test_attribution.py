"""Attribution graphs are exact: every edge checked against an independent ground truth.

Each family gets a tiny random model and a random CLT (and, on some, a PLT with a skip path); the
graph's edges are checked by completeness (edges + constant = the target's real value), by
perturbation (moving one source in the frozen model moves every target by edge × δ), and against a
slow reference that runs one backward pass per target straight through ReplacementModel.frozen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.attribution import RTOL, assert_close_rel, case
from helpers.models import VOCAB, prompt_ids, tiny_model, tiny_tokenizer
from helpers.transcoders import CASE_IDS, CASES

from cltrace.errors import CltraceError
from cltrace.graph.attribution import AttributionConfig, attribute
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.targets import LogitDifference, select_targets
from cltrace.replacement import ReplacementModel


@pytest.fixture(params=CASES, ids=CASE_IDS)
def built(request: pytest.FixtureRequest) -> tuple[ReplacementModel, Graph]:
    return case(*request.param)


# -- independent ground truth ------------------------------------------------------------------------


def target_values(rm: ReplacementModel, graph: Graph, run, slots: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Every target row's value [n_nodes] (0 elsewhere) from one plain frozen forward."""
    live = graph.metadata["settings"]["live_skip"]
    with torch.no_grad():
        out = rm.frozen(run, slots, embeds, live_skip=live)
    tc, nodes = rm.transcoder, graph.nodes
    values = torch.zeros(graph.n_nodes, dtype=torch.float64)
    feats = (nodes.kind == NodeKind.FEATURE).nonzero().flatten()
    layer, pos, feat = nodes.layer[feats].long(), nodes.pos[feats].long(), nodes.feature[feats]
    with torch.no_grad():  # the encoder of each feature node on the frozen model's resid_mid
        pre = (tc.W_enc[layer, feat] * out.resid_mid[0, pos, layer]).sum(-1) + tc.b_enc[layer, feat]
    values[feats] = pre.double()
    raw = out.logits[0, -1].double()
    for i, target in zip((nodes.kind == NodeKind.LOGIT).nonzero().flatten().tolist(), graph.metadata["targets"]):
        values[i] = sum(c * (raw[t] - raw.mean()) for t, c in zip(target["tokens"], target["coefs"]))
    return values


def dense_edges(graph: Graph) -> torch.Tensor:
    adj = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.float64)
    adj[graph.edge_target, graph.edge_source] = graph.edge_weight.double()
    return adj


def base_inputs(rm: ReplacementModel, run) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = rm.model.model.get_input_embeddings()(run.input_ids[None]).detach()
    return (run.reconstruction + run.error).detach()[None], embeds


# -- completeness -------------------------------------------------------------------------------------


def test_edges_plus_constant_give_every_target(built) -> None:
    rm, graph = built
    run = rm.run(prompt_ids())
    nodes, md = graph.nodes, graph.metadata
    rows = (nodes.kind == NodeKind.FEATURE) | (nodes.kind == NodeKind.LOGIT)
    incoming = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, graph.edge_target, graph.edge_weight.double())
    total = incoming + torch.tensor(md["target_constant"], dtype=torch.float64)
    # Ground truth: feature pre-activations as the transcoder computed them on the real model, and
    # demeaned logits from a plain (batch 1, all positions) frozen forward.
    expected = torch.zeros(graph.n_nodes, dtype=torch.float64)
    feats = (nodes.kind == NodeKind.FEATURE).nonzero().flatten()
    expected[feats] = run.pre_activations[nodes.pos[feats].long(), nodes.layer[feats].long(), nodes.feature[feats]].double()
    logit_values = target_values(rm, graph, run, *base_inputs(rm, run))
    logits = (nodes.kind == NodeKind.LOGIT).nonzero().flatten()
    expected[logits] = logit_values[logits]
    assert rows.sum() == len(feats) + len(logits) and len(logits) >= 1 and len(feats) > 20
    assert_close_rel(total[rows], expected[rows], 1.0, "edges + constant vs value")
    assert_close_rel(torch.tensor(md["target_value"], dtype=torch.float64)[rows], expected[rows], 1.0, "recorded values")
    # The constant is not doing the work: the edges carry most of each value.
    assert (incoming[rows].abs() > 1e-3).float().mean() > 0.9


def test_graph_structure(built) -> None:
    rm, graph = built
    nodes, md = graph.nodes, graph.metadata
    L, P = rm.model.n_layers, len(md["input_ids"])
    assert int((nodes.kind == NodeKind.ERROR).sum()) == L * P
    assert int((nodes.kind == NodeKind.EMBEDDING).sum()) == P
    assert torch.all(nodes.kind[:-1] <= nodes.kind[1:]), "features, errors, embeddings, logits, in that order"
    feats = nodes.kind == NodeKind.FEATURE
    assert not (nodes.pos[feats] == 0).any(), "no features at the BOS position"
    assert int(feats.sum()) == md["n_active_features"]  # no cap here: every active feature is a node
    run = rm.run(prompt_ids())
    assert torch.allclose(nodes.activation[feats], run.activations[nodes.pos[feats].long(), nodes.layer[feats].long(), nodes.feature[feats]])
    # Targets are features and logits; sources are everything but logits; all weights non-zero.
    assert torch.all((nodes.kind[graph.edge_target] == NodeKind.FEATURE) | (nodes.kind[graph.edge_target] == NodeKind.LOGIT))
    assert not (nodes.kind[graph.edge_source] == NodeKind.LOGIT).any()
    assert torch.all(graph.edge_weight != 0)
    # Edges run only upwards in layer and never from a later position.
    assert torch.all(nodes.layer[graph.edge_source] < nodes.layer[graph.edge_target])
    assert torch.all(nodes.pos[graph.edge_source] <= nodes.pos[graph.edge_target])
    key = graph.edge_target * graph.n_nodes + graph.edge_source
    assert torch.all(key[1:] > key[:-1]), "edges sorted by (target, source), no duplicates"


# -- perturbation -------------------------------------------------------------------------------------


def test_perturbing_a_source_moves_targets_by_its_edges(built) -> None:
    rm, graph = built
    run = rm.run(prompt_ids())
    tc, nodes = rm.transcoder, graph.nodes
    slots, embeds = base_inputs(rm, run)
    before = target_values(rm, graph, run, slots, embeds)
    adj = dense_edges(graph)
    # The map is affine, so any step is exact; a large one lifts the change well above the fp32
    # rounding of the two forward passes it is measured from.
    delta = 64.0
    feats = (nodes.kind == NodeKind.FEATURE).nonzero().flatten()
    # Sources: features of every layer (the strongest of each), an error node, an embedding, and
    # the error node and embedding at position 0.
    sources = []
    for layer in range(rm.model.n_layers - 1):
        at = feats[nodes.layer[feats] == layer]
        if len(at):
            sources.append(int(at[nodes.activation[at].argmax()]))
    errors = (nodes.kind == NodeKind.ERROR).nonzero().flatten()
    embeddings = (nodes.kind == NodeKind.EMBEDDING).nonzero().flatten()
    sources += [int(errors[(nodes.layer[errors] == 0) & (nodes.pos[errors] == 3)][0]), int(errors[0]),
                int(embeddings[5]), int(embeddings[0])]
    x = run.resid_mid
    for s in sources:
        new_slots, new_embeds = slots.clone(), embeds.clone()
        layer, pos = int(nodes.layer[s]), int(nodes.pos[s])
        if nodes.kind[s] == NodeKind.FEATURE:
            # Scale the feature's activation by 1 + δ and decode again: its decoders move the slots.
            acts = run.activations.clone()
            acts[pos, layer, int(nodes.feature[s])] *= 1 + delta
            new_slots = (tc.decode(acts, x) + run.error).detach()[None]
        elif nodes.kind[s] == NodeKind.ERROR:
            new_slots[0, pos, layer] += delta * run.error[pos, layer]
        else:
            new_embeds[0, pos] += delta * embeds[0, pos]
        moved = target_values(rm, graph, run, new_slots, new_embeds) - before
        predicted = delta * adj[:, s]
        assert predicted.abs().max() > 1e-3, f"source {s} must reach some target"
        assert_close_rel(moved, predicted, predicted.abs().max() * 1e-2 + 1e-3, f"perturbing node {s}")


# -- naive reference ----------------------------------------------------------------------------------


def naive_edges(rm: ReplacementModel, graph: Graph) -> torch.Tensor:
    """Every edge, one backward pass per target through ReplacementModel.frozen (no batching, no
    layer grouping, all positions' logits), each source's write computed by `Transcoder.decode`."""
    run = rm.run(prompt_ids())
    tc, nodes = rm.transcoder, graph.nodes
    live = graph.metadata["settings"]["live_skip"]
    slots0, embeds0 = base_inputs(rm, run)
    # What each feature node writes into the slots, by decoding it alone (no biases, no skip).
    feats = (nodes.kind == NodeKind.FEATURE).nonzero().flatten()
    one_hot = torch.zeros(len(feats), *run.activations.shape)
    one_hot[torch.arange(len(feats)), nodes.pos[feats].long(), nodes.layer[feats].long(), nodes.feature[feats]] = nodes.activation[feats]
    no_skip = torch.zeros(len(feats), *run.resid_mid.shape)
    writes = (tc.decode(one_hot, no_skip) - tc.b_dec).detach()  # [feature node, pos, layer, d]
    errors = (nodes.kind == NodeKind.ERROR).nonzero().flatten()
    embeddings = (nodes.kind == NodeKind.EMBEDDING).nonzero().flatten()
    adj = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.float64)
    logit_nodes = (nodes.kind == NodeKind.LOGIT).nonzero().flatten().tolist()
    targets = dict(zip(logit_nodes, graph.metadata["targets"]))
    # One plain forward (batch 1); then one backward pass per target through it.
    slots = slots0.clone().requires_grad_(True)
    embeds = embeds0.clone().requires_grad_(True)
    out = rm.frozen(run, slots, embeds, live_skip=live)
    for t in feats.tolist() + logit_nodes:
        if t in targets:
            raw = out.logits[0, -1]
            value = sum(c * (raw[k] - raw.mean()) for k, c in zip(targets[t]["tokens"], targets[t]["coefs"]))
        else:
            layer, pos, feat = int(nodes.layer[t]), int(nodes.pos[t]), int(nodes.feature[t])
            value = tc.W_enc[layer, feat] @ out.resid_mid[0, pos, layer] + tc.b_enc[layer, feat]
        g_slots, g_embeds = torch.autograd.grad(value, [slots, embeds], allow_unused=True, retain_graph=True)
        g_slots = torch.zeros_like(slots) if g_slots is None else g_slots
        adj[t, feats] = torch.einsum("npld,pld->n", writes, g_slots[0]).double()
        adj[t, errors] = (run.error * g_slots[0]).sum(-1).T.reshape(-1).double()  # (layer, pos) order
        adj[t, embeddings] = (embeds0[0] * g_embeds[0]).sum(-1).double()
    return adj


@pytest.mark.parametrize(("family", "kind"), CASES, ids=CASE_IDS)
def test_attribution_matches_naive_per_target_backward(family: str, kind: str) -> None:
    rm, graph = case(family, kind)
    expected = naive_edges(rm, graph)
    got = dense_edges(graph)
    scale = expected.abs().amax(1, keepdim=True) * 1e-2 + 1e-4  # per target row
    assert_close_rel(got, expected, scale, "attribute() vs naive")
    assert int((expected != 0).sum()) == graph.n_edges, "the graph keeps exactly the non-zero edges"


# -- the feature cap ----------------------------------------------------------------------------------


def reference_selection(full: Graph, cap: int, round_size: int) -> set[int]:
    """circuit-tracer's visiting rule, recomputed densely from the uncapped graph: rounds of
    `round_size` features ranked by their influence (power iteration over row-normalised |A| of
    the rows visited so far, from the logits' probabilities)."""
    nodes = full.nodes
    adj = dense_edges(full).numpy()
    feats = (nodes.kind == NodeKind.FEATURE).nonzero().flatten().numpy()
    logits = (nodes.kind == NodeKind.LOGIT).nonzero().flatten().numpy()
    probs = nodes.probability[logits].double().numpy()
    probs = probs / probs.sum()
    visited: list[int] = []
    while len(visited) < cap:
        rows = np.concatenate([logits, np.array(visited, dtype=np.int64)])
        a = np.abs(adj[rows])
        a = a / np.maximum(a.sum(1, keepdims=True), 1e-8)
        prod = np.zeros(full.n_nodes)
        prod[logits] = probs
        influence = np.zeros(full.n_nodes)
        for _ in range(100):
            prod = prod[rows] @ a
            if not prod.any():
                break
            influence += prod
        order = feats[np.argsort(-influence[feats], kind="stable")]
        seen = set(visited)
        visited += [int(f) for f in order if f not in seen][: min(round_size, cap - len(visited))]
    return set(visited)


def feature_keys(graph: Graph) -> list[tuple[int, int, int]]:
    n = graph.nodes
    feats = (n.kind == NodeKind.FEATURE).nonzero().flatten().tolist()
    return [(int(n.layer[i]), int(n.pos[i]), int(n.feature[i])) for i in feats]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cap_keeps_the_most_influential_features(family: str) -> None:
    rm, full = case(family, "clt")
    cap, batch, interval = 37, 4, 2
    config = AttributionConfig(max_feature_nodes=cap, batch_size=batch, update_interval=interval, progress=False)
    capped = attribute(rm, prompt_ids(), config=config)
    kept = feature_keys(capped)
    assert len(kept) == cap < full.metadata["n_active_features"]
    full_keys = feature_keys(full)
    expected = {full_keys[i] for i in reference_selection(full, cap, batch * interval)}
    assert set(kept) == expected
    # Rounds ordered by influence (capped) and the plain layer-by-layer visit (uncapped, checked
    # against the naive backward above) give every edge between kept nodes alike.
    def edges_by_id(graph: Graph) -> dict[tuple[str, str], float]:
        ids = graph.node_ids()
        return {(ids[t], ids[s]): w for t, s, w in zip(graph.edge_target.tolist(), graph.edge_source.tolist(),
                                                       graph.edge_weight.tolist())}

    capped_edges, full_edges = edges_by_id(capped), edges_by_id(full)
    kept_ids = set(capped.node_ids())
    between_kept = {k: w for k, w in full_edges.items() if k[0] in kept_ids and k[1] in kept_ids}
    assert capped_edges.keys() == between_kept.keys()
    scale = max(abs(w) for w in between_kept.values())
    assert max(abs(capped_edges[k] - w) for k, w in between_kept.items()) <= 1e-5 * scale
    # The kept rows are the same rows as in the full graph, less the sources left out, whose
    # effect the constant term takes up: completeness still holds.
    incoming = torch.zeros(capped.n_nodes, dtype=torch.float64).index_add_(0, capped.edge_target, capped.edge_weight.double())
    value = torch.tensor(capped.metadata["target_value"], dtype=torch.float64)
    constant = torch.tensor(capped.metadata["target_constant"], dtype=torch.float64)
    rows = (capped.nodes.kind == NodeKind.FEATURE) | (capped.nodes.kind == NodeKind.LOGIT)
    assert_close_rel((incoming + constant)[rows], value[rows], 1.0, "capped completeness")
    bias = torch.tensor(capped.metadata["target_bias"], dtype=torch.float64)
    assert not torch.allclose(bias[rows], constant[rows]), "the features left out show in the constant"
    # The first round holds the features with the largest direct effect on the logits.
    adj = dense_edges(full)
    logit_rows = (full.nodes.kind == NodeKind.LOGIT).nonzero().flatten()
    probs = full.nodes.probability[logit_rows].double()
    a = adj[logit_rows].abs()
    direct = (probs[:, None] * a / a.sum(1, keepdim=True)).sum(0)[: len(full_keys)]
    top = direct.argsort(descending=True)[: batch * interval].tolist()
    assert {full_keys[i] for i in top} <= set(kept)


def test_zero_cap_gives_logit_rows_only() -> None:
    rm, _ = case("gpt2", "clt")
    graph = attribute(rm, prompt_ids(), max_feature_nodes=0, progress=False)
    assert int((graph.nodes.kind == NodeKind.FEATURE).sum()) == 0
    assert torch.all(graph.nodes.kind[graph.edge_target] == NodeKind.LOGIT)
    assert len(graph.metadata["targets"]) >= 1


# -- targets ------------------------------------------------------------------------------------------


def test_default_targets_reach_95_percent_at_most_10() -> None:
    probs = torch.tensor([0.5, 0.3, 0.16, 0.04])
    chosen = select_targets(probs.log())
    assert [t.token for t in chosen] == [0, 1, 2]
    assert abs(chosen[0].probability - 0.5) < 1e-6
    flat = torch.zeros(50)
    assert len(select_targets(flat)) == 10
    assert len(select_targets(flat, max_n_logits=3)) == 3
    assert [t.token for t in select_targets(probs.log(), desired_logit_prob=0.5)] == [0]


def tokenized_case(family: str = "llama") -> ReplacementModel:
    rm, _ = case(family, "clt")
    model = tiny_model(family)
    model.tokenizer = tiny_tokenizer()
    return ReplacementModel(model, rm.transcoder)


PROMPT = "t10 t20 t30 t40 t50 t60 t70 t80"


def test_targets_by_string_and_logit_difference() -> None:
    rm = tokenized_case()
    graph = attribute(rm, PROMPT, targets=["t5", 7], progress=False)
    md = graph.metadata
    assert md["input_ids"] == [0, 10, 20, 30, 40, 50, 60, 70, 80]  # BOS prepended
    assert md["tokens"][:2] == ["<bos>", "t10"] and md["prompt"] == PROMPT
    assert [t["tokens"] for t in md["targets"]] == [[5], [7]]
    logit_nodes = (graph.nodes.kind == NodeKind.LOGIT).nonzero().flatten()
    assert graph.nodes.token[logit_nodes].tolist() == [5, 7]
    assert md["targets"][0]["label"] == "t5"

    diff = attribute(rm, PROMPT, targets=LogitDifference("t5", "t9"), progress=False)
    (node,) = (diff.nodes.kind == NodeKind.LOGIT).nonzero().flatten().tolist()
    run = rm.run(PROMPT)
    raw = rm.frozen(run).logits[0, -1]
    expected = float(raw[5] - raw[9])
    assert abs(diff.metadata["target_value"][node] - expected) <= RTOL * (abs(expected) + 1)
    incoming = float(diff.edge_weight[diff.edge_target == node].double().sum())
    assert abs(incoming + diff.metadata["target_constant"][node] - expected) <= RTOL * (abs(expected) + 1)
    # The difference row is the difference of the two single-token rows (no cap: same nodes).
    singles = attribute(rm, PROMPT, targets=["t5", "t9"], progress=False)
    a, b = (singles.nodes.kind == NodeKind.LOGIT).nonzero().flatten().tolist()
    n = diff.n_nodes
    def row(g: Graph, t: int) -> torch.Tensor:
        r = torch.zeros(g.n_nodes - (1 if g is diff else 2), dtype=torch.float64)
        at = g.edge_target == t
        r[g.edge_source[at]] = g.edge_weight[at].double()
        return r
    assert singles.n_nodes == n + 1
    torch.testing.assert_close(row(diff, node), row(singles, a) - row(singles, b), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused() -> None:
    rm = tokenized_case()
    with pytest.raises(CltraceError, match="empty"):
        attribute(rm, "", progress=False)
    with pytest.raises(CltraceError, match="tokenizes to nothing"):
        attribute(rm, "~~ ~", progress=False)
    with pytest.raises(CltraceError, match="no tokens"):
        attribute(rm, torch.tensor([], dtype=torch.long), progress=False)
    with pytest.raises(CltraceError, match="'t5 t6' is 2 tokens"):
        attribute(rm, PROMPT, targets=["t5 t6"], progress=False)
    with pytest.raises(CltraceError, match="out of range"):
        attribute(rm, PROMPT, targets=[VOCAB + 3], progress=False)
    with pytest.raises(CltraceError, match="batch_size"):
        attribute(rm, PROMPT, batch_size=0, progress=False)
    untokenized, _ = case("llama", "clt")
    with pytest.raises(CltraceError, match="no tokenizer"):
        attribute(untokenized, prompt_ids(), targets=["t5"], progress=False)
    with pytest.raises(CltraceError, match="itself"):
        attribute(rm, PROMPT, targets=LogitDifference("t5", 5), progress=False)


def test_metadata_describes_the_run() -> None:
    _, graph = case("qwen3", "clt")
    md = graph.metadata
    assert md["model"] == "tiny-qwen3" and md["prompt"] is None and md["tokens"] is None
    assert md["input_ids"] == prompt_ids().tolist()
    assert md["transcoder"]["kind"] == "clt" and md["settings"]["max_feature_nodes"] == 10_000
    assert len(md["target_constant"]) == len(md["target_value"]) == graph.n_nodes
    import json

    json.dumps(md)  # plain JSON, ready to save


# -- the frozen model's additions used by attribution ---------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_frozen_live_skip_and_per_layer_slots(family: str) -> None:
    rm, _ = case(family, "plt")
    run = rm.run(prompt_ids())
    base = (run.reconstruction + run.error).detach()
    plain = rm.frozen(run, base)
    live = rm.frozen(run, base, live_skip=True)
    # At the prompt the live skip path changes nothing ...
    torch.testing.assert_close(live.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live.resid_mid, plain.resid_mid, rtol=1e-5, atol=1e-5)
    # ... but a change in layer 0's slot now also reaches layer 2 through layer 1's skip.
    moved = base.clone()
    moved[:, 0] += 1.0
    d_plain = rm.frozen(run, moved).resid_mid - plain.resid_mid
    d_live = rm.frozen(run, moved, live_skip=True).resid_mid - live.resid_mid
    torch.testing.assert_close(d_live[:, :, :2], d_plain[:, :, :2], rtol=1e-4, atol=1e-5)
    # Exactly: slot 1 also emits (its input's change) @ W_skip_1, which then moves layer 2's input.
    with_skip = moved.clone()
    with_skip[:, 1] += (d_plain[0, :, 1] @ rm.transcoder.W_skip[1]).detach()
    expected = rm.frozen(run, with_skip).resid_mid - plain.resid_mid
    torch.testing.assert_close(d_live, expected, rtol=1e-4, atol=1e-5)
    assert (d_live[:, :, 2] - d_plain[:, :, 2]).abs().max() > 1e-4
    # Per-layer slot tensors give the same as one stacked tensor; logits_to_keep=1 the last row.
    per_layer = rm.frozen(run, [base[:, layer][None] for layer in range(base.shape[1])], logits_to_keep=1)
    torch.testing.assert_close(per_layer.logits[:, -1], plain.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert per_layer.logits.shape[1] == 1
    assert len(per_layer.resid_mid_layers) == base.shape[1]
    with pytest.raises(CltraceError, match="per layer"):
        rm.frozen(run, [base[:, 0][None]])
    clt, _ = case(family, "clt")
    with pytest.raises(CltraceError, match="skip path"):
        clt.frozen(clt.run(prompt_ids()), live_skip=True)
