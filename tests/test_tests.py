"""The test suite's own shape: test modules share helpers through tests/helpers/ and conftest
fixtures, never by importing one another (or conftest, which holds only fixtures and profiles)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# A line of Python inside a string: the scripts that tests write out and run in a subprocess.
SCRIPT_IMPORT = re.compile(r"^\s*(?:import|from)\s+([\w.]+)", re.MULTILINE)


def forbidden(module: str) -> bool:
    """Whether importing `module` reaches into another test module or conftest."""
    top = module.split(".")[0]
    return top == "conftest" or top.startswith("test_")


def imports_of_test_modules(source: str) -> list[str]:
    """Every test module or conftest that `source` imports: at any depth (imports inside functions
    count) and in the scripts it holds as strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if forbidden(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and forbidden(node.module):
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [name for name in SCRIPT_IMPORT.findall(node.value) if forbidden(name)]
    return found


def python_files() -> list[Path]:
    """The suite's Python files, less this one (its planted examples are imports by design)."""
    files = sorted(TESTS.glob("*.py")) + sorted((TESTS / "helpers").glob("*.py"))
    return [path for path in files if path.name != Path(__file__).name]


def test_no_test_module_imports_another() -> None:
    offenders = {
        str(path.relative_to(TESTS)): names
        for path in python_files()
        if (names := imports_of_test_modules(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, "import the shared helper from tests/helpers/ instead: " + repr(offenders)


@pytest.mark.parametrize(
    "source",
    [
        "from test_graph import small_graph\n",
        "import test_store\n",
        "import test_features as t\n",
        "def f():\n    from conftest import tiny_model\n",
        "SCRIPT = '''\nimport sys\nfrom test_train import Planted\n'''\n",
        "import helpers.models, test_serve\n",
    ],
)
def test_the_check_finds_a_planted_import(source: str) -> None:
    assert imports_of_test_modules(source)


def test_the_check_passes_helpers_and_the_package() -> None:
    source = "from helpers.models import tiny_model\nimport cltrace.test_utils\nfrom cltrace import testing\n"
    assert imports_of_test_modules(source) == []
    assert python_files() and all(path.exists() for path in python_files())
