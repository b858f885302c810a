"""Supernodes in a graph: their members' node ids, and the graph with each one's members merged."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from cltrace.graph.graph import PER_NODE_METADATA_KEYS, Graph, NodeKind, NodeTable
from cltrace.replacement.supernodes import Supernode


def supernodes_to_qparams(graph: Graph, supernodes: Sequence[Supernode] | Mapping[str, Supernode]) -> list[list[str]]:
    """circuit-tracer / Neuronpedia ``qParams.supernodes``: [name, node ids of its members in `graph`...]
    per supernode (a member without a position stands for all its nodes); empty groups left out."""
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


def _member_groups(
    graph: Graph, supernodes: Sequence[Supernode] | Mapping[str, Supernode]
) -> tuple[list[int], list[tuple[Supernode, list[int]]]]:
    """Each node's merged group (−1: none) and each non-empty group's (supernode, member nodes); a
    node joins the first supernode that claims it."""
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
    return group, groups


def merge_supernodes(graph: Graph, supernodes: Sequence[Supernode] | Mapping[str, Supernode]) -> Graph:
    """A copy of `graph` with each supernode's member feature nodes merged into one node, for display.

    The merged node is a feature node placed after the other features, with layer = its members'
    lowest, pos = their highest, feature = −2 − (its index among the merged supernodes) (so its id
    never clashes with a real feature or error node), activation = the sum of its members'; the
    extra column ``supernode`` holds that index (−1 elsewhere) and ``metadata["supernodes"]`` the
    names and member ids. Edges into and out of members are summed; edges among members are
    dropped. Per-node target values are summed; influence takes the members' smallest.
    A supernode with no member in the graph is left out.
    """
    nodes, n = graph.nodes, graph.n_nodes
    kinds = nodes.kind.tolist()
    layers, poss = nodes.layer.tolist(), nodes.pos.tolist()
    group, groups = _member_groups(graph, supernodes)
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


__all__ = ["merge_supernodes", "supernodes_to_qparams"]
