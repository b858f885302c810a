"""A traced prompt's circuit: automatic supernodes, the circuit, its validation, files and text.

`find_circuit` groups the pruned graph's features into supernodes (named from the feature labels),
chooses the circuit by signed effects computed on the full graph, and validates it by intervening;
`write_circuit` puts ``circuit.json``, ``circuit.png`` and ``supernodes.json`` in the trace folder;
`format_circuit` is the text `cltrace trace` prints first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cltrace.graph.circuit import Circuit, build_circuit, relabel
from cltrace.graph.circuit_plot import CIRCUIT_PICTURE, circuit_title, plot_circuit, validation_text
from cltrace.graph.config import CircuitConfig, GroupingConfig, ValidationConfig
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.grouping import group_features
from cltrace.graph.prune import prune_masks
from cltrace.graph.validate import validate_circuit
from cltrace.replacement import ReplacementModel
from cltrace.replacement.supernodes import Supernode, save_supernodes
from cltrace.trace.labels import Labels

CIRCUIT_FILE = "circuit.json"
SUPERNODES_FILE = "supernodes.json"


@dataclass
class CircuitResult:
    """What `find_circuit` made, and how long each step took (seconds)."""

    supernodes: list[Supernode]
    circuit: Circuit
    timing: dict[str, float] = field(default_factory=dict)


def find_circuit(
    replacement: ReplacementModel | None,
    graph: Graph,
    labels: Labels | None = None,
    *,
    grouping: GroupingConfig | None = None,
    config: CircuitConfig | None = None,
    validation: ValidationConfig | None = None,
    supernodes: list[Supernode] | None = None,
    names: dict[str, str] | None = None,
    target: int = 0,
    influence: torch.Tensor | None = None,
) -> CircuitResult:
    """Supernodes of `graph` pruned to `grouping.node_threshold` (or the given `supernodes`), the
    circuit among them with effects on `graph` itself, validated on `replacement` (None: not validated).

    `influence` [node]: `graph`'s node influence where a pruning already computed it."""
    grouping, config, validation = grouping or GroupingConfig(), config or CircuitConfig(), validation or ValidationConfig()
    labels = labels or Labels()
    timing: dict[str, float] = {}
    t = time.perf_counter()
    if supernodes is None:
        node_mask, edge_mask, _ = prune_masks(graph, node_threshold=grouping.node_threshold, influence=influence)
        candidates = graph.subgraph(node_mask, edge_mask)
        nodes = candidates.nodes
        feats = (nodes.kind == int(NodeKind.FEATURE)).nonzero(as_tuple=True)[0]
        labels.load(zip(nodes.layer[feats].tolist(), nodes.feature[feats].tolist()))
        supernodes = group_features(candidates, label_of=labels.text, max_layer_gap=grouping.max_layer_gap,
                                    threshold=grouping.threshold, output_weight=grouping.output_weight, target=target)
    else:
        labels.load((l, f) for sn in supernodes for l, f, _ in sn.members)
    timing["supernodes_s"] = time.perf_counter() - t
    t = time.perf_counter()
    circuit = build_circuit(graph, supernodes, max_supernodes=config.max_supernodes, min_coverage=config.min_coverage,
                            core_share=config.core_share,
                            min_edge_share=config.min_edge_share, max_token_edges=config.max_token_edges, target=target,
                            names=names, label_info=labels.info)
    timing["circuit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if replacement is not None and config.label_members > 0:
        leads = [m[:2] for sn in circuit.supernodes for m in sn.members[: config.label_members]]
        if labels.measure_outputs(replacement, leads):
            relabel(circuit, labels.info, names)
    timing["output_labels_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if replacement is not None and circuit.supernodes:
        validate_circuit(replacement, graph, circuit, n_random=validation.n_random, seed=validation.seed,
                         steer_factor=validation.steer_factor)
    timing["validation_s"] = time.perf_counter() - t
    return CircuitResult(supernodes, circuit, timing)


def circuit_metadata(circuit: Circuit) -> dict[str, Any]:
    """What a graph's metadata keeps of its circuit (``metadata["circuit"]``)."""
    return {
        "file": CIRCUIT_FILE, "coverage": circuit.coverage, "n_candidates": circuit.n_candidates,
        "n_needed": circuit.n_needed, "target": circuit.target.get("label"),
        "supernodes": [{"id": sn.id, "name": sn.name, "effect": sn.effect, "members": sn.to_dict()["members"],
                        "validation": sn.validation} for sn in circuit.supernodes],
        "validation": circuit.validation,
    }


def write_circuit(folder: Path, result: CircuitResult, n_layers: int) -> list[Path]:
    """Write circuit.json, circuit.png and supernodes.json into `folder`; the paths written."""
    circuit = result.circuit
    paths = [circuit.save(folder / CIRCUIT_FILE), save_supernodes(folder / SUPERNODES_FILE, result.supernodes)]
    paths.insert(1, plot_circuit(circuit, folder / CIRCUIT_PICTURE, n_layers, title=circuit_title(circuit)))
    return paths


def _token(circuit: Circuit, pos: int) -> str:
    return repr(circuit.tokens[pos]) if 0 <= pos < len(circuit.tokens) else f"pos {pos}"


def format_circuit(circuit: Circuit) -> str:
    """The circuit as terminal text: each supernode with its labels, effect and validation, then the
    circuit's own validation."""
    p = circuit.target.get("probability")
    head = f"circuit for {circuit.target.get('label', '')!r}" + (f" (p {p:.2f})" if isinstance(p, (int, float)) else "")
    lines = [f"{head}: " + validation_text(circuit).split("\n")[0]]
    if not circuit.supernodes:
        return "\n".join([*lines, "  (no supernode has an effect on the target)"])
    lines.append(f"  {'':1} {'supernode':<34} {'layers':<8} {'at':<10} {'effect':>7}  {'ablated Δp pred / real':<22} steer")
    for sn in circuit.supernodes:
        layers = sn.layers
        where = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
        abl = (sn.validation or {}).get("ablate") or {}
        pred = f"{abl['predicted']:+.3f} / {abl['actual']:+.3f}" if abl else "not validated"
        steer = (sn.validation or {}).get("steer")
        steered = f"{'/'.join(repr(t) for t in steer['tokens'][:2])} {'pass' if steer['passed'] else 'fail'}" if steer else "-"
        sign = "+" if sn.effect >= 0 else "-"
        lines.append(f"  {sign} {sn.name[:34]:<34} {where:<8} {_token(circuit, sn.pos)[:10]:<10} {sn.effect:+7.2f}  "
                     f"{pred:<22} {steered}")
        detail = "; ".join(x for x in (f"detects: {sn.input_label}" if sn.input_label else "",
                                       f"says: {sn.output_label}" if sn.output_label else "",
                                       "label unclear" if sn.unclear else "") if x)
        lines.append(f"      {sn.id}" + (f"  ({detail})" if detail else ""))
    if circuit.validation:
        lines.append("  " + validation_text(circuit).split("\n", 1)[-1])
    return "\n".join(lines)


__all__ = ["CIRCUIT_FILE", "CIRCUIT_PICTURE", "SUPERNODES_FILE", "CircuitResult", "circuit_metadata", "find_circuit",
           "format_circuit", "write_circuit"]
