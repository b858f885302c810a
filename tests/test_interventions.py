"""Interventions, each checked against an independent ground truth on tiny models of several families.

* setting a feature to its current value changes nothing;
* iterative mode equals a layer-by-layer recomputation written out here (frozen attention through
  ReplacementModel.frozen, free attention through hooks on the plain model);
* a constrained intervention over all layers with frozen attention changes the logits exactly as
  the first-order computation frozen(slots + Δ decoder output) − frozen(slots) says, and as the
  attribution graph's edges predict;
* batched equals one at a time; open-ended interventions carry through generation;
* bad input gives one clear line (Python API and the command line).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.models import prompt_ids, tiny_model

from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.graph.predict import compare_with_graph, predict_effects
from cltrace.graph.supernodes import merge_supernodes, supernodes_to_qparams
from cltrace.replacement import ReplacementModel
from cltrace.replacement.interventions import (
    Intervention,
    intervene,
    intervene_batch,
    intervene_prompts,
    parse_intervention,
)
from cltrace.replacement.supernodes import (
    Supernode,
    load_supernodes,
    save_supernodes,
    supernodes_from_json,
)
from cltrace.transcoder import Transcoder, TranscoderConfig

CASES = [("llama", "clt"), ("qwen3", "clt"), ("gemma2", "clt"), ("gemma3", "clt"), ("gpt2", "clt"), ("gpt2", "plt")]
CASE_IDS = [f"{f}-{k}" for f, k in CASES]


def random_transcoder(model, kind: str, seed: int = 0, activation: str = "jumprelu") -> Transcoder:
    """A random transcoder with non-zero biases, varied thresholds and decoders large enough to matter;
    a PLT gets a skip path."""
    cfg = TranscoderConfig(
        kind=kind, n_layers=model.n_layers, d_model=model.d_model, n_features=24, activation=activation,
        skip=kind == "plt", topk_k=6 if activation == "topk" else None,
    )
    tc = Transcoder.random(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tc.b_enc.copy_(0.1 * torch.randn(tc.b_enc.shape, generator=g))
        tc.b_dec.copy_(0.1 * torch.randn(tc.b_dec.shape, generator=g))
        if activation == "jumprelu":
            tc.activation.threshold.copy_(0.05 * torch.rand(tc.activation.threshold.shape, generator=g))
        for w in tc._decoder_parameters():
            w.mul_(4.0)
        if getattr(tc, "W_skip", None) is not None:
            tc.W_skip.copy_(0.05 * torch.randn(tc.W_skip.shape, generator=g))
    return tc


@functools.cache
def case(family: str, kind: str) -> ReplacementModel:
    model = tiny_model(family)
    return ReplacementModel(model, random_transcoder(model, kind))


@pytest.fixture(params=CASES, ids=CASE_IDS)
def rm(request: pytest.FixtureRequest) -> ReplacementModel:
    return case(*request.param)


def active_features(run, k: int = 3, min_layer: int = 0) -> list[tuple[int, int, int]]:
    """k active (layer, feature, pos) away from position 0, spread over layers and positions."""
    acts = run.activations.clone()
    acts[0] = 0
    acts[:, :min_layer] = 0
    pos, layer, feat = (acts > 0).nonzero(as_tuple=True)
    picks = torch.linspace(0, pos.numel() - 1, k).round().long()
    return [(int(layer[i]), int(feat[i]), int(pos[i])) for i in picks]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# -- setting a feature to its current value ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["iterative", "constrained"])
@pytest.mark.parametrize("frozen", [False, True], ids=["free", "frozen"])
def test_setting_current_value_changes_nothing(rm: ReplacementModel, mode: str, frozen: bool) -> None:
    run = rm.run(prompt_ids())
    specs = [Intervention.at(l, f, p, value=float(run.activations[p, l, f])) for l, f, p in active_features(run, 4)]
    specs.append(Intervention.at(*active_features(run, 1)[0][:2], None, factor=1.0))  # x1 everywhere
    result = intervene(rm, run.input_ids, specs, mode=mode, freeze_attention=frozen, run=run)
    assert max_diff(result.logits_after, result.logits_before) <= 1e-6
    assert max_diff(result.logits_after, rm.model.model(input_ids=run.input_ids[None]).logits[0, -1]) <= 1e-5
    assert max_diff(result.activations_after, run.activations) <= 1e-6
    assert result.n_changed_features() == 0


# -- iterative mode against a hand-written layer-by-layer recomputation -------------------------------


def manual_iterative(rm: ReplacementModel, run, specs: list[tuple[int, int, int, float]], frozen: bool) -> torch.Tensor:
    """The replacement model with features recomputed layer by layer and the given (layer, feature,
    pos, value) set, written out: one full forward per layer. Returns the final logits [vocab]."""
    tc, model = rm.transcoder, rm.model
    L = tc.n_layers
    x_all = run.resid_mid.clone()  # [pos, layer, d]
    acts = torch.zeros_like(run.activations)  # [pos, layer, F], filled layer by layer
    slots = run.mlp_out.clone()  # [pos, layer, d]: layers >= l are not read before they are set

    def forward(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(resid_mid [pos, layer, d], logits [vocab]) of the model whose MLP blocks emit `slots`."""
        if frozen:
            out = rm.frozen(run, slots)
            return out.resid_mid[0], model.finalize_logits(out.logits[0, -1])
        layers = model.adapter.decoder_layers(model.model)
        seen: list[torch.Tensor] = []
        handles = []
        for i, layer in enumerate(layers):
            handles.append(model.adapter.mlp_input_module(layer).register_forward_pre_hook(
                lambda _m, args: seen.append(args[0][0])))
            handles.append(model.adapter.mlp_output_module(layer).register_forward_hook(
                lambda _m, _a, out, i=i: slots[None, :, i].to(out.dtype)))
        try:
            logits = model.model(input_ids=run.input_ids[None], use_cache=False).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        return torch.stack(seen, dim=1), logits

    with torch.no_grad():
        for l in range(L):
            resid, _ = forward(slots)
            x_all[:, l] = resid[:, l]
            acts[:, l] = tc.encode(x_all)[:, l]  # the transcoder's own encoder on this layer's new input
            for layer, feat, pos, value in specs:
                if layer == l:
                    acts[pos, l, feat] = value
            slots[:, l] = tc.decode(acts, x_all)[:, l] + run.error[:, l]
        return forward(slots)[1], acts


