"""The nodes of an attribution graph: their kinds, the node table's columns, edges and paths as values."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

import torch

from cltrace.errors import CltraceError


class NodeKind(IntEnum):
    """What a node is; the graph lists nodes in this order."""

    FEATURE = 0
    ERROR = 1
    EMBEDDING = 2
    LOGIT = 3


# Column name -> dtype, in the order of NodeTable's fields.
_NODE_COLUMNS: dict[str, torch.dtype] = {
    "kind": torch.int8,
    "layer": torch.int32,
    "pos": torch.int32,
    "feature": torch.int64,
    "token": torch.int64,
    "activation": torch.float32,
    "probability": torch.float32,
}


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
    # [node] float32 or None: the node's cumulative influence share in the unpruned graph
    # (circuit-tracer's "influence": nodes sorted by influence on the logits, the running share
    # of the total at this node; smaller is more important). Set by `cltrace.graph.prune`.
    influence: torch.Tensor | None = None
    # Further per-node columns (name -> 1-D tensor of length n_nodes, any dtype), kept by `select`,
    # `Graph.subgraph`, `Graph.save` and `Graph.load`.
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @classmethod
    def from_columns(
        cls,
        kind: Any,
        layer: Any,
        pos: Any,
        feature: Any = None,
        token: Any = None,
        activation: Any = None,
        probability: Any = None,
    ) -> NodeTable:
        """A table from sequences (lists or tensors), cast to the column dtypes; omitted columns
        get their defaults (feature/token -1, activation/probability 0)."""
        n = len(kind)

        def col(name: str, values: Any, default: float) -> torch.Tensor:
            dtype = _NODE_COLUMNS[name]
            if values is None:
                return torch.full((n,), default, dtype=dtype)
            t = torch.as_tensor(values).to(dtype).flatten().clone()
            if t.shape[0] != n:
                raise CltraceError(f"node column '{name}' has {t.shape[0]} values for {n} nodes")
            return t

        return cls(
            kind=col("kind", [int(k) for k in kind], 0), layer=col("layer", layer, 0), pos=col("pos", pos, 0),
            feature=col("feature", feature, -1), token=col("token", token, -1),
            activation=col("activation", activation, 0.0), probability=col("probability", probability, 0.0),
        )

    def select(self, index: torch.Tensor) -> NodeTable:
        """The rows at `index` (a bool mask or int64 indices), as a new table."""
        cols = {name: getattr(self, name)[index] for name in _NODE_COLUMNS}
        infl = None if self.influence is None else self.influence[index]
        return NodeTable(**cols, influence=infl, extra={k: v[index] for k, v in self.extra.items()})


class Edge(NamedTuple):
    """One edge: source → target with its (signed, raw) weight."""

    source: int
    target: int
    weight: float


class GraphPath(NamedTuple):
    """A path through the graph: node indices from source to target, and its score (the product
    of the row-normalised |weights| of its edges)."""

    nodes: list[int]
    score: float


def _kind_name(kind: int) -> str:
    return NodeKind(kind).name.lower()
