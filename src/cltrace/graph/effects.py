"""Signed effects through every path of an attribution graph, linearised, with chosen nodes held.

An edge s → t carries the part of t's target value (a feature's pre-activation, a logit target's
value) that s's whole output makes, directly. A JumpReLU feature above its threshold passes a change
of its pre-activation on to its activation one for one, so, to first order, removing a fraction f of
a node's output moves each target t by f · edge(s → t), a feature's activation by the same amount
as its pre-activation, and that change on through its own edges as the fraction Δa / a of its
output. Summed over every path this gives:

* the **effect** R(s) of a node on a target: how much of the target's value s's output makes,
  through all paths (positive: s pushes it up). R(s) = Σ_t edge(s → t) · u(t), where u(t) = ∂target /
  ∂pre-activation of t is 1 for the target logit, R(t) / a_t for a feature t, and 0 for a *held* node
  (one that does not relay a change; a group's joint effect holds its own members, so that a path
  from one member through another counts once);
* the **arrival** at each node of a change injected at some nodes (`forward`): how much of its
  pre-activation those nodes make through the paths that avoid the held nodes.

Both are exact sweeps over the edges in layer order (a feature's edges go to higher layers and the
logits only), one column per question: one sparse matrix product per layer, never a dense N × N
matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.prune import level_runs

#: Columns per sweep: bounds the [edges, columns] products of one layer.
CHUNK = 64


class Sweeps:
    """A graph's edges arranged by their source's layer, for exact sweeps in either direction."""

    def __init__(self, graph: Graph) -> None:
        nodes = graph.nodes
        kind = nodes.kind.to(torch.int64)
        src, tgt = graph.edge_source, graph.edge_target
        if graph.n_edges:
            if bool((kind[tgt] == int(NodeKind.ERROR)).any()) or bool((kind[tgt] == int(NodeKind.EMBEDDING)).any()):
                raise CltraceError("graph has an edge into an error or embedding node; it is not an attribution graph")
            if bool((kind[src] == int(NodeKind.LOGIT)).any()):
                raise CltraceError("graph has an edge out of a logit node; it is not an attribution graph")
        self.n = graph.n_nodes
        self.is_feature = kind == int(NodeKind.FEATURE)  # [node]
        # Sources that are not features (errors, embeddings) come first forwards, last backwards.
        level = torch.where(self.is_feature, nodes.layer.to(torch.int64), torch.full_like(kind, -1))  # [node]
        ff = self.is_feature[src] & self.is_feature[tgt]
        if bool((level[src][ff] >= level[tgt][ff]).any()):
            raise CltraceError("graph has an edge between features that does not go to a higher layer; "
                               "effects need a layered attribution graph (not one with merged supernodes)")
        self.activation = nodes.activation.to(torch.float64)  # [node]
        weight = graph.edge_weight.to(torch.float64)
        # Per source level: the edges as sparse matrices, [source, target] (backward) and [target, source],
        # cut from the edges grouped once by their source's level.
        order, runs = level_runs(level[src])
        if order is not None:
            src, tgt, weight = src[order], tgt[order], weight[order]
        self.levels = [lv for lv, _, _ in runs]
        self.down: dict[int, torch.Tensor] = {}
        self.up: dict[int, torch.Tensor] = {}
        for lv, lo, hi in runs:
            self.down[lv] = _csr(src[lo:hi], tgt[lo:hi], weight[lo:hi], self.n)
            self.up[lv] = _csr(tgt[lo:hi], src[lo:hi], weight[lo:hi], self.n)
        features = self.is_feature & (self.activation != 0)
        self.features_at = {lv: (features & (level == lv)).nonzero(as_tuple=True)[0] for lv in self.levels if lv >= 0}

    def _relay(self, values: torch.Tensor, nodes: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
        """values[nodes] / activation, 0 where held: the fraction of a feature's output that moves."""
        out = values[nodes] / self.activation[nodes, None]  # [k, K]
        if held is not None:
            out = torch.where(held[nodes], torch.zeros((), dtype=out.dtype), out)
        return out

    def backward(self, seed: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
        """[node, K] effect R of every node on each column's target; `seed` [node, K] is ∂target/∂value
        at the target nodes (1 at the target logit), `held` [node, K] bool the nodes that do not relay."""
        self._check(seed, held)
        u = seed.to(torch.float64).clone()  # [node, K] ∂target/∂pre-activation
        effect = torch.zeros_like(u)  # [node, K]
        for lv in reversed(self.levels):
            effect += self.down[lv] @ u
            if lv >= 0:
                nodes = self.features_at[lv]
                u[nodes] = self._relay(effect, nodes, held)
        return effect

    def forward(self, inject: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
        """[node, K] how much of each node's target value the injected outputs make: `inject` [node, K]
        is the fraction of each node's output injected (1: all of it), `held` [node, K] the nodes
        that take no part in relaying it (their arrival is still counted)."""
        self._check(inject, held)
        frac = inject.to(torch.float64).clone()  # [node, K] fraction of each output that moves
        arrival = torch.zeros_like(frac)  # [node, K]
        for lv in self.levels:
            if lv >= 0:
                nodes = self.features_at[lv]
                frac[nodes] = inject[nodes].to(torch.float64) + self._relay(arrival, nodes, held)
            arrival += self.up[lv] @ frac
        return arrival

    def _check(self, values: torch.Tensor, held: torch.Tensor | None) -> None:
        if values.dim() != 2 or values.shape[0] != self.n:
            raise CltraceError(f"sweep columns must be [{self.n}, K], got {tuple(values.shape)}")
        if held is not None and held.shape != values.shape:
            raise CltraceError(f"held nodes must be [{self.n}, {values.shape[1]}], got {tuple(held.shape)}")

    def effects(self, target: int) -> torch.Tensor:
        """[node] each node's effect on node `target` (a logit), every other node relaying."""
        seed = torch.zeros(self.n, 1, dtype=torch.float64)
        seed[target] = 1.0
        return self.backward(seed)[:, 0]

    def joint_effects(self, target: int, groups: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(effects [group], sensitivities [node, group]): each group's joint effect on `target` (its
        members held: the change of the target, to first order and with the sign flipped, when all its
        members are removed together) and ∂target/∂pre-activation of every node with that group held."""
        out = torch.zeros(len(groups), dtype=torch.float64)
        sens = torch.zeros(self.n, len(groups), dtype=torch.float64)
        for c in range(0, len(groups), CHUNK):
            chunk = groups[c : c + CHUNK]
            seed = torch.zeros(self.n, len(chunk), dtype=torch.float64)
            seed[target] = 1.0
            held = self.membership(chunk)
            effect = self.backward(seed, held)  # [node, k]
            out[c : c + len(chunk)] = (effect * held).sum(0)
            sens[:, c : c + len(chunk)] = self.sensitivity(effect, seed)
        return out, sens

    def sensitivity(self, effect: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        """[node, K] ∂target/∂pre-activation from effects: R / a for features, the seed elsewhere."""
        act = self.activation[:, None]
        safe = torch.where(act != 0, act, torch.ones_like(act))
        return torch.where(self.is_feature[:, None] & (act != 0), effect / safe, seed.to(effect.dtype))

    def membership(self, groups: Sequence[Sequence[int]]) -> torch.Tensor:
        """[node, group] bool: which nodes belong to which group."""
        held = torch.zeros(self.n, len(groups), dtype=torch.bool)
        for k, members in enumerate(groups):
            if len(members):
                held[torch.as_tensor(list(members), dtype=torch.long), k] = True
        return held


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """An [n, n] sparse CSR matrix with `values` at (rows, cols), duplicates summed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta": only the products below are used
        key = rows * n + cols  # [edge]
        if bool((key[1:] > key[:-1]).all()):  # already in row order without duplicates (a graph's target side)
            crow = torch.zeros(n + 1, dtype=torch.int64)
            crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
            return torch.sparse_csr_tensor(crow, cols, values, (n, n))
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n)).coalesce()
        return coo.to_sparse_csr()


__all__ = ["Sweeps"]
