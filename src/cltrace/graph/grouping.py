"""Automatic supernodes: a graph's feature nodes grouped by the role they play for a target.

Two features play the same role when they sit at the same position, at nearby layers, push the
target the same way, and both their effect and their input come through the same nodes:

* output role: the vector, over the graph's nodes t, of edge(f → t) · u(t), where u(t) is
  ∂target/∂(t's value) through every path (`cltrace.graph.effects`): where f's effect on the
  target flows, with its sign;
* input role: the vector, over the graph's nodes s, of edge(s → f) / f's activation: which nodes
  make f's activation, and how much of it.

The similarity of two features is a weighted mean of the cosines of their output and input roles.
Groups merge bottom-up (agglomerative, average linkage) while the best pair's similarity is at least
a threshold, and only where all their members are at nearby layers and push the target
the same way (a supernode's members never have effects of opposite signs). Each group becomes a `Supernode` whose name says what its members are (from
`label_of(layer, feature)` where labels are known, else their layers) and where they sit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from cltrace.errors import CltraceError
from cltrace.graph.config import GroupingConfig
from cltrace.graph.effects import Sweeps
from cltrace.graph.graph import Graph, NodeKind
from cltrace.replacement.supernodes import Supernode

LabelOf = Callable[[int, int], "str | None"]

_DEFAULTS = GroupingConfig()


def target_node(graph: Graph, target: int = 0) -> int:
    """The node index of the graph's `target`-th logit node; CltraceError if there is none."""
    logits = (graph.nodes.kind == int(NodeKind.LOGIT)).nonzero(as_tuple=True)[0].tolist()
    if not logits:
        raise CltraceError("the graph has no logit node: a circuit needs a target")
    if not 0 <= target < len(logits):
        raise CltraceError(f"target {target} is out of range: the graph has {len(logits)} logit target(s), 0..{len(logits) - 1}")
    return int(logits[target])


class Roles:
    """The output and input roles of a graph's feature nodes for one target (see the module docstring)."""

    def __init__(self, graph: Graph, sweeps: Sweeps, target: int) -> None:
        seed = torch.zeros(graph.n_nodes, 1, dtype=torch.float64)
        seed[target] = 1.0
        effect = sweeps.backward(seed)
        self.u = sweeps.sensitivity(effect, seed)[:, 0]  # [node] ∂target/∂value
        self.effect = effect[:, 0]  # [node] each node's effect on the target
        self.graph = graph
        act = graph.nodes.activation.to(torch.float64)
        self.act = torch.where(act != 0, act, torch.ones_like(act))  # [node]

    def vectors(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output roles [k, node], input roles [k, node]) of the feature nodes `feats` [k], each row
        scaled to unit length (zero rows stay zero)."""
        g = self.graph
        row = torch.full((g.n_nodes,), -1, dtype=torch.long)
        row[feats] = torch.arange(len(feats))
        w = g.edge_weight.to(torch.float64)
        out = torch.zeros(len(feats), g.n_nodes, dtype=torch.float64)
        m = row[g.edge_source] >= 0
        out.index_put_((row[g.edge_source[m]], g.edge_target[m]), w[m] * self.u[g.edge_target[m]], accumulate=True)
        inp = torch.zeros(len(feats), g.n_nodes, dtype=torch.float64)
        m = row[g.edge_target] >= 0
        inp.index_put_((row[g.edge_target[m]], g.edge_source[m]), w[m] / self.act[g.edge_target[m]], accumulate=True)
        return _unit(out), _unit(inp)


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def agglomerate(sim: torch.Tensor, layers: torch.Tensor, effects: torch.Tensor, threshold: float,
                max_layer_gap: int) -> list[list[int]]:
    """Average-linkage clusters of items with similarity `sim` [n, n]: merge the most similar pair of
    clusters while that similarity is >= `threshold`, all their members' `layers` [n] are at most
    `max_layer_gap` apart and no two of their members' `effects` [n] have opposite signs."""
    n = sim.shape[0]
    s = sim.to(torch.float64).clone()
    s.fill_diagonal_(-torch.inf)
    members = [[i] for i in range(n)]
    size = torch.ones(n, dtype=torch.float64)
    lo, hi = layers.to(torch.int64).clone(), layers.to(torch.int64).clone()
    sign = torch.sign(effects.to(torch.float64))  # [n] each cluster's sign (0: none yet)
    alive = torch.ones(n, dtype=torch.bool)
    while int(alive.sum()) > 1:
        gap = torch.maximum(hi[:, None], hi[None, :]) - torch.minimum(lo[:, None], lo[None, :])  # [n, n] merged span
        ok = alive[:, None] & alive[None, :] & (gap <= max_layer_gap) & (sign[:, None] * sign[None, :] >= 0)
        masked = torch.where(ok, s, torch.full_like(s, -torch.inf))
        best = int(masked.argmax())
        i, j = divmod(best, n)
        if not bool(masked[i, j] >= threshold):
            break
        s[i] = (size[i] * s[i] + size[j] * s[j]) / (size[i] + size[j])  # Lance-Williams, average linkage
        s[:, i] = s[i]
        s[i, i] = -torch.inf
        s[j], s[:, j] = -torch.inf, -torch.inf
        size[i] += size[j]
        lo[i], hi[i] = min(lo[i], lo[j]), max(hi[i], hi[j])
        sign[i] = sign[i] if sign[i] != 0 else sign[j]
        members[i] += members[j]
        alive[j] = False
    return [sorted(members[i]) for i in alive.nonzero(as_tuple=True)[0].tolist()]