@pytest.mark.parametrize("frozen", [False, True], ids=["free", "frozen"])
def test_iterative_matches_layer_by_layer_recomputation(rm: ReplacementModel, frozen: bool) -> None:
    run = rm.run(prompt_ids())
    picks = active_features(run, 2)
    specs = [(picks[0][0], picks[0][1], picks[0][2], 0.0), (picks[1][0], picks[1][1], picks[1][2], 3.0)]
    # also switch on an inactive feature of layer 0 at the last position, so effects propagate far
    inactive = int((run.activations[-1, 0] == 0).nonzero()[0])
    specs.append((0, inactive, run.n_pos - 1, 2.0))
    expected_logits, expected_acts = manual_iterative(rm, run, specs, frozen)
    result = intervene(
        rm, run.input_ids, [Intervention.at(l, f, p, value=v) for l, f, p, v in specs],
        mode="iterative", freeze_attention=frozen, run=run,
    )
    change = max_diff(result.logits_after, result.logits_before)
    assert change > 1e-2, "the test intervention must move the logits"
    assert max_diff(result.logits_after, expected_logits) <= 1e-4 * max(1.0, change)
    assert max_diff(result.activations_after, expected_acts) <= 1e-4
    # downstream features really were recomputed: some feature nobody set has changed
    touched = {(l, p, f) for l, f, p, _ in specs}
    others = [c for c in result.changed_features(k=1000) if (c[0], c[1], c[2]) not in touched]
    assert others, "iterative mode must propagate to downstream features"


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_iterative_with_other_activations(activation: str) -> None:
    model = tiny_model("qwen2")
    rm = ReplacementModel(model, random_transcoder(model, "clt", activation=activation))
    run = rm.run(prompt_ids())
    (l, f, p), = active_features(run, 1)
    specs = [(l, f, p, 0.0), (0, 1, run.n_pos - 2, 5.0)]
    expected_logits, expected_acts = manual_iterative(rm, run, specs, frozen=True)
    result = intervene(
        rm, run.input_ids, [Intervention.at(l, f, p, value=v) for l, f, p, v in specs], freeze_attention=True, run=run
    )
    assert max_diff(result.logits_after, result.logits_before) > 1e-2
    assert max_diff(result.logits_after, expected_logits) <= 1e-4
    assert max_diff(result.activations_after, expected_acts) <= 1e-4


