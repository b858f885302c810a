"""The shape of src/: no file over MAX_FILE_LINES lines, no function over MAX_FUNCTION_LINES lines.

A function's length runs from its `def` line to its last line (decorators left out), nested
functions included in their parent's.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cltrace"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# Paths (relative to src/cltrace; a folder ends in "/") that other changes of issue 20 split;
# the lead empties this after merging them, and from then on every file of src/ is checked.
NOT_YET_SPLIT: tuple[str, ...] = ()


def checked_files() -> list[Path]:
    """Every .py file of src/cltrace outside NOT_YET_SPLIT."""
    files = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if not any(rel == skip or (skip.endswith("/") and rel.startswith(skip)) for skip in NOT_YET_SPLIT):
            files.append(path)
    return files


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function in `source` longer than `limit` lines."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = (child.end_lineno or child.lineno) - child.lineno + 1  # `def` to end: decorators excluded
                    if lines > limit:
                        found.append((name, lines))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return found


def test_the_check_sees_files() -> None:
    assert len(checked_files()) > 20


def test_no_file_is_too_long() -> None:
    too_long = {}
    for path in checked_files():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            too_long[path.relative_to(SRC).as_posix()] = n
    assert not too_long, f"files over {MAX_FILE_LINES} lines (split them along their seams): {too_long}"


def test_no_function_is_too_long() -> None:
    too_long = {}
    for path in checked_files():
        for name, n in long_functions(path.read_text(encoding="utf-8")):
            too_long[f"{path.relative_to(SRC).as_posix()}:{name}"] = n
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_function_check_counts_from_def_to_end() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(4))
    inner = "\n".join("    " + line for line in body.splitlines())
    source = f"@decorator\n@another\ndef f():\n{body}\n\nclass C:\n    def g(self):\n{inner}\n        pass\n"
    assert long_functions(source, limit=6) == []
    assert long_functions(source, limit=5) == [("C.g", 6)]
    assert sorted(long_functions(source, limit=4)) == [("C.g", 6), ("f", 5)]
