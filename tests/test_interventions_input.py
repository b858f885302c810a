"""Interventions as written: the --set syntax, supernodes, and one clear line for bad input (Python API and command line)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, run_cli
from helpers.interventions import active_features, case, hand_graph, max_diff, random_transcoder
from helpers.models import char_tokenizer, prompt_ids, tiny_model

from cltrace.errors import CltraceError
from cltrace.graph.graph import NodeKind
from cltrace.graph.supernodes import merge_supernodes, supernodes_to_qparams
from cltrace.replacement.interventions import Intervention, intervene, intervene_batch, parse_intervention
from cltrace.replacement.supernodes import Supernode, load_supernodes, save_supernodes, supernodes_from_json
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder

# -- supernodes ---------------------------------------------------------------------------------------


def test_supernodes_roundtrip_and_expand(tmp_path: Path) -> None:
    nodes = {"say-x": Supernode("say-x", [(0, 3, 1), (1, 5, None)]), "other": Supernode("other", [[2, 2, 2]])}
    path = save_supernodes(tmp_path / "s.json", nodes)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary left behind
    loaded = load_supernodes(path)
    assert loaded["say-x"].members == [(0, 3, 1), (1, 5, None)] and loaded["other"].members == [(2, 2, 2)]
    specs = parse_intervention("say-x@4-=x0", loaded)
    assert specs == [Intervention(0, 3, None, 0.0, 1, 1), Intervention(1, 5, None, 0.0, 4, None)]
    (tmp_path / "ct.json").write_text(json.dumps({"qParams": {"supernodes": [["grp", "0_3_1", "1_5_1"]]}}))
    assert load_supernodes(tmp_path / "ct.json")["grp"].members == [(0, 3, 1), (1, 5, 1)]
    with pytest.raises(CltraceError, match="no supernode named 'nope'"):
        parse_intervention("nope=0", loaded)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CltraceError, match="cannot read supernodes file"):
        load_supernodes(tmp_path / "bad.json")


def test_supernode_intervention_equals_its_members() -> None:
    rm = case("gemma2", "clt")
    run = rm.run(prompt_ids())
    picks = active_features(run, 2)
    sn = Supernode("grp", [(picks[0][0], picks[0][1], picks[0][2]), (picks[1][0], picks[1][1], None)])
    via_name = intervene(rm, run.input_ids, parse_intervention("grp=x0", {"grp": sn}), run=run)
    direct = intervene(
        rm, run.input_ids,
        [Intervention.at(picks[0][0], picks[0][1], picks[0][2], factor=0.0), Intervention.at(*picks[1][:2], None, factor=0.0)],
        run=run,
    )
    assert max_diff(via_name.logits_after, direct.logits_after) == 0.0


def test_merge_supernodes_sums_edges() -> None:
    graph = hand_graph()
    merged = merge_supernodes(graph, [Supernode("ab", [(0, 3, 1), (1, 5, None)])])
    assert merged.n_nodes == graph.n_nodes - 1
    dense, old = merged.to_dense(), graph.to_dense()
    s = int((merged.nodes.extra["supernode"] == 0).nonzero()[0])
    assert merged.nodes.kind[s] == NodeKind.FEATURE and merged.nodes.activation[s] == pytest.approx(2.5)
    # old nodes 2..6 are new nodes 1..5; the members 0 and 1 are merged into s
    for t_old in range(2, 7):
        t_new = t_old - 1
        assert dense[t_new, s] == pytest.approx(float(old[t_old, 0] + old[t_old, 1]))  # out of the supernode
        assert dense[s, t_new] == pytest.approx(float(old[0, t_old] + old[1, t_old]))  # into it
    assert dense[s, s] == 0  # the edge between members is dropped
    assert merged.metadata["supernodes"] == [{"name": "ab", "node": s, "members": ["0_3_1", "1_5_1"]}]
    assert supernodes_to_qparams(graph, [Supernode("ab", [(0, 3, 1), (1, 5, None)]), Supernode("z", [(9, 9, 9)])]) == [
        ["ab", "0_3_1", "1_5_1"]
    ]
    assert supernodes_from_json({"qParams": {"supernodes": supernodes_to_qparams(graph, [Supernode("ab", [(1, 5, None)])])}})[
        "ab"
    ].members == [(1, 5, 1)]


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("5:3", "does not have the form"),
        ("5:3@2", "does not have the form"),
        ("a:3=1", "layer 'a'"),
        ("5:-3=1", "feature '-3'"),
        ("5:3@x=1", "position 'x'"),
        ("5:3@4-2=1", "empty"),
        ("5:3=abc", "value 'abc'"),
        ("5:3=xz", "factor 'z'"),
        ("5:3=nan", "not a finite number"),
        ("5:3@1=", "does not have the form"),
    ],
)
def test_malformed_set_is_one_clear_line(spec: str, needle: str) -> None:
    with pytest.raises(CltraceError) as info:
        parse_intervention(spec)
    message = str(info.value)
    assert "\n" not in message and needle in message and spec in message


def test_parse_forms() -> None:
    assert parse_intervention("5:3=0") == [Intervention(5, 3, 0.0)]
    assert parse_intervention(" 5:3@4 = x2.5 ") == [Intervention(5, 3, None, 2.5, 4, 4)]
    assert parse_intervention("5:3@2-7=-1e-3") == [Intervention(5, 3, -1e-3, None, 2, 7)]
    assert parse_intervention("5:3@2-=x0") == [Intervention(5, 3, None, 0.0, 2, None)]
    assert str(parse_intervention("5:3@2-=x0")[0]) == "5:3@2-=x0"


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("3:0=1", "layer 3 is out of range: the transcoder has layers 0..2"),
        ("1:24=1", "feature 24 is out of range: layer 1 has features 0..23"),
        ("1:2@9=1", "position 9 is beyond the prompt (9 tokens, positions 0..8)"),
        ("1:2@3-12=1", "position 12 is beyond the prompt"),
    ],
)
def test_out_of_range_is_one_clear_line(spec: str, needle: str) -> None:
    rm = case("llama", "clt")
    run = rm.run(prompt_ids())
    with pytest.raises(CltraceError) as info:
        intervene(rm, run.input_ids, parse_intervention(spec), run=run)
    assert "\n" not in str(info.value) and needle in str(info.value)
    with pytest.raises(CltraceError, match="layer range 2-5 is not within 0..2"):
        intervene(rm, run.input_ids, [], mode="constrained", layers=(2, 5), run=run)
    with pytest.raises(CltraceError, match="constrained mode only"):
        intervene(rm, run.input_ids, [], mode="iterative", layers=(0, 1), run=run)


# -- the command line, on the default model -----------------------------------------------------------

ACRONYM = "The National Digital Analytics Group (N"


def test_cli_intervene(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=30, d_model=576, n_features=16, activation="jumprelu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    save_supernodes(tmp_path / "sn.json", [Supernode("grp", [(29, 1, None), (28, 2, None)])])

    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli("intervene", ACRONYM, "--transcoder", str(tmp_path / "clt"), *args, capsys=capsys)

    code, out, err = cli("--set", "29:3@5-=60", "--set", "grp=x2", "--supernodes", str(tmp_path / "sn.json"), "-g", "2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("SmolLM2-135M-Instruct") and "29:3@5-=60" in lines[1] and "29:1=x2" in lines[1]
    assert lines[3].split()[1] == "'DA'"  # before: the model's own top token
    assert any(line.startswith("continuation after:") for line in lines)
    # (positions beyond the prompt are checked through the Python API above: that check needs the
    # model loaded, which is the slow part here)
    for args, needle in [
        (("--set", "30:0=1"), "layer 30 is out of range"),
        (("--set", "29:16=1"), "feature 16 is out of range"),
        (("--set", "29:0@=1"), "malformed --set"),
        (("--set", "29-0=1"), "malformed --set"),
        (("--set", "grp=0"), "no supernode named 'grp'"),
    ]:
        code, out, err = cli(*args)
        errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and needle in errors[0], err
        assert "Traceback" not in err


# -- bad input: more cases, and the command line on a tiny model -----------------------------------


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: Intervention(1, 2, value=1.0, factor=2.0), "exactly one of value"),
        (lambda: Intervention(1, 2), "exactly one of value"),
        (lambda: Intervention.at(1, 2, -1, value=0.0), "position -1 is negative"),
        (lambda: Intervention.at(1, 2, (5, 3), value=0.0), "position range 5-3 is empty"),
        (lambda: Intervention(1, 2, None, 2.0, None, 4), "needs a start position"),
        (lambda: Intervention.at(1, 2, 3, factor=float("inf")), "not a finite number"),
    ],
)
def test_bad_intervention_in_python_is_one_clear_line(make, needle: str) -> None:
    with pytest.raises(CltraceError) as info:
        make()
    assert "\n" not in str(info.value) and needle in str(info.value)


def test_open_ended_range_starting_beyond_the_prompt_is_refused() -> None:
    rm = case("llama", "clt")
    run = rm.run(prompt_ids())  # 9 tokens
    with pytest.raises(CltraceError) as info:
        intervene_batch(rm, run.input_ids, [parse_intervention("1:2@3=0"), parse_intervention("1:2@9-=0")], run=run)
    message = str(info.value)
    assert "\n" not in message and "position 9 is beyond the prompt (9 tokens, positions 0..8)" in message


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny Llama saved as a model folder (character tokenizer) and a random CLT for it."""
    root = tmp_path_factory.mktemp("intervene_cli")
    model = tiny_model("llama")
    model.model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    save_transcoder(random_transcoder(model, "clt"), root / "clt")
    return str(root / "model"), str(root / "clt")


