"""The attribution graph as data: a node table, COO edges and metadata.

Node order is fixed: the selected features, then the error nodes, then the token embeddings,
then the target logits (circuit-tracer's order). An edge s → t carries the source's activation
times the virtual weight from s to t: the direct effect, through the frozen residual stream and
attention OV circuits only, of s's output on t's pre-activation (a feature) or on t's logit minus
the vocabulary-mean logit (a logit node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch


class NodeKind(IntEnum):
    """What a node is; the graph lists nodes in this order."""

    FEATURE = 0
    ERROR = 1
    EMBEDDING = 2
    LOGIT = 3


@dataclass
class NodeTable:
    """One row per node, as parallel columns (all of length n_nodes)."""

    kind: torch.Tensor  # [node] int8, a NodeKind
    layer: torch.Tensor  # [node] int32; embeddings -1, logits n_layers
    pos: torch.Tensor  # [node] int32, token position
    feature: torch.Tensor  # [node] int64, feature index within its layer; -1 for non-features
    token: torch.Tensor  # [node] int64, the token id (embeddings, logits); -1 otherwise
    activation: torch.Tensor  # [node] float32, a feature's activation; 0 otherwise
    probability: torch.Tensor  # [node] float32, a logit node's probability; 0 otherwise

    def __len__(self) -> int:
        return int(self.kind.shape[0])


@dataclass
class Graph:
    """An attribution graph: nodes, edges (target, source, weight) and metadata."""

    nodes: NodeTable
    edge_target: torch.Tensor  # [edge] int64, index into nodes
    edge_source: torch.Tensor  # [edge] int64, index into nodes
    edge_weight: torch.Tensor  # [edge] float32
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return int(self.edge_weight.shape[0])
