"""The import layering of src/cltrace (pyproject's import-linter contracts) and of benchmarks/.

The contract is checked on the tree as it is, and on a copy with one planted upward import, so
that a contract which checks nothing (a typo, a layer that matches no module) fails here.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports on the tree at `root` (its pyproject.toml and its src/), with a cache of its own."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def planted_copy(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the repository's pyproject.toml and src/ with `line` appended to src/cltrace/`module`."""
    root = tmp_path / "tree"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    target = root / "src" / "cltrace" / module
    target.write_text(target.read_text(encoding="utf-8") + "\n\n" + line + "\n", encoding="utf-8")
    return root


def test_the_tree_keeps_the_contracts() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "upward"),
    [
        ("model/load.py", "import cltrace.cli  # noqa", "cltrace.model.load -> cltrace.cli"),
        # inside a function, where an import would hide from a check that reads only the top of a module
        ("transcoder/transcoder.py", "def _planted() -> None:\n    from cltrace.graph import graph  # noqa",
         "cltrace.transcoder.transcoder -> cltrace.graph.graph"),
        ("graph/prune.py", "def _planted() -> None:\n    import cltrace.train.trainer  # noqa",
         "cltrace.graph.prune -> cltrace.train.trainer"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str, line: str, upward: str) -> None:
    result = lint_imports(planted_copy(tmp_path, module, line))
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert upward in result.stdout, result.stdout[-4000:]


def benchmark_imports() -> dict[str, set[str]]:
    """Each benchmarks/*.py module's imports of its sibling modules, at any depth in the file."""
    names = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[path.stem] = (found & names) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_benchmarks_have_no_import_cycle() -> None:
    graph = benchmark_imports()
    assert graph, "no benchmarks found"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_src_has_no_import_cycle() -> None:
    import grimp

    built = grimp.build_graph("cltrace", cache_dir=None)
    graph = {m: set(built.find_modules_directly_imported_by(m)) for m in built.modules}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
