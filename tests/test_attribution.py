"""Attribution graphs are exact: every edge checked against an independent ground truth.

Each family gets a tiny random model and a random CLT (and, on some, a PLT with a skip path); the
graph's edges are checked by completeness (edges + constant = the target's real value), by
perturbation (moving one source in the frozen model moves every target by edge × δ), and against a
slow reference that runs one backward pass per target straight through ReplacementModel.frozen.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from helpers.models import VOCAB, prompt_ids, tiny_model, tiny_tokenizer
from helpers.transcoders import CASE_IDS, CASES, random_transcoder

from cltrace.errors import CltraceError
from cltrace.graph import attribution as attribution_module
from cltrace.graph import estimate as estimate_module
from cltrace.graph.attribution import AttributionConfig, attribute, estimate_attribution
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.targets import LogitDifference, select_targets
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig

RTOL = 1e-4


@functools.cache
def case(family: str, kind: str) -> tuple[ReplacementModel, Graph]:
    model = tiny_model(family)
    rm = ReplacementModel(model, random_transcoder(model, kind))
    graph = attribute(rm, prompt_ids(), max_feature_nodes=10_000, batch_size=16, progress=False)
    return rm, graph


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


def assert_close_rel(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | float, what: str) -> None:
    """|got − expected| ≤ RTOL · (|expected| + scale), elementwise."""
    bad = (got - expected).abs() > RTOL * (expected.abs() + scale)
    assert not bad.any(), f"{what}: {int(bad.sum())} mismatches, worst {float((got - expected).abs().max()):.3g}"


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


# -- estimates, memory refusal and bad input on the command line -----------------------------------------


def test_estimate_counts_what_attribute_then_does() -> None:
    from cltrace.graph.attribution import estimate_attribution

    rm, graph = case("gemma2", "clt")
    est = estimate_attribution(rm, prompt_ids(), config=AttributionConfig(max_feature_nodes=10_000, batch_size=16))
    run = rm.run(prompt_ids())
    active = run.activations != 0
    active[0] = False  # BOS features are not nodes
    assert est.n_active_features == int(active.sum()) == graph.metadata["n_active_features"]
    assert est.n_logit_rows == len(graph.metadata["targets"])
    assert est.n_feature_rows == int((graph.nodes.kind == NodeKind.FEATURE).sum())
    assert est.n_batches == -(-est.n_logit_rows // 16) + -(-est.n_feature_rows // 16)
    params = sum(p.numel() * 4 for p in (*rm.model.model.parameters(), *rm.transcoder.parameters()))
    assert params < est.peak_bytes < 2**30 and est.seconds > 0
    # A limit below the estimate refuses the work before any backward pass; the message carries the estimate.
    with pytest.raises(CltraceError, match=r"needs about .* GB .*active features.*--max-memory"):
        attribute(rm, prompt_ids(), config=AttributionConfig(max_memory_bytes=est.peak_bytes - 1), progress=False)


def test_memory_refusal_is_the_default_and_comes_before_the_forward_run(monkeypatch) -> None:
    """With no limit given, the limit is the memory available now; a prompt whose forward run alone
    (attention patterns grow with tokens squared) would not fit is refused before the model runs."""
    import cltrace.graph.config as config_module  # AttributionConfig reads available memory through its own name

    rm, _ = case("gemma2", "clt")
    ids = prompt_ids()
    mcfg, tc = rm.model.model.config, rm.transcoder.config
    P = ids.numel()
    params = sum(t.numel() * t.element_size() for t in (*rm.model.model.parameters(), *rm.transcoder.parameters()))
    patterns = 4 * tc.n_layers * mcfg.num_attention_heads * P * P
    # 'available' memory just below what the run needs: refused, and the model is never run.
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: params + patterns)
    ran = []
    monkeypatch.setattr(rm, "run", lambda *a, **k: ran.append(1))
    with pytest.raises(CltraceError, match=rf"a prompt of {P} tokens needs at least .* GB .*shorten the prompt"):
        attribute(rm, ids, progress=False)
    assert not ran
    # Plenty available: the same call builds the graph, and an explicit limit overrides what is available.
    monkeypatch.undo()
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: 1 << 40)
    assert attribute(rm, ids, progress=False).n_edges > 0
    with pytest.raises(CltraceError, match="needs"):
        attribute(rm, ids, config=AttributionConfig(max_memory_bytes=params), progress=False)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_decoders_gathered_on_each_pass_give_the_same_graph(share: float) -> None:
    """Long prompts gather some or all decoders per pass instead of caching them: the edges must not change."""
    rm, cached = case("qwen2", "clt")
    with torch.enable_grad():
        padded = attribution_module._Attribution(rm, prompt_ids(), None, AttributionConfig(progress=False)).decoder_cache_bytes
    budget = int(share * padded)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, decoder_cache_bytes=budget)
    with torch.enable_grad():
        work = attribution_module._Attribution(rm, prompt_ids(), None, config)
    kept = [g.keep for slot in work.slots if slot is not None for g in slot.groups]
    assert work.cached_decoder_bytes <= budget and (any(kept) and not all(kept) if share else not any(kept))
    assert not work.estimate().decoders_cached
    gathered = attribute(rm, prompt_ids(), config=config)
    assert gathered.n_edges == cached.n_edges
    assert torch.equal(gathered.edge_source, cached.edge_source) and torch.equal(gathered.edge_target, cached.edge_target)
    torch.testing.assert_close(gathered.edge_weight, cached.edge_weight, rtol=1e-6, atol=1e-7)


def test_a_tight_memory_limit_keeps_fewer_decoders_instead_of_refusing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept decoders are the first thing given up when the graph would not fit in the memory allowed:
    before the rows go to bf16 for a second pass, and before the graph is refused."""
    rm, cached = case("qwen2", "clt")
    # Sparse edges, so that the passes (decoders included), not the edges' layout, set the peak.
    monkeypatch.setattr(estimate_module, "_EDGE_DENSITY", 0.01)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, progress=False)
    full = estimate_attribution(rm, prompt_ids(), config=config)
    gathered = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(config, decoder_cache_bytes=0))
    assert full.decoders_cached and not gathered.decoders_cached and gathered.peak_bytes < full.peak_bytes
    for limit in (gathered.peak_bytes, (gathered.peak_bytes + full.peak_bytes) // 2):
        limited = dataclasses.replace(config, max_memory_bytes=limit)
        chosen = estimate_attribution(rm, prompt_ids(), config=limited)
        assert not chosen.decoders_cached and not chosen.recompute_rows and chosen.peak_bytes <= limit
        squeezed = attribute(rm, prompt_ids(), config=limited)
        same_graph(squeezed, cached, "fewer decoders kept")
        assert not squeezed.metadata["settings"]["rows_recomputed"]


def same_graph(got: Graph, expected: Graph, what: str) -> None:
    assert got.n_edges == expected.n_edges, what
    assert torch.equal(got.edge_source, expected.edge_source) and torch.equal(got.edge_target, expected.edge_target), what
    torch.testing.assert_close(got.edge_weight, expected.edge_weight, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("family, kind", [("llama", "clt"), ("gpt2", "plt")])
def test_rows_recomputed_give_the_same_exact_graph(family: str, kind: str) -> None:
    """Long prompts keep the rows in bf16 for the ordering and compute the edges again: with every
    feature visited the graph is the fp32 one, and a capped one still sums to its targets exactly."""
    rm, full = case(family, kind)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, recompute_rows=True, progress=False)
    recomputed = attribute(rm, prompt_ids(), config=config)
    assert recomputed.metadata["settings"]["rows_recomputed"] and not full.metadata["settings"]["rows_recomputed"]
    same_graph(recomputed, full, "recomputed rows")
    capped = attribute(rm, prompt_ids(), config=AttributionConfig(max_feature_nodes=20, batch_size=4, recompute_rows=True,
                                                                  progress=False))
    incoming = torch.zeros(capped.n_nodes, dtype=torch.float64).index_add_(0, capped.edge_target, capped.edge_weight.double())
    value = torch.tensor(capped.metadata["target_value"], dtype=torch.float64)
    constant = torch.tensor(capped.metadata["target_constant"], dtype=torch.float64)
    rows = (capped.nodes.kind == NodeKind.FEATURE) | (capped.nodes.kind == NodeKind.LOGIT)
    assert_close_rel((incoming + constant)[rows], value[rows], 1.0, "capped, recomputed completeness")


def test_memory_limit_chooses_recomputed_rows_and_rows_outgrowing_their_budget(monkeypatch) -> None:
    """A limit that fp32 rows would pass but bf16 rows fit picks the second pass up front; rows that
    outgrow their budget on the way go to bf16, and past that the work stops with one clear line."""
    rm, full = case("qwen2", "clt")
    # Rows in bf16 lower the peak where the rows outweigh the graph's edges (fp32 rows are held while
    # the edges are laid out); on these tiny graphs the edges weigh more, unless they are sparse.
    monkeypatch.setattr(estimate_module, "_EDGE_DENSITY", 0.01)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, progress=False)
    fp32 = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(config, recompute_rows=False))
    bf16 = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(config, recompute_rows=True))
    assert bf16.row_bytes * 2 == fp32.row_bytes > 0 and bf16.peak_bytes < fp32.peak_bytes
    # Below what fp32 rows take even with every decoder gathered on each pass (see the test above).
    gathered = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(
        config, recompute_rows=False, decoder_cache_bytes=0))
    limited = dataclasses.replace(config, max_memory_bytes=gathered.peak_bytes - 1)
    chosen = estimate_attribution(rm, prompt_ids(), config=limited)
    assert chosen.recompute_rows and "second pass" in chosen.summary()
    graph = attribute(rm, prompt_ids(), config=limited)
    assert graph.metadata["settings"]["rows_recomputed"]
    same_graph(graph, full, "recomputed under a memory limit")

    # With every feature visited the rows take exactly the estimate; understate it so that the
    # budget (the limit less everything else) is 60% of the fp32 rows: they go to bf16 half-way.
    real = attribution_module._Attribution.estimate

    def understated(share: float):
        def estimate(self, recompute=None):
            est = real(self, recompute)
            return dataclasses.replace(est, row_bytes=int(est.row_bytes * share))
        return estimate

    exact = dataclasses.replace(config, recompute_rows=False, max_memory_bytes=fp32.peak_bytes)
    monkeypatch.setattr(attribution_module._Attribution, "estimate", understated(0.6))
    graph = attribute(rm, prompt_ids(), config=exact)
    assert graph.metadata["settings"]["rows_recomputed"]
    same_graph(graph, full, "rows moved to bf16 on the way")
    monkeypatch.setattr(attribution_module._Attribution, "estimate", understated(0.4))
    with pytest.raises(CltraceError, match=r"outgrew their .* GB budget after \d+ rows: lower --max-feature-nodes"):
        attribute(rm, prompt_ids(), config=exact)


