"""The command line speaks one dialect. Walking every command of the real app: a short flag means
the same option everywhere, every option naming something written is `-o/--out`, the transcoder is
always `-t/--transcoder`; the old spellings still work for a release and say so on stderr; and the
commands that read feature pages find a transcoder's store the way `trace --features auto` does."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated

import pytest
import typer
from helpers.cli import assert_one_line_error, run_cli
from helpers.models import VOCAB, tiny_model
from typer import _click as click  # typer vendors its own click: its classes, not the click package's

from cltrace.cli import app
from cltrace.features import build_feature_store
from cltrace.trace.run import feature_db_path
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder

#: Words in an option's help that say it names a file or folder the command writes.
WRITES = ("where to write", "folder to write", "run folder", "store folder", "store to write", "also write")

Commands = list[tuple[str, click.Command]]


def commands(of: typer.Typer = app) -> Commands:
    """(path, command) of every leaf command of an app (the real one), e.g. ("features show", ...)."""
    found: Commands = []

    def walk(cmd: click.Command, path: str) -> None:
        if hasattr(cmd, "commands"):  # a group
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found.append((path, cmd))

    walk(typer.main.get_command(of), "")
    return found


def clashes(cmds: Commands) -> dict[str, list[str]]:
    """Short flags that stand for more than one long option across `cmds` (hidden ones included)."""
    meanings: dict[str, set[str]] = defaultdict(set)
    for _, cmd in cmds:
        for p in cmd.params:
            if p.param_type_name == "option":
                long = next(o for o in p.opts if o.startswith("--"))
                for short in (o for o in [*p.opts, *p.secondary_opts] if not o.startswith("--")):
                    meanings[short].add(long)
    return {short: sorted(longs) for short, longs in meanings.items() if len(longs) > 1}


def misnamed_outputs(cmds: Commands) -> list[str]:
    """Visible options or arguments naming something written that are not `-o/--out`."""
    wrong = []
    for path, cmd in cmds:
        for p in cmd.params:
            if getattr(p, "hidden", False):
                continue
            if p.param_type_name == "option" and any(w in (p.help or "").lower() for w in WRITES):
                if sorted(p.opts) != ["--out", "-o"]:
                    wrong.append(f"{path} {'/'.join(p.opts)}")
            if p.param_type_name == "argument" and p.name in ("out", "out_dir", "output", "dst"):
                wrong.append(f"{path} {p.name.upper()}")
    return wrong


def test_the_walk_sees_every_command_and_its_outputs() -> None:
    cmds = dict(commands())
    assert {"train", "harvest", "eval", "attribute", "trace", "export", "intervene", "predict", "serve", "convert",
            "info", "features build", "features show", "features export"} <= set(cmds)
    outputs = [path for path, cmd in cmds.items() for p in cmd.params
               if p.param_type_name == "option" and "--out" in p.opts]
    assert {"train", "harvest", "eval", "attribute", "trace", "export", "convert", "features build",
            "features export"} <= set(outputs)


def test_each_short_flag_has_one_meaning() -> None:
    assert clashes(commands()) == {}


def test_every_output_is_o_out() -> None:
    assert misnamed_outputs(commands()) == []


def test_the_transcoder_is_always_t() -> None:
    for path, cmd in commands():
        for p in cmd.params:
            if p.name == "transcoder":
                assert p.param_type_name == "option" and sorted(p.opts) == ["--transcoder", "-t"], path


def test_the_checks_catch_a_planted_clash_and_output() -> None:
    planted = typer.Typer()

    @planted.command()
    def seeded(
        dst: Annotated[Path | None, typer.Argument()] = None,
        seed: Annotated[int, typer.Option("--seed", "-s")] = 0,
        output: Annotated[Path | None, typer.Option("--output", help="Where to write the log.")] = None,
    ) -> None:
        """A command with a clashing flag and two misnamed outputs."""

    @planted.command()
    def other() -> None:
        """A second command, so that the app is a group."""

    cmds = [*commands(), *[(f"planted {path}", cmd) for path, cmd in commands(planted)]]
    assert clashes(cmds) == {"-s": ["--seed", "--source"]}
    assert misnamed_outputs(cmds) == ["planted seeded DST", "planted seeded --output"]


def test_old_spellings_work_with_a_deprecation_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=3, d_model=32, n_features=8, activation="relu")
    save_transcoder(Transcoder.random(cfg), tmp_path / "clt")
    code, out, err = run_cli("convert", str(tmp_path / "clt"), str(tmp_path / "old"), capsys=capsys)
    assert code == 0 and (tmp_path / "old" / "config.json").is_file(), err
    assert "the transcoder as a positional argument is deprecated" in err and "use -t/--transcoder" in err
    assert "the output folder as a positional argument is deprecated" in err
    code, out, err = run_cli("convert", "-t", str(tmp_path / "clt"), "-o", str(tmp_path / "new"), capsys=capsys)
    assert code == 0 and "deprecated" not in err and (tmp_path / "new" / "config.json").is_file()
    assert (tmp_path / "new" / "transcoder.safetensors").read_bytes() == (tmp_path / "old" / "transcoder.safetensors").read_bytes()
    code, _, err = run_cli("convert", str(tmp_path / "clt"), "-t", str(tmp_path / "new"), "-o", str(tmp_path / "x"),
                           capsys=capsys)
    assert_one_line_error(code, err, "both -t/--transcoder and the transcoder as a positional argument given")
    code, _, err = run_cli("convert", "-t", str(tmp_path / "clt"), capsys=capsys)
    assert_one_line_error(code, err, "missing option -o/--out")
    code, _, err = run_cli("attribute", "The cat", "-t", str(tmp_path / "clt"), "--output", str(tmp_path / "dir" / "g"),
                           capsys=capsys)
    assert "--output is deprecated" in err
    assert_one_line_error(code, err, str(tmp_path / "dir"), "does not exist")  # the old spelling reached the check


CORPUS = [" ".join(f"w{(7 * i + j) % (VOCAB - 6)}" for j in range(30)) for i in range(12)]


def _tokenize(text: str) -> list[int]:
    return [int(w[1:]) + 2 for w in text.split()]


def test_feature_pages_are_found_by_transcoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`features show/label/search/stats/export -t T` read the store `trace --features auto` keeps for T."""
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tc = Transcoder.random(TranscoderConfig(kind="clt", n_layers=3, d_model=32, n_features=8, activation="relu"), seed=3)
    save_transcoder(tc, tmp_path / "clt")
    db = feature_db_path(tc)
    db.parent.mkdir(parents=True)
    build_feature_store(tiny_model("llama"), tc, CORPUS, 120, db, n_ctx=16, batch_size=4, tokenize=_tokenize,
                        bos_id=1, progress=False, top_k=3)
    t = ("-t", str(tmp_path / "clt"))
    code, out, err = run_cli("features", "label", "1:5", "found it", *t, capsys=capsys)
    assert code == 0, err
    code, out, err = run_cli("features", "show", "1:5", *t, capsys=capsys)
    assert code == 0 and "found it" in out, err
    code, out, _ = run_cli("features", "search", "found", *t, capsys=capsys)
    assert out.split() == ["1:5", "found", "it"]
    code, out, _ = run_cli("features", "stats", *t, capsys=capsys)
    assert code == 0 and "features" in out
    code, out, _ = run_cli("features", "export", "-o", str(tmp_path / "pages"), *t, capsys=capsys)
    assert code == 0 and "wrote 24 feature files" in out
    # another transcoder has no store yet; the default one is not trained just to look
    other = Transcoder.random(TranscoderConfig(kind="clt", n_layers=3, d_model=32, n_features=8, activation="relu"), seed=4)
    save_transcoder(other, tmp_path / "other")
    code, _, err = run_cli("features", "show", "1:5", "-t", str(tmp_path / "other"), capsys=capsys)
    assert_one_line_error(code, err, "no feature store for the transcoder", "cltrace trace")
    code, _, err = run_cli("features", "stats", capsys=capsys)
    assert_one_line_error(code, err, "default transcoder is not trained yet")
    assert not (tmp_path / "cache" / "transcoders").exists()


