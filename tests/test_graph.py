"""The Graph data model: save / load, ids, neighbourhood and path queries."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.graphs import assert_graphs_equal, rewrite_header, small_graph
from hypothesis import given, settings
from hypothesis import strategies as st

from cltrace.errors import CltraceError
from cltrace.graph.graph import GRAPH_SCHEMA_VERSION, Graph, NodeKind, NodeTable

F, E, T, L = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT


# ---------------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path):
    g = small_graph()
    path = g.save(tmp_path / "g.cltg")
    assert_graphs_equal(g, Graph.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["g.cltg"]  # no temp file left behind
    g.nodes.influence = torch.linspace(0, 1, g.n_nodes)
    g.nodes.extra = {"target_value": torch.randn(g.n_nodes, dtype=torch.float64), "flag": torch.ones(7, dtype=torch.bool)}
    g.save(tmp_path / "g.cltg")  # overwrite in place
    assert_graphs_equal(g, Graph.load(tmp_path / "g.cltg"))


def test_save_load_empty_edges(tmp_path):
    g = small_graph()
    g = g.subgraph(torch.ones(g.n_nodes, dtype=torch.bool), torch.zeros(g.n_edges, dtype=torch.bool))
    assert g.n_edges == 0
    assert_graphs_equal(g, Graph.load(g.save(tmp_path / "e.cltg")))


def test_load_truncated(tmp_path):
    path = small_graph().save(tmp_path / "g.cltg")
    data = path.read_bytes()
    for cut in (len(data) - 7, 40, 5):
        bad = tmp_path / f"cut{cut}.cltg"
        bad.write_bytes(data[:cut])
        with pytest.raises(CltraceError, match="truncated"):
            Graph.load(bad)


def test_load_other_formats(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a graph at all, just some bytes" * 3)
    with pytest.raises(CltraceError):
        Graph.load(junk)
    other = tmp_path / "weights.safetensors"
    save_file({"W": torch.zeros(2, 2)}, other, metadata={"format": "pt"})
    with pytest.raises(CltraceError, match="not a cltrace graph"):
        Graph.load(other)
    with pytest.raises(CltraceError, match="does not exist"):
        Graph.load(tmp_path / "missing.cltg")


def test_load_newer_schema(tmp_path):
    path = small_graph().save(tmp_path / "g.cltg")
    rewrite_header(path, schema_version=str(GRAPH_SCHEMA_VERSION + 1))
    with pytest.raises(CltraceError, match="newer"):
        Graph.load(path)


def test_save_rejects_bad_graphs(tmp_path):
    g = small_graph()
    g.metadata["bad"] = object()
    with pytest.raises(CltraceError, match="JSON"):
        g.save(tmp_path / "g.cltg")
    g = small_graph()
    g.edge_source = g.edge_source.clone()
    g.edge_source[0] = 99
    with pytest.raises(CltraceError):
        g.save(tmp_path / "g.cltg")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- ids and queries

def test_node_ids_and_find():
    g = small_graph()
    ids = ["0_3_1", "1_5_1", "0_-1_1", "E_10_0", "E_11_1", "3_7_1", "3_9_1"]
    assert g.node_ids() == ids
    assert [g.node_id(i) for i in range(g.n_nodes)] == ids
    assert [g.find(i) for i in ids] == list(range(g.n_nodes))
    with pytest.raises(CltraceError, match="no node"):
        g.find("9_9_9")
    assert g.summary() == {"feature": 2, "error": 1, "embedding": 2, "logit": 2, "nodes": 7, "edges": 10}


def test_inputs_outputs():
    g = small_graph()
    ins = g.inputs("1_5_1", k=2)
    assert [(e.source, e.target, e.weight) for e in ins] == [(0, 1, 3.0), (2, 1, -0.5)]
    assert [e.source for e in g.inputs(1, k=None)] == [0, 2, 3]
    outs = g.outputs("E_10_0")
    assert [(e.source, e.target, e.weight) for e in outs] == [(3, 0, -1.0), (3, 1, 0.25)]
    assert g.outputs(5) == [] and g.inputs(3) == []


def test_to_dense():
    g = small_graph()
    d = g.to_dense()
    assert d.shape == (7, 7) and d[1, 0] == 3.0 and d[0, 3] == -1.0 and d[3].abs().sum() == 0
    with pytest.raises(CltraceError, match="max_nodes"):
        g.to_dense(max_nodes=3)


def _all_paths(g: Graph, s: int, t: int):
    a = g.normalized_weights().tolist()
    out = {}
    for src, tgt, w in zip(g.edge_source.tolist(), g.edge_target.tolist(), a):
        out.setdefault(src, []).append((tgt, w))
    paths = []

    def walk(v, path, score):
        if v == t:
            paths.append((path, score))
            return
        for w_, a_ in out.get(v, []):
            walk(w_, path + [w_], score * a_)

    walk(s, [s], 1.0)
    return [p for p in paths if p[1] > 0]


def test_top_paths_hand():
    g = small_graph()
    a = dict(zip(zip(g.edge_source.tolist(), g.edge_target.tolist()), g.normalized_weights().tolist()))
    paths = g.top_paths("E_10_0", "3_7_1", k=10)
    # E_10_0 → f0 → f1 → L7, E_10_0 → f1 → L7, E_10_0 → f0 → L7.
    expect = sorted(_all_paths(g, 3, 5), key=lambda p: -p[1])
    assert len(paths) == len(expect) == 3
    for got, (_nodes, score) in zip(paths, expect):
        assert got.score == pytest.approx(score, rel=1e-6)
        assert got.score == pytest.approx(math.prod(a[(u, v)] for u, v in zip(got.nodes, got.nodes[1:])), rel=1e-6)
    assert g.top_paths(3, 5, k=1)[0].nodes == paths[0].nodes
    assert g.top_paths("3_7_1", "E_10_0") == []  # no path backwards


@st.composite
def random_graph(draw):
    n = draw(st.integers(2, 9))
    edges = []
    for t in range(1, n):
        for s in range(t):
            if draw(st.integers(0, 2)) == 0:
                edges.append((s, t, draw(st.floats(-2, 2, allow_nan=False, width=32))))
    nodes = NodeTable.from_columns(kind=[F] * (n - 1) + [L], layer=list(range(n)), pos=[0] * n,
                                   feature=list(range(n)), probability=[0] * (n - 1) + [1])
    return Graph.from_edges(nodes, edges), draw(st.integers(1, 6))


@settings(max_examples=150, deadline=None)
@given(random_graph())
def test_top_paths_brute_force(case):
    g, k = case
    s, t = 0, g.n_nodes - 1
    expect = sorted(_all_paths(g, s, t), key=lambda p: -p[1])[:k]
    got = g.top_paths(s, t, k)
    assert len(got) == len(expect)
    assert [p.score for p in got] == pytest.approx([p[1] for p in expect], rel=1e-5)
    valid = {tuple(p) for p, _ in _all_paths(g, s, t)}
    assert all(tuple(p.nodes) in valid for p in got)
    assert len({tuple(p.nodes) for p in got}) == len(got)


def test_subgraph_and_validate():
    g = small_graph()
    mask = torch.tensor([True, True, False, True, True, True, False])
    sub = g.subgraph(mask)
    assert sub.node_ids() == ["0_3_1", "1_5_1", "E_10_0", "E_11_1", "3_7_1"]
    assert sub.n_edges == 7  # the three edges touching the error node or L9 go
    sub.validate()
    # Per-node columns and per-node metadata lists follow the nodes.
    g.nodes.extra = {"v": torch.arange(7)}
    g.metadata["target_value"] = list(range(7))
    sub = g.subgraph(mask)
    assert sub.nodes.extra["v"].tolist() == [0, 1, 3, 4, 5] and sub.metadata["target_value"] == [0, 1, 3, 4, 5]
    bad = small_graph()
    bad.nodes.kind = bad.nodes.kind.flip(0)
    with pytest.raises(CltraceError, match="ordered"):
        bad.validate()


def test_package_names_are_the_modules_objects_and_loading_a_graph_needs_no_model_stack(tmp_path):
    """`from cltrace.graph import ...` gives the same objects as the submodules; only the names that
    compute graphs import transformers, so a process that just reads graphs stays light."""
    import importlib
    import subprocess
    import sys

    import cltrace.graph as package

    modules = {name: importlib.import_module(f"cltrace.graph.{name}") for name in ("attribution", "export", "prune")}
    assert package.Graph is Graph and package.NodeKind is NodeKind
    assert package.attribute is modules["attribution"].attribute
    assert package.prune is modules["prune"].prune  # the function, though a submodule has its name
    assert package.write_neuronpedia_json is modules["export"].write_neuronpedia_json
    assert all(getattr(package, name) is not None for name in package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        package.nonexistent  # noqa: B018
    script = (
        "import sys; from cltrace.graph import Graph, prune; "
        "assert 'transformers' not in sys.modules, 'reading graphs imported transformers'; "
        "from cltrace.graph import attribute; assert 'transformers' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
