"""`cltrace trace`: the report's paths, its "say X" tokens, the picture, and the command end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.models import char_tokenizer, tiny_model

from cltrace.features.views import token_views
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.replacement import ReplacementModel
from cltrace.trace.plot import node_xy, plot_graph
from cltrace.trace.report import influential_paths, promoted_tokens, strongest_paths
from cltrace.trace.run import GRAPH_FILE, PICTURE_FILE, REPORT_FILE, trace_prompt
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hand_graph() -> Graph:
    """Nodes: features f0 f1 (layer 0) and f2 (layer 1), an error, embeddings e0 e1, one logit.
    Row-normalised weights into the logit: f2 0.6, err 0.4; into f2: f0 0.75, f1 0.25; into f0 and
    f1: e0 and e1 each 0.5; into err: e1 only. Best path through a feature: e -> f0 -> f2 -> logit,
    score 0.5 * 0.75 * 0.6 = 0.225; the featureless path e1 -> err -> logit (score 0.4) must not be
    reported."""
    kinds = [NodeKind.FEATURE, NodeKind.FEATURE, NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING,
             NodeKind.EMBEDDING, NodeKind.LOGIT]
    nodes = NodeTable.from_columns(kinds, layer=[0, 0, 1, 1, -1, -1, 2], pos=[1, 1, 1, 1, 0, 1, 1],
                                   feature=[0, 1, 0, -1, -1, -1, -1], token=[-1, -1, -1, -1, 5, 6, 7],
                                   activation=[1.0, 2.0, 3.0, 0, 0, 0, 0])
    f0, f1, f2, err, e0, e1, logit = range(7)
    edges = [(e0, f0, 1.0), (e1, f0, 1.0), (e0, f1, 1.0), (e1, f1, -1.0), (f0, f2, 3.0), (f1, f2, 1.0),
             (f2, logit, 6.0), (err, logit, -4.0), (e1, err, 2.0)]
    return Graph.from_edges(nodes, edges, {"n_layers": 2, "tokens": ["a", "b"]})


def test_strongest_paths_go_through_features_best_first() -> None:
    g = hand_graph()
    f0, f1, f2, err, e0, e1, logit = range(7)
    paths = strongest_paths(g, logit, k=10)
    assert {tuple(p.nodes) for p in paths[:2]} == {(e0, f0, f2, logit), (e1, f0, f2, logit)}
    assert paths[0].score == pytest.approx(0.5 * 0.75 * 0.6)
    assert {tuple(p.nodes) for p in paths} == {(e0, f0, f2, logit), (e1, f0, f2, logit), (e0, f1, f2, logit),
                                               (e1, f1, f2, logit)}
    assert all(err not in p.nodes for p in paths)  # the error-only path is not a feature path
    assert [p.score for p in paths] == sorted((p.score for p in paths), reverse=True)


def test_promoted_tokens_match_the_feature_pages_view() -> None:
    loaded = tiny_model("llama")
    loaded.tokenizer = char_tokenizer()
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 8), seed=3)
    views = token_views(loaded, tc, n=4)
    for layer in range(loaded.n_layers):
        got = promoted_tokens(loaded, tc, layer, [0, 5, 7], n=4)
        want = [[loaded.decode_token(int(t)) for t in views["promoted_ids"][layer, f]] for f in (0, 5, 7)]
        assert got == want


def test_node_layout_puts_tokens_left_to_right_and_layers_bottom_to_top() -> None:
    g = hand_graph()
    xy = node_xy(g)
    f0, f1, f2, err, e0, e1, logit = range(7)
    assert xy[e0, 1] == -1 and xy[logit, 1] == 2  # embeddings below, logits on top
    assert xy[e0, 0] < xy[e1, 0]  # position 0 left of position 1
    assert xy[f0, 1] < xy[f2, 1]  # layer 0 below layer 1
    assert xy[f0, 0] != xy[f1, 0]  # features of one cell spread sideways


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = plot_graph(hand_graph(), tmp_path / "g.png", highlight=[[4, 0, 2, 6]], labels={0: "f0"}, title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("*.tmp*"))


def test_trace_prompt_writes_graph_picture_and_report(tmp_path: Path) -> None:
    loaded = tiny_model("llama")
    loaded.tokenizer = char_tokenizer()
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 8), seed=1)
    rm = ReplacementModel(loaded, tc)
    prompt = "The National Digital Analytics Group (N"
    result = trace_prompt(rm, prompt, tmp_path, progress=False)
    graph = Graph.load(tmp_path / GRAPH_FILE)
    assert graph.n_nodes == result.graph.n_nodes and graph.metadata["prompt"] == prompt
    assert (tmp_path / PICTURE_FILE).read_bytes()[:8] == PNG_MAGIC
    text = (tmp_path / REPORT_FILE).read_text()
    # The top prediction the report names is the model's own.
    with torch.no_grad():
        logits = loaded.model(input_ids=loaded.encode(prompt)[None]).logits[0, -1]
    top = loaded.decode_token(int(logits.argmax()))
    assert result.report.targets[0][0] == top
    assert f"top predictions: {top!r}" in text
    # Every feature the report describes is on one of its paths and in the pruned graph.
    assert result.report.paths, "a random CLT on this prompt still has feature paths"
    pruned_features = {(int(l), int(f), int(p)) for k, l, f, p in zip(result.pruned.nodes.kind, result.pruned.nodes.layer,
                                                                       result.pruned.nodes.feature, result.pruned.nodes.pos)
                       if int(k) == NodeKind.FEATURE}
    for note in result.report.features:
        assert (note.layer, note.feature, note.pos) in pruned_features
        assert any(note.name in steps for steps, _ in result.report.paths)


@pytest.mark.slow  # the real default model
def test_trace_command_on_the_default_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole command on the real default model with a small random CLT (no training, no database)."""
    from cltrace.model import load_model

    loaded = load_model("default")
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 4), seed=0)
    with torch.no_grad():
        tc.activation.threshold.fill_(0.5)  # a few features per position: a quick graph
    save_transcoder(tc, tmp_path / "tc")
    code, out, err = run_cli("trace", "The cat sat on the", "-t", str(tmp_path / "tc"), "--features", "none",
                             "-o", str(tmp_path / "t"), "-q", capsys=capsys)
    assert code == 0, err
    assert "top predictions:" in out and "replacement score" in out
    assert f"cltrace serve {tmp_path / 't'}" in out
    assert (tmp_path / "t" / PICTURE_FILE).is_file() and (tmp_path / "t" / GRAPH_FILE).is_file()