def test_defaults_bounds_and_help_come_from_the_config_dataclass() -> None:
    """`max_feature_nodes` and `batch_size` are defined once, on AttributionConfig: the command line
    and the server take their default, least value and help text from it."""
    from cltrace.fields import field_bounds, field_help
    from cltrace.graph.config import AttributionConfig

    pytest.importorskip("fastapi")
    from cltrace.serve.app import MAX_FEATURE_NODES_SERVED, NewGraphBody

    cfg = AttributionConfig()
    cmds = dict(commands())
    seen = 0
    for path in ("attribute", "trace"):
        for p in cmds[path].params:
            if p.name in ("max_feature_nodes", "batch_size"):
                assert p.default == getattr(cfg, p.name), (path, p.name)
                assert (p.min, p.max) == field_bounds(AttributionConfig, p.name), (path, p.name)
                assert p.help == field_help(AttributionConfig, p.name) and p.help.startswith(
                    {"max_feature_nodes": "At most this many feature nodes", "batch_size": "Target rows"}[p.name])
                seen += 1
    assert seen == 3
    server = NewGraphBody.model_fields["max_feature_nodes"]
    assert server.default == cfg.max_feature_nodes and server.description == field_help(AttributionConfig, "max_feature_nodes")
    assert NewGraphBody(prompt="x", max_feature_nodes=0).max_feature_nodes == 0  # the library's least value
    with pytest.raises(ValueError):
        NewGraphBody(prompt="x", max_feature_nodes=MAX_FEATURE_NODES_SERVED + 1)  # the server's own cap
