"""Supernodes: named groups of features, grouped by hand.

A supernode lists members ``(layer, feature, pos)``, ``pos`` None meaning the feature at every
position. It can be used wherever interventions take features (``--set NAME=0``, or
`Supernode.interventions`), saved to and loaded from a JSON file, and shown in a graph as one node
whose edges are the sums of its members' edges (`cltrace.graph.supernodes.merge_supernodes`).

File format (written atomically)::

    {"format": "cltrace-supernodes", "version": 1,
     "supernodes": [{"name": "say-DA", "members": [[12, 345, 9], [14, 7, null]]}, ...]}

`load_supernodes` also reads circuit-tracer / Neuronpedia ``qParams.supernodes`` lists
(``[["name", "12_345_9", ...], ...]``), alone or inside a graph JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltrace.atomic import atomic_write_text
from cltrace.errors import CltraceError, load_json_file
from cltrace.notation import NAME
from cltrace.replacement.intervention import Intervention

SUPERNODES_FORMAT = "cltrace-supernodes"
SUPERNODES_VERSION = 1

Member = tuple[int, int, "int | None"]


@dataclass
class Supernode:
    """A named group of features: members (layer, feature, pos or None for every position)."""

    name: str
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise CltraceError(
                f"supernode name {self.name!r} is not valid: use letters, digits, '_', '.', '-', starting with a letter or '_'"
            )
        cleaned: list[Member] = []
        for member in self.members:
            try:
                layer, feature, pos = member
                layer, feature = int(layer), int(feature)
                pos = None if pos is None else int(pos)
            except (TypeError, ValueError):
                raise CltraceError(
                    f"supernode {self.name!r}: member {member!r} is not (layer, feature, pos or null)"
                ) from None
            if layer < 0 or feature < 0 or (pos is not None and pos < 0):
                raise CltraceError(f"supernode {self.name!r}: member {member!r} has a negative index")
            cleaned.append((layer, feature, pos))
        if not cleaned:
            raise CltraceError(f"supernode {self.name!r} has no members")
        self.members = cleaned

    def interventions(
        self,
        value: float | None = None,
        factor: float | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> list[Intervention]:
        """One intervention per member; a member's own position wins over (start, end)."""
        out = []
        for layer, feature, pos in self.members:
            s, e = (pos, pos) if pos is not None else (start, end)
            out.append(Intervention(layer, feature, value, factor, s, e))
        return out

    def matches(self, layer: int, feature: int, pos: int) -> bool:
        return any(l == layer and f == feature and (p is None or p == pos) for l, f, p in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "members": [list(m) for m in self.members]}


def _parse_node_id(name: str, node_id: str) -> Member:
    m = re.fullmatch(r"(\d+)_(\d+)_(\d+)", str(node_id))
    if not m:
        raise CltraceError(f"supernode {name!r}: {node_id!r} is not a feature node id 'layer_feature_pos'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def supernodes_from_json(data: Any) -> dict[str, Supernode]:
    """Supernodes from parsed JSON: cltrace's format, or circuit-tracer's [["name", "l_f_p", ...], ...]."""
    if isinstance(data, dict) and "qParams" in data:
        data = data["qParams"].get("supernodes", [])
    if isinstance(data, dict):
        if data.get("format") not in (None, SUPERNODES_FORMAT):
            raise CltraceError(f"not a supernodes file (format {data.get('format')!r})")
        if int(data.get("version", SUPERNODES_VERSION)) > SUPERNODES_VERSION:
            raise CltraceError(f"supernodes file version {data.get('version')} is newer than this cltrace reads; upgrade")
        data = data.get("supernodes", [])
    if not isinstance(data, list):
        raise CltraceError("supernodes must be a list")
    out: dict[str, Supernode] = {}
    for entry in data:
        if isinstance(entry, dict):
            name: Any = entry.get("name")  # Supernode checks it is a valid name
            node = Supernode(name, list(entry.get("members") or []))
        elif isinstance(entry, list) and entry and isinstance(entry[0], str):
            node = Supernode(entry[0], [_parse_node_id(entry[0], i) for i in entry[1:]])
        else:
            raise CltraceError(f"supernode entry {entry!r} is neither {{name, members}} nor [name, node ids...]")
        if node.name in out:
            raise CltraceError(f"supernode {node.name!r} is defined twice")
        out[node.name] = node
    return out


def load_supernodes(path: str | os.PathLike) -> dict[str, Supernode]:
    """Read supernodes from a JSON file (see the module docstring); one-line CltraceError if unreadable."""
    return load_json_file(path, "supernodes", "check the path", supernodes_from_json)


def save_supernodes(path: str | os.PathLike, supernodes: Mapping[str, Supernode] | Iterable[Supernode]) -> Path:
    """Write supernodes as JSON, atomically (temp file, fsync, rename)."""
    items = list(supernodes.values()) if isinstance(supernodes, Mapping) else list(supernodes)
    names = [s.name for s in items]
    if len(set(names)) != len(names):
        raise CltraceError("two supernodes share a name; give each its own")
    text = json.dumps(
        {"format": SUPERNODES_FORMAT, "version": SUPERNODES_VERSION, "supernodes": [s.to_dict() for s in items]},
        indent=1,
    )
    return atomic_write_text(path, text, what="supernodes")


__all__ = [
    "SUPERNODES_FORMAT",
    "Supernode",
    "load_supernodes",
    "save_supernodes",
    "supernodes_from_json",
]
