"""Property tests of the command line: every command, fed argument lists that hypothesis builds from
its real option names and from hostile values (empty strings, negative, huge and non-finite numbers,
missing paths, folders where files belong, garbage files, unicode), ends cleanly:

- the exit status is 0, 1 or 2 and no output holds a traceback;
- a failure says so in one line: `error: ...` (a CltraceError) as the last line of stderr; or, for
  what click's parser refuses (a missing or unknown option, a value out of its declared range),
  click's own usage error: the message in a box, after the two lines `Usage: cltrace ...` and
  `Try 'cltrace ... --help' for help.` where click got as far as the command.

The commands run in-process on a tiny random model (the default model's loader is swapped for it,
the hub is offline, the cache is a temporary folder); the steps that would start long work (training,
harvesting, evaluating, building feature pages, tracing with pictures) are replaced by a stub that
stops the command there, counted as "accepted".
"""

from __future__ import annotations

import collections
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from helpers.cli import run_cli
from helpers.serve import build_folder, replacement
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cltrace.cli import app


class Reached(BaseException):
    """Raised by a stubbed long step: the arguments got that far (a BaseException, so that no
    `except Exception` in the command turns it into something else)."""


def commands() -> dict[str, list[Any]]:
    """Every leaf command ("features build", ...) and its click parameters."""
    found: dict[str, list[Any]] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(None):
                walk(cmd.get_command(None, name), [*path, name])
        else:
            found[" ".join(path)] = list(cmd.params)

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = commands()

# Values for any argument: numbers past every range, non-finite, empty, unicode, paths of every kind
# (names relative to the working folder, which holds the files `work_folder` makes).
HOSTILE = [
    "", " ", "-1", "0", "1", "2", "-0", "1e309", "-1e309", "nan", "inf", "-inf", "1e308", "99999999999999999999",
    "9" * 40, "0x10", "1.5", "ünïcødé ☃", "日本語", "\U0001F600", "--", "-", "missing", "missing/deeper/file.txt",
    "/nonexistent/x", "dir", "garbage.bin", "empty.txt", "corpus.txt", ".", "..", "acronym.safetensors",
    "features.db", "clt", "default", "config.json", "supernodes.json", "acronym.explorer.json",
]
# Values closer to what each option means, so that the commands get past their first check
MEANINGFUL = {
    "prompt": ["AB(C", "The National D", "x" * 200, "  "],
    "transcoder": ["clt", "default", "dir", "garbage.bin", "missing"],
    "src": ["clt", "default", "dir"],
    "dst": ["new-out", "clt", "dir", "acronym.safetensors"],
    "model": ["default", "missing.gguf", "dir", "garbage.bin", "no-such-org/no-such-model"],
    "set_": ["0:1=0", "0:1@2=x2", "1:3=1e308", "0:1=1e30", "0:0=-1e38", "0:1=nan", "9:9=1", "0:1@999=1", "0:1@2-=x0",
             "0:1@5-2=1", "0:99999999999999999999=1", "say-N=0", "say-N@3=x-1", "=1", "0:1", "a:b=1"],
    "overrides": ["n_features=8", "n_features=-1", "lr=nan", "lr=1e309", "bogus=1", "=", "kind=", "total_steps=0",
                  "batch_tokens=99999999999999999999", "n_features"],
    "target": ["A", "AB", "", "☃"],
    "layers": ["0-1", "1-0", "x", "0-99", "-1-2"],
    "layer": ["0", "1", "99", "-1"], "head": ["0", "1", "99", "-1"],
    "feature": ["0:1", "2:7", "9:9", "-1:0", "a:b", "0:99999999999999999999", "0", ""],
    "graph": ["acronym.safetensors", "garbage.bin", "features.db", "dir"],
    "db": ["features.db", "garbage.bin", "dir", "missing.db", "acronym.safetensors"],
    "features": ["features.db", "auto", "none", "garbage.bin", "dir"],
    "prompts": ["default", "none", "prompts.jsonl", "corpus.txt", "garbage.bin", "empty.txt", "dir", "missing"],
    "source": ["corpus.txt", "default", "missing.txt", "dir", "garbage.bin", "hf:", "empty.txt"],
    "config": ["config.json", "garbage.bin", "dir", "corpus.txt"],
    "store": ["dir", "clt", "missing"],
    "supernodes": ["supernodes.json", "garbage.bin", "acronym.explorer.json", "dir"],
    "host": ["127.0.0.1", "0.0.0.0", "::1", "", "not a host"],
    "graph_dir": [".", "dir", "garbage.bin", "missing"],
    "out": ["new-out", "dir", "garbage.bin", "acronym.safetensors"],
    "output": ["new-out.json", "dir", "acronym.safetensors", "missing/deeper/g.json"],
    "json_out": ["new-out.json", "dir", "missing/deeper/x.json"],
    "out_dir": ["new-out", "garbage.bin", "dir"],
    "preset": ["tiny", "default", "nope"],
    # numbers in range and just past it
    "tokens": ["64", "1", "0"], "n_ctx": ["16", "2", "1"], "batch_size": ["2", "0"], "top": ["3", "0", "101"],
    "port": ["8123", "0", "65536"], "max_feature_nodes": ["20", "0"], "node_threshold": ["0.5", "1.5"],
    "edge_threshold": ["0.9", "-0.1"], "feature_tokens": ["100", "0"], "generate": ["2", "513"], "samples": ["1", "-1"],
    "limit": ["5", "0"], "top_k": ["3", "0"], "max_memory": ["0.05", "4"], "heldout_fraction": ["0.5", "1", "-0.1"],
    "shard_contexts": ["4", "0"], "feature_parallel": ["1", "-1"], "dist_timeout": ["0.5", "60"],
    "max_prompts": ["2", "0"], "max_prompt_tokens": ["3", "64", "1"],
    # choices
    "mode": ["iterative", "constrained"], "to": ["native", "circuit-tracer"], "format": ["neuronpedia"],
    "dtype": ["bfloat16", "float16"], "compute_dtype": ["float32", "bfloat16"], "text_column": ["text", "nope"],
    "slug": ["g", "../../x"], "scan": ["s", "../../x", "a/b", ".."],
}
# Options that are optional but that the command needs to get anywhere (`intervene` without --set
# stops at once), or whose default names what the sandbox lacks (the default corpus)
USUAL = {"intervene": ["--set"], "harvest": ["--source"], "eval": ["--source"], "features build": ["--source"]}
TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=12)  # argv holds no NUL or control bytes