# -- constrained mode is first order -----------------------------------------------------------------


def test_constrained_all_layers_frozen_is_the_first_order_change(rm: ReplacementModel) -> None:
    run = rm.run(prompt_ids())
    picks = active_features(run, 3)
    specs = [
        Intervention.at(*picks[0][:2], picks[0][2], value=0.0),
        Intervention.at(*picks[1][:2], picks[1][2], factor=-2.5),
        Intervention.at(*picks[2][:2], (picks[2][2], None), value=1.5),  # open-ended range
    ]
    result = intervene(rm, run.input_ids, specs, mode="constrained", freeze_attention=True, run=run)
    # ground truth: the frozen replacement model, every slot given the decoders' change
    new = run.activations.clone()
    for iv in specs:
        for p in range(run.n_pos):
            if iv.covers(p):
                new[p, iv.layer, iv.feature] = iv.apply(float(run.activations[p, iv.layer, iv.feature]))
    x = run.resid_mid
    delta = rm.transcoder.decode(new, x) - rm.transcoder.decode(run.activations, x)  # [pos, layer, d]
    slots = run.reconstruction + run.error
    live = rm.transcoder.config.skip
    with torch.no_grad():
        moved = rm.frozen(run, slots + delta, live_skip=live).logits[0, -1] - rm.frozen(run, slots, live_skip=live).logits[0, -1]
    measured = result.raw_logits_after - result.raw_logits_before
    assert float(moved.abs().max()) > 1e-2
    assert max_diff(measured, moved) <= 1e-5 * max(1.0, float(moved.abs().max()))
    # only the intervened features changed
    assert {(l, f, p) for l, p, f, _, _ in result.changed_features(k=1000)} <= {
        (iv.layer, iv.feature, p) for iv in specs for p in range(run.n_pos) if iv.covers(p)
    }


def test_constrained_layer_range_holds_only_those_layers() -> None:
    rm = case("llama", "clt")
    run = rm.run(prompt_ids())
    spec = Intervention.at(0, int((run.activations[-1, 0] == 0).nonzero()[0]), run.n_pos - 1, value=4.0)
    held = intervene(rm, run.input_ids, [spec], mode="constrained", layers=(1, 1), run=run)
    changed_layers = {l for l, *_ in held.changed_features(k=10_000)}
    assert 1 not in changed_layers and 2 in changed_layers  # layer 1 held, layer 2 recomputed
    everything = intervene(rm, run.input_ids, [spec], mode="constrained", run=run)
    assert {l for l, *_ in everything.changed_features(k=10_000)} == {0}


graph_cases = [("llama", "clt"), ("gemma3", "clt"), ("gpt2", "plt")]


