"""The replacement and completeness scores over a prompt set (`cltrace.graph.prompt_scores`): equal to the
scores of graphs built one by one, in both definitions; the committed set ships with the package; and
`cltrace eval` prints them, writes them to its JSON and refuses a bad prompts file in one line."""

from __future__ import annotations

import fnmatch
import json
import statistics
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, run_cli
from helpers.models import char_tokenizer, tiny_model
from helpers.train import tiny_model_dir, word_docs
from helpers.transcoders import random_transcoder

from cltrace.data.harvest import FIRST_POSITION
from cltrace.errors import CltraceError
from cltrace.graph.attribution import attribute
from cltrace.graph.config import PromptSetConfig
from cltrace.graph.prompt_scores import (
    DEFAULT_PROMPTS,
    SCORE_NAMES,
    encode_prompts,
    format_prompt_scores,
    load_prompts,
    prompt_set_scores,
)
from cltrace.graph.prune import graph_scores, prune
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import save_transcoder

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The cat sat on the", "1, 2, 3,", "f(a, (b"]


@pytest.fixture(scope="module")
def replacement() -> ReplacementModel:
    """A tiny llama reading characters, with a random CLT (biases and thresholds non-zero)."""
    loaded = tiny_model("llama")
    loaded.tokenizer = char_tokenizer()
    return ReplacementModel(loaded, random_transcoder(loaded, "clt", seed=2))


def test_the_set_scores_are_those_of_graphs_built_one_by_one(replacement: ReplacementModel) -> None:
    got = prompt_set_scores(replacement, PROMPTS, progress=False)
    # the independent path: each prompt attributed as text, its scores as pruning reports them
    results = [prune(attribute(replacement, p, progress=False))[1] for p in PROMPTS]
    assert got["n_prompts"] == got["n_given"] == 3
    assert [p["prompt"] for p in got["prompts"]] == PROMPTS
    for name in SCORE_NAMES:
        want = [getattr(r, name) for r in results]
        assert [p[name] for p in got["prompts"]] == pytest.approx(want, rel=1e-6), name
        assert got["mean"][name] == pytest.approx(sum(want) / len(want), rel=1e-6), name
        assert got["median"][name] == pytest.approx(statistics.median(want), rel=1e-6), name
    assert [p["n_tokens"] for p in got["prompts"]] == [len(p) + 1 for p in PROMPTS]  # one token a character, BOS first

    first_two = prompt_set_scores(replacement, PROMPTS, PromptSetConfig(max_prompts=2), progress=False)
    assert (first_two["n_prompts"], first_two["n_given"]) == (2, 3)
    assert first_two["prompts"] == got["prompts"][:2]
    # prompts a caller encoded already (`cltrace eval` checks them before its held-out pass) are not encoded again
    encoded = encode_prompts(replacement.model, PROMPTS, PromptSetConfig(max_prompts=2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replacement.model, "encode", lambda *a, **k: pytest.fail("encoded twice"))
        again = prompt_set_scores(replacement, PROMPTS, PromptSetConfig(max_prompts=2), progress=False, encoded=encoded)
    assert again["prompts"] == first_two["prompts"]


def test_both_definitions_are_reported_as_graph_scores_gives_them(replacement: ReplacementModel) -> None:
    got = prompt_set_scores(replacement, PROMPTS, progress=False)
    for p in got["prompts"]:
        graph = attribute(replacement, p["prompt"], progress=False)
        assert (p["replacement_score"], p["completeness_score"]) == pytest.approx(graph_scores(graph), rel=1e-6)
        no_bos = graph_scores(graph, bos_errors=False)
        assert (p["replacement_score_no_bos"], p["completeness_score_no_bos"]) == pytest.approx(no_bos, rel=1e-6)
    # the BOS error nodes carry influence on this model: leaving them out raises both scores
    assert got["mean"]["replacement_score_no_bos"] > got["mean"]["replacement_score"]
    assert got["mean"]["completeness_score_no_bos"] > got["mean"]["completeness_score"]
    text = format_prompt_scores(got)
    assert "on 3 prompts" in text
    for name, line in zip(SCORE_NAMES, text.splitlines()[2:6]):
        assert line.split()[-2:] == [f"{got['mean'][name]:.4f}", f"{got['median'][name]:.4f}"], line


def test_an_undefined_score_is_left_out_of_the_summary() -> None:
    rows = [{"prompt": "a", "n_tokens": 2, "target": "b", **dict.fromkeys(SCORE_NAMES, 0.5)},
            {"prompt": "c", "n_tokens": 2, "target": "d", **dict.fromkeys(SCORE_NAMES, None)}]
    scores = {"n_prompts": 2, "n_given": 5, "prompts": rows, "mean": dict.fromkeys(SCORE_NAMES, 0.5),
              "median": dict.fromkeys(SCORE_NAMES, None)}
    text = format_prompt_scores(scores)
    assert "on 2 of 5 prompts" in text and "0.5000      n/a" in text


def test_a_prompt_too_long_is_refused_before_any_graph(replacement: ReplacementModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import cltrace.graph.prompt_scores

    built: list[object] = []
    monkeypatch.setattr(cltrace.graph.prompt_scores, "attribute", lambda *args, **kw: built.append(args))
    with pytest.raises(CltraceError, match=r"prompt 2 \('The cat sat on the'\) is 19 tokens, more than max_prompt_tokens \(9\)"):
        prompt_set_scores(replacement, [PROMPTS[1], PROMPTS[0]], PromptSetConfig(max_prompt_tokens=9), progress=False)
    assert built == []


def test_the_committed_set_is_new_and_ships_in_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    prompts = load_prompts()
    assert 12 <= len(prompts) <= 16 and len(set(prompts)) == len(prompts)
    kinds = {json.loads(line)["kind"] for line in DEFAULT_PROMPTS.read_text().splitlines()}
    assert {"acronym", "factual", "antonym", "sequence", "code", "bracket"} <= kinds
    for bench in (ROOT / "benchmarks" / "prompts").glob("*.jsonl"):
        used = {json.loads(line)["prompt"] for line in bench.read_text().splitlines() if line.strip()}
        assert not used & set(prompts), bench.name
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    where = DEFAULT_PROMPTS.relative_to(ROOT / "src" / "cltrace" / "graph").as_posix()
    assert any(fnmatch.fnmatch(where, pattern) for pattern in package_data["cltrace.graph"])
    assert PromptSetConfig().max_prompts >= len(prompts)  # the default scores the whole set


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny llama (word-level tokenizer) as a model folder, a random CLT for it, documents and a prompt set."""
    root = tmp_path_factory.mktemp("prompt-scores")
    model = tiny_model_dir(root / "model")
    save_transcoder(random_transcoder(tiny_model("llama"), "clt", seed=1), root / "tc")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in word_docs(200)))
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "t5 t17 t9 t33", "kind": "x"}\n\n{"prompt": "t40 t41 t42"}\n')
    return {"model": str(model), "tc": str(root / "tc"), "docs": str(docs), "prompts": str(prompts), "root": str(root)}


def eval_args(f: dict[str, str], *extra: str) -> list[str]:
    return ["eval", "-t", f["tc"], "-m", f["model"], "-s", f["docs"], "-n", "32", "--n-ctx", str(16 + FIRST_POSITION),
            *extra]


def test_eval_prints_and_writes_the_prompt_set_scores(files: dict[str, str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(*eval_args(files, "--prompts", files["prompts"], "-o", str(tmp_path / "e.json")), capsys=capsys)
    assert code == 0, err
    assert "NMSE mean" in out and "attribution graphs on 2 prompts" in out
    assert "replacement score, no BOS errors" in out and "completeness score, no BOS errors" in out
    assert "graphs" in err  # the progress bar over the prompts, on stderr
    graphs = json.loads((tmp_path / "e.json").read_text())["graphs"]
    assert graphs["prompts_file"] == files["prompts"] and graphs["n_prompts"] == 2
    assert [p["prompt"] for p in graphs["prompts"]] == ["t5 t17 t9 t33", "t40 t41 t42"]
    for name in SCORE_NAMES:
        values = [p[name] for p in graphs["prompts"]]
        assert graphs["mean"][name] == pytest.approx(sum(values) / 2)
        assert f"{graphs['mean'][name]:.4f}" in out

    # the committed set, cut to its first prompts; -q: no bar
    code, out, err = run_cli(*eval_args(files, "--max-prompts", "2", "-q"), capsys=capsys)
    assert code == 0, err
    assert f"attribution graphs on 2 of {len(load_prompts())} prompts" in out and "graphs" not in err

    code, out, err = run_cli(*eval_args(files, "--prompts", "none", "-o", str(tmp_path / "n.json")), capsys=capsys)
    assert code == 0, err
    assert "NMSE mean" in out and "attribution graphs" not in out
    assert "graphs" not in json.loads((tmp_path / "n.json").read_text())


@pytest.mark.parametrize(("content", "needles"), [
    (None, ("does not exist", '{"prompt"')),
    ("", ("has no prompts",)),
    ("\n  \n", ("has no prompts",)),
    ('{"prompt": "a b"}\n{"prompt": "c d"\n', ("line 2: not JSON",)),
    ("t5 t6\n", ("line 1: not JSON",)),
    ('{"text": "t5 t6"}\n', ('line 1: no "prompt" string',)),
    ('["t5 t6"]\n', ('line 1: no "prompt" string',)),
    ('{"prompt": "  "}\n', ('line 1: no "prompt" string',)),
    (b"\xff\xfe{", ("cannot read prompts file",)),
    ("folder", ("is not a file",)),
])
def test_a_bad_prompts_file_is_one_line(files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        content: str | bytes | None, needles: tuple[str, ...]) -> None:
    path = tmp_path / "p.jsonl"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, out, err = run_cli(*eval_args(files, "--prompts", str(path)), capsys=capsys)
    assert_one_line_error(code, err, str(path), *needles)
    assert "NMSE" not in out  # refused before the evaluation


def test_a_prompt_too_long_stops_eval_before_the_evaluation(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(*eval_args(files, "--prompts", files["prompts"], "--max-prompt-tokens", "4"), capsys=capsys)
    assert_one_line_error(code, err, "prompt 1 ('t5 t17 t9 t33') is 5 tokens, more than max_prompt_tokens (4)")
    assert "NMSE" not in out