@st.composite
def values(draw: st.DrawFn, name: str) -> str:
    """A value for parameter `name`: mostly one that means something to it (so that the command's
    own checks run, past click's), else anything hostile."""
    if name in MEANINGFUL and draw(st.integers(0, 9)) not in (4, 5, 6):
        return draw(st.sampled_from(MEANINGFUL[name]))
    return draw(st.one_of(st.sampled_from(HOSTILE), TEXT, st.integers(-(2**70), 2**70).map(str),
                          st.floats(allow_nan=True, allow_infinity=True).map(str)))


@st.composite
def argument_lists(draw: st.DrawFn, command: str) -> list[str]:
    """Positional arguments (each sometimes left out), then options by their real names (sometimes
    an unknown one, or one missing its value at the end), with hostile values."""
    params = COMMANDS[command]
    args = command.split()
    for p in [p for p in params if type(p).__name__.endswith("Argument")]:
        if draw(st.integers(0, 9)) != 4:  # (hypothesis favours a range's ends: rare is in its middle)
            args.append(draw(values(p.name)))
    options = [p for p in params if type(p).__name__.endswith("Option")]
    usual = USUAL.get(command, ())
    for p in [p for p in options if p.required or p.opts[0] in usual]:  # usually given: else every example stops there
        if draw(st.integers(0, 19)) != 9:
            args += [draw(st.sampled_from(p.opts)), draw(values(p.name))]
    for _ in range(draw(st.integers(0, 4))):
        p = draw(st.sampled_from(options)) if options else None
        if p is None or draw(st.integers(0, 19)) == 9:
            args.append(draw(st.sampled_from(["--nope", "-Z", "--help"])))
            continue
        args.append(draw(st.sampled_from(p.opts + p.secondary_opts)))
        if not p.is_flag:
            args.append(draw(values(p.name)))
    # an option left without its value at the very end: click's usage error
    if options and draw(st.integers(0, 14)) == 7:
        args.append(draw(st.sampled_from([o for p in options if not p.is_flag for o in p.opts])))
    return args


@functools.cache
def pristine(base: Path) -> Path:
    """The files the values name: a tiny model's transcoder (clt), graph, feature store, explorer
    sidecar, supernodes file, a small corpus, garbage, an empty file, an empty folder, a bad config."""
    folder = build_folder(base / "pristine")["root"]
    (folder / "acronym.explorer.json").write_text(
        '{"format": "cltrace-explorer", "version": 1, "qParams": {"pinnedIds": [], "supernodes": [["say-N", "0_1_3"]]}}'
    )
    (folder / "supernodes.json").write_text('{"qParams": {"supernodes": [["say-N", "0_1_3", "1_2_4"]]}}')
    (folder / "corpus.txt").write_text("The National Digital Analytics Group (NDAG) met today.\n" * 20)
    (folder / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "empty.txt").write_text("")
    (folder / "prompts.jsonl").write_text('{"prompt": "AB(C"}\n{"prompt": "The National D"}\n')
    (folder / "config.json").write_text('{"kind": "clt", "n_features": "many", "lr": -1}')
    (folder / "dir").mkdir()
    return folder


def tiny_transcoder_path() -> Path:
    return Path.cwd() / "clt"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-property")