@pytest.mark.parametrize("family,kind", graph_cases, ids=[f"{f}-{k}" for f, k in graph_cases])
def test_graph_edges_predict_constrained_frozen_change(family: str, kind: str) -> None:
    attribution = pytest.importorskip("cltrace.graph.attribution")
    rm = case(family, kind)
    graph = attribution.attribute(rm, prompt_ids(), max_feature_nodes=10_000, batch_size=16, progress=False)
    run = rm.run(prompt_ids())
    picks = active_features(run, 3)
    specs = [
        Intervention.at(*picks[0][:2], picks[0][2], value=0.0),
        Intervention.at(*picks[1][:2], picks[1][2], factor=3.0),
        Intervention.at(*picks[2][:2], picks[2][2], value=-1.0),
    ]
    rows, result, prediction = compare_with_graph(rm, graph, specs)
    assert not prediction.missing
    logit_rows = [r for r in rows if r.kind == "logit"]
    assert len(logit_rows) == int((graph.nodes.kind == int(NodeKind.LOGIT)).sum())
    scale = max(abs(r.actual) for r in rows)
    assert scale > 1e-2
    for row in rows:
        assert abs(row.predicted - row.actual) <= 1e-4 * max(1.0, scale), row
    # the measured logit changes are those of the demeaned logits, from the intervention itself
    raw_b, raw_a = result.raw_logits_before.double(), result.raw_logits_after.double()
    for row in logit_rows:
        token = int(graph.nodes.token[row.node])
        expected = (raw_a[token] - raw_a.mean()) - (raw_b[token] - raw_b.mean())
        assert abs(row.actual - float(expected)) < 1e-6


# -- predict_effects from a hand-made graph -----------------------------------------------------------


def hand_graph() -> Graph:
    """features a (L0 #3 @1, act 2.0), b (L1 #5 @1, act 0.5); error; embedding; logits for tokens 7, 9."""
    F, E, T, Lg = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT
    nodes = NodeTable.from_columns(
        kind=[F, F, E, T, T, Lg, Lg], layer=[0, 1, 0, -1, -1, 2, 2], pos=[1, 1, 1, 0, 1, 1, 1],
        feature=[3, 5, -1, -1, -1, -1, -1], token=[-1, -1, -1, 10, 11, 7, 9],
        activation=[2.0, 0.5, 0, 0, 0, 0, 0], probability=[0, 0, 0, 0, 0, 0.6, 0.4],
    )
    edges = [(4, 0, 2.0), (0, 1, 3.0), (2, 1, -0.5), (1, 5, 2.0), (0, 5, 0.5), (1, 6, 1.0), (0, 6, -4.0)]
    return Graph.from_edges(nodes, edges, {"n_layers": 2})


def test_predict_effects_uses_edges_linearly() -> None:
    graph = hand_graph()
    # a: 2.0 → 0 (Δa/a = −1); b: ×3 (Δb/b = +2)
    pred = predict_effects(graph, [Intervention.at(0, 3, 1, value=0.0), Intervention.at(1, 5, None, factor=3.0)])
    assert pred.source_change == {0: -2.0, 1: 1.0}
    assert pred.change[1] == pytest.approx(-3.0)  # feature b's pre-activation: −1 × 3.0
    assert pred.change[5] == pytest.approx(2 * 2.0 - 0.5)  # logit 7: +2 × 2.0 − 1 × 0.5
    assert pred.change[6] == pytest.approx(2 * 1.0 + 4.0)  # logit 9: +2 × 1.0 − 1 × (−4.0)
    missing = predict_effects(graph, [Intervention.at(1, 6, 1, value=1.0)])
    assert missing.missing == ["1_6_1"] and missing.change == {}


# -- batched equals one at a time ---------------------------------------------------------------------


