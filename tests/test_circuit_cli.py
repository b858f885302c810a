"""The circuit from the command line: logit-difference targets, `cltrace supernodes` and `cltrace circuit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.circuits import role_graph
from helpers.cli import assert_one_line_error, run_cli

from cltrace.graph.graph import Graph
from cltrace.graph.grouping import group_features
from cltrace.graph.prune import prune
from cltrace.replacement.supernodes import Supernode, load_supernodes, save_supernodes
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder


@pytest.fixture(scope="module")
def small_clt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLT for the default model with a few active features per position (quick graphs)."""
    from cltrace.model import load_model

    loaded = load_model("default")
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 4), seed=0)
    with torch.no_grad():
        tc.activation.threshold.fill_(0.5)
    path = tmp_path_factory.mktemp("clt") / "tc"
    save_transcoder(tc, path)
    return path


@pytest.mark.slow
def test_trace_explains_a_logit_difference_and_the_circuit_is_rebuilt(
        small_clt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t"
    code, stdout, err = run_cli("trace", "The cat sat on the", "-t", str(small_clt), "--features", "none", "-o", str(out),
                                "--target", " mat", "--versus", " floor", "-q", capsys=capsys)
    assert code == 0, err
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["target"]["coefs"] == [1.0, -1.0] and circuit["target"]["label"] == " mat −  floor"
    assert "circuit for ' mat −  floor'" in stdout
    assert str(out / "circuit.png") in stdout
    graph = Graph.load(out / "graph.safetensors")
    assert graph.metadata["targets"][0]["coefs"] == [1.0, -1.0]
    assert graph.metadata["circuit"]["validation"] == circuit["validation"]

    # edit the supernodes, then rebuild: the circuit is built from the edited ones, names kept
    groups = load_supernodes(out / "supernodes.json")
    first = next(iter(groups))
    code, stdout, err = run_cli("supernodes", "rename", str(out / "supernodes.json"), first, "mine", capsys=capsys)
    assert code == 0, err
    code, stdout, err = run_cli("circuit", str(out), "--max-supernodes", "3", capsys=capsys)
    assert code == 0, err
    rebuilt = json.loads((out / "circuit.json").read_text())
    assert len(rebuilt["supernodes"]) <= 3 and rebuilt["validation"] is not None
    ids = {s["id"] for s in rebuilt["supernodes"]}
    assert ids <= set(load_supernodes(out / "supernodes.json")) and "mine" in load_supernodes(out / "supernodes.json")
    code, stdout, err = run_cli("circuit", str(out), "-t", "none", capsys=capsys)
    assert code == 0, err
    assert json.loads((out / "circuit.json").read_text())["validation"] is None


@pytest.mark.slow
def test_attribute_takes_versus_with_one_target(small_clt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("attribute", "The cat sat on the", "-t", str(small_clt), "-o", str(tmp_path / "g.safetensors"),
                           "--target", " mat", "--versus", " floor", capsys=capsys)
    assert code == 0, err
    targets = Graph.load(tmp_path / "g.safetensors").metadata["targets"]
    assert len(targets) == 1 and targets[0]["coefs"] == [1.0, -1.0]
    code, _, err = run_cli("attribute", "The cat sat on the", "-t", str(small_clt), "-o", str(tmp_path / "h.safetensors"),
                           "--versus", " floor", capsys=capsys)
    assert_one_line_error(code, err, "--versus", "exactly one --target")
    code, _, err = run_cli("attribute", "The cat sat on the", "-t", str(small_clt), "-o", str(tmp_path / "h.safetensors"),
                           "--target", " mat", "--target", " rug", "--versus", " floor", capsys=capsys)
    assert_one_line_error(code, err, "exactly one --target")


def test_supernodes_commands_edit_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.json"
    save_supernodes(path, [Supernode("a", [(1, 2, 3), (1, 4, 3)]), Supernode("b", [(2, 5, 3)]), Supernode("c", [(3, 1, None)])])
    code, out, err = run_cli("supernodes", "list", str(path), capsys=capsys)
    assert code == 0 and "a  (2)  1:2@3, 1:4@3" in out and "3:1" in out
    code, _, err = run_cli("supernodes", "merge", str(path), "a", "b", "--name", "ab", capsys=capsys)
    assert code == 0, err
    got = load_supernodes(path)
    assert list(got) == ["ab", "c"] and got["ab"].members == [(1, 2, 3), (1, 4, 3), (2, 5, 3)]
    code, _, err = run_cli("supernodes", "split", str(path), "ab", capsys=capsys)
    assert code == 0, err
    got = load_supernodes(path)
    assert list(got) == ["ab.1", "ab.2", "ab.3", "c"] and got["ab.3"].members == [(2, 5, 3)]
    code, _, err = run_cli("supernodes", "rename", str(path), "c", "everywhere", capsys=capsys)
    assert code == 0 and list(load_supernodes(path))[-1] == "everywhere"
    code, _, err = run_cli("supernodes", "rename", str(path), "nope", "x", capsys=capsys)
    assert_one_line_error(code, err, "no supernode named 'nope'")
    code, _, err = run_cli("supernodes", "rename", str(path), "ab.1", "ab.2", capsys=capsys)
    assert_one_line_error(code, err, "exists already")
    code, _, err = run_cli("supernodes", "rename", str(path), "ab.1", "bad name", capsys=capsys)
    assert_one_line_error(code, err, "not valid")
    code, _, err = run_cli("supernodes", "merge", str(path), "ab.1", capsys=capsys)
    assert_one_line_error(code, err, "at least two")


def test_supernodes_auto_groups_a_saved_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g, _ = role_graph()
    g.save(tmp_path / "g.safetensors")
    code, out, err = run_cli("supernodes", "auto", str(tmp_path / "g.safetensors"), "--node-threshold", "1.0", capsys=capsys)
    assert code == 0, err
    groups = load_supernodes(tmp_path / "supernodes.json")
    pruned, _ = prune(g, node_threshold=1.0)
    assert [s.members for s in groups.values()] == [s.members for s in group_features(pruned)]
    pairs = {frozenset(s.members) for s in groups.values() if len(s.members) == 2}
    assert pairs == {frozenset([(1, 1, 2), (2, 2, 2)]), frozenset([(5, 3, 2), (6, 4, 2)])}  # detectors, say features
    code, _, err = run_cli("supernodes", "auto", str(tmp_path / "missing"), capsys=capsys)
    assert_one_line_error(code, err, "neither a graph file nor a folder")
