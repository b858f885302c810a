"""Attribution graphs: computing, pruning, scoring, saving and exporting them.

The names below are the Python side of `cltrace attribute`, `cltrace prune` and `cltrace export`
(`from cltrace.graph import Graph, attribute, prune`). Those that compute graphs are imported on
first use, so that reading, pruning and exporting saved graphs does not import the model stack
(transformers). The light ones are bound here, after their modules: `prune` is the function, not
the submodule of the same name.
"""

from __future__ import annotations

import importlib
from typing import Any

from cltrace.graph.config import AttributionConfig
from cltrace.graph.export import to_neuronpedia_json, write_neuronpedia_json
from cltrace.graph.graph import Graph, GraphPath, NodeKind
from cltrace.graph.prune import graph_scores, prune
from cltrace.graph.targets import LogitDifference

_COMPUTE = ("attribute", "estimate_attribution")  # in cltrace.graph.attribution


def __getattr__(name: str) -> Any:
    if name in _COMPUTE:
        return getattr(importlib.import_module("cltrace.graph.attribution"), name)
    raise AttributeError(f"module 'cltrace.graph' has no attribute {name!r}")


__all__ = [
    "AttributionConfig", "Graph", "GraphPath", "LogitDifference", "NodeKind", "attribute", "estimate_attribution",
    "graph_scores", "prune", "to_neuronpedia_json", "write_neuronpedia_json",
]
