"""`cltrace qk` on a tiny saved model: the printed pairs, the JSON beside the graph, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, run_cli
from helpers.models import char_tokenizer, tiny_model
from helpers.transcoders import random_transcoder

from cltrace.transcoder import save_transcoder


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("qk_cli")
    model = tiny_model("qwen3")
    model.model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    save_transcoder(random_transcoder(model, "clt"), root / "clt")
    return str(root / "model"), str(root / "clt")


def test_qk_writes_pairs_beside_the_graph(tiny_paths: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, clt = tiny_paths
    graph = tmp_path / "g.cltg"
    code, out, err = run_cli("attribute", "abcabca", "-m", model, "-t", clt, "-o", str(graph), capsys=capsys)
    assert code == 0, err
    from cltrace.graph.graph import Graph

    g = Graph.load(graph)
    ids = g.node_ids()
    edge = next(
        f"{ids[s]},{ids[t]}" for s, t in zip(g.edge_source.tolist(), g.edge_target.tolist())
        if int(g.nodes.pos[s]) < int(g.nodes.pos[t]) and int(g.nodes.kind[t]) == 0
    )
    code, out, err = run_cli(
        "qk", "abcabca", "-m", model, "-t", clt, "--layer", "2", "--head", "3", "--keys", "2", "-k", "4",
        "--graph", str(graph), "--edge", edge, capsys=capsys,
    )
    assert code == 0, err
    written = tmp_path / "g.qk_L2_H3_qlast.json"
    data = json.loads(written.read_text())
    assert data["query_pos"] == 7 and len(data["keys"]) == 2 and len(data["keys"][0]["pairs"]) == 4
    assert len(data["scores"]) == 8
    best = max(range(8), key=lambda k: data["pattern"][k])
    assert data["keys"][0]["key_pos"] == best
    assert data["keys"][0]["score"] == pytest.approx(data["scores"][best], rel=1e-4, abs=1e-5)
    assert "edge" in data and data["edge"]["heads"]
    assert f"key {best} " in out and " × " in out and "through attention" in out


def test_qk_bad_head_is_one_line(tiny_paths: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, clt = tiny_paths
    code, _, err = run_cli("qk", "abc", "-m", model, "-t", clt, "--layer", "1", "--head", "7",
                           "-o", str(tmp_path / "x.json"), capsys=capsys)
    assert_one_line_error(code, err, "head 7 is out of range")
    code, _, err = run_cli("qk", "abc", "-m", model, "-t", clt, "--layer", "1", "--head", "0", "--edge", "a,b",
                           capsys=capsys)
    assert_one_line_error(code, err, "--graph")
