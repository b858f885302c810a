"""Supernodes: named groups of features, grouped by hand.

A supernode lists members ``(layer, feature, pos)``, ``pos`` None meaning the feature at every
position. It can be used wherever interventions take features (``--set NAME=0``, or
`Supernode.interventions`), saved to and loaded from a JSON file, and shown in a graph as one node
whose edges are the sums of its members' edges (`merge_supernodes`).

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cltrace.atomic import atomic_write_text
from cltrace.errors import CltraceError
from cltrace.notation import NAME
from cltrace.replacement.interventions import Intervention

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
            node = Supernode(entry.get("name"), list(entry.get("members") or []))
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
    path = Path(path)
    if not path.is_file():
        raise CltraceError(f"supernodes file '{path}' does not exist; check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CltraceError(f"cannot read supernodes file '{path}': {str(exc).splitlines()[0]}") from None
    try:
        return supernodes_from_json(data)
    except CltraceError as exc:
        raise CltraceError(f"supernodes file '{path}': {exc}") from None


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


def supernodes_to_qparams(graph, supernodes: Sequence[Supernode] | Mapping[str, Supernode]) -> list[list[str]]:
    """circuit-tracer / Neuronpedia ``qParams.supernodes``: [name, node ids of its members in `graph`...]
    per supernode (a member without a position stands for all its nodes); empty groups left out."""
    from cltrace.graph.graph import NodeKind

    items = list(supernodes.values()) if isinstance(supernodes, Mapping) else list(supernodes)
    nodes = graph.nodes
    feats = (nodes.kind == int(NodeKind.FEATURE)).nonzero(as_tuple=True)[0].tolist()
    ids = graph.node_ids()
    out = []
    for sn in items:
        members = [ids[i] for i in feats if sn.matches(int(nodes.layer[i]), int(nodes.feature[i]), int(nodes.pos[i]))]
        if members:
            out.append([sn.name, *members])
    return out


def merge_supernodes(graph, supernodes: Sequence[Supernode] | Mapping[str, Supernode]):
    """A copy of `graph` with each supernode's member feature nodes merged into one node, for display.

    The merged node is a feature node placed after the other features, with layer = its members'
    lowest, pos = their highest, feature = −2 − (its index among the merged supernodes) (so its id
    never clashes with a real feature or error node), activation = the sum of its members'; the
    extra column ``supernode`` holds that index (−1 elsewhere) and ``metadata["supernodes"]`` the
    names and member ids. Edges into and out of members are summed; edges among members are
    dropped. Per-node target values are summed; influence takes the members' smallest.
    A supernode with no member in the graph is left out.
    """
    from cltrace.graph.graph import PER_NODE_METADATA_KEYS, Graph, NodeKind, NodeTable

    items = list(supernodes.values()) if isinstance(supernodes, Mapping) else list(supernodes)
    nodes, n = graph.nodes, graph.n_nodes
    kinds = nodes.kind.tolist()
    layers, poss, feats = nodes.layer.tolist(), nodes.pos.tolist(), nodes.feature.tolist()
    group = [-1] * n  # node -> merged group
    groups: list[tuple[Supernode, list[int]]] = []
    for sn in items:
        members = [
            i for i in range(n)
            if kinds[i] == NodeKind.FEATURE and group[i] < 0 and sn.matches(layers[i], feats[i], poss[i])
        ]
        if members:
            for i in members:
                group[i] = len(groups)
            groups.append((sn, members))
    if not groups:
        return graph
    n_feat = sum(1 for k in kinds if k == NodeKind.FEATURE)
    kept_features = [i for i in range(n_feat) if group[i] < 0]
    rest = list(range(n_feat, n))
    G = len(groups)
    # old node -> new node
    new_index = torch.empty(n, dtype=torch.long)
    new_index[torch.tensor(kept_features, dtype=torch.long)] = torch.arange(len(kept_features))
    for g, (_, members) in enumerate(groups):
        new_index[torch.tensor(members, dtype=torch.long)] = len(kept_features) + g
    new_index[torch.tensor(rest, dtype=torch.long)] = torch.arange(len(rest)) + len(kept_features) + G
    n_new = len(kept_features) + G + len(rest)

    def column(values: torch.Tensor, merged: list) -> torch.Tensor:
        return torch.cat([
            values[kept_features], torch.tensor(merged, dtype=values.dtype), values[rest]
        ]) if len(values) else values

    member_lists = [m for _, m in groups]
    table = NodeTable(
        kind=column(nodes.kind, [int(NodeKind.FEATURE)] * G),
        layer=column(nodes.layer, [min(layers[i] for i in m) for m in member_lists]),
        pos=column(nodes.pos, [max(poss[i] for i in m) for m in member_lists]),
        feature=column(nodes.feature, [-2 - g for g in range(G)]),
        token=column(nodes.token, [-1] * G),
        activation=column(nodes.activation, [float(nodes.activation[m].sum()) for m in member_lists]),
        probability=column(nodes.probability, [0.0] * G),
        influence=None if nodes.influence is None else column(
            nodes.influence, [float(nodes.influence[m].min()) for m in member_lists]
        ),
        extra={k: column(v, [v[m[0]].item() for m in member_lists]) for k, v in nodes.extra.items()},
    )
    table.extra["supernode"] = torch.cat([
        torch.full((len(kept_features),), -1, dtype=torch.int64), torch.arange(G), torch.full((len(rest),), -1, dtype=torch.int64)
    ])
    tgt, src = new_index[graph.edge_target], new_index[graph.edge_source]
    keep = tgt != src
    key = tgt[keep] * n_new + src[keep]
    ukey, inv = torch.unique(key, return_inverse=True)
    weight = torch.zeros(ukey.shape[0], dtype=torch.float64).index_add_(0, inv, graph.edge_weight[keep].double())
    metadata = json.loads(json.dumps(graph.metadata))
    for name in PER_NODE_METADATA_KEYS:
        values = metadata.get(name)
        if isinstance(values, list) and len(values) == n:
            metadata[name] = (
                [values[i] for i in kept_features]
                + [sum(values[i] for i in m) for m in member_lists]
                + [values[i] for i in rest]
            )
    ids = graph.node_ids()
    metadata["supernodes"] = [
        {"name": sn.name, "node": len(kept_features) + g, "members": [ids[i] for i in m]} for g, (sn, m) in enumerate(groups)
    ]
    merged = Graph(table, ukey // n_new, ukey % n_new, weight.float(), metadata)
    merged.validate()
    return merged


__all__ = [
    "SUPERNODES_FORMAT",
    "Supernode",
    "load_supernodes",
    "merge_supernodes",
    "save_supernodes",
    "supernodes_from_json",
    "supernodes_to_qparams",
]