@pytest.mark.parametrize("mode,frozen", [("iterative", False), ("constrained", True)])
def test_batched_equals_one_at_a_time(mode: str, frozen: bool) -> None:
    for family, kind in [("qwen3", "clt"), ("gpt2", "plt")]:
        rm = case(family, kind)
        run = rm.run(prompt_ids())
        picks = active_features(run, 3)
        sets = [
            [Intervention.at(*picks[0][:2], picks[0][2], value=0.0)],
            [],
            [Intervention.at(*picks[1][:2], None, factor=2.0), Intervention.at(*picks[2][:2], picks[2][2], value=5.0)],
            [Intervention.at(0, 0, (2, None), value=3.0)],
        ]
        together = intervene_batch(rm, run.input_ids, sets, mode=mode, freeze_attention=frozen, run=run)
        for specs, batched in zip(sets, together):
            alone = intervene(rm, run.input_ids, specs, mode=mode, freeze_attention=frozen, run=run)
            assert max_diff(batched.logits_after, alone.logits_after) <= 1e-5
            assert max_diff(batched.activations_after, alone.activations_after) <= 1e-5
        # the empty set rides in a batch of 4, where products may round differently than alone
        assert max_diff(together[1].logits_after, together[1].logits_before) <= 1e-5


# -- generation ---------------------------------------------------------------------------------------


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    seq = ids[None]
    with torch.no_grad():
        for _ in range(n):
            nxt = model.model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, ids.numel():].tolist()


def test_open_ended_intervention_carries_through_generation() -> None:
    rm = case("llama", "clt")
    run = rm.run(prompt_ids())
    P, L = run.n_pos, rm.transcoder.n_layers
    # the last layer's feature whose decoder most moves the logits: it matters for the output
    unembed = rm.model.model.get_output_embeddings().weight  # [vocab, d]
    strength = (rm.transcoder.W_dec[L - 1][:, 0] @ unembed.T).std(-1)  # [F]
    feat = int(strength.argmax())
    open_ended = Intervention.at(L - 1, feat, (P - 1, None), value=40.0)
    closed = Intervention.at(L - 1, feat, P - 1, value=40.0)
    r_open, r_closed = intervene_batch(rm, run.input_ids, [[open_ended], [closed]], generate=5, run=run)
    assert r_open.generated_before == greedy(rm.model, run.input_ids, 5)  # unintervened = the model's own
    assert r_closed.generated_before == r_open.generated_before
    assert r_open.generated_after != r_open.generated_before
    assert r_open.generated_after[0] == r_closed.generated_after[0]  # same prompt-position intervention
    assert r_open.generated_after != r_closed.generated_after  # only the open-ended one reaches new tokens
    assert len(r_open.generated_after) == 5 and r_open.text_after is not None


# -- supernodes ---------------------------------------------------------------------------------------


def test_supernodes_roundtrip_and_expand(tmp_path: Path) -> None:
    nodes = {"say-x": Supernode("say-x", [(0, 3, 1), (1, 5, None)]), "other": Supernode("other", [[2, 2, 2]])}
    path = save_supernodes(tmp_path / "s.json", nodes)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary left behind
    loaded = load_supernodes(path)
    assert loaded["say-x"].members == [(0, 3, 1), (1, 5, None)] and loaded["other"].members == [(2, 2, 2)]
    specs = parse_intervention("say-x@4-=x0", loaded)
    assert specs == [Intervention(0, 3, None, 0.0, 1, 1), Intervention(1, 5, None, 0.0, 4, None)]
    (tmp_path / "ct.json").write_text(json.dumps({"qParams": {"supernodes": [["grp", "0_3_1", "1_5_1"]]}}))
    assert load_supernodes(tmp_path / "ct.json")["grp"].members == [(0, 3, 1), (1, 5, 1)]
    with pytest.raises(CltraceError, match="no supernode named 'nope'"):
        parse_intervention("nope=0", loaded)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CltraceError, match="cannot read supernodes file"):
        load_supernodes(tmp_path / "bad.json")


def test_supernode_intervention_equals_its_members() -> None:
    rm = case("gemma2", "clt")
    run = rm.run(prompt_ids())
    picks = active_features(run, 2)
    sn = Supernode("grp", [(picks[0][0], picks[0][1], picks[0][2]), (picks[1][0], picks[1][1], None)])
    via_name = intervene(rm, run.input_ids, parse_intervention("grp=x0", {"grp": sn}), run=run)
    direct = intervene(
        rm, run.input_ids,
        [Intervention.at(picks[0][0], picks[0][1], picks[0][2], factor=0.0), Intervention.at(*picks[1][:2], None, factor=0.0)],
        run=run,
    )
    assert max_diff(via_name.logits_after, direct.logits_after) == 0.0


