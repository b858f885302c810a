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


def test_an_undefined_variable_fails_the_lint(tmp_path: Path) -> None:
    copy_source(tmp_path, "graphview.js", "\nexport const planted = (x) => x + undefinedThing;\n")
    result = eslint(tmp_path, "src/graphview.js")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'undefinedThing' is not defined" in result.stdout
    assert "no-undef" in result.stdout


def test_a_node_global_in_the_browser_code_fails_the_lint(tmp_path: Path) -> None:
    # src/ runs in the browser: `document` is known there, node's `process` is not
    copy_source(tmp_path, "layout.js", "\nexport const planted = () => [document.title, process.argv];\n")
    result = eslint(tmp_path, "src/layout.js")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'process' is not defined" in result.stdout
    assert "document" not in result.stdout


def test_loose_equality_and_unused_names_fail_the_lint(tmp_path: Path) -> None:
    copy_source(tmp_path, "layout.js", "\nexport const planted = (a, b) => { const unused = 1; return a == b; };\n")
    result = eslint(tmp_path, "src/layout.js")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "eqeqeq" in result.stdout
    assert "'unused' is assigned a value but never used" in result.stdout
