"""The graph explorer's API (`cltrace serve`), through FastAPI's TestClient on a folder holding the
acronym graph of a tiny random model, its feature store and a stray file outside the folder.

Ground truths: the graph file itself (node ids, pruning by `cltrace.graph.prune`), the feature store
read directly, the sidecar file on disk, and the interventions module run by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli
from helpers.serve import ACRONYM, CORPUS, build_folder, replacement

from cltrace.features import FeatureStore, build_feature_store
from cltrace.graph.attribution import attribute
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.prune import prune
from cltrace.graph.targets import LogitDifference
from cltrace.replacement.interventions import Intervention, intervene
from cltrace.replacement.supernodes import load_supernodes
from cltrace.transcoder import Transcoder

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cltrace.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = build_folder(tmp_path_factory.mktemp("served") / "graphs")
    (paths["root"].parent / "secret.safetensors").write_bytes((paths["graph"]).read_bytes())
    return paths


@pytest.fixture(scope="module")
def client(folder: dict[str, Path]) -> TestClient:
    app = create_app(folder["root"], loader=lambda _metadata: replacement())
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


def graph_of(folder: dict[str, Path]) -> Graph:
    return Graph.load(folder["graph"])


def first_feature(view: dict) -> dict:
    """The pruned view's most influential feature node."""
    feats = [n for n in view["nodes"] if n["kind"] == "feature"]
    return min(feats, key=lambda n: n["influence"])


# -- graphs ------------------------------------------------------------------------------------------


def test_lists_the_graphs_in_the_folder_only(client: TestClient, folder: dict[str, Path]) -> None:
    listed = client.get("/api/graphs").json()
    # the transcoder's own safetensors files are not graphs, and the file outside is not listed
    assert [g["path"] for g in listed] == ["acronym.safetensors"]
    graph = graph_of(folder)
    assert listed[0]["prompt"] == ACRONYM and listed[0]["n_nodes"] == graph.n_nodes and listed[0]["n_edges"] == graph.n_edges


def test_graph_view_is_the_pruned_graph(client: TestClient, folder: dict[str, Path]) -> None:
    graph = graph_of(folder)
    for nt, et in [(0.8, 0.98), (0.5, 0.9)]:
        view = client.get("/api/graph", params={"path": "acronym.safetensors", "node_threshold": nt, "edge_threshold": et}).json()
        pruned, result = prune(graph, nt, et)
        assert [n["id"] for n in view["nodes"]] == pruned.node_ids()
        assert view["edges"]["source"] == pruned.edge_source.tolist()
        assert view["edges"]["target"] == pruned.edge_target.tolist()
        w = torch.tensor(view["edges"]["weight"])
        assert torch.allclose(w, pruned.edge_weight, rtol=1e-3, atol=0)  # 4 significant digits
        assert view["metadata"]["pruning"]["n_nodes_after"] == result.n_nodes_after
    assert view["metadata"]["tokens"][1:4] == ["T", "h", "e"] and view["metadata"]["n_layers"] == 3
    kinds = {n["kind"] for n in view["nodes"]}
    assert kinds == {"feature", "error", "embedding", "logit"} or kinds == {"feature", "embedding", "logit"}
    emb = [n for n in view["nodes"] if n["kind"] == "embedding"]
    assert "".join(n["text"] for n in emb[1:]) == ACRONYM
    logits = [n for n in view["nodes"] if n["kind"] == "logit"]
    assert [n["text"] for n in logits] == [t["label"] for t in graph.metadata["targets"]]
    full = client.get("/api/graph", params={"path": "acronym.safetensors", "full": True}).json()
    assert len(full["nodes"]) == graph.n_nodes and len(full["edges"]["weight"]) == graph.n_edges


def test_feature_labels_come_from_the_store(client: TestClient, folder: dict[str, Path]) -> None:
    view = client.get("/api/graph", params={"path": "acronym.safetensors"}).json()
    assert view["features_db"] is True
    with FeatureStore(folder["db"]) as store:
        for node in [n for n in view["nodes"] if n["kind"] == "feature"][:5]:
            assert node["label"] == store.page(node["layer"], node["feature"]).display_label


