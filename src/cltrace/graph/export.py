"""Export a graph as the JSON that the circuit-tracer / Neuronpedia graph front ends read.

The layout and conventions follow circuit-tracer's ``create_graph_files`` (and its pydantic
models): top-level ``metadata``, ``qParams``, ``nodes`` and ``links``; ``feature_type`` strings
``"cross layer transcoder"``, ``"mlp reconstruction error"``, ``"embedding"``, ``"logit"``; layer
written as a string (``"E"`` for embeddings, ``str(n_layers + 1)`` for logits); a feature's
``feature`` is the Cantor pairing of (layer, feature index) and its ``jsNodeId``
``"{layer}_{feature}-0"``; an embedding's ``feature`` is its position; a logit's is its token id,
with ``clerp`` ``'Output "tok" (p=0.123)'`` (the front end parses the probability from it) and
``is_target_logit`` on the first (most probable) logit; ``influence`` is the cumulative influence
share from pruning. Node ids follow `cltrace.graph.graph`: error nodes are ``"{layer}_-1_{pos}"``.

Supernodes (``qParams.supernodes``, ``[[name, node_id, ...], ...]``) and pinned nodes
(``qParams.pinnedIds``: the members, which the front end's subgraph shows) are exported when given.
circuit-tracer's own page (0.5.0) reads supernodes from its address only, not from the file:
`qparams_query` gives the query string that carries them, as Neuronpedia's share links do.

Graph metadata read (all optional): ``prompt`` (str), ``tokens`` (list of token strings),
``n_layers`` (int), ``model`` (str), ``transcoder`` (str, list of str, or a config dict with a
``name``), ``scan`` (str), ``logit_tokens`` (list of strings, one per logit node, in node order;
else the ``label`` of each entry of ``targets``), ``clerps`` (dict node id -> label).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from cltrace.atomic import atomic_write_text, check_writable
from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.prune import (
    DEFAULT_EDGE_THRESHOLD,
    DEFAULT_NODE_THRESHOLD,
    cumulative_scores,
    node_influence,
    prune,
)

if TYPE_CHECKING:  # reading and exporting graphs stays free of the model stack
    from cltrace.replacement.supernodes import Supernode

NEURONPEDIA_SCHEMA_VERSION = 1

FEATURE_TYPES = {
    NodeKind.FEATURE: "cross layer transcoder",
    NodeKind.ERROR: "mlp reconstruction error",
    NodeKind.EMBEDDING: "embedding",
    NodeKind.LOGIT: "logit",
}


def cantor_pairing(x: int, y: int) -> int:
    """circuit-tracer's ``feature`` number for feature `y` of layer `x`."""
    return (x + y) * (x + y + 1) // 2 + y


def _scan(graph: Graph, scan: str | Sequence[str] | None) -> tuple[str, list[str]]:
    md = graph.metadata
    if scan is None:
        tc = md.get("transcoder")
        if isinstance(tc, dict):  # a transcoder config: use a name in it if it has one
            tc = tc.get("scan") or tc.get("name")
        if not isinstance(tc, (str, list, tuple)) or not tc:
            tc = None
        scan = md.get("scan") or tc or md.get("model") or "cltrace"
    if isinstance(scan, (list, tuple)):
        names = [str(x) for x in scan]
        digest = hashlib.sha1("-".join(names).encode()).hexdigest()[:16]
        return f"custom-{int(digest, 16)}", names
    return str(scan), []


def _logit_labels(md: dict[str, Any]) -> list[str | None]:
    names = md.get("logit_tokens")
    if isinstance(names, list):
        return [None if x is None else str(x) for x in names]
    targets = md.get("targets")
    if isinstance(targets, list):
        return [str(t["label"]) if isinstance(t, dict) and t.get("label") is not None else None for t in targets]
    return []