def test_merge_supernodes_sums_edges() -> None:
    graph = hand_graph()
    merged = merge_supernodes(graph, [Supernode("ab", [(0, 3, 1), (1, 5, None)])])
    assert merged.n_nodes == graph.n_nodes - 1
    dense, old = merged.to_dense(), graph.to_dense()
    s = int((merged.nodes.extra["supernode"] == 0).nonzero()[0])
    assert merged.nodes.kind[s] == NodeKind.FEATURE and merged.nodes.activation[s] == pytest.approx(2.5)
    # old nodes 2..6 are new nodes 1..5; the members 0 and 1 are merged into s
    for t_old in range(2, 7):
        t_new = t_old - 1
        assert dense[t_new, s] == pytest.approx(float(old[t_old, 0] + old[t_old, 1]))  # out of the supernode
        assert dense[s, t_new] == pytest.approx(float(old[0, t_old] + old[1, t_old]))  # into it
    assert dense[s, s] == 0  # the edge between members is dropped
    assert merged.metadata["supernodes"] == [{"name": "ab", "node": s, "members": ["0_3_1", "1_5_1"]}]
    assert supernodes_to_qparams(graph, [Supernode("ab", [(0, 3, 1), (1, 5, None)]), Supernode("z", [(9, 9, 9)])]) == [
        ["ab", "0_3_1", "1_5_1"]
    ]
    assert supernodes_from_json({"qParams": {"supernodes": supernodes_to_qparams(graph, [Supernode("ab", [(1, 5, None)])])}})[
        "ab"
    ].members == [(1, 5, 1)]


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("5:3", "does not have the form"),
        ("5:3@2", "does not have the form"),
        ("a:3=1", "layer 'a'"),
        ("5:-3=1", "feature '-3'"),
        ("5:3@x=1", "position 'x'"),
        ("5:3@4-2=1", "empty"),
        ("5:3=abc", "value 'abc'"),
        ("5:3=xz", "factor 'z'"),
        ("5:3=nan", "not a finite number"),
        ("5:3@1=", "does not have the form"),
    ],
)
def test_malformed_set_is_one_clear_line(spec: str, needle: str) -> None:
    with pytest.raises(CltraceError) as info:
        parse_intervention(spec)
    message = str(info.value)
    assert "\n" not in message and needle in message and spec in message


def test_parse_forms() -> None:
    assert parse_intervention("5:3=0") == [Intervention(5, 3, 0.0)]
    assert parse_intervention(" 5:3@4 = x2.5 ") == [Intervention(5, 3, None, 2.5, 4, 4)]
    assert parse_intervention("5:3@2-7=-1e-3") == [Intervention(5, 3, -1e-3, None, 2, 7)]
    assert parse_intervention("5:3@2-=x0") == [Intervention(5, 3, None, 0.0, 2, None)]
    assert str(parse_intervention("5:3@2-=x0")[0]) == "5:3@2-=x0"


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("3:0=1", "layer 3 is out of range: the transcoder has layers 0..2"),
        ("1:24=1", "feature 24 is out of range: layer 1 has features 0..23"),
        ("1:2@9=1", "position 9 is beyond the prompt (9 tokens, positions 0..8)"),
        ("1:2@3-12=1", "position 12 is beyond the prompt"),
    ],
)
def test_out_of_range_is_one_clear_line(spec: str, needle: str) -> None:
    rm = case("llama", "clt")
    run = rm.run(prompt_ids())
    with pytest.raises(CltraceError) as info:
        intervene(rm, run.input_ids, parse_intervention(spec), run=run)
    assert "\n" not in str(info.value) and needle in str(info.value)
    with pytest.raises(CltraceError, match="layer range 2-5 is not within 0..2"):
        intervene(rm, run.input_ids, [], mode="constrained", layers=(2, 5), run=run)
    with pytest.raises(CltraceError, match="constrained mode only"):
        intervene(rm, run.input_ids, [], mode="iterative", layers=(0, 1), run=run)