def test_paths_outside_the_folder_are_refused(client: TestClient, folder: dict[str, Path]) -> None:
    outside = folder["root"].parent / "secret.safetensors"
    (folder["root"] / "link.safetensors").symlink_to(outside)
    try:
        for path in ["../secret.safetensors", str(outside), "link.safetensors", "clt/../../secret.safetensors"]:
            for url in ["/api/graph", "/api/graph/state", "/api/graph/feature"]:
                r = client.get(url, params={"path": path, "layer": 0, "feature": 0})
                assert r.status_code == 403, (path, url, r.text)
                assert "served folder" in r.json()["detail"]
            r = client.put("/api/graph/state", params={"path": path}, json={"pinned": []})
            assert r.status_code == 403
        assert not (outside.parent / "secret.explorer.json").exists()
        # a job cannot borrow a graph from outside either
        r = client.post("/api/jobs", json={"prompt": "AB", "like": "../secret.safetensors"})
        assert r.status_code == 403
    finally:
        (folder["root"] / "link.safetensors").unlink()


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "needle"),
    [
        ("get", "/api/graph", {}, 422, "path"),
        ("get", "/api/graph", {"params": {"path": "nope.safetensors"}}, 404, "no graph 'nope.safetensors'"),
        ("get", "/api/graph", {"params": {"path": "features.db"}}, 400, "not a safetensors file"),
        ("get", "/api/graph", {"params": {"path": "acronym.safetensors", "node_threshold": 1.5}}, 422, "node_threshold"),
        ("get", "/api/graph", {"params": {"path": "acronym.safetensors", "node_threshold": "x"}}, 422, "node_threshold"),
        ("get", "/api/graph/feature", {"params": {"path": "acronym.safetensors", "layer": 0, "feature": 999}}, 404, "not in this graph"),
        ("put", "/api/graph/state", {"params": {"path": "acronym.safetensors"}, "content": b"{not json"}, 422, "malformed"),
        ("put", "/api/graph/state", {"params": {"path": "acronym.safetensors"}, "json": {"pinned": ["9_9_9"]}}, 400, "cannot pin '9_9_9'"),
        ("put", "/api/graph/state", {"params": {"path": "acronym.safetensors"},
                                     "json": {"supernodes": [{"name": "bad name!", "members": ["0_0_1"]}]}}, 400, "not valid"),
        ("put", "/api/graph/state", {"params": {"path": "acronym.safetensors"}, "json": {"pinned": "x" * 2_000_000}}, 413, "over"),
        ("put", "/api/graph/label", {"params": {"path": "acronym.safetensors"}, "json": {"layer": -1, "feature": 0, "label": "x"}}, 422, "layer"),
        ("post", "/api/graph/intervene", {"params": {"path": "acronym.safetensors"}, "json": {"interventions": []}}, 422, "interventions"),
        ("post", "/api/graph/intervene", {"params": {"path": "acronym.safetensors"},
                                          "json": {"interventions": [{"node": "E_53_1", "value": 0}]}}, 400, "not a feature node"),
        ("post", "/api/graph/intervene", {"params": {"path": "acronym.safetensors"},
                                          "json": {"interventions": [{"supernode": "ghost", "value": 0}]}}, 404, "no supernode named"),
        ("post", "/api/graph/intervene", {"params": {"path": "acronym.safetensors"},
                                          "json": {"interventions": [{"node": "1_2_3", "value": "nan"}]}}, 422, "value"),
        ("post", "/api/jobs", {"json": {"prompt": ""}}, 422, "prompt"),
        ("post", "/api/jobs", {"json": {"prompt": "   "}}, 400, "prompt is empty"),
        ("get", "/api/jobs/nope", {}, 404, "no job"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(client: TestClient, method: str, url: str, kwargs: dict,
                                                      status: int, needle: str) -> None:
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and needle in detail, detail


def test_openapi_describes_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/api/graphs", "/api/graph", "/api/graph/state", "/api/graph/feature", "/api/graph/label",
            "/api/graph/intervene", "/api/jobs", "/api/jobs/{job_id}"} <= set(schema["paths"])
    assert "InterventionBody" in schema["components"]["schemas"]


# -- saved work, labels, feature pages ---------------------------------------------------------------


def test_pins_and_supernodes_persist_in_the_sidecar(client: TestClient, folder: dict[str, Path]) -> None:
    view = client.get("/api/graph", params={"path": "acronym.safetensors"}).json()
    feats = [n["id"] for n in view["nodes"] if n["kind"] == "feature"][:3]
    body = {"pinned": feats[:2], "supernodes": [{"name": "say-N", "members": feats[1:3]}]}
    r = client.put("/api/graph/state", params={"path": "acronym.safetensors"}, json=body)
    assert r.status_code == 200 and r.json() == body
    sidecar = folder["root"] / "acronym.explorer.json"
    on_disk = json.loads(sidecar.read_text())
    assert on_disk["qParams"] == {"pinnedIds": feats[:2], "supernodes": [["say-N", *feats[1:3]]]}
    # a fresh server (a restart) sees the same work, and `cltrace intervene --supernodes` reads the file
    fresh = TestClient(create_app(folder["root"]), base_url="http://127.0.0.1")
    assert fresh.get("/api/graph", params={"path": "acronym.safetensors"}).json()["state"] == body
    members = [tuple(int(x) for x in nid.split("_")) for nid in feats[1:3]]
    assert load_supernodes(sidecar)["say-N"].members == members
    # a supernode of a non-feature node is refused and the file is left as it was
    err = next(n["id"] for n in view["nodes"] if n["kind"] in ("embedding", "logit"))
    r = client.put("/api/graph/state", params={"path": "acronym.safetensors"},
                   json={"supernodes": [{"name": "x", "members": [err]}]})
    assert r.status_code == 400 and json.loads(sidecar.read_text()) == on_disk


def test_feature_page_and_label_round_trip(client: TestClient, folder: dict[str, Path]) -> None:
    view = client.get("/api/graph", params={"path": "acronym.safetensors"}).json()
    node = first_feature(view)
    r = client.get("/api/graph/feature", params={"path": "acronym.safetensors", "layer": node["layer"], "feature": node["feature"]})
    assert r.status_code == 200
    page = r.json()
    with FeatureStore(folder["db"]) as store:
        truth = store.page(node["layer"], node["feature"])
    assert page["top"][0]["texts"] == truth.top[0].texts and page["top"][0]["acts"] == pytest.approx(truth.top[0].acts)
    assert [p["text"] for p in page["promoted"]] == [p.text for p in truth.promoted]
    r = client.put("/api/graph/label", params={"path": "acronym.safetensors"},
                   json={"layer": node["layer"], "feature": node["feature"], "label": "  acronym letter "})
    assert r.json()["saved_in"] == "store"
    with FeatureStore(folder["db"]) as store:
        assert store.labels()[(node["layer"], node["feature"])] == "acronym letter"
    again = client.get("/api/graph", params={"path": "acronym.safetensors"}).json()
    assert next(n for n in again["nodes"] if n["id"] == node["id"])["label"] == "acronym letter"
    client.put("/api/graph/label", params={"path": "acronym.safetensors"},
               json={"layer": node["layer"], "feature": node["feature"], "label": ""})
    with FeatureStore(folder["db"]) as store:
        assert (node["layer"], node["feature"]) not in store.labels()


def test_without_a_feature_store_labels_go_to_the_sidecar(tmp_path: Path, folder: dict[str, Path]) -> None:
    (tmp_path / "g.safetensors").write_bytes(folder["graph"].read_bytes())
    c = TestClient(create_app(tmp_path), raise_server_exceptions=False, base_url="http://127.0.0.1")
    view = c.get("/api/graph", params={"path": "g.safetensors"}).json()
    assert view["features_db"] is False
    node = first_feature(view)
    r = c.get("/api/graph/feature", params={"path": "g.safetensors", "layer": node["layer"], "feature": node["feature"]})
    assert r.status_code == 404 and "cltrace features build" in r.json()["detail"]
    r = c.put("/api/graph/label", params={"path": "g.safetensors"}, json={"layer": node["layer"], "feature": node["feature"], "label": "mine"})
    assert r.json()["saved_in"] == "sidecar"
    assert json.loads((tmp_path / "g.explorer.json").read_text())["labels"] == {f"{node['layer']}:{node['feature']}": "mine"}
    view = c.get("/api/graph", params={"path": "g.safetensors"}).json()
    assert next(n for n in view["nodes"] if n["id"] == node["id"])["label"] == "mine"
    # interventions need to know the transcoder: this graph names one, but no model could be loaded
    # by name ("tiny-llama"): a 400 with the reason, not a 500
    r = c.post("/api/graph/intervene", params={"path": "g.safetensors"},
               json={"interventions": [{"node": node["id"], "value": 0}]})
    assert r.status_code == 400 and "tiny-llama" in r.json()["detail"]


# -- interventions and new graphs --------------------------------------------------------------------


def test_intervention_matches_the_interventions_module(client: TestClient, folder: dict[str, Path]) -> None:
    view = client.get("/api/graph", params={"path": "acronym.safetensors"}).json()
    node = first_feature(view)
    r = client.post("/api/graph/intervene", params={"path": "acronym.safetensors"},
                    json={"interventions": [{"node": node["id"], "mode": "scale", "value": -3}], "top": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    rm = replacement()
    ids = torch.tensor(graph_of(folder).metadata["input_ids"])
    truth = intervene(rm, ids, [Intervention.at(node["layer"], node["feature"], node["pos"], factor=-3.0)], top=5)
    assert [t["token"] for t in out["after"]] == [t.token for t in truth.top_after]
    assert [t["probability"] for t in out["after"]] == pytest.approx([t.probability for t in truth.top_after], rel=1e-5)
    assert [t["token"] for t in out["before"]] == [t.token for t in truth.top_before]
    assert out["interventions"] == [f"{node['layer']}:{node['feature']}@{node['pos']}=x-3"]
    # the graph's prediction: one row per logit node, predicted beside measured; the graph holds
    # every edge out of the node, so its linear prediction equals the constrained, frozen-attention
    # measurement (cltrace.replacement.interventions' exactness property)
    rows = out["graph_prediction"]
    assert sorted(p["label"] for p in rows) == sorted(t["label"] for t in view["metadata"]["targets"])
    assert any(abs(p["predicted"]) > 1e-3 for p in rows)
    for p in rows:
        assert p["predicted"] == pytest.approx(p["measured"], rel=1e-3, abs=1e-4), p


def test_new_graph_runs_in_the_background(client: TestClient, folder: dict[str, Path]) -> None:
    r = client.post("/api/jobs", json={"prompt": "The World Health Organization (W", "like": "acronym.safetensors",
                                       "name": "who", "max_feature_nodes": 50})
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.monotonic() + 60
    while job["status"] not in ("done", "error") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done", job
    assert job["graph"] == "who.safetensors" and job["done"] == job["total"] > 0
    graph = Graph.load(folder["root"] / "who.safetensors")
    truth = attribute(replacement(), "The World Health Organization (W", max_feature_nodes=50, progress=False)
    assert graph.node_ids() == truth.node_ids() and torch.allclose(graph.edge_weight, truth.edge_weight)
    assert graph.metadata["transcoder_path"] == str(folder["root"] / "clt") and "scores" in graph.metadata
    assert "who.safetensors" in [g["path"] for g in client.get("/api/graphs").json()]
    assert int((graph.nodes.kind == int(NodeKind.FEATURE)).sum()) <= 50


def wait_for(client: TestClient, job: dict) -> dict:
    deadline = time.monotonic() + 60
    while job["status"] not in ("done", "error") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


def test_a_new_graph_explains_a_chosen_target_or_a_logit_difference(client: TestClient, folder: dict[str, Path]) -> None:
    prompt = "The World Health Organization (W"
    cases = [({"target": "H"}, "H"), ({"target": "H", "versus": "O"}, "H − O")]
    for extra, label in cases:
        r = client.post("/api/jobs", json={"prompt": prompt, "like": "acronym.safetensors", "max_feature_nodes": 20, **extra})
        assert r.status_code == 202, r.text
        job = wait_for(client, r.json())
        assert job["status"] == "done", job
        graph = Graph.load(folder["root"] / job["graph"])
        truth = attribute(replacement(), prompt, [extra["target"] if "versus" not in extra else LogitDifference("H", "O")],
                          max_feature_nodes=20, progress=False)
        assert [t["label"] for t in graph.metadata["targets"]] == [label] == [t["label"] for t in truth.metadata["targets"]]
        assert torch.allclose(graph.edge_weight, truth.edge_weight)
    r = client.post("/api/jobs", json={"prompt": prompt, "versus": "O"})
    assert r.status_code == 400 and "give the target too" in r.json()["detail"]
    job = wait_for(client, client.post("/api/jobs", json={"prompt": prompt, "target": "HO", "max_feature_nodes": 20}).json())
    assert job["status"] == "error" and "\n" not in job["error"] and not job["error"].startswith(("ValueError", "KeyError"))


def test_a_job_over_the_limit_gets_429(client: TestClient) -> None:
    """The job past the concurrent limit is told to try again later (429), in the usual JSON shape."""
    from cltrace.serve.jobs import MAX_RUNNING, Job

    jobs = client.app.state.jobs
    busy = {f"busy{i}": Job(id=f"busy{i}", prompt="x", status="running") for i in range(MAX_RUNNING)}
    jobs._jobs.update(busy)  # as if MAX_RUNNING graphs were being computed
    try:
        r = client.post("/api/jobs", json={"prompt": "The World Health Organization (W", "name": "too-many"})
    finally:
        for job_id in busy:
            jobs._jobs.pop(job_id, None)
    assert r.status_code == 429, r.text
    assert r.json() == {"detail": f"{MAX_RUNNING} graphs or circuits are already being computed: wait for one to finish, then try again"}
    assert "429" in client.get("/openapi.json").json()["paths"]["/api/jobs"]["post"]["responses"]


# -- the command -------------------------------------------------------------------------------------


def test_serve_binds_localhost_by_default(monkeypatch: pytest.MonkeyPatch, folder: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    import cltrace.serve.app as serve_app

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setattr(serve_app, "assets_built", lambda: True)
    code, out, err = run_cli("serve", str(folder["root"]), "--port", "8123", capsys=capsys)
    assert code == 0, err
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8123
    assert "http://127.0.0.1:8123" in out and "warning" not in err
    code, out, err = run_cli("serve", str(folder["root"]), "--host", "0.0.0.0", capsys=capsys)
    assert code == 0 and calls[-1]["host"] == "0.0.0.0"
    assert "warning" in err and "0.0.0.0" in err


def test_serve_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cltrace.serve.app as serve_app

    code, _, err = run_cli("serve", str(tmp_path / "nope"), capsys=capsys)
    assert_one_line_error(code, err, "is not a folder")
    monkeypatch.setattr(serve_app, "assets_built", lambda: False)
    code, _, err = run_cli("serve", str(tmp_path), capsys=capsys)
    assert_one_line_error(code, err, "make setup")


def test_a_store_of_another_transcoder_of_the_same_shape_is_not_shown(tmp_path: Path, folder: dict[str, Path]) -> None:
    """A graph records its transcoder's fingerprint; served beside the feature store of a retrained
    transcoder of the same shape, its pages are refused with the reason instead of showing the
    other transcoder's features. A graph without a fingerprint (older files) still matches by shape."""
    rm = replacement()
    graph = graph_of(folder)
    with FeatureStore(folder["db"]) as store:
        assert graph.metadata["transcoder_fingerprint"] == store.meta["fingerprint"]
    other = Transcoder.random(rm.transcoder.config, seed=2)  # same kind and sizes, other weights
    tok = rm.model.tokenizer
    build_feature_store(
        rm.model, other, CORPUS, 200, tmp_path / "features.db", n_ctx=32, batch_size=4, top_k=5, n_bands=2,
        per_band=2, tokenize=lambda s: tok(s, add_special_tokens=False)["input_ids"], bos_id=0, first_position=1,
        progress=False,
    )
    (tmp_path / "g.safetensors").write_bytes(folder["graph"].read_bytes())
    node = first_feature(TestClient(create_app(folder["root"]), base_url="http://127.0.0.1").get("/api/graph", params={"path": "acronym.safetensors"}).json())
    where = {"layer": node["layer"], "feature": node["feature"]}
    for app in (create_app(tmp_path), create_app(tmp_path, features=tmp_path / "features.db")):
        c = TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1")
        assert c.get("/api/graph", params={"path": "g.safetensors"}).json()["features_db"] is False
        r = c.get("/api/graph/feature", params={"path": "g.safetensors", **where})
        assert r.status_code == 404 and "built for another transcoder" in r.json()["detail"], r.json()
        assert "cltrace features build -t" in r.json()["detail"]
        r = c.put("/api/graph/label", params={"path": "g.safetensors"}, json={**where, "label": "not in the store"})
        assert r.json()["saved_in"] == "sidecar"
    with FeatureStore(tmp_path / "features.db") as store:
        assert store.labels() == {}

    older = Graph.load(tmp_path / "g.safetensors")
    del older.metadata["transcoder_fingerprint"]
    older.save(tmp_path / "old.safetensors")
    c = TestClient(create_app(tmp_path), raise_server_exceptions=False, base_url="http://127.0.0.1")
    assert c.get("/api/graph", params={"path": "old.safetensors"}).json()["features_db"] is True
    r = c.get("/api/graph/feature", params={"path": "old.safetensors", **where})
    with FeatureStore(tmp_path / "features.db") as store:
        assert r.status_code == 200 and r.json()["top"][0]["texts"] == store.page(**where).top[0].texts
