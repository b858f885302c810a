"""The circuit of a prompt: the few supernodes that carry most of a graph's effect on its target.

Every supernode gets its **signed effect** on the target: how much of the target's value (a logit
minus the vocabulary mean, or a logit difference) its members' outputs make through every path of
the graph, to first order, its own members held so that a path through two of them counts once
(`cltrace.graph.effects`). Positive pushes the target up: removing it should lower the target.

The circuit is the smallest set of supernodes, taken by decreasing |effect|, whose |effects| make up
`min_coverage` of all supernodes' (its **coverage**), at most `max_supernodes` of them: the strongest
pushing the target up and the strongest pushing it down. Beside it, the graph's own prediction of
what removing the circuit's up-pushing supernodes together does: the target's value drops by their
joint effect E (to first order, each path counted once), and its probability follows with the other
logits held, p' = p·e^−E / (1 − p + p·e^−E) (**predicted_drop** = 1 − p'/p). Its edges are signed and in
the target's units: edge A → B is the part of A's effect that reaches the target through B, B being
the first circuit supernode on the way (A's arrival at B's members through nodes outside the
circuit, times the target's sensitivity to B's members); edge A → out the part of A's effect whose
paths meet no other circuit supernode; edge token → A the part of the token embedding's effect that
goes through A first.

`Circuit.to_dict()` is the ``circuit.json`` format (docs/circuit.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cltrace.atomic import atomic_write_text
from cltrace.errors import CltraceError, load_json_file
from cltrace.graph.config import CircuitConfig
from cltrace.graph.effects import Sweeps
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.grouping import target_node
from cltrace.replacement.supernodes import Supernode

CIRCUIT_VERSION = 1
#: What a label callable returns for a feature: keys text, input_label, output_label, input_score,
#: output_score, output_tokens, unclear (any may be missing).
LabelInfo = Callable[[int, int], "Mapping[str, Any] | None"]

_DEFAULTS = CircuitConfig()


@dataclass
class CircuitNode:
    """One supernode of a circuit."""

    id: str
    """Stable: the supernode's name (a valid `Supernode` name, usable in ``--set ID=0``)."""
    name: str
    """What a person reads (editable; any text)."""
    members: list[tuple[int, int, int]]
    """(layer, feature, pos) of each member, the largest contribution to the supernode's effect first."""
    effect: float
    """Signed effect on the target, in the target's units (positive: pushes it up)."""
    activation: float = 0.0
    input_label: str = ""
    output_label: str = ""
    label_scores: dict[str, float | None] = field(default_factory=lambda: {"input": None, "output": None})
    unclear: bool = False
    output_tokens: list[str] = field(default_factory=list)
    """Tokens its label says it promotes (steered in validation)."""
    validation: dict[str, Any] | None = None

    @property
    def layers(self) -> list[int]:
        return sorted({m[0] for m in self.members})

    @property
    def pos(self) -> int:
        return max(m[2] for m in self.members)

    def supernode(self) -> Supernode:
        return Supernode(self.id, [(int(m[0]), int(m[1]), int(m[2])) for m in self.members])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "members": [f"{l}_{f}_{p}" for l, f, p in self.members],
            "layers": self.layers, "pos": self.pos, "activation": self.activation,
            "input_label": self.input_label, "output_label": self.output_label, "label_scores": dict(self.label_scores),
            "unclear": self.unclear, "output_tokens": list(self.output_tokens), "effect": self.effect,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CircuitNode:
        try:
            members = [_member(m) for m in d["members"]]
            node = cls(str(d["id"]), str(d.get("name") or d["id"]), members, float(d.get("effect") or 0.0),
                       float(d.get("activation") or 0.0), str(d.get("input_label") or ""), str(d.get("output_label") or ""),
                       dict(d.get("label_scores") or {"input": None, "output": None}), bool(d.get("unclear", False)),
                       [str(t) for t in d.get("output_tokens") or []], d.get("validation"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CltraceError(f"circuit supernode {dict(d).get('id', '?')!r} is malformed ({exc}); "
                               "it needs id, members ['layer_feature_pos', ...] and effect") from None
        node.supernode()  # the id must be a valid supernode name, with members
        return node


def _member(text: Any) -> tuple[int, int, int]:
    if isinstance(text, (list, tuple)) and len(text) == 3:
        return int(text[0]), int(text[1]), int(text[2])
    parts = str(text).split("_")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"member {text!r} is not 'layer_feature_pos'")
    return int(parts[0]), int(parts[1]), int(parts[2])


@dataclass
class Circuit:
    """A circuit: its supernodes, the tokens and output they connect, signed edges, validation."""

    prompt: str
    tokens: list[str]
    target: dict[str, Any]
    """label, tokens, coefs, probability (of its first token), value (its value in the graph)."""
    supernodes: list[CircuitNode]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    coverage: float
    """The share of all supernodes' summed |effect| that the circuit's make up."""
    n_candidates: int = 0
    """How many supernodes it was chosen from."""
    n_needed: int = 0
    """How many supernodes, taken by |effect|, reach min_coverage (more than the circuit holds where
    the cap cut it)."""
    predicted_drop: float | None = None
    """The share of the target's probability that removing the up-pushing supernodes takes away, as
    the graph predicts (see the module docstring)."""
    graph: str = "graph.safetensors"
    validation: dict[str, Any] | None = None

    def node(self, node_id: str) -> CircuitNode:
        for sn in self.supernodes:
            if sn.id == node_id:
                return sn
        raise CltraceError(f"the circuit has no supernode {node_id!r}")

    def as_supernodes(self) -> list[Supernode]:
        """Its supernodes as `Supernode`s (for a supernode file, interventions or `build_circuit`)."""
        return [sn.supernode() for sn in self.supernodes]

    def names(self) -> dict[str, str]:
        """id → the name a person reads."""
        return {sn.id: sn.name for sn in self.supernodes}

    def to_dict(self) -> dict[str, Any]:
        """The circuit.json form (docs/circuit.md)."""
        return {
            "version": CIRCUIT_VERSION, "prompt": self.prompt, "tokens": list(self.tokens), "target": dict(self.target),
            "graph": self.graph, "coverage": self.coverage, "n_candidates": self.n_candidates, "n_needed": self.n_needed,
            "predicted_drop": self.predicted_drop,
            "supernodes": [sn.to_dict() for sn in self.supernodes], "inputs": list(self.inputs),
            "outputs": list(self.outputs), "edges": list(self.edges), "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circuit:
        """A circuit from its circuit.json form; one-line CltraceError where it is malformed."""
        if not isinstance(d, Mapping):
            raise CltraceError("a circuit must be a JSON object")
        if int(d.get("version", CIRCUIT_VERSION)) > CIRCUIT_VERSION:
            raise CltraceError(f"circuit version {d.get('version')} is newer than this cltrace reads; upgrade cltrace")
        try:
            return cls(
                str(d.get("prompt") or ""), [str(t) for t in d.get("tokens") or []], dict(d["target"]),
                [CircuitNode.from_dict(s) for s in d["supernodes"]], list(d.get("inputs") or []),
                list(d.get("outputs") or []), list(d.get("edges") or []), float(d.get("coverage") or 0.0),
                int(d.get("n_candidates") or 0), int(d.get("n_needed") or 0), None if d.get("predicted_drop") is None else float(d["predicted_drop"]),
                str(d.get("graph") or "graph.safetensors"), d.get("validation"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CltraceError(f"circuit is malformed ({exc}); it needs target and supernodes") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write circuit.json atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n", what="circuit")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read circuit.json; one-line CltraceError where it is missing, unreadable or malformed."""
        return load_json_file(path, "circuit", "run `cltrace trace` or `cltrace circuit` first", cls.from_dict)


def member_nodes(graph: Graph, supernodes: Sequence[Supernode]) -> list[list[int]]:
    """For each supernode, the indices of its member feature nodes in `graph` (a member without a
    position: the feature at every position); a node claimed twice stays with the first supernode."""
    nodes = graph.nodes
    feats = (nodes.kind == int(NodeKind.FEATURE)).nonzero(as_tuple=True)[0].tolist()
    layer, feature, pos = nodes.layer.tolist(), nodes.feature.tolist(), nodes.pos.tolist()
    at = {(layer[i], feature[i], pos[i]): i for i in feats}
    anywhere: dict[tuple[int, int], list[int]] = {}
    for i in feats:
        anywhere.setdefault((layer[i], feature[i]), []).append(i)
    seen: set[int] = set()
    out = []
    for sn in supernodes:
        found: list[int] = []
        for l, f, p in sn.members:
            for i in ([at[(l, f, p)]] if (l, f, p) in at else []) if p is not None else anywhere.get((l, f), []):
                if i not in seen:
                    seen.add(i)
                    found.append(i)
        out.append(found)
    return out


def _target_info(graph: Graph, tnode: int, target: int) -> dict[str, Any]:
    meta = graph.metadata.get("targets")
    info = dict(meta[target]) if isinstance(meta, list) and target < len(meta) and isinstance(meta[target], dict) else {}
    info.setdefault("tokens", [int(graph.nodes.token[tnode])])
    info.setdefault("coefs", [1.0] * len(info["tokens"]))
    info.setdefault("label", str(info["tokens"][0]))
    info.setdefault("probability", float(graph.nodes.probability[tnode]))
    values = graph.metadata.get("target_value")
    if isinstance(values, list) and len(values) == graph.n_nodes:
        info["value"] = float(values[tnode])
    return info


def _label_fields(label_info: LabelInfo | None, members: list[tuple[int, int, int]]) -> dict[str, Any]:
    """The label fields of a supernode: those of its first member (members come strongest first)
    with a clear label, else of its first member with any."""
    if label_info is None:
        return {}
    infos = [d for d in (label_info(layer, feature) for layer, feature, _ in members) if d]
    if not infos:
        return {}
    clear = [d for d in infos if not d.get("unclear")]
    d = clear[0] if clear else infos[0]
    tokens: list[str] = []
    for other in infos[:3]:
        if not other.get("unclear"):
            tokens += [t for t in other.get("output_tokens") or [] if t not in tokens]
    return {
        "name": str(d.get("text") or ""), "input_label": str(d.get("input_label") or ""),
        "output_label": str(d.get("output_label") or ""),
        "label_scores": {"input": d.get("input_score"), "output": d.get("output_score")},
        "unclear": not clear, "output_tokens": tokens[:5],
    }


def _labelled(node: CircuitNode, label_info: LabelInfo | None, names: Mapping[str, str] | None,
              tokens: list[str]) -> CircuitNode:
    """`node` with its label fields from its members' labels and the name to show: a person's
    (`names`), else its label's, else its layers and position."""
    labels = _label_fields(label_info, node.members)
    node.name = (names or {}).get(node.id) or labels.pop("name", "") or _default_name(node.members, tokens)
    labels.pop("name", None)
    for key, value in labels.items():
        setattr(node, key, value)
    return node


def relabel(circuit: Circuit, label_info: LabelInfo, names: Mapping[str, str] | None = None) -> Circuit:
    """Refresh the label fields and shown names of `circuit`'s supernodes from `label_info` (after
    more labels were measured); names in `names` (id → name) are kept."""
    for node in circuit.supernodes:
        _labelled(node, label_info, names, circuit.tokens)
    return circuit


def _default_name(members: list[tuple[int, int, int]], tokens: list[str]) -> str:
    layers = sorted({m[0] for m in members})
    where = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
    p = max(m[2] for m in members)
    return f"{where} at {tokens[p]!r}" if 0 <= p < len(tokens) else f"{where} at pos {p}"


def build_circuit(
    graph: Graph,
    supernodes: Sequence[Supernode],
    *,
    max_supernodes: int = _DEFAULTS.max_supernodes,
    min_coverage: float = _DEFAULTS.min_coverage,
    core_share: float = _DEFAULTS.core_share,
    min_edge_share: float = _DEFAULTS.min_edge_share,
    max_token_edges: int = _DEFAULTS.max_token_edges,
    target: int = 0,
    names: Mapping[str, str] | None = None,
    label_info: LabelInfo | None = None,
    graph_file: str = "graph.safetensors",
) -> Circuit:
    """The circuit of `graph`'s `target`-th logit among `supernodes` (see the module docstring).

    The effects are computed on `graph` itself: pass the full graph for the most faithful ones (the
    supernodes usually come from its pruned version). `names` (supernode name → a name to show)
    keeps names a person gave; `label_info(layer, feature)` gives the members' labels, from which a
    supernode is named where `names` does not.
    """
    if max_supernodes < 1:
        raise CltraceError(f"max_supernodes must be at least 1, got {max_supernodes}")
    if not 0.0 <= min_coverage <= 1.0:
        raise CltraceError(f"min_coverage must be between 0 and 1, got {min_coverage}")
    if not 0.0 < core_share <= 1.0:
        raise CltraceError(f"core_share must be above 0 and at most 1, got {core_share}")
    sweeps = Sweeps(graph)
    tnode = target_node(graph, target)
    tokens = [str(t) for t in graph.metadata.get("tokens") or []]
    reserved = [sn.name for sn in supernodes if re.fullmatch(r"e\d+|out\d*", sn.name)]
    if reserved:
        raise CltraceError(f"supernode name {reserved[0]!r} is kept for the circuit's tokens and output; rename it")
    kept = [(sn, g) for sn, g in zip(supernodes, member_nodes(graph, supernodes)) if g]
    effects, sens = sweeps.joint_effects(tnode, [g for _, g in kept])  # [G], [node, G]
    info = _target_info(graph, tnode, target)
    chosen, coverage, n_needed = select(effects, max_supernodes, min_coverage)
    act = graph.nodes.activation.tolist()
    cores = [core_members(kept[i][1], [float(sens[m, i]) * act[m] for m in kept[i][1]], core_share) for i in chosen]
    core_effects, core_sens = sweeps.joint_effects(tnode, cores) if cores else (effects[:0], sens[:, :0])
    up = [m for c, g in enumerate(cores) if float(core_effects[c]) > 0 for m in g]
    predicted_drop = carried_share(float(info["probability"]), float(sweeps.joint_effects(tnode, [up])[0][0]))
    nodes = graph.nodes
    circuit_nodes = []
    for c, g in enumerate(cores):
        members = [(int(nodes.layer[m]), int(nodes.feature[m]), int(nodes.pos[m])) for m in g]
        node = CircuitNode(kept[chosen[c]][0].name, "", members, float(core_effects[c]), float(sum(act[m] for m in g)))
        circuit_nodes.append(_labelled(node, label_info, names, tokens))
    edges, inputs = _circuit_edges(graph, sweeps, tnode, cores, core_sens,
                                   [sn.id for sn in circuit_nodes], min_edge_share, max_token_edges, tokens)
    return Circuit(
        str(graph.metadata.get("prompt") or ""), tokens, info, circuit_nodes, inputs,
        [{"id": "out", "label": str(info.get("label", ""))}], edges, coverage, len(kept), n_needed, predicted_drop,
        graph_file,
    )


def core_members(members: Sequence[int], contributions: Sequence[float], core_share: float) -> list[int]:
    """The strongest of `members` (by |contribution| to their group's joint effect, the largest
    first) that make up `core_share` of their summed |contribution|: the group's core."""
    order = sorted(range(len(members)), key=lambda j: -abs(contributions[j]))
    total = sum(abs(c) for c in contributions)
    core: list[int] = []
    running = 0.0
    for j in order:
        if core and running >= core_share * total - 1e-12:
            break
        core.append(members[j])
        running += abs(contributions[j])
    return core


def carried_share(p: float, effect: float) -> float:
    """1 − p'/p: the share of probability `p` lost when the target's value drops by `effect`, the
    other logits held (p' = p·e^−E / (1 − p + p·e^−E))."""
    if p <= 0:
        return 0.0
    kept = math.exp(-min(effect, 700.0))
    return 1.0 - kept / (1.0 - p + p * kept)


def select(effects: torch.Tensor, max_supernodes: int, min_coverage: float) -> tuple[list[int], float, int]:
    """(chosen indices, their share of the summed |effects|, how many reach min_coverage): the
    supernodes by decreasing |effect| (those with none left out), at most max_supernodes."""
    size = effects.abs()
    order = torch.argsort(size, descending=True, stable=True)
    order = order[size[order] > 0]
    total = float(size.sum())
    if not len(order) or total <= 0:
        return [], 0.0, 0
    share = torch.cumsum(size[order], 0) / total
    n_needed = min(int(torch.searchsorted(share, torch.tensor([min_coverage - 1e-12], dtype=share.dtype))) + 1, len(order))
    k = min(n_needed, max_supernodes)
    return order[:k].tolist(), float(share[k - 1]), n_needed


def _circuit_edges(graph: Graph, sweeps: Sweeps, tnode: int, groups: list[list[int]], sens: torch.Tensor,
                   ids: list[str], min_edge_share: float, max_token_edges: int, tokens: list[str]
                   ) -> tuple[list[dict], list[dict]]:
    """(edges, input nodes) of a circuit whose supernodes have members `groups` and sensitivities
    `sens` [node, k] (each with its own members held); see the module docstring."""
    k, n = len(groups), graph.n_nodes
    in_circuit = sweeps.membership(groups).any(1)  # [node]
    seed = torch.zeros(n, 1, dtype=torch.float64)
    seed[tnode] = 1.0
    direct = sweeps.backward(seed, in_circuit[:, None])[:, 0]  # [node] effects avoiding the circuit
    emb = (graph.nodes.kind == int(NodeKind.EMBEDDING)).nonzero(as_tuple=True)[0].tolist()
    inject = torch.zeros(n, k + len(emb), dtype=torch.float64)
    for c, g in enumerate(groups):
        inject[g, c] = 1.0
    for j, e in enumerate(emb):
        inject[e, k + j] = 1.0
    arrival = sweeps.forward(inject, in_circuit[:, None].expand(n, k + len(emb)))  # [node, sources]
    raw: list[tuple[str, str, float]] = []
    sources = ids + [f"e{int(graph.nodes.pos[e])}" for e in emb]
    for b, g in enumerate(groups):
        flows = (arrival[g] * sens[g, b : b + 1]).sum(0)  # [sources] into b, through b to the target
        raw += [(sources[c], ids[b], float(flows[c])) for c in range(k) if c != b and float(flows[c]) != 0]
        from_tokens = sorted(range(k, len(sources)), key=lambda c: -abs(float(flows[c])))[:max_token_edges]
        raw += [(sources[c], ids[b], float(flows[c])) for c in from_tokens if float(flows[c]) != 0]
        raw.append((ids[b], "out", float(direct[g].sum())))
    biggest = max((abs(w) for _, _, w in raw), default=0.0)
    edges = [{"source": s, "target": t, "weight": w} for s, t, w in raw if biggest > 0 and abs(w) >= min_edge_share * biggest]
    input_ids = set(sources[k:])
    used = sorted({int(str(e["source"])[1:]) for e in edges if e["source"] in input_ids})
    inputs = [{"id": f"e{p}", "token": tokens[p] if 0 <= p < len(tokens) else "", "pos": p} for p in used]
    return edges, inputs


__all__ = ["CIRCUIT_VERSION", "Circuit", "CircuitNode", "LabelInfo", "build_circuit", "carried_share", "core_members", "member_nodes",
           "relabel", "select"]
