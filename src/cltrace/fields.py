"""What a config dataclass says about its own fields, read once for every front end: the default,
the bounds (``field(metadata={"min": ..., "max": ...})``) and the help text (the docstring written
under the field), so that the command line and the server show and enforce the same thing as the
library."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any, TypeVar

from cltrace.errors import CltraceError

T = TypeVar("T")


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def field_default(cls: type, name: str) -> Any:
    """The default value of field `name` of dataclass `cls`."""
    f = _field(cls, name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def field_bounds(cls: type, name: str) -> tuple[Any, Any]:
    """(least, most) allowed for field `name` (None where unbounded)."""
    meta = _field(cls, name).metadata
    return meta.get("min"), meta.get("max")


def check_bounds(obj: Any) -> str | None:
    """A message naming the first field of dataclass instance `obj` outside its bounds, or None."""
    for f in dataclasses.fields(obj):
        least, most = f.metadata.get("min"), f.metadata.get("max")
        if least is None and most is None:
            continue
        value = getattr(obj, f.name)
        kind = int if isinstance(f.default, int) else float
        ok = isinstance(value, kind) and not isinstance(value, bool)
        ok = ok and (least is None or value >= least) and (most is None or value <= most)
        if not ok:
            what = "an integer" if kind is int else "a number"
            return f"{f.name} must be {what}" + (f" >= {least}" if least is not None else "") + (
                f" and <= {most}" if most is not None else "")
    return None


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """Field name → the string literal written right under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_help(cls: type, name: str) -> str:
    """The help text of field `name`: its docstring's first sentence."""
    doc = _docstrings(cls).get(name, "")
    return doc.split(". ")[0].rstrip(".") + "." if doc else ""


__all__ = ["check_bounds", "field_bounds", "field_default", "field_help"]


def show_keys(keys: list[str]) -> str:
    """Keys for a message: plain where printable, quoted otherwise (a damaged file's keys may hold newlines)."""
    return ", ".join(k if k.isprintable() else repr(k) for k in keys)


def check_keys(cls: type, keys: Any, what: str) -> None:
    """CltraceError naming `what` where `keys` holds a name that is not a field of dataclass `cls`."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise CltraceError(f"{what}: unknown key(s) {show_keys(unknown)}; known keys: {', '.join(names)}")


def from_mapping(cls: type[T], data: Any, what: str) -> T:
    """`cls(**data)` for a config dataclass read from a file: a JSON object with known keys only and
    every field that has no default; a one-line CltraceError naming `what` otherwise (the dataclass's
    own checks judge the values)."""
    if not isinstance(data, dict):
        raise CltraceError(f"{what} must be a JSON object, got {type(data).__name__}")
    check_keys(cls, data, what)
    missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
    if missing:
        raise CltraceError(f"{what}: missing key(s) {', '.join(missing)}")
    return cls(**data)