# -- the command line, on the default model -----------------------------------------------------------

ACRONYM = "The National Digital Analytics Group (N"


def test_cli_intervene(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cltrace.transcoder import save_transcoder

    cfg = TranscoderConfig(kind="clt", n_layers=30, d_model=576, n_features=16, activation="jumprelu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    save_supernodes(tmp_path / "sn.json", [Supernode("grp", [(29, 1, None), (28, 2, None)])])

    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli("intervene", ACRONYM, "--transcoder", str(tmp_path / "clt"), *args, capsys=capsys)

    code, out, err = cli("--set", "29:3@5-=60", "--set", "grp=x2", "--supernodes", str(tmp_path / "sn.json"), "-g", "2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("SmolLM2-135M-Instruct") and "29:3@5-=60" in lines[1] and "29:1=x2" in lines[1]
    assert lines[3].split()[1] == "'DA'"  # before: the model's own top token
    assert any(line.startswith("continuation after:") for line in lines)
    # (positions beyond the prompt are checked through the Python API above: that check needs the
    # model loaded, which is the slow part here)
    for args, needle in [
        (("--set", "30:0=1"), "layer 30 is out of range"),
        (("--set", "29:16=1"), "feature 16 is out of range"),
        (("--set", "29:0@=1"), "malformed --set"),
        (("--set", "29-0=1"), "malformed --set"),
        (("--set", "grp=0"), "no supernode named 'grp'"),
    ]:
        code, out, err = cli(*args)
        errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and needle in errors[0], err
        assert "Traceback" not in err


# -- bad input: more cases, and the command line on a tiny model -----------------------------------


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: Intervention(1, 2, value=1.0, factor=2.0), "exactly one of value"),
        (lambda: Intervention(1, 2), "exactly one of value"),
        (lambda: Intervention.at(1, 2, -1, value=0.0), "position -1 is negative"),
        (lambda: Intervention.at(1, 2, (5, 3), value=0.0), "position range 5-3 is empty"),
        (lambda: Intervention(1, 2, None, 2.0, None, 4), "needs a start position"),
        (lambda: Intervention.at(1, 2, 3, factor=float("inf")), "not a finite number"),
    ],
)
def test_bad_intervention_in_python_is_one_clear_line(make, needle: str) -> None:
    with pytest.raises(CltraceError) as info:
        make()
    assert "\n" not in str(info.value) and needle in str(info.value)