def test_influential_paths_go_through_the_most_influential_features_first() -> None:
    g = hand_graph()
    f0, f1, f2, err, e0, e1, logit = range(7)
    g.nodes.influence = torch.tensor([0.5, 0.1, 0.3, 1.0, 1.0, 1.0, 1.0])  # f1 first, then f2, then f0
    paths = influential_paths(g, logit, k=2)
    assert paths[0].nodes[1:] == [f1, f2, logit] and paths[0].nodes[0] in (e0, e1)
    assert paths[0].score == pytest.approx(0.5 * 0.25 * 0.6)
    assert paths[1].nodes[1:] == [f0, f2, logit]  # f2's best way up is through f0 (0.75 > 0.25)
    assert paths[1].score == pytest.approx(0.5 * 0.75 * 0.6)
    g.nodes.influence = None
    assert [p.nodes for p in influential_paths(g, logit, k=2)] == [p.nodes for p in strongest_paths(g, logit, k=2)]


@pytest.mark.slow
def test_graphs_of_the_default_transcoder_record_its_cached_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`-t default` resolves to the cached folder, and the graph names that folder (not ./default), so
    that `cltrace serve` can load the transcoder to intervene."""
    from cltrace.model import load_model
    from cltrace.train.default import default_paths

    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    loaded = load_model("default")
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 4), seed=0)
    with torch.no_grad():
        tc.activation.threshold.fill_(0.5)
    target, _ = default_paths()
    save_transcoder(tc, target)  # stands in for the trained default: no training in this test
    code, out, err = run_cli("attribute", "The cat sat on the", "-t", "default", "-o", "g.safetensors",
                             "--max-feature-nodes", "50", capsys=capsys)
    assert code == 0, err
    assert Graph.load(tmp_path / "g.safetensors").metadata["transcoder_path"] == str(target.resolve())
