"""Signed effects, automatic supernodes and the circuit, against slow naive computations and graphs
whose answer is known by construction."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers.circuits import random_graph, role_graph, simulate

from cltrace.errors import CltraceError
from cltrace.graph.circuit import Circuit, build_circuit, core_members, member_nodes
from cltrace.graph.circuit_plot import plot_circuit
from cltrace.graph.effects import Sweeps
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.grouping import agglomerate, group_features, group_name, slug
from cltrace.replacement.supernodes import Supernode, load_supernodes, save_supernodes

F, E, T, L = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT


def test_effects_match_removing_nodes_in_a_naive_simulation() -> None:
    for seed in range(4):
        g = random_graph(seed)
        target = g.n_nodes - 1
        sweeps = Sweeps(g)
        before = simulate(g, set())[target]
        single = sweeps.effects(target)
        for i in range(g.n_nodes - 1):
            assert float(single[i]) == pytest.approx(before - simulate(g, {i})[target], abs=1e-9)
        rng = random.Random(seed)
        feats = [i for i in range(g.n_nodes) if int(g.nodes.kind[i]) == F]
        groups = [rng.sample(feats, k) for k in (2, 3, 5)]
        joint, _ = sweeps.joint_effects(target, groups)
        for group, effect in zip(groups, joint.tolist()):
            assert effect == pytest.approx(before - simulate(g, set(group))[target], abs=1e-9)
        # forward: what removing a group takes from each node, the frozen nodes relaying nothing
        frozen = set(groups[1])
        inject = torch.zeros(g.n_nodes, 1, dtype=torch.float64)
        inject[groups[0], 0] = 1.0
        held = torch.zeros(g.n_nodes, 1, dtype=torch.bool)
        held[list(frozen), 0] = True
        arrival = sweeps.forward(inject, held)[:, 0]
        gone = simulate(g, set(groups[0]), frozen - set(groups[0]))
        full = simulate(g, set())
        for i in feats + [target]:
            if i not in groups[0]:
                assert float(arrival[i]) == pytest.approx(full[i] - gone[i], abs=1e-9)


def test_sweeps_refuse_a_graph_that_is_not_layered() -> None:
    g = random_graph(0)
    f0 = 0  # a layer-0 feature
    bad = Graph.from_edges(g.nodes, [(f0, f0 + 1, 1.0)], g.metadata)  # layer 0 -> layer 0
    with pytest.raises(CltraceError, match="higher layer"):
        Sweeps(bad)


def test_grouping_finds_the_roles_of_a_hand_built_graph() -> None:
    g, roles = role_graph()
    labels = {(1, 1): "digit", (2, 2): None, (5, 3): "says X", (6, 4): "says X too"}
    groups = group_features(g, label_of=lambda l, f: labels.get((l, f)), threshold=0.5, max_layer_gap=3)
    got = sorted(sorted(i for i in member_nodes(g, [sn])[0]) for sn in groups)
    assert got == sorted(sorted(v) for v in roles.values())
    by_members = {tuple(sorted(member_nodes(g, [sn])[0])): sn.name for sn in groups}
    assert by_members[(2, 3)] == "says_X.p2"  # named after its member with the larger effect
    assert by_members[(0, 1)] == "digit.p2"
    assert by_members[(4,)] == "L6.p2"  # no label: its layers
    # with no layer gap allowed the detectors (layers 1, 2) still merge, the say features (5, 6) too
    tight = group_features(g, threshold=0.5, max_layer_gap=1)
    assert len(tight) == len(groups)
    # a threshold above every similarity keeps each feature alone
    assert len(group_features(g, threshold=1.01)) == 7


def test_agglomerate_keeps_opposite_effects_and_far_layers_apart() -> None:
    sim = torch.ones(3, 3)
    assert agglomerate(sim, torch.tensor([1, 2, 3]), torch.tensor([1.0, 1.0, 1.0]), 0.5, 3) == [[0, 1, 2]]
    assert sorted(agglomerate(sim, torch.tensor([1, 2, 3]), torch.tensor([1.0, -1.0, 1.0]), 0.5, 3)) == [[0, 2], [1]]
    # members, not sums: +3 and -1 would sum positive, yet never share a supernode
    assert sorted(agglomerate(sim[:2, :2], torch.tensor([1, 2]), torch.tensor([3.0, -1.0]), 0.5, 3)) == [[0], [1]]
    assert sorted(agglomerate(sim, torch.tensor([1, 2, 9]), torch.tensor([1.0, 1.0, 1.0]), 0.5, 3)) == [[0, 1], [2]]
    # average linkage: the pair at 0.9 merges, then the third joins only if its mean similarity passes
    sim = torch.tensor([[1, 0.9, 0.6], [0.9, 1, 0.2], [0.6, 0.2, 1]])
    assert sorted(agglomerate(sim, torch.zeros(3), torch.ones(3), 0.5, 3)) == [[0, 1], [2]]
    assert sorted(agglomerate(sim, torch.zeros(3), torch.ones(3), 0.35, 3)) == [[0, 1, 2]]


def test_names_are_valid_supernode_names() -> None:
    assert slug("'(' before an acronym → says 'DA'") == "before_an_acronym_says_DA"
    assert group_name([(3, 1, 4)], "7 wonders") == "L3_7_wonders.p4"
    assert group_name([(3, 1, 4), (5, 2, 4)]) == "L3-5.p4"
    Supernode(group_name([(3, 1, 4)], "«»"), [(3, 1, 4)])  # no word left: still a valid name


def naive_effect(g: Graph, members: list[int]) -> float:
    target = g.n_nodes - 1
    return simulate(g, set())[target] - simulate(g, set(members))[target]


def test_circuit_takes_the_supernodes_with_the_largest_signed_effects() -> None:
    g, roles = role_graph(scale=0.25)
    sns = [Supernode(name, [(int(g.nodes.layer[i]), int(g.nodes.feature[i]), int(g.nodes.pos[i])) for i in members])
           for name, members in roles.items()]
    effects = {name: naive_effect(g, members) for name, members in roles.items()}
    assert effects["inh"] < 0 < effects["say"]
    order = sorted(effects, key=lambda k: -abs(effects[k]))
    total = sum(abs(v) for v in effects.values())
    share = [sum(abs(effects[k]) for k in order[: i + 1]) / total for i in range(len(order))]
    for coverage in (0.3, 0.6, 0.9, 1.0):
        c = build_circuit(g, sns, min_coverage=coverage, max_supernodes=12)
        n = next(i + 1 for i, s in enumerate(share) if s >= coverage - 1e-12)
        assert [sn.id for sn in c.supernodes] == order[:n] and c.n_needed == n
        assert c.coverage == pytest.approx(share[n - 1])
        for sn in c.supernodes:
            assert sn.effect == pytest.approx(effects[sn.id], abs=1e-9)
        # the graph's prediction: remove the up-pushing supernodes together, shift the logit, softmax
        drop = naive_effect(g, [i for k in order[:n] if effects[k] > 0 for i in roles[k]])
        p = 0.6
        assert c.predicted_drop == pytest.approx(1 - math.exp(-drop) / (1 - p + p * math.exp(-drop)))
    capped = build_circuit(g, sns, min_coverage=1.0, max_supernodes=2)
    assert len(capped.supernodes) == 2 and capped.n_needed == 5 and capped.n_candidates == 5


def test_a_circuit_supernode_keeps_its_core_members() -> None:
    """With core_share < 1 each supernode keeps its strongest members, by contribution to its joint
    effect, up to that share of the summed contribution; its effect is then the core's own."""
    assert core_members([5, 6, 7], [0.1, -0.6, 0.3], 0.5) == [6]
    assert core_members([5, 6, 7], [0.1, -0.6, 0.3], 0.7) == [6, 7]
    assert core_members([5, 6, 7], [0.1, -0.6, 0.3], 1.0) == [6, 7, 5]
    g, roles = role_graph()
    sns = [Supernode(name, [(int(g.nodes.layer[i]), int(g.nodes.feature[i]), int(g.nodes.pos[i])) for i in members])
           for name, members in roles.items()]
    full = build_circuit(g, sns, min_coverage=1.0)
    cored = build_circuit(g, sns, min_coverage=1.0, core_share=0.5)
    assert [sn.id for sn in cored.supernodes] == [sn.id for sn in full.supernodes]  # chosen on whole supernodes
    index = {(int(g.nodes.layer[i]), int(g.nodes.feature[i]), int(g.nodes.pos[i])): i for i in range(g.n_nodes)}
    for whole, core in zip(full.supernodes, cored.supernodes):
        assert set(core.members) <= set(whole.members) and core.members == whole.members[: len(core.members)]
        assert core.effect == pytest.approx(naive_effect(g, [index[m] for m in core.members]), abs=1e-9)
    assert len(cored.node("det").members) == 1 and len(cored.node("say").members) == 1
    with pytest.raises(CltraceError, match="core_share"):
        build_circuit(g, sns, core_share=0.0)


