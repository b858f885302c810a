"""The circuit-tracer / Neuronpedia front-end JSON."""

from __future__ import annotations

import json

import pytest

from cltrace.errors import CltraceError
from cltrace.graph.export import (
    cantor_pairing,
    to_neuronpedia_json,
    write_neuronpedia_json,
)
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.graph.prune import prune

F, E, T, L = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT

NODE_KEYS = {
    "node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
    "is_target_logit": bool, "jsNodeId": str, "clerp": str, "influence": (float, type(None)),
    "activation": (float, type(None)),
}


def graph(**meta) -> Graph:
    nodes = NodeTable.from_columns(
        kind=[F, F, F, E, E, T, T, L, L], layer=[0, 1, 1, 0, 1, -1, -1, 2, 2], pos=[1, 1, 0, 1, 1, 0, 1, 1, 1],
        feature=[3, 5, 2, -1, -1, -1, -1, -1, -1], token=[-1, -1, -1, -1, -1, 10, 11, 7, 9],
        activation=[1.5, 2.0, 0.5, 0, 0, 0, 0, 0, 0], probability=[0, 0, 0, 0, 0, 0, 0, 0.75, 0.25],
    )
    edges = [(6, 0, 2.0), (5, 0, -2.0), (5, 2, 1.0), (0, 1, 3.0), (3, 1, 1.0), (4, 7, 0.5),
             (1, 7, 4.0), (2, 7, 1.0), (6, 7, 3.0), (1, 8, 1.0)]
    md = {"n_layers": 2, "prompt": "Hi there", "tokens": ["Hi", " there"], "model": "tiny-llama",
          "transcoder": "tiny-clt", "logit_tokens": [" you", " friend"]}
    md.update(meta)
    return Graph.from_edges(nodes, edges, md)


def check_schema(data: dict):
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    md = data["metadata"]
    for key, typ in {"slug": str, "scan": str, "prompt_tokens": list, "prompt": str, "node_threshold": float,
                     "schema_version": int}.items():
        assert isinstance(md[key], typ), key
    assert all(isinstance(t, str) for t in md["prompt_tokens"])
    q = data["qParams"]
    assert q == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    for node in data["nodes"]:
        for key, typ in NODE_KEYS.items():
            assert isinstance(node[key], typ), (key, node)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids)
    for link in data["links"]:
        assert set(link) == {"source", "target", "weight"}
        assert link["source"] in ids and link["target"] in ids and isinstance(link["weight"], float)
    json.dumps(data, allow_nan=False)


def test_export_unpruned():
    g = graph()
    data = to_neuronpedia_json(g, slug="hi", prune_graph=False)
    check_schema(data)
    md = data["metadata"]
    assert md["slug"] == "hi" and md["scan"] == "tiny-clt" and md["prompt"] == "Hi there"
    assert md["prompt_tokens"] == ["Hi", " there"] and md["schema_version"] == 1
    by_id = {n["node_id"]: n for n in data["nodes"]}
    assert set(by_id) == set(g.node_ids())
    f = by_id["1_5_1"]
    assert (f["feature"], f["layer"], f["ctx_idx"], f["feature_type"], f["jsNodeId"]) == (
        cantor_pairing(1, 5), "1", 1, "cross layer transcoder", "1_5-0")
    assert f["activation"] == 2.0
    e = by_id["0_-1_1"]
    assert (e["feature"], e["layer"], e["feature_type"], e["activation"]) == (-1, "0", "mlp reconstruction error", None)
    emb = by_id["E_10_0"]
    assert (emb["feature"], emb["layer"], emb["ctx_idx"], emb["feature_type"], emb["jsNodeId"]) == (
        0, "E", 0, "embedding", "E_10-0")
    lg = by_id["3_7_1"]
    assert (lg["feature"], lg["layer"], lg["feature_type"], lg["token_prob"], lg["is_target_logit"]) == (
        7, "3", "logit", 0.75, True)
    assert lg["clerp"] == 'Output " you" (p=0.750)' and lg["jsNodeId"] == "L_7-1"
    assert by_id["3_9_1"]["is_target_logit"] is False
    assert len(data["links"]) == g.n_edges
    # The most influential node has the smallest cumulative influence.
    feats = [n for n in data["nodes"] if n["feature_type"] != "logit"]
    assert min(feats, key=lambda n: n["influence"])["node_id"] == "1_5_1"


def test_export_prunes_by_default_and_matches_prune():
    g = graph()
    data = to_neuronpedia_json(g, slug="hi")
    check_schema(data)
    pruned, res = prune(g)
    assert {n["node_id"] for n in data["nodes"]} == set(pruned.node_ids())
    assert len(data["links"]) == pruned.n_edges == res.n_edges_after
    assert data["metadata"]["node_threshold"] == 0.8
    assert data["metadata"]["cltrace_pruning"]["n_nodes_after"] == pruned.n_nodes
    # An already pruned graph is not pruned again.
    again = to_neuronpedia_json(pruned, slug="hi")
    assert again["nodes"] == data["nodes"] and again["links"] == data["links"]


