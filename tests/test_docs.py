"""Every command the README and docs/ show stays valid: each `cltrace ...` line in their code blocks
(also under `.venv/bin/`, `torchrun ... -m cltrace` and `make demo`) is parsed by the real command
line, so a renamed command or option fails here. What the commands do is tested elsewhere
(test_cli, test_trace, test_train, test_serve, ...); the README's Python example runs below."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer import _click as click  # typer vendors its own click: its classes, not the click package's

from cltrace.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def cltrace_invocations(path: Path) -> list[list[str]]:
    """The argument lists of the `cltrace` commands in the shell blocks of `path`."""
    out = []
    for lang, body in code_blocks(path.read_text()):
        if lang not in ("sh", "bash", "shell", "console", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().lstrip("$ ").strip()
            if not line:
                continue
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            for i, w in enumerate(words):
                if w.endswith("cltrace") and (i == 0 or words[i - 1] == "-m" or "/" in w):
                    out.append(words[i + 1 :])
                    break
    return out


CASES = [(p.name, args) for p in DOCS for args in cltrace_invocations(p)]


def test_docs_show_commands() -> None:
    names = {name for name, _ in CASES}
    assert "README.md" in names and len(CASES) >= 15, CASES


def parse(args: list[str]) -> None:
    """Parse `args` as the CLI would, down to the subcommand, without running anything."""
    command = typer.main.get_command(app)
    ctx = command.make_context("cltrace", list(args), resilient_parsing=False)
    while hasattr(command, "resolve_command"):  # a group: descend into the subcommand
        name, sub, rest = command.resolve_command(ctx, ctx._protected_args + ctx.args)
        assert sub is not None, f"no command {name!r}"
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


@pytest.mark.parametrize("doc,args", CASES, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in CASES])
def test_documented_command_parses(doc: str, args: list[str]) -> None:
    if any("..." in a for a in args):
        pytest.skip("an elided command line (...) only names the command")
    try:
        parse(args)
    except click.ClickException as e:  # an unknown command or option, or a bad value
        pytest.fail(f"{doc}: `cltrace {' '.join(args)}`: {e.format_message()}")


def test_makefile_demo_runs_the_documented_commands() -> None:
    """`make demo` is the README's first command: its cltrace lines parse too."""
    text = (ROOT / "Makefile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("$(BIN)/cltrace ")]
    assert any(" trace " in ln for ln in lines) and any(" serve " in ln for ln in lines)
    for ln in lines:
        args = shlex.split(ln.replace("$(BIN)/cltrace", "").replace("$(PROMPT)", "p").replace("$(DEMO_DIR)", "demo")
                           .replace("$(PORT)", "8000"))
        parse(args)


def test_readme_python_example_names_real_functions() -> None:
    """The imports of the README's Python example resolve (its calls run in test_trace and test_cli)."""
    blocks = [body for lang, body in code_blocks((ROOT / "README.md").read_text()) if lang == "python"]
    assert blocks
    for body in blocks:
        for line in body.splitlines():
            if line.startswith("from cltrace"):
                exec(line, {})  # noqa: S102 - our own README's import lines


def test_input_surfaces_name_tests_that_exist() -> None:
    """docs/input-surfaces.md cites the tests behind each behaviour: every cited file and test must exist
    (`::name` after a file; a bare `::name` refers to the file cited last; `*` matches a name's tail)."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "input-surfaces.md").read_text(encoding="utf-8")
    cited = re.findall(r"`((?:test_\w+\.py)?(?:::[\w*]+)?)`", text)
    assert len(cited) >= 40, "the document should cite the tests behind its rows"
    current = None
    for ref in cited:
        file, _, name = ref.partition("::")
        if file:
            current = root / "tests" / file
            assert current.is_file(), f"docs/input-surfaces.md cites {file}, which does not exist"
        if name:
            assert current is not None, f"{ref} follows no file"
            pattern = re.escape(name).replace(r"\*", r"\w*")
            assert re.search(rf"^def {pattern}\b", current.read_text(encoding="utf-8"), re.M), (
                f"docs/input-surfaces.md cites {current.name}::{name}, which is not a test there")