@pytest.fixture
def sandbox(base: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline, cache in a temporary folder, the default model the tiny one, long steps stubbed."""
    import uvicorn

    import cltrace.data.store
    import cltrace.eval
    import cltrace.features
    import cltrace.model
    import cltrace.serve.app
    import cltrace.trace.run
    import cltrace.train
    import cltrace.train.default

    pristine(base)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLTRACE_CACHE", str(base / "cache"))
    real_load = cltrace.model.load_model

    def load_model(name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        return replacement().model if name in (None, "default") else real_load(name, *args, **kwargs)

    def reached(*_args: Any, **_kwargs: Any) -> None:
        raise Reached()

    monkeypatch.setattr(cltrace.model, "load_model", load_model)
    monkeypatch.setattr(cltrace.train.default, "default_transcoder_path", lambda **_kw: tiny_transcoder_path())
    for module, name in [(cltrace.train, "train_transcoder"), (cltrace.data.store, "harvest_to_store"),
                         (cltrace.eval, "evaluate"), (cltrace.features, "build_feature_store"),
                         (cltrace.trace.run, "trace_prompt"), (cltrace.trace.run, "ensure_feature_db"),
                         (uvicorn, "run")]:
        monkeypatch.setattr(module, name, reached)
    monkeypatch.setattr(cltrace.serve.app, "assets_built", lambda: True)
    # one thread: the tiny model's products are too small to share, and on a busy machine torch's
    # threads waiting for each other made each command 20 times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield base
    torch.set_num_threads(threads)


def fresh_work_folder(base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the pristine files as the working folder: a command that writes or overwrites
    (convert --force, features label, ...) never changes what the next example sees."""
    work = base / "work"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine(base), work, symlinks=True)
    monkeypatch.chdir(work)
    return work


OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()


def check(command: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run `cltrace ARGS` and check the property; tally how it ended. Returns (how, stdout): how is
    "ok", "error" (one `error:` line), "usage" (click's usage error) or "accepted" (a long step reached)."""
    try:
        code, out, err = run_cli(*args, capsys=capsys)
    except Reached:
        capsys.readouterr()
        OUTCOMES[(command, "accepted")] += 1
        return "accepted", ""
    shown = f"cltrace {args!r} -> exit {code}\nstdout: {out[-800:]}\nstderr: {err[-1500:]}"
    assert code in (0, 1, 2), shown
    assert "Traceback" not in out + err, shown
    if code == 0:
        OUTCOMES[(command, "ok")] += 1
        return "ok", out
    # progress bars (carriage returns, "%|") are not messages
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    box = [i for i, line in enumerate(lines) if line.startswith(("╭─ Error", "Error: "))]
    if box:
        # click's usage error: the message in a box (rich) or on an `Error:` line, after the lines
        # `Usage: cltrace ...` and `Try 'cltrace ... --help' for help.` where click got that far
        before = lines[: box[0]]
        assert code == 2 and len(box) == 1 and box[0] == (2 if before else 0), shown
        # (in-process, click names the program after sys.argv[0]: "cltrace" when installed)
        assert not before or (before[0].startswith("Usage: ") and before[1].startswith("Try '")), shown
        assert lines[-1].startswith("╰") or lines[-1].startswith("Error: "), shown
        OUTCOMES[(command, "usage")] += 1
        return "usage", out
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0], shown
    assert len(errors[0]) > len("error: ") + 10, shown  # says what is wrong
    OUTCOMES[(command, "error")] += 1
    return "error", out


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_any_arguments_end_in_a_clean_exit(command: str, sandbox: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(args=argument_lists(command))
    def run(args: list[str]) -> None:
        fresh_work_folder(sandbox, monkeypatch)
        check(command, args, capsys)

    run()
    ended = {kind for (cmd, kind) in OUTCOMES if cmd == command}
    # the examples reached past the parser: each command's own checks ran, not only click's
    assert "usage" in ended and ended & {"error", "ok", "accepted"}, OUTCOMES


# What the property tests found, kept as fixed examples: each was a traceback (or, for x1e308, NaN
# probabilities; for --host "", a server on every interface) before its fix
FOUND = [
    (["intervene", "AB(C", "-t", "clt", "--set", "1:3=1e308"], "error"),  # float32 overflow setting the activation
    (["intervene", "AB(C", "-t", "clt", "--set", "1:3=x1e308"], "error"),
    (["attribute", "AB(C", "-t", "clt", "-o", "dir"], "error"),  # os.replace onto a folder, after the whole graph
    (["attribute", "AB(C", "-t", "clt", "-o", "g.safetensors", "--max-memory", "1e300"], "usage"),  # int(inf)
    (["features", "export", "garbage.bin"], "error"),  # mkdir under a file
    (["features", "search", "x", "--limit", "99999999999999999999"], "usage"),  # SQLite integer overflow
    (["predict", "AB(C", "--top", "100"], "ok"),  # top-k past the tiny model's vocabulary of 96
    (["serve", ".", "--host", ""], "error"),
]


@pytest.mark.parametrize(("args", "how"), FOUND, ids=lambda a: " ".join(a)[:40] if isinstance(a, list) else a)
def test_what_the_property_tests_found_ends_cleanly(args: list[str], how: str, sandbox: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fresh_work_folder(sandbox, monkeypatch)
    ended, out = check(args[0], args, capsys)
    assert ended == how, out
    if args[0] == "predict":  # the whole vocabulary, ranked
        assert len([line for line in out.splitlines() if line.strip().split(".")[0].isdigit()]) == 96, out
