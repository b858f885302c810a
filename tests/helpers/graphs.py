"""A small hand-made attribution graph, graph equality, and rewriting a graph file's header."""

from __future__ import annotations

import json
import struct

import torch

from cltrace.graph.graph import Graph, NodeKind, NodeTable

F, E, T, L = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT


def small_graph() -> Graph:
    """Tokens t0 (id 10), t1 (id 11); features f0 (layer 0, #3, pos 1), f1 (layer 1, #5, pos 1);
    an error node at (layer 0, pos 1); logits for tokens 7 and 9 at pos 1 (n_layers 2)."""
    nodes = NodeTable.from_columns(
        kind=[F, F, E, T, T, L, L], layer=[0, 1, 0, -1, -1, 2, 2], pos=[1, 1, 1, 0, 1, 1, 1],
        feature=[3, 5, -1, -1, -1, -1, -1], token=[-1, -1, -1, 10, 11, 7, 9],
        activation=[1.25, 0.5, 0, 0, 0, 0, 0], probability=[0, 0, 0, 0, 0, 0.6, 0.4],
    )
    edges = [(4, 0, 2.0), (3, 0, -1.0), (0, 1, 3.0), (2, 1, -0.5), (3, 1, 0.25),
             (1, 5, 2.0), (4, 5, -1.0), (0, 5, 0.5), (1, 6, 1.0), (2, 6, 1.0)]
    return Graph.from_edges(nodes, edges, {"n_layers": 2, "prompt": "ab", "tokens": ["a", "b"],
                                           "model": "tiny", "nested": {"x": [1, 2.5, None, "s"]}})


def assert_graphs_equal(a: Graph, b: Graph):
    for name in ("kind", "layer", "pos", "feature", "token", "activation", "probability"):
        x, y = getattr(a.nodes, name), getattr(b.nodes, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.nodes.extra.keys() == b.nodes.extra.keys()
    for name, col in a.nodes.extra.items():
        assert col.dtype == b.nodes.extra[name].dtype and torch.equal(col, b.nodes.extra[name]), name
    assert (a.nodes.influence is None) == (b.nodes.influence is None)
    if a.nodes.influence is not None:
        assert torch.equal(a.nodes.influence, b.nodes.influence)
    for name in ("edge_target", "edge_source", "edge_weight"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.metadata == b.metadata


def rewrite_header(path, **changes):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