@pytest.mark.slow
def test_cli_dry_run_and_bad_input(tmp_path, capsys) -> None:
    from helpers.cli import assert_one_line_error, run_cli
    from helpers.graphs import rewrite_header

    from cltrace.graph.graph import GRAPH_SCHEMA_VERSION
    from cltrace.model import load_model
    from cltrace.transcoder import save_transcoder

    prompt, out = "The cat sat", tmp_path / "g.cltg"
    cfg = TranscoderConfig(kind="clt", n_layers=30, d_model=576, n_features=8, activation="jumprelu")
    tc = Transcoder.random(cfg, seed=3)
    save_transcoder(tc, tmp_path / "clt")
    # --dry-run: the estimate, with the true number of active features, and no graph.
    code, text, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--dry-run", capsys=capsys)
    assert code == 0, err
    run = ReplacementModel(load_model("default"), tc).run(prompt)
    n_active = int((run.activations[1:] != 0).sum())
    assert f"{len(run.input_ids)} tokens, {n_active} active features" in text
    assert "GB peak memory" in text and "nothing computed" in text and not out.exists()
    # A memory limit below the estimate but above the forward run's needs: refused up front with the
    # estimate, one line, no graph.
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--max-memory", "0.55",
                           capsys=capsys)
    assert_one_line_error(code, err, "GB", "--max-memory", f"{n_active} active features")
    assert not out.exists()
    # Below what the model and the forward run alone take: refused before the model runs.
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--max-memory", "0.1",
                           capsys=capsys)
    assert_one_line_error(code, err, "forward run alone", "--max-memory")
    assert not out.exists()
    # A target that is two tokens.
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--target", " on the",
                           capsys=capsys)
    assert_one_line_error(code, err, "' on the' is 2 tokens")
    # A prompt that tokenizes to nothing.
    code, _, err = run_cli("attribute", "", "-t", str(tmp_path / "clt"), "-o", str(out), capsys=capsys)
    assert_one_line_error(code, err, "empty")
    # A transcoder for another model (4 layers, not 30).
    other = TranscoderConfig(kind="clt", n_layers=4, d_model=576, n_features=8, activation="jumprelu")
    save_transcoder(Transcoder.random(other), tmp_path / "other")
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "other"), "-o", str(out), capsys=capsys)
    assert_one_line_error(code, err, "does not fit", "4 layers")
    assert not out.exists()
    # A graph file from a newer schema, and a truncated one, refused by export.
    _, graph = case("llama", "clt")
    graph.save(tmp_path / "new.cltg")
    rewrite_header(tmp_path / "new.cltg", schema_version=str(GRAPH_SCHEMA_VERSION + 1))
    code, _, err = run_cli("export", str(tmp_path / "new.cltg"), "-o", str(tmp_path / "new.json"), capsys=capsys)
    assert_one_line_error(code, err, "newer")
    raw = (tmp_path / "new.cltg").read_bytes()
    (tmp_path / "cut.cltg").write_bytes(raw[: len(raw) - 100])
    code, _, err = run_cli("export", str(tmp_path / "cut.cltg"), "-o", str(tmp_path / "cut.json"), capsys=capsys)
    assert_one_line_error(code, err, "cut.cltg")
    assert not (tmp_path / "new.json").exists() and not (tmp_path / "cut.json").exists()
