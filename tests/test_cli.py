"""The command line on the default model: real predictions, and one clear line for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, run_cli

from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder

ACRONYM = "The National Digital Analytics Group (N"


def test_predict_acronym_gives_DA_first(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli("predict", ACRONYM, "--top", "3", capsys=capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("SmolLM2-135M-Instruct")
    assert lines[1].split()[1] == "'DA'", out
    probabilities = [float(line.split()[-1].rstrip("%")) for line in lines[1:4]]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > 50


def test_info_describes_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli("info", capsys=capsys)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.strip().splitlines() if not line.startswith("BOS"))
    assert fields["family"] == "llama" and fields["layers"] == "30" and fields["d_model"] == "576"
    assert fields["d_mlp"] == "1536" and fields["vocab"] == "49152"


def test_predict_with_transcoder_runs_replacement_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=30, d_model=576, n_features=32, activation="jumprelu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    code, out, _ = run_cli("predict", ACRONYM, "--transcoder", str(tmp_path / "clt"), capsys=capsys)
    assert code == 0
    line = out.strip().splitlines()[-1]
    assert line.startswith("replacement model:")
    assert float(line.split("max |logit difference| ")[1].split(",")[0]) < 1e-3


def test_transcoder_for_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=4, d_model=576, n_features=8, activation="relu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    code, _, err = run_cli("predict", ACRONYM, "--transcoder", str(tmp_path / "clt"), capsys=capsys)
    assert_one_line_error(code, err, "does not fit", "4 layers")
    cfg = TranscoderConfig(kind="clt", n_layers=30, d_model=64, n_features=8, activation="relu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt2")
    code, _, err = run_cli("predict", ACRONYM, "--transcoder", str(tmp_path / "clt2"), capsys=capsys)
    assert_one_line_error(code, err, "d_model 64")


def test_empty_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("predict", "  ", capsys=capsys)
    assert_one_line_error(code, err, "prompt is empty")


def test_prompt_longer_than_context(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("predict", "word " * 8300, capsys=capsys)
    assert_one_line_error(code, err, "longer than the model's context of 8192")


def test_truncated_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=2, d_model=8, n_features=4, activation="relu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    weights = tmp_path / "clt" / "transcoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    code, _, err = run_cli("convert", str(tmp_path / "clt"), str(tmp_path / "out"), "--to", "circuit-tracer", capsys=capsys)
    assert_one_line_error(code, err, "transcoder.safetensors")
    assert not (tmp_path / "out").exists(), "nothing half-written"


def test_convert_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=2, d_model=8, n_features=4, activation="relu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, _, err = run_cli("convert", str(tmp_path / "clt"), str(tmp_path / "busy"), capsys=capsys)
    assert_one_line_error(code, err, "not empty")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_unknown_model_without_hub_fails_fast_in_a_real_process() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cltrace", "info", "no-such-org/no-such-model"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "no-such-org/no-such-model")
    assert proc.stdout == ""


@pytest.mark.slow
def test_attribute_then_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from cltrace.graph.graph import Graph

    cfg = TranscoderConfig(kind="clt", n_layers=30, d_model=576, n_features=8, activation="jumprelu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    code, out, _ = run_cli(
        "attribute", "The cat sat", "-t", str(tmp_path / "clt"), "-o", str(tmp_path / "g.cltg"), capsys=capsys
    )
    assert code == 0, out
    graph = Graph.load(tmp_path / "g.cltg")
    scores = graph.metadata["scores"]
    assert scores["n_nodes_before"] == graph.n_nodes and scores["n_edges_before"] == graph.n_edges
    assert 0.0 <= scores["replacement_score"] <= 1.0
    assert f"nodes {graph.n_nodes} -> {scores['n_nodes_after']}" in out
    code, out, _ = run_cli("export", str(tmp_path / "g.cltg"), "-o", str(tmp_path / "g.json"), capsys=capsys)
    assert code == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert len(data["nodes"]) == scores["n_nodes_after"] and len(data["links"]) <= scores["n_edges_after"]
    assert data["metadata"]["prompt"] == "The cat sat"

    # A truncated graph file is refused with one line.
    raw = (tmp_path / "g.cltg").read_bytes()
    (tmp_path / "cut.cltg").write_bytes(raw[: len(raw) // 2])
    code, _, err = run_cli("export", str(tmp_path / "cut.cltg"), "-o", str(tmp_path / "cut.json"), capsys=capsys)
    assert_one_line_error(code, err, "cut.cltg")
    assert not (tmp_path / "cut.json").exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`attribute -o`, `trace -o`, `export -o` and `eval --json` check where they will write before loading the model
    (or the graph): one line naming the path, instead of a failure after the whole computation."""
    import cltrace.graph.graph
    import cltrace.model

    class Started(Exception):
        pass

    def started(*_args: object, **_kwargs: object) -> None:
        raise Started("the command started its work before checking its output path")

    monkeypatch.setattr(cltrace.model, "load_model", started)
    monkeypatch.setattr(cltrace.graph.graph.Graph, "load", started)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "busy" / "graph.safetensors").mkdir(parents=True)
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path / "locked" and real_access(p, mode, **kw))

    attribute = ("attribute", "The cat sat", "-t", str(tmp_path / "clt"), "-o")
    for args, needles in [
        ((*attribute, str(tmp_path / "dir")), (f"'{tmp_path / 'dir'}' is a folder", "give a file name")),
        ((*attribute, str(tmp_path / "missing" / "g.cltg")), (str(tmp_path / "missing"), "does not exist", "create it")),
        ((*attribute, str(tmp_path / "locked" / "g.cltg")), (str(tmp_path / "locked"), "not writable", "pick another place")),
        (("trace", "The cat sat", "-o", str(tmp_path / "file.txt")), ("file.txt", "is a file, not a folder")),
        (("trace", "The cat sat", "-o", str(tmp_path / "busy")), ("graph.safetensors' is a folder",)),
        (("trace", "The cat sat", "-o", str(tmp_path / "locked" / "new" / "t")), ("locked", "not writable")),
        (("export", str(tmp_path / "g.cltg"), "-o", str(tmp_path / "dir")), ("is a folder", "give a file name")),
        (("export", str(tmp_path / "g.cltg"), "-o", str(tmp_path / "missing" / "g.json")), ("does not exist",)),
        (("eval", str(tmp_path / "clt"), "--json", str(tmp_path / "dir")), ("evaluation JSON", "is a folder")),
        (("eval", str(tmp_path / "clt"), "--json", str(tmp_path / "missing" / "e.json")), ("does not exist",)),
    ]:
        code, _, err = run_cli(*args, capsys=capsys)
        assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "dir", "file.txt", "locked"]  # nothing written