def test_open_ended_range_starting_beyond_the_prompt_is_refused() -> None:
    rm = case("llama", "clt")
    run = rm.run(prompt_ids())  # 9 tokens
    with pytest.raises(CltraceError) as info:
        intervene_batch(rm, run.input_ids, [parse_intervention("1:2@3=0"), parse_intervention("1:2@9-=0")], run=run)
    message = str(info.value)
    assert "\n" not in message and "position 9 is beyond the prompt (9 tokens, positions 0..8)" in message


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny Llama saved as a model folder (character tokenizer) and a random CLT for it."""
    from helpers.models import char_tokenizer

    from cltrace.transcoder import save_transcoder

    root = tmp_path_factory.mktemp("intervene_cli")
    model = tiny_model("llama")
    model.model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    save_transcoder(random_transcoder(model, "clt"), root / "clt")
    return str(root / "model"), str(root / "clt")


def test_cli_bad_input_on_a_tiny_model(tiny_cli: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.cli import assert_one_line_error

    model_dir, clt_dir = tiny_cli
    tc = random_transcoder(tiny_model("llama"), "clt")
    n_layers, n_features = tc.n_layers, tc.n_features

    def cli(*sets: str) -> tuple[int, str, str]:
        args = [a for s in sets for a in ("--set", s)]
        return run_cli("intervene", "abcdef", "--transcoder", clt_dir, "--model", model_dir, *args, capsys=capsys)

    code, out, err = cli("1:2@3=0")
    assert code == 0, err
    n_prompt = int(out.split(" tokens:")[0].rsplit(" ", 1)[1])
    cases = [
        ((f"{n_layers}:0=1",), f"layer {n_layers} is out of range: the transcoder has layers 0..{n_layers - 1}"),
        ((f"1:{n_features}=1",), f"feature {n_features} is out of range"),
        ((f"1:2@{n_prompt}=0",), f"position {n_prompt} is beyond the prompt ({n_prompt} tokens"),
        ((f"1:2@1-{n_prompt + 3}=0",), "write 1- for a range that also covers generated tokens"),
        (("1:2@3=0", "1:2@@3=0"), "malformed --set '1:2@@3=0'"),
        (("1:2=",), "malformed --set"),
        (("1;2=0",), "malformed --set"),
        (("1:2=x",), "factor '' is not a number"),
    ]
    for sets, needle in cases:
        code, _, err = cli(*sets)
        assert_one_line_error(code, err, needle)


def test_cli_absurd_position_names_the_prompt_length(tiny_cli: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """A position past any prompt is refused with the prompt's real length, not the placeholder the
    command used for "length not known yet" (sys.maxsize) before the model was loaded."""
    from helpers.cli import assert_one_line_error

    model_dir, clt_dir = tiny_cli
    huge = "99999999999999999999"  # past sys.maxsize
    for spec in (f"1:2@{huge}=0", f"1:2@{huge}-=x2", f"1:2@1-{huge}=0"):
        code, _, err = run_cli("intervene", "abcdef", "--transcoder", clt_dir, "--model", model_dir, "--set", spec,
                               capsys=capsys)
        assert_one_line_error(code, err, f"position {huge} is beyond the prompt (", " tokens, positions 0..")
        assert str(sys.maxsize) not in err


@pytest.mark.parametrize(("family", "kind"), [("llama", "clt"), ("gemma3", "clt"), ("gpt2", "plt")])
def test_intervene_prompts_equals_each_prompt_alone(family: str, kind: str) -> None:
    """A batch of runs of different prompts, each with its own interventions, gives what
    `intervene` gives each prompt alone, in both modes (a soft-capped model and a PLT's skip included)."""
    model = tiny_model(family)
    rm = ReplacementModel(model, random_transcoder(model, kind))
    ids = torch.stack([prompt_ids(7, seed=s) for s in range(4)])  # [4, 7]
    run = rm.run_batch(ids)
    for b in range(4):
        alone = rm.run(ids[b])
        assert torch.allclose(run.activations[b], alone.activations, atol=1e-5)
        assert torch.allclose(run.logits[b], alone.logits, atol=1e-4)
    plans = [[Intervention.at(1, 3, 6, value=4.0)], [], [Intervention.at(0, 2, (2, 6), factor=3.0)],
             [Intervention.at(2, 5, 6, value=0.0), Intervention.at(0, 1, 4, value=2.5)]]
    for mode, frozen in (("iterative", False), ("constrained", True), ("iterative", True)):
        before, after = intervene_prompts(rm, run, plans, mode=mode, freeze_attention=frozen)
        for b in range(4):
            one = intervene(rm, ids[b], plans[b], mode=mode, freeze_attention=frozen)
            assert torch.allclose(before[b], one.logits_before, atol=1e-4), (mode, frozen, b)
            assert torch.allclose(after[b], one.logits_after, atol=1e-4), (mode, frozen, b)
        assert not torch.allclose(after[0], before[0], atol=1e-3)  # the interventions did something
    with pytest.raises(CltraceError, match="one plan per prompt"):
        intervene_prompts(rm, run, plans[:3])