def test_cli_bad_input_on_a_tiny_model(tiny_cli: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, clt_dir = tiny_cli
    tc = random_transcoder(tiny_model("llama"), "clt")
    n_layers, n_features = tc.n_layers, tc.n_features

    def cli(*sets: str) -> tuple[int, str, str]:
        args = [a for s in sets for a in ("--set", s)]
        return run_cli("intervene", "abcdef", "--transcoder", clt_dir, "--model", model_dir, *args, capsys=capsys)

    code, out, err = cli("1:2@3=0")
    assert code == 0, err
    n_prompt = int(out.split(" tokens:")[0].rsplit(" ", 1)[1])
    cases = [
        ((f"{n_layers}:0=1",), f"layer {n_layers} is out of range: the transcoder has layers 0..{n_layers - 1}"),
        ((f"1:{n_features}=1",), f"feature {n_features} is out of range"),
        ((f"1:2@{n_prompt}=0",), f"position {n_prompt} is beyond the prompt ({n_prompt} tokens"),
        ((f"1:2@1-{n_prompt + 3}=0",), "write 1- for a range that also covers generated tokens"),
        (("1:2@3=0", "1:2@@3=0"), "malformed --set '1:2@@3=0'"),
        (("1:2=",), "malformed --set"),
        (("1;2=0",), "malformed --set"),
        (("1:2=x",), "factor '' is not a number"),
    ]
    for sets, needle in cases:
        code, _, err = cli(*sets)
        assert_one_line_error(code, err, needle)


def test_cli_absurd_position_names_the_prompt_length(tiny_cli: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """A position past any prompt is refused with the prompt's real length, not the placeholder the
    command used for "length not known yet" (sys.maxsize) before the model was loaded."""
    model_dir, clt_dir = tiny_cli
    huge = "99999999999999999999"  # past sys.maxsize
    for spec in (f"1:2@{huge}=0", f"1:2@{huge}-=x2", f"1:2@1-{huge}=0"):
        code, _, err = run_cli("intervene", "abcdef", "--transcoder", clt_dir, "--model", model_dir, "--set", spec,
                               capsys=capsys)
        assert_one_line_error(code, err, f"position {huge} is beyond the prompt (", " tokens, positions 0..")
        assert str(sys.maxsize) not in err
