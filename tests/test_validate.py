"""Validating a circuit: its numbers against interventions run directly, and the trace that writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.models import char_tokenizer, tiny_model

from cltrace.graph.attribution import attribute
from cltrace.graph.circuit import Circuit, build_circuit
from cltrace.graph.config import AttributionConfig
from cltrace.graph.graph import Graph
from cltrace.graph.grouping import group_features
from cltrace.graph.prune import prune
from cltrace.graph.validate import matched_random, pearson, validate_circuit
from cltrace.replacement import ReplacementModel
from cltrace.replacement.intervention import Intervention
from cltrace.replacement.interventions import intervene
from cltrace.trace.run import trace_prompt
from cltrace.transcoder import Transcoder, TranscoderConfig

PROMPT = "Digital Analytics (N"


@pytest.fixture(scope="module")
def traced() -> tuple[ReplacementModel, Graph, Circuit]:
    loaded = tiny_model("llama")
    loaded.tokenizer = char_tokenizer()
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 16), seed=1)
    rm = ReplacementModel(loaded, tc)
    graph = attribute(rm, PROMPT, targets=["=", "("], config=AttributionConfig(progress=False, max_memory_bytes=2 << 30))
    pruned, _ = prune(graph, node_threshold=0.95)
    circuit = build_circuit(graph, group_features(pruned), max_supernodes=4, min_coverage=1.0,
                            label_info=lambda l, f: {"text": f"f{l}.{f}", "output_tokens": ["=", "zz"]})
    validate_circuit(rm, graph, circuit, n_random=3, seed=5, steer_factor=2.0)
    return rm, graph, circuit


def p_and_value(res, tokens: list[int]) -> tuple[float, float]:
    p = float(res.logits_after.float().softmax(-1)[tokens[0]])
    raw = res.raw_logits_after.double()
    return p, float(raw[tokens[0]] - raw.mean())


def test_supernode_ablations_match_direct_interventions(traced) -> None:
    rm, graph, circuit = traced
    assert len(circuit.supernodes) >= 2
    tokens = circuit.target["tokens"]
    ids = torch.tensor(graph.metadata["input_ids"])
    p0 = float(torch.softmax(rm.run(ids).logits[-1].float(), -1)[tokens[0]])
    for sn in circuit.supernodes:
        ivs = [Intervention.at(l, f, p, value=0.0) for l, f, p in sn.members]
        real = intervene(rm, ids, ivs, mode="iterative", freeze_attention=False)
        frozen = intervene(rm, ids, ivs, mode="iterative", freeze_attention=True)
        abl = sn.validation["ablate"]
        (p_real, v_real), (p_frozen, v_frozen) = p_and_value(real, tokens), p_and_value(frozen, tokens)
        assert abl["p_before"] == pytest.approx(p0, rel=1e-5)
        assert abl["p_after"] == pytest.approx(p_real, rel=1e-5, abs=1e-7)
        assert abl["actual"] == pytest.approx(p_real - p0, abs=1e-6)
        assert abl["predicted"] == pytest.approx(p_frozen - p0, abs=1e-6)
        v_real_before = float(real.raw_logits_before[tokens[0]]) - float(real.raw_logits_before.mean())
        v_frozen_before = float(frozen.raw_logits_before[tokens[0]]) - float(frozen.raw_logits_before.mean())
        assert abl["value_actual"] == pytest.approx(v_real - v_real_before, abs=1e-4)
        assert abl["value_predicted"] == pytest.approx(v_frozen - v_frozen_before, abs=1e-4)
        assert abl["value_graph"] == -sn.effect
        # the graph's linear prediction is the frozen model's to first order: same sign on this small change
        steer = sn.validation["steer"]
        assert steer["tokens"] == ["="]  # "zz" is two tokens: not steered
        boosted = intervene(rm, ids, [Intervention.at(l, f, p, factor=2.0) for l, f, p in sn.members])
        eq = tokens[0]
        change = float(boosted.raw_logits_after[eq] - boosted.raw_logits_after.mean()) - float(
            boosted.raw_logits_before[eq] - boosted.raw_logits_before.mean())
        assert steer["logit_change"] == pytest.approx(change, abs=1e-4) and steer["passed"] == (change > 0)


def test_circuit_and_random_ablations_match_direct_interventions(traced) -> None:
    rm, graph, circuit = traced
    v = circuit.validation
    tokens = circuit.target["tokens"]
    ids = torch.tensor(graph.metadata["input_ids"])
    members = [m for sn in circuit.supernodes for m in sn.members]
    up = [m for sn in circuit.supernodes if sn.effect > 0 for m in sn.members]
    assert 0 < len(up) < len(members)  # the test sees supernodes of both signs
    whole = intervene(rm, ids, [Intervention.at(l, f, p, value=0.0) for l, f, p in members])
    p_whole, _ = p_and_value(whole, tokens)
    assert v["whole_circuit_ablation"]["p_after"] == pytest.approx(p_whole, rel=1e-5, abs=1e-7)
    part = intervene(rm, ids, [Intervention.at(l, f, p, value=0.0) for l, f, p in up])
    p_part, _ = p_and_value(part, tokens)
    c = v["circuit_ablation"]
    assert c["p_after"] == pytest.approx(p_part, rel=1e-5, abs=1e-7) and c["n_features"] == len(up)
    assert c["relative_drop"] == pytest.approx((c["p_before"] - p_part) / c["p_before"], rel=1e-4, abs=1e-7)
    run = rm.run(ids)
    gen = torch.Generator().manual_seed(5)
    r = v["random_ablation"]
    assert r["draws"] == 3 and r["n_features"] == len(up)
    drops = []
    for d in range(3):
        picks = matched_random(run, up, gen, exclude=members)
        assert len(picks) == len(up) and not set(picks) & set(members) and all(p >= 1 for _, _, p in picks)
        res = intervene(rm, ids, [Intervention.at(l, f, p, value=0.0) for l, f, p in picks])
        p_after, _ = p_and_value(res, tokens)
        assert r["p_after"][d] == pytest.approx(p_after, rel=1e-5, abs=1e-7)
        drops.append((c["p_before"] - p_after) / c["p_before"])
    assert r["relative_drop_mean"] == pytest.approx(sum(drops) / 3, rel=1e-4, abs=1e-7)
    expected_ratio = c["relative_drop"] / r["relative_drop_mean"] if r["relative_drop_mean"] > 0 else None
    assert v["ratio"] == (pytest.approx(expected_ratio) if expected_ratio is not None else None)
    abl = [sn.validation["ablate"] for sn in circuit.supernodes]
    assert v["pearson_r"] == pearson([a["predicted"] for a in abl], [a["actual"] for a in abl])


def test_matched_random_features_have_near_activations() -> None:
    loaded = tiny_model("llama")
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 16), seed=1)
    rm = ReplacementModel(loaded, tc)
    run = rm.run(torch.arange(1, 12))
    pos, layer, feat = (run.activations[1:] != 0).nonzero(as_tuple=True)
    acts = sorted(float(a) for a in run.activations[1:][pos, layer, feat])
    members = [(int(layer[0]), int(feat[0]), int(pos[0]) + 1)]
    a = float(run.activations[members[0][2], members[0][0], members[0][1]])
    picks = matched_random(run, members, torch.Generator().manual_seed(0))
    got = float(run.activations[picks[0][2], picks[0][0], picks[0][1]])
    others = sorted(abs(x - a) for x in acts)
    assert abs(got - a) <= others[3] + 1e-9  # among the 3 nearest besides the member itself


def test_pearson_against_the_formula() -> None:
    x, y = [1.0, 2.0, 4.0, 7.0], [2.0, 1.0, 5.0, 9.0]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    want = cov / (sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5
    assert pearson(x, y) == pytest.approx(want)
    assert pearson([1.0, 2.0], [3.0, 4.0]) is None and pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_trace_writes_the_circuit_first(tmp_path: Path) -> None:
    loaded = tiny_model("llama")
    loaded.tokenizer = char_tokenizer()
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 8), seed=1)
    rm = ReplacementModel(loaded, tc)
    result = trace_prompt(rm, PROMPT, tmp_path, progress=False)
    data = json.loads((tmp_path / "circuit.json").read_text())
    assert data["supernodes"] and data["validation"]["circuit_ablation"]["p_before"] > 0
    assert (tmp_path / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "supernodes.json").is_file()
    saved = Graph.load(tmp_path / "graph.safetensors")
    assert saved.metadata["circuit"]["validation"] == data["validation"]
    text = (tmp_path / "report.txt").read_text()
    assert text.index("circuit for") < text.index("paths to")
    assert data["supernodes"][0]["id"] in text and result.circuit.circuit.to_dict() == data
