"""The graph explorer's test folders: the acronym graph of a tiny Llama with a random CLT, its feature
store and the transcoder; a trace folder with a circuit.json written by hand."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from cltrace.features import build_feature_store
from cltrace.graph.attribution import attribute
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.prune import node_influence
from cltrace.replacement import ReplacementModel
from cltrace.replacement.supernodes import save_supernodes, supernodes_from_json
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder
from helpers.models import char_tokenizer, tiny_model

ACRONYM = "The National Digital Analytics Group (N"

CORPUS = [
    "The National Digital Analytics Group (NDAG) met today.",
    "The World Health Organization (WHO) said so.",
    "A Big Example Company (ABEC) and the United Nations (UN).",
    "The Central Processing Unit (CPU) runs the code.",
    "National Aeronautics and Space Administration (NASA) launched it.",
] * 4


@functools.cache


def replacement() -> ReplacementModel:
    """The tiny Llama with the character tokenizer and a random 3 x 8-feature CLT."""
    model = tiny_model("llama")
    model.tokenizer = char_tokenizer()
    tc = Transcoder.random(TranscoderConfig("clt", model.n_layers, model.d_model, 8), seed=1)
    return ReplacementModel(model, tc)


def build_folder(root: Path) -> dict[str, Path]:
    """The served folder: acronym.safetensors, features.db for its transcoder, the transcoder."""
    rm = replacement()
    root.mkdir(parents=True, exist_ok=True)
    save_transcoder(rm.transcoder, root / "clt")
    graph = attribute(rm, ACRONYM, max_feature_nodes=400, batch_size=64, progress=False)
    graph.metadata["transcoder_path"] = str(root / "clt")
    graph.save(root / "acronym.safetensors")
    tok = rm.model.tokenizer
    build_feature_store(
        rm.model, rm.transcoder, CORPUS, 600, root / "features.db", n_ctx=32, batch_size=4, top_k=5, n_bands=2,
        per_band=2, window_before=6, window_after=3, tokenize=lambda s: tok(s, add_special_tokens=False)["input_ids"],
        bos_id=0, first_position=1, progress=False,
    )
    return {"root": root, "graph": root / "acronym.safetensors", "db": root / "features.db"}


def hand_circuit(graph: Graph, n_supernodes: int = 4) -> dict:
    """A circuit.json for `graph`, written by hand rather than by `cltrace.graph.circuit`: its most
    influential features grouped two by two, edges the sums of the graph's direct edges between the
    groups (tokens e{pos}: each supernode's two strongest; the top logit 'out': only from supernodes),
    effects each group's direct edges into the top logit, the first two supernodes given validation
    numbers and the rest none."""
    nodes = graph.nodes
    ids = graph.node_ids()
    feats = [i for i in torch.argsort(node_influence(graph), descending=True).tolist() if nodes.kind[i] == NodeKind.FEATURE]
    groups = [feats[2 * k : 2 * k + 2] for k in range(n_supernodes)]
    logit = int((nodes.kind == int(NodeKind.LOGIT)).nonzero()[0])
    emb = {i: f"e{int(nodes.pos[i])}" for i in (nodes.kind == int(NodeKind.EMBEDDING)).nonzero(as_tuple=True)[0].tolist()}
    owner = {i: f"s{k}" for k, g in enumerate(groups) for i in g} | emb | {logit: "out"}
    sums: dict[tuple[str, str], float] = {}
    for s, t, w in zip(graph.edge_source.tolist(), graph.edge_target.tolist(), graph.edge_weight.tolist()):
        a, b = owner.get(s), owner.get(t)
        if a is not None and b is not None and a != b and a[0] != "o" and b[0] != "e" and (a, b)[a[0] == "e"] != "out":
            sums[(a, b)] = sums.get((a, b), 0.0) + w
    tokens = graph.metadata["tokens"]
    supernodes = []
    for k, g in enumerate(groups):
        layers = sorted({int(nodes.layer[i]) for i in g})
        supernodes.append({
            "id": f"s{k}", "name": f"group {k}", "members": [ids[i] for i in g], "layers": layers,
            "pos": max(int(nodes.pos[i]) for i in g), "activation": float(sum(float(nodes.activation[i]) for i in g)),
            "input_label": f"detects pattern {k}", "output_label": f"says token {k}",
            "label_scores": {"input": 0.9 - 0.1 * k, "output": None}, "unclear": k == 3, "output_tokens": [],
            "effect": sums.get((f"s{k}", "out"), 0.0),
            "validation": {"ablate": {"predicted": -0.1 * (k + 1), "actual": -0.12 * (k + 1), "p_before": 0.5,
                                      "p_after": 0.5 - 0.12 * (k + 1)}, "steer": None} if k < 2 else None,
        })
    # every edge between supernodes and into the output; of the tokens' edges, each supernode's two strongest
    strongest = {f"s{k}": sorted((abs(w), a) for (a, b), w in sums.items() if b == f"s{k}" and a[0] == "e")[-2:] for k in range(n_supernodes)}
    keep = {(a, b) for b, top in strongest.items() for _, a in top}
    edges = [{"source": a, "target": b, "weight": w} for (a, b), w in sorted(sums.items()) if a[0] != "e" or (a, b) in keep]
    used = sorted({int(e["source"][1:]) for e in edges if e["source"].startswith("e")})
    target = graph.metadata["targets"][0]
    return {
        "version": 1, "prompt": graph.metadata["prompt"], "tokens": tokens,
        "target": {"label": target["label"], "tokens": [int(nodes.token[logit])], "coefs": [1.0],
                   "probability": float(nodes.probability[logit])},
        "graph": "graph.safetensors", "coverage": 0.8, "supernodes": supernodes,
        "inputs": [{"id": f"e{p}", "token": tokens[p], "pos": p} for p in used],
        "outputs": [{"id": "out", "label": target["label"]}], "edges": edges,
        "validation": {"circuit_ablation": {"p_before": 0.5, "p_after": 0.1, "relative_drop": 0.8},
                       "random_ablation": {"n_features": 8, "draws": 3, "relative_drop_mean": 0.02},
                       "ratio": 40.0, "pearson_r": 0.93},
    }


def build_trace_folder(root: Path) -> dict[str, Path]:
    """A trace folder as `cltrace trace` leaves it: graph.safetensors (the acronym graph), a
    circuit.json beside it (`hand_circuit`) and supernodes.json (the circuit's groups and one more)."""
    rm = replacement()
    root.mkdir(parents=True, exist_ok=True)
    save_transcoder(rm.transcoder, root / "clt")
    graph = attribute(rm, ACRONYM, max_feature_nodes=400, batch_size=64, progress=False)
    graph.metadata["transcoder_path"] = str(root / "clt")
    folder = root / "acronym"
    folder.mkdir()
    graph.save(folder / "graph.safetensors")
    circuit = hand_circuit(graph)
    (folder / "circuit.json").write_text(json.dumps(circuit, indent=1))
    # the groups the circuit was chosen from: its own and one more
    in_circuit = {m for sn in circuit["supernodes"] for m in sn["members"]}
    ids = graph.node_ids()
    extra = [ids[i] for i in (graph.nodes.kind == int(NodeKind.FEATURE)).nonzero(as_tuple=True)[0].tolist() if ids[i] not in in_circuit][:2]
    groups = [[sn["id"], *sn["members"]] for sn in circuit["supernodes"]] + [["other", *extra]]
    save_supernodes(folder / "supernodes.json", supernodes_from_json(groups).values())
    return {"root": root, "graph": folder / "graph.safetensors", "circuit": folder / "circuit.json",
            "supernodes": folder / "supernodes.json", "rel": "acronym/graph.safetensors"}
