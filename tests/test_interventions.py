"""Interventions, each checked against an independent ground truth on tiny models of several families.

* setting a feature to its current value changes nothing;
* iterative mode equals a layer-by-layer recomputation written out here (frozen attention through
  ReplacementModel.frozen, free attention through hooks on the plain model);
* a constrained intervention over all layers with frozen attention changes the logits exactly as
  the first-order computation frozen(slots + Δ decoder output) − frozen(slots) says, and as the
  attribution graph's edges predict;
* batched equals one at a time, and a batch of prompts equals each prompt alone; open-ended
  interventions carry through generation.

The --set syntax, supernodes and bad input are test_interventions_input.py's.
"""

from __future__ import annotations

import pytest
import torch
from helpers.interventions import active_features, case, hand_graph, max_diff, random_transcoder
from helpers.models import prompt_ids, tiny_model

from cltrace.errors import CltraceError
from cltrace.graph.graph import NodeKind
from cltrace.graph.predict import compare_with_graph, predict_effects
from cltrace.replacement import ReplacementModel
from cltrace.replacement.interventions import Intervention, intervene, intervene_batch, intervene_prompts

CASES = [("llama", "clt"), ("qwen3", "clt"), ("gemma2", "clt"), ("gemma3", "clt"), ("gpt2", "clt"), ("gpt2", "plt")]
CASE_IDS = [f"{f}-{k}" for f, k in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def rm(request: pytest.FixtureRequest) -> ReplacementModel:
    return case(*request.param)


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
