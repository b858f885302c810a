"""Damaged files for the loaders' property tests, and the check of what a loader makes of them.

For each format: (1) a generated valid object saved and loaded again is equal to itself; (2) a
damaged file (truncated anywhere, bytes flipped or overwritten at any offset, random bytes, an
altered JSON header or field, a field of the wrong type, a missing file) either loads an object
equal to the original (the damage was harmless) or is refused with a `CltraceError` whose message
is one line naming the file. Never another exception, never a silently different object.

Formats that a person writes or edits (text sources, a training config.json) and circuit-tracer's
foreign layout carry no checksums, so for them the damage property is weaker: a CltraceError or
a load that reflects what the file now says, never another exception.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hypothesis import event, settings
from hypothesis import strategies as st

from cltrace.errors import CltraceError

# Few examples each (each loader test file runs in well under a minute on 2 busy cores); no deadline,
# since the shared machine's timing varies.
FAST = settings(max_examples=25, deadline=None)
MEDIUM = settings(max_examples=60, deadline=None)


def scratch_folders(base: Path) -> Callable[[], Path]:
    """A call that makes a fresh folder under `base` each time. Folders are kept until `base` goes,
    so no two examples share a path or an inode (the feature store caches verified files by both)."""
    return lambda: Path(tempfile.mkdtemp(dir=base))


@st.composite
def damages(draw: st.DrawFn, n: int) -> tuple:
    """A way to damage a file of `n` bytes (a recipe, so that a failing example prints short):
    truncated, 1-3 bytes XOR-ed, a run overwritten, or replaced whole."""
    how = draw(st.sampled_from(("truncate", "flip", "overwrite", "replace")))
    if how == "truncate":
        return how, draw(st.integers(0, n - 1))
    if how == "flip":
        return how, draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=3))
    if how == "overwrite":
        return how, draw(st.integers(0, n - 1)), draw(st.binary(min_size=1, max_size=48))
    return how, draw(st.binary(max_size=300))


def damage(raw: bytes, recipe: tuple) -> bytes:
    """`raw` damaged as `recipe` (from `damages`) says."""
    how = recipe[0]
    if how == "truncate":
        return raw[: recipe[1]]
    if how == "flip":
        out = bytearray(raw)
        for offset, mask in recipe[1]:
            out[offset] ^= mask
        return bytes(out)
    if how == "overwrite":
        at, junk = recipe[1], recipe[2]
        return raw[:at] + junk + raw[at + len(junk) :]
    return recipe[1]


def damaged(data: st.DataObject, raw: bytes) -> bytes:
    """`raw` damaged some way `data` draws."""
    return damage(raw, data.draw(damages(len(raw))))


def damaged_or_missing(data: st.DataObject, raw: bytes) -> bytes | None:
    """`raw` damaged, or (one time in five) None: the file is missing."""
    return None if data.draw(st.integers(0, 4)) == 0 else damaged(data, raw)


def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Any JSON value (no NaN: it never equals itself)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=max_leaves,
    )


def loaded_or_refused(load: Callable[[], Any], *names: str) -> Any:
    """What `load()` returns, or None after checking its refusal is one line naming `names`; the
    hypothesis events ("loaded"/"refused", see --hypothesis-show-statistics) show how damage fell."""
    try:
        got = load()
    except CltraceError as exc:
        assert_refused(exc, *names)
        event("refused")
        return None
    event("loaded")
    return got


def assert_refused(exc: CltraceError, *names: str) -> None:
    """A one-line message that names the file (any of `names`)."""
    msg = str(exc)
    assert msg and len(msg.splitlines()) == 1, msg
    assert any(name in msg for name in names), msg


def mutate_json(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` with one value somewhere in it replaced by any JSON value, or one key deleted or added."""
    if not isinstance(doc, (dict, list)) or not doc or draw(st.integers(0, 3)) == 0:
        return draw(json_values())
    if isinstance(doc, dict):
        key = draw(st.sampled_from(sorted(doc)))
        how = draw(st.sampled_from(("descend", "delete", "add")))
        out = dict(doc)
        if how == "delete":
            del out[key]
        elif how == "add":
            out[draw(st.text(max_size=8))] = draw(json_values())
        else:
            out[key] = mutate_json(draw, doc[key])
        return out
    i = draw(st.integers(0, len(doc) - 1))
    return [mutate_json(draw, v) if j == i else v for j, v in enumerate(doc)]


def deep_equal(a: Any, b: Any) -> bool:
    """Equality of nested containers of tensors (same dtype and values) and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def copy_with(scratch: Callable[[], Path], source: Path, name: str, content: bytes | None) -> Path:
    """A copy of directory `source` with file `name` replaced by `content` (None: deleted)."""
    folder = scratch() / source.name
    shutil.copytree(source, folder)
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)
    return folder