def group_features(
    graph: Graph,
    *,
    label_of: LabelOf | None = None,
    max_layer_gap: int = _DEFAULTS.max_layer_gap,
    threshold: float = _DEFAULTS.threshold,
    output_weight: float = _DEFAULTS.output_weight,
    target: int = 0,
) -> list[Supernode]:
    """Supernodes for the feature nodes of `graph` (usually pruned), grouped by role for its
    `target`-th logit (see the module docstring); every feature node is in exactly one, a lone
    feature in a supernode of its own. Ordered by |summed effect| on the target, largest first.

    `label_of(layer, feature)` names features (None where unknown); a group is named after its
    member with the largest |effect| that has a label.
    """
    if not 0.0 <= output_weight <= 1.0:
        raise CltraceError(f"output_weight must be between 0 and 1, got {output_weight}")
    if max_layer_gap < 0:
        raise CltraceError(f"max_layer_gap must be >= 0, got {max_layer_gap}")
    sweeps = Sweeps(graph)
    roles = Roles(graph, sweeps, target_node(graph, target))
    nodes = graph.nodes
    feats = (nodes.kind == int(NodeKind.FEATURE)).nonzero(as_tuple=True)[0]
    if not len(feats):
        return []
    effects = roles.effect[feats]  # [f]
    layers, poss = nodes.layer[feats].to(torch.int64), nodes.pos[feats].to(torch.int64)
    groups: list[list[int]] = []
    for p in sorted(set(poss.tolist())):
        at = (poss == p).nonzero(as_tuple=True)[0]
        out, inp = roles.vectors(feats[at])
        sim = output_weight * (out @ out.T) + (1 - output_weight) * (inp @ inp.T)  # [k, k]
        for cluster in agglomerate(sim, layers[at], effects[at], threshold, max_layer_gap):
            groups.append([int(at[c]) for c in cluster])
    groups.sort(key=lambda g: (-abs(float(effects[g].sum())), min(g)))
    taken: set[str] = set()
    out_nodes = []
    for g in groups:
        members = [(int(layers[i]), int(nodes.feature[feats[i]]), int(poss[i])) for i in g]
        lead = sorted(g, key=lambda i: -abs(float(effects[i])))
        label = _first_label(label_of, [members[g.index(i)] for i in lead])
        out_nodes.append(Supernode(unique_name(group_name(members, label), taken), [(l, f, p) for l, f, p in members]))
    return out_nodes


def _first_label(label_of: LabelOf | None, members: Iterable[tuple[int, int, int]]) -> str | None:
    if label_of is None:
        return None
    for layer, feature, _ in members:
        text = label_of(layer, feature)
        if text and text.strip():
            return text
    return None


def slug(text: str, limit: int = 32) -> str:
    """`text` as a supernode name's stem: words joined by '_', other characters dropped, at most
    `limit` characters (cut at a word); '' if no word is left."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    out = ""
    for w in words:
        if len(out) + len(w) + (1 if out else 0) > limit:
            break
        out = f"{out}_{w}" if out else w
    if not out and words:
        out = words[0][:limit]
    return out


def group_name(members: list[tuple[int, int, int]], label: str | None = None) -> str:
    """A supernode name for `members` (layer, feature, pos): its label's words, else its layers,
    then its position, e.g. ``say_DA.p9`` or ``L17-18.p9``."""
    layers = sorted({m[0] for m in members})
    where = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
    stem = slug(label) if label else ""
    if not stem or not stem[0].isalpha():
        stem = f"{where}_{stem}" if stem else where
    positions = sorted({m[2] for m in members})
    return f"{stem}.p{positions[-1]}" if len(positions) == 1 else f"{stem}.p{positions[0]}-{positions[-1]}"


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name.2`, `name.3`, ... the first not in `taken` (which it is added to)."""
    out, k = name, 2
    while out in taken:
        out, k = f"{name}.{k}", k + 1
    taken.add(out)
    return out


__all__ = ["Roles", "agglomerate", "group_features", "group_name", "slug", "target_node", "unique_name"]