def test_circuit_edges_carry_each_supernode_effect_to_the_target() -> None:
    g, roles = role_graph()
    sns = [Supernode(name, [(int(g.nodes.layer[i]), int(g.nodes.feature[i]), int(g.nodes.pos[i])) for i in members])
           for name, members in roles.items()]
    c = build_circuit(g, sns, min_coverage=1.0, min_edge_share=0.0, max_token_edges=10)
    w = {(e["source"], e["target"]): e["weight"] for e in c.edges}
    effect = {sn.id: sn.effect for sn in c.supernodes}
    # every path from det goes through say or far: its effect splits between those two edges, none direct
    assert w[("det", "say")] + w[("det", "far")] == pytest.approx(effect["det"])
    assert ("det", "out") not in w or w[("det", "out")] == pytest.approx(0.0, abs=1e-12)
    assert w[("say", "out")] == pytest.approx(effect["say"])
    assert w[("inh", "out")] == pytest.approx(effect["inh"]) and w[("inh", "out")] < 0
    # token 2's path through the detectors: its part of det's effect; through say directly, its edges' part
    assert w[("e2", "det")] == pytest.approx(naive_effect_of_token(g, 10, through=roles["det"]))
    assert {i["id"] for i in c.inputs} >= {"e1", "e2"} and c.outputs == [{"id": "out", "label": "X"}]


