"""Tiny models with random transcoders and their attribution graphs, shared by the attribution tests."""

from __future__ import annotations

import functools

import torch

from cltrace.graph.attribution import attribute
from cltrace.graph.graph import Graph
from cltrace.replacement import ReplacementModel
from helpers.models import prompt_ids, tiny_model
from helpers.transcoders import random_transcoder

RTOL = 1e-4


@functools.cache
def case(family: str, kind: str) -> tuple[ReplacementModel, Graph]:
    """A tiny `family` model with a random `kind` transcoder and its full graph of `prompt_ids()` (cached)."""
    model = tiny_model(family)
    rm = ReplacementModel(model, random_transcoder(model, kind))
    graph = attribute(rm, prompt_ids(), max_feature_nodes=10_000, batch_size=16, progress=False)
    return rm, graph


def assert_close_rel(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | float, what: str) -> None:
    """|got − expected| ≤ RTOL · (|expected| + scale), elementwise."""
    bad = (got - expected).abs() > RTOL * (expected.abs() + scale)
    assert not bad.any(), f"{what}: {int(bad.sum())} mismatches, worst {float((got - expected).abs().max()):.3g}"


def same_graph(got: Graph, expected: Graph, what: str) -> None:
    """The same edges, weights within float error."""
    assert got.n_edges == expected.n_edges, what
    assert torch.equal(got.edge_source, expected.edge_source) and torch.equal(got.edge_target, expected.edge_target), what
    torch.testing.assert_close(got.edge_weight, expected.edge_weight, rtol=1e-5, atol=1e-6, msg=what)
