"""The front end's lint gate (`npm run lint` in `make test`) fails on a real bug.

eslint runs with web/eslint.config.js on copies of the explorer's sources in a temporary folder:
a clean copy passes, and the same copy with an undefined name planted in it fails, so the gate
in `make test` can fail and does not pass by linting nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"
ESLINT = WEB / "node_modules" / "eslint" / "bin" / "eslint.js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed: the front end's lint needs Node 20 or later"),
    pytest.mark.skipif(not ESLINT.exists(), reason="web/node_modules is missing: run `make setup` (npm ci in web/)"),
]


def eslint(folder: Path, *files: str) -> subprocess.CompletedProcess[str]:
    """eslint with the project's config on `files` (relative to `folder`, where it runs)."""
    command = [str(NODE), str(ESLINT), "--config", str(WEB / "eslint.config.js"), *files]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)


def copy_source(tmp_path: Path, name: str, planted: str = "") -> None:
    """web/src/`name` copied to tmp_path/src/, with `planted` appended."""
    (tmp_path / "src").mkdir(exist_ok=True)
    text = (WEB / "src" / name).read_text(encoding="utf-8")
    (tmp_path / "src" / name).write_text(text + planted, encoding="utf-8")


def test_the_front_end_lints_clean() -> None:
    result = eslint(WEB, ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["layout.js", "graphview.js", "main.js"])
def test_a_clean_copy_passes(tmp_path: Path, name: str) -> None:
    copy_source(tmp_path, name)
    result = eslint(tmp_path, f"src/{name}")
    assert result.returncode == 0, result.stdout + result.stderr


PLANTED = {
    "an undefined name": ("graphview.js", "(x) => x + undefinedThing", ["'undefinedThing' is not defined", "no-undef"]),
    # src/ runs in the browser: `document` is known there, node's `process` is not
    "a node global in browser code": ("layout.js", "() => [document.title, process.argv]", ["'process' is not defined"]),
    "loose equality": ("layout.js", "(a, b) => a == b", ["eqeqeq"]),
    "an unused name": ("main.js", "() => { const unused = 1; }", ["'unused' is assigned a value but never used"]),
}


@pytest.mark.parametrize("bug", PLANTED)
def test_a_planted_bug_fails_the_lint(tmp_path: Path, bug: str) -> None:
    name, planted, expected = PLANTED[bug]
    copy_source(tmp_path, name, f"\nexport const planted = {planted};\n")
    result = eslint(tmp_path, f"src/{name}")
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if " error " in line]
    assert len(problems) == 1, result.stdout  # that bug and nothing else (`document` is a known global)
    for text in expected:
        assert text in problems[0], result.stdout
