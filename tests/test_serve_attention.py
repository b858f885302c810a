"""The explorer's attention routes against the library: an edge's heads sum to its weight, a head's
QK pairs are the library's, with the feature store's labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.serve import build_folder, replacement

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cltrace.graph.graph import Graph  # noqa: E402
from cltrace.graph.qk import qk_attribution  # noqa: E402
from cltrace.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, dict[str, Path]]:
    folder = build_folder(tmp_path_factory.mktemp("served_attention"))
    app = create_app(folder["root"], loader=lambda _metadata: replacement())
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as client:
        yield client, folder


def test_an_edges_heads_sum_to_its_weight(served: tuple[TestClient, dict[str, Path]]) -> None:
    client, folder = served
    graph = Graph.load(folder["graph"])
    ids = graph.node_ids()
    edge = next(
        (s, t, w) for s, t, w in zip(graph.edge_source.tolist(), graph.edge_target.tolist(), graph.edge_weight.tolist())
        if int(graph.nodes.kind[t]) == 0 and int(graph.nodes.pos[s]) < int(graph.nodes.pos[t]) and abs(w) > 1e-3
    )
    r = client.get("/api/graph/heads", params={"path": "acronym.safetensors", "source": ids[edge[0]], "target": ids[edge[1]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == pytest.approx(edge[2], rel=1e-3, abs=1e-5)
    assert sum(map(sum, body["loadings"])) == pytest.approx(body["total"], rel=1e-5, abs=1e-6)
    assert abs(body["heads"][0]["loading"]) == max(abs(x) for row in body["loadings"] for x in row)
    r = client.get("/api/graph/heads", params={"path": "acronym.safetensors", "source": ids[edge[1]], "target": ids[edge[0]]})
    assert r.status_code == 400 and "across positions" in r.json()["detail"]


def test_a_heads_qk_pairs(served: tuple[TestClient, dict[str, Path]]) -> None:
    client, folder = served
    r = client.get("/api/graph/qk", params={"path": "acronym.safetensors", "layer": 2, "head": 1, "keys": 2, "top": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    rm = replacement()
    graph = Graph.load(folder["graph"])
    import torch

    run = rm.run(torch.tensor(graph.metadata["input_ids"]))
    want = qk_attribution(rm, run, 2, 1, run.n_pos - 1, n_keys=2)
    assert [k["key_pos"] for k in body["keys"]] == [k.key_pos for k in want.keys]
    assert [p["value"] for p in body["keys"][0]["pairs"]] == pytest.approx([p["value"] for p in want.top_pairs(want.keys[0], 5)], rel=1e-5)
    assert len(body["tokens"]) == run.n_pos
    features = [n for k in body["keys"] for p in k["pairs"] for n in (p["query"], p["key"]) if n["kind"] == "feature"]
    assert all("label" in n for n in features)
    r = client.get("/api/graph/qk", params={"path": "acronym.safetensors", "layer": 2, "head": 99})
    assert r.status_code == 400 and "head 99 is out of range" in r.json()["detail"]
