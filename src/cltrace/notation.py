"""The notations people type for features, parsed in one place.

- ``LAYER:FEATURE`` (``3:117``; ``3/117`` is read too): one transcoder feature.
- ``KEY=VALUE``: the one ``--set`` grammar, split at the first ``=`` (`split_setting`). A training
  override's KEY is a config field; an intervention's is ``TARGET[@POS]`` (`split_assignment`), its
  TARGET ``LAYER:FEATURE`` or a supernode NAME, its VALUE a number or ``xFACTOR``, and POS ``4``,
  ``2-5`` or ``2-`` (open-ended).
- NAME: a supernode's name, letters, digits, ``_``, ``.``, ``-``, starting with a letter or ``_``.

The parsers raise `NotationError` saying which part is wrong; each caller turns that into its own
one-line message (naming the option, with an example).
"""

from __future__ import annotations

import re

from cltrace.errors import CltraceError

NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")
_TARGET = re.compile(r"(?P<target>[^@\s]+)\s*(?:@\s*(?P<pos>.*))?")
_FORM = "it does not have the form TARGET[@POS]=VALUE"
_SEPARATOR = re.compile(r"[:/]")
_POSITIONS = re.compile(r"\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*")


class NotationError(CltraceError):
    """A typed notation that does not parse; the message says which part is wrong."""


def is_feature(text: str) -> bool:
    """Whether `text` is written as LAYER:FEATURE (a supernode name never holds ':' or '/')."""
    return _SEPARATOR.search(text) is not None


def parse_feature(text: str) -> tuple[int, int]:
    """``"LAYER:FEATURE"`` (e.g. ``"3:117"``, spaces allowed) as (layer, feature)."""
    parts = _SEPARATOR.split(text, maxsplit=1)
    if len(parts) != 2:
        raise NotationError(f"{text!r} is not LAYER:FEATURE")
    return _index(parts[0], "layer"), _index(parts[1], "feature")


def format_feature(layer: int, feature: int) -> str:
    """(layer, feature) written as ``LAYER:FEATURE``, the inverse of `parse_feature`."""
    return f"{layer}:{feature}"


def _index(text: str, what: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise NotationError(f"{what} {text!r} is not a non-negative integer")
    return int(text)


def split_setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` split at the first ``=``: (the key, stripped; the value as written)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise NotationError("must look like KEY=VALUE")
    if not key.strip():
        raise NotationError("has no key before '='")
    return key.strip(), value


def split_assignment(text: str) -> tuple[str, str | None, str]:
    """``TARGET[@POS]=VALUE`` as (target, the POS text or None, the value text): a setting whose key
    carries an optional position and whose value is one word."""
    try:
        key, value = split_setting(text)
    except NotationError:
        raise NotationError(_FORM) from None
    m = _TARGET.fullmatch(key)
    if not m or not re.fullmatch(r"\S+", value.strip()):
        raise NotationError(_FORM)
    return m.group("target"), m.group("pos"), value.strip()


def parse_positions(text: str | None) -> tuple[int | None, int | None]:
    """(start, end) of a POS text: "4" → (4, 4), "2-5" → (2, 5), "2-" → (2, None), None → (None, None)."""
    if text is None:
        return None, None
    m = _POSITIONS.fullmatch(text)
    if not m:
        raise NotationError(f"position {text!r} is not N, A-B or A-")
    start = int(m.group(1))
    if m.group(2) is None:
        return start, start
    if m.group(3) is None:
        return start, None
    end = int(m.group(3))
    if end < start:
        raise NotationError(f"position range {start}-{end} is empty (write it low-high)")
    return start, end


__all__ = [
    "NAME", "NotationError", "format_feature", "is_feature", "parse_feature", "parse_positions", "split_assignment",
    "split_setting",
]