def test_export_fallbacks():
    g = graph()
    g.metadata = {}
    data = to_neuronpedia_json(g, prune_graph=False)
    check_schema(data)
    assert data["metadata"]["scan"] == "cltrace"
    assert data["metadata"]["prompt_tokens"] == ["10", "11"]
    assert {n["node_id"] for n in data["nodes"] if n["feature_type"] == "logit"} == {"3_7_1", "3_9_1"}
    data = to_neuronpedia_json(graph(transcoder=["a", "b"]), prune_graph=False)
    assert data["metadata"]["scan"].startswith("custom-") and data["metadata"]["transcoder_list"] == ["a", "b"]


def test_export_attribution_style_metadata():
    # What attribution writes: prompt / tokens may be None, transcoder is a config dict, logit
    # labels come from `targets`, per-node lists ride along.
    g = graph()
    g.metadata = {"prompt": None, "tokens": None, "model": "tiny-llama", "n_layers": 2,
                  "transcoder": {"kind": "clt", "n_layers": 2}, "target_value": [0.0] * g.n_nodes,
                  "targets": [{"tokens": [7], "coefs": [1.0], "label": " you", "probability": 0.75},
                              {"tokens": [9], "coefs": [1.0], "label": " friend", "probability": 0.25}]}
    data = to_neuronpedia_json(g, slug="s")
    check_schema(data)
    assert data["metadata"]["scan"] == "tiny-llama" and data["metadata"]["prompt"] == "1011"
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [n["clerp"] for n in logits] == ['Output " you" (p=0.750)', 'Output " friend" (p=0.250)']


def test_write(tmp_path):
    g = graph()
    path = tmp_path / "my-graph.json"
    data = write_neuronpedia_json(g, path, update_index=True)
    assert json.loads(path.read_text()) == data
    assert data["metadata"]["slug"] == "my-graph"
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [m["slug"] for m in index["graphs"]] == ["my-graph"]
    write_neuronpedia_json(g, tmp_path / "other.json", update_index=True)
    write_neuronpedia_json(g, path, update_index=True)
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(m["slug"] for m in index["graphs"]) == ["my-graph", "other"]
    with pytest.raises(CltraceError, match="does not exist"):
        write_neuronpedia_json(g, tmp_path / "no" / "x.json")
    bad = graph()
    bad.edge_weight[0] = float("nan")
    with pytest.raises(CltraceError, match="non-finite"):
        to_neuronpedia_json(bad, prune_graph=False)


def test_supernodes_and_pins_go_into_qparams_with_the_kept_members_only():
    from urllib.parse import parse_qs

    from cltrace.graph.export import qparams_query
    from cltrace.replacement.supernodes import Supernode

    g = graph()
    groups = [
        Supernode("say-you", [(1, 5, 1), (0, 3, None)]),  # 0:3 without a position: wherever it is kept
        ("two words ok", ["1_2_0", "9_9_9"]),  # a (name, ids) pair; an id the export lacks is left out
        Supernode("gone", [(7, 7, 0)]),  # nothing kept: the group is left out
    ]
    data = to_neuronpedia_json(g, slug="hi", prune_graph=False, supernodes=groups, pinned=["E_10_0", "nope"])
    q = data["qParams"]
    assert q["supernodes"] == [["say-you", "1_5_1", "0_3_1"], ["two words ok", "1_2_0"]]
    assert q["pinnedIds"] == ["E_10_0", "1_5_1", "0_3_1", "1_2_0"]
    ids = {n["node_id"] for n in data["nodes"]}
    assert set(q["pinnedIds"]) <= ids
    json.dumps(data, allow_nan=False)
    # pruned: members the pruning drops leave their group
    pruned = to_neuronpedia_json(g, slug="hi", supernodes=groups)
    kept = {n["node_id"] for n in pruned["nodes"]}
    assert all(set(grp[1:]) <= kept and grp[1:] for grp in pruned["qParams"]["supernodes"])
    # the address that carries them to circuit-tracer's page
    parsed = parse_qs(qparams_query(data))
    assert parsed["slug"] == ["hi"] and parsed["pinnedIds"] == [",".join(q["pinnedIds"])]
    assert json.loads(parsed["supernodes"][0]) == q["supernodes"]
    assert "supernodes" not in parse_qs(qparams_query(to_neuronpedia_json(g, slug="hi", prune_graph=False)))


def test_cli_export_with_supernodes(tmp_path, capsys):
    from helpers.cli import run_cli

    from cltrace.replacement.supernodes import Supernode, save_supernodes

    g = graph()
    g.save(tmp_path / "g.safetensors")
    save_supernodes(tmp_path / "sn.json", [Supernode("say-you", [(1, 5, 1)]), Supernode("gone", [(7, 7, 0)])])
    code, out, err = run_cli("export", str(tmp_path / "g.safetensors"), "-o", str(tmp_path / "g.json"),
                             "--supernodes", str(tmp_path / "sn.json"), capsys=capsys)
    assert code == 0, err
    assert "1 of 2 supernodes" in out
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["qParams"]["supernodes"] == [["say-you", "1_5_1"]]
    code, out, err = run_cli("export", str(tmp_path / "g.safetensors"), "-o", str(tmp_path / "h.json"),
                             "--supernodes", str(tmp_path / "missing.json"), capsys=capsys)
    assert code != 0 and "does not exist" in err and "Traceback" not in err
