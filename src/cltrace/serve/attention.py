"""The explorer's attention routes: the heads that carry an edge, and a head's QK pairs.

`add_attention_routes` registers, on the explorer app,

* ``GET /api/graph/heads?path&source&target``: head loadings of an edge between two node ids of
  the graph (source at an earlier position than target), every head's share and the top ones;
* ``GET /api/graph/qk?path&layer&head&query&keys&top``: the head's scores at a query position and
  the top (query node, key node) pairs of its most attended keys, features labelled from the
  graph's feature store (or its sidecar labels).

Both run the graph's prompt through the replacement model the app serves (under its lock).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import FastAPI, Query

from cltrace.errors import CltraceError
from cltrace.graph.heads import graph_node, head_loadings
from cltrace.graph.qk import qk_attribution
from cltrace.graph.qk_sites import AttentionSites
from cltrace.serve.jobs import Models
from cltrace.serve.workspace import Workspace

MAX_INDEX = 1 << 20
GraphPath = Annotated[str, Query(min_length=1, max_length=1000, description="The graph file, relative to the served folder.")]


def _prompt(graph: Any) -> torch.Tensor:
    ids = graph.metadata.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise CltraceError("the graph's metadata has no input_ids: rebuild it with `cltrace attribute`")
    return torch.tensor(ids, dtype=torch.long)


def add_attention_routes(app: FastAPI, workspace: Workspace, models: Models) -> None:
    """Register the head-loading and QK routes on the explorer app."""

    @app.get("/api/graph/heads", summary="The attention heads that carry an edge between two positions")
    def get_heads(
        path: GraphPath,
        source: str = Query(min_length=1, max_length=64, description="The edge's source node id."),
        target: str = Query(min_length=1, max_length=64, description="The edge's target node id."),
        top: int = Query(10, ge=1, le=1000),
    ) -> dict[str, Any]:
        graph = workspace.load(workspace.resolve(path))
        src, dst = graph_node(graph, graph.find(source)), graph_node(graph, graph.find(target))
        with models.lock:
            rm = models.replacement(graph.metadata)
            loads = head_loadings(rm, rm.run(_prompt(graph)), src, dst)
        return {"source": source, "target": target, "total": loads.total, "heads": loads.top(top),
                "loadings": loads.loadings.tolist()}

    @app.get("/api/graph/qk", summary="A head's attention scores at a query position as (query node, key node) pairs")
    def get_qk(
        path: GraphPath,
        layer: int = Query(ge=0, le=MAX_INDEX),
        head: int = Query(ge=0, le=MAX_INDEX),
        query: int | None = Query(None, ge=0, le=MAX_INDEX, description="The query position (default: the last)."),
        key: int | None = Query(None, ge=0, le=MAX_INDEX, description="A key position to decompose first (e.g. an edge's source)."),
        keys: int = Query(3, ge=1, le=64, description="Key positions to decompose, most attended first."),
        top: int = Query(10, ge=1, le=1000, description="Pairs per key position."),
    ) -> dict[str, Any]:
        graph_path = workspace.resolve(path)
        graph = workspace.load(graph_path)
        ids = _prompt(graph)
        with models.lock:
            rm = models.replacement(graph.metadata)
            run = rm.run(ids)
            q = run.n_pos - 1 if query is None else query
            sites = AttentionSites(rm, run)
            positions = None
            if key is not None:
                order = qk_attribution(rm, run, layer, head, q, key_positions=[], sites=sites).pattern.argsort(descending=True)
                positions = [key, *[k for k in order.tolist() if k != key][: keys - 1]]
            result = qk_attribution(rm, run, layer, head, q, key_positions=positions, n_keys=keys, sites=sites)
            tokens = [rm.model.decode_token(t) for t in ids.tolist()]
        data = result.to_json(top)
        labels = workspace.labels(graph_path, graph)
        for shown in data["keys"]:
            for pair in shown["pairs"]:
                for node in (pair["query"], pair["key"]):
                    if node["kind"] == "feature":
                        node["label"] = labels.get((node["layer"], node["feature"]), "")
        return {"tokens": tokens, **data}