def naive_effect_of_token(g: Graph, token: int, through: list[int]) -> float:
    """What a token's embedding makes of the target through `through` first: its arrival at those
    nodes (everything relaying), times the target's sensitivity to them."""
    target = g.n_nodes - 1
    full = simulate(g, set())
    without = simulate(g, {token}, frozen=set())
    total = 0.0
    for m in through:
        delta = full[m] - without[m]  # the token's share of m's value
        total += delta * (full[target] - simulate(g, {m}, set(through) - {m})[target]) / float(g.nodes.activation[m])
    return total


def test_circuit_json_round_trips_and_refuses_bad_input(tmp_path: Path) -> None:
    g, roles = role_graph()
    sns = group_features(g)
    c = build_circuit(g, sns, label_info=lambda l, f: {"text": f"feature {l}:{f}", "output_tokens": ["X"],
                                                     "input_score": 0.8, "output_score": None, "unclear": False})
    path = c.save(tmp_path / "circuit.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["target"]["label"] == "X"
    assert set(data["supernodes"][0]) >= {"id", "name", "members", "layers", "pos", "activation", "input_label",
                                         "output_label", "label_scores", "unclear", "effect", "validation"}
    assert all(isinstance(m, str) and m.count("_") == 2 for s in data["supernodes"] for m in s["members"])
    assert Circuit.load(path).to_dict() == c.to_dict()
    assert c.supernodes[0].name.startswith("feature ")
    assert [s.members for s in Circuit.load(path).as_supernodes()] == [sn.members for sn in c.supernodes]
    data["supernodes"][0]["members"] = ["12_x_3"]
    path.write_text(json.dumps(data))
    with pytest.raises(CltraceError, match="malformed"):
        Circuit.load(path)
    with pytest.raises(CltraceError, match="does not exist"):
        Circuit.load(tmp_path / "nope.json")
    with pytest.raises(CltraceError, match="kept for the circuit"):
        build_circuit(g, [Supernode("e2", [(1, 1, 2)])])


def test_supernode_file_keeps_the_groups_and_the_picture_is_drawn(tmp_path: Path) -> None:
    g, _ = role_graph()
    sns = group_features(g)
    save_supernodes(tmp_path / "s.json", sns)
    assert [s.members for s in load_supernodes(tmp_path / "s.json").values()] == [s.members for s in sns]
    c = build_circuit(g, sns)
    out = plot_circuit(c, tmp_path / "c.png", n_layers=16)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