def _finite(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise CltraceError(f"graph has a non-finite {what} ({x}); the graph is broken, re-run attribution")
    return x


def _prompt_tokens(graph: Graph) -> list[str]:
    """Prompt tokens: metadata, else the embedding nodes' token ids as text."""
    tokens = graph.metadata.get("tokens")
    if tokens is None:
        kinds, poss, toks = graph.nodes.kind.tolist(), graph.nodes.pos.tolist(), graph.nodes.token.tolist()
        emb = sorted((p, t) for k, p, t in zip(kinds, poss, toks) if k == NodeKind.EMBEDDING)
        n_pos = max(poss) + 1 if poss else 0
        by_pos = dict(emb)
        tokens = [str(by_pos.get(p, "")) for p in range(n_pos)]
    return [str(t) for t in tokens]


def _node_dicts(graph: Graph, ids: list[str], clerps: dict[str, str]) -> list[dict[str, Any]]:
    """One front-end dict per node, in the graph's order."""
    n_layers = graph.n_layers
    kinds = graph.nodes.kind.tolist()
    layers, poss = graph.nodes.layer.tolist(), graph.nodes.pos.tolist()
    feats, toks = graph.nodes.feature.tolist(), graph.nodes.token.tolist()
    acts, probs = graph.nodes.activation.tolist(), graph.nodes.probability.tolist()
    if graph.nodes.influence is not None:
        infl = graph.nodes.influence.tolist()
    else:
        infl = cumulative_scores(node_influence(graph)).tolist()
    logit_names = _logit_labels(graph.metadata)
    logit_rank = 0

    nodes: list[dict[str, Any]] = []
    for i, (k, layer, pos, feat, tok) in enumerate(zip(kinds, layers, poss, feats, toks)):
        node_id = ids[i]
        base = {
            "node_id": node_id, "feature": 0, "layer": str(layer), "ctx_idx": int(pos),
            "feature_type": FEATURE_TYPES[NodeKind(k)], "token_prob": 0.0, "is_target_logit": False,
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": node_id, "clerp": clerps.get(node_id, ""),
            "influence": None, "activation": None,
        }
        if k == NodeKind.FEATURE:
            base.update(feature=cantor_pairing(layer, feat), jsNodeId=f"{layer}_{feat}-0",
                        influence=_finite(float(infl[i]), "influence"),
                        activation=_finite(float(acts[i]), "activation"))
        elif k == NodeKind.ERROR:
            base.update(feature=-1, jsNodeId=f"{layer}_{pos}-0", influence=_finite(float(infl[i]), "influence"))
        elif k == NodeKind.EMBEDDING:
            base.update(feature=int(pos), layer="E", jsNodeId=f"E_{tok}-{pos}",
                        influence=_finite(float(infl[i]), "influence"))
        else:
            p = _finite(float(probs[i]), "logit probability")
            name = logit_names[logit_rank] if logit_rank < len(logit_names) else None
            name = str(tok) if name is None else name
            base.update(feature=int(tok), layer=str(n_layers + 1), jsNodeId=f"L_{tok}-{pos}", token_prob=p,
                        is_target_logit=logit_rank == 0,
                        clerp=clerps.get(node_id) or f'Output "{name}" (p={p:.3f})')
            logit_rank += 1
        nodes.append(base)
    return nodes


def to_neuronpedia_json(
    graph: Graph,
    slug: str = "cltrace-graph",
    scan: str | list[str] | None = None,
    *,
    prune_graph: bool | None = None,
    node_threshold: float = DEFAULT_NODE_THRESHOLD,
    edge_threshold: float = DEFAULT_EDGE_THRESHOLD,
    clerps: dict[str, str] | None = None,
    supernodes: Sequence[Supernode | tuple[str, Sequence[str]]] = (),
    pinned: Sequence[str] = (),
) -> dict[str, Any]:
    """The front-end JSON of `graph`, as a dict.

    `prune_graph`: None (default) prunes unless the graph is already pruned (its metadata has
    ``pruning``); True always prunes; False exports every node and edge. `clerps` maps node ids to
    labels (default: metadata ``clerps``). `supernodes` (`Supernode`s, or (name, node ids) pairs)
    become ``qParams.supernodes``, with the members the export keeps; `pinned` node ids and every
    kept member become ``qParams.pinnedIds``.
    """
    if not slug or not isinstance(slug, str):
        raise CltraceError("slug must be a non-empty string naming the graph")
    already = "pruning" in graph.metadata
    if prune_graph or (prune_graph is None and not already):
        graph, _ = prune(graph, node_threshold, edge_threshold)
    elif already:
        node_threshold = graph.metadata["pruning"].get("node_threshold", node_threshold)
    md = graph.metadata
    ids = graph.node_ids()
    clerps = dict(md.get("clerps", {}) if clerps is None else clerps)
    tokens = _prompt_tokens(graph)
    prompt = md.get("prompt")
    if prompt is None:
        prompt = "".join(tokens)
    nodes = _node_dicts(graph, ids, clerps)

    weights = graph.edge_weight.tolist()
    links = []
    for s, t, w in zip(graph.edge_source.tolist(), graph.edge_target.tolist(), weights):
        links.append({"source": ids[s], "target": ids[t], "weight": _finite(float(w), "edge weight")})
    # As circuit-tracer: keep only nodes some link touches, and every embedding and logit.
    used = {link["source"] for link in links} | {link["target"] for link in links}
    nodes = [d for d in nodes if d["node_id"] in used or d["feature_type"] in ("embedding", "logit")]

    scan_name, transcoder_list = _scan(graph, scan)
    metadata = {
        "slug": slug,
        "scan": scan_name,
        "transcoder_list": transcoder_list,
        "prompt_tokens": tokens,
        "prompt": str(prompt),
        "node_threshold": float(node_threshold) if node_threshold is not None else None,
        "schema_version": NEURONPEDIA_SCHEMA_VERSION,
    }
    if isinstance(md.get("pruning"), dict):
        # Namespaced extra (the front ends ignore unknown metadata keys): counts and scores.
        metadata["cltrace_pruning"] = dict(md["pruning"])
    groups = _supernode_groups(nodes, supernodes)
    kept = {d["node_id"] for d in nodes}
    pins = list(dict.fromkeys([p for p in pinned if p in kept] + [m for g in groups for m in g[1:]]))
    q_params = {"pinnedIds": pins, "supernodes": groups, "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def _supernode_groups(nodes: list[dict[str, Any]], supernodes: Sequence[Supernode | tuple[str, Sequence[str]]]
                      ) -> list[list[str]]:
    """qParams' ``[[name, node_id, ...], ...]``: each supernode's members among the exported `nodes`
    (a member without a position: the feature wherever it was kept); empty groups are left out."""
    features: dict[tuple[int, int], list[str]] = {}
    for d in nodes:
        if d["feature_type"] == FEATURE_TYPES[NodeKind.FEATURE]:
            layer, feature, _ = d["node_id"].split("_")
            features.setdefault((int(layer), int(feature)), []).append(d["node_id"])
    kept = {d["node_id"] for d in nodes}
    groups = []
    for sn in supernodes:
        if isinstance(sn, tuple):
            name, ids = str(sn[0]), [str(i) for i in sn[1]]
        else:
            name = sn.name
            ids = [i for l, f, p in sn.members for i in ([f"{l}_{f}_{p}"] if p is not None else features.get((l, f), []))]
        members = list(dict.fromkeys(i for i in ids if i in kept))
        if members:
            groups.append([name, *members])
    return groups


def qparams_query(data: dict[str, Any]) -> str:
    """The query string (no '?') that opens exported `data` in circuit-tracer's page with its
    qParams: the graph's slug, pinned ids comma-separated, supernodes as JSON."""
    q = data["qParams"]
    params = {"slug": data["metadata"]["slug"], "pinnedIds": ",".join(q.get("pinnedIds") or [])}
    if q.get("supernodes"):
        params["supernodes"] = json.dumps(q["supernodes"], separators=(",", ":"))
    return urlencode(params)




def write_neuronpedia_json(
    graph: Graph,
    path: str | os.PathLike,
    slug: str | None = None,
    scan: str | list[str] | None = None,
    *,
    update_index: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Write `to_neuronpedia_json(graph, ...)` to `path` (atomically) and return the dict.

    `slug` defaults to the file name without ``.json``. With `update_index`, also add (or replace)
    the graph's metadata in ``graph-metadata.json`` beside it, the index the local front end lists.
    """
    path = check_writable(path, "graph JSON")  # before the conversion, not after it
    slug = slug or path.stem
    data = to_neuronpedia_json(graph, slug=slug, scan=scan, **kwargs)
    atomic_write_text(path, json.dumps(data, allow_nan=False))
    if update_index:
        index_path = path.parent / "graph-metadata.json"
        index: dict[str, Any] = {"graphs": []}
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                index.setdefault("graphs", [])
            except (json.JSONDecodeError, AttributeError):
                raise CltraceError(f"'{index_path}' is not a valid graph index; fix or delete it") from None
        index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [data["metadata"]]
        atomic_write_text(index_path, json.dumps(index, indent=2))
    return data


__all__ = ["FEATURE_TYPES", "NEURONPEDIA_SCHEMA_VERSION", "cantor_pairing", "qparams_query", "to_neuronpedia_json",
           "write_neuronpedia_json"]
