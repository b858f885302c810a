"""A picture of a pruned attribution graph (PNG, matplotlib).

Layout as in the paper's figures and the web explorer: token positions left to right with the
prompt's tokens along the bottom, layers bottom to top, token embeddings below layer 0 and the
logits on top. Edges are drawn with width and opacity by |weight| (relative to the largest) and
coloured by sign; the nodes of the highlighted paths are labelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cltrace.atomic import atomic_path
from cltrace.graph.circuit_plot import NEGATIVE, POSITIVE
from cltrace.graph.graph import Graph, NodeKind

NODE_COLOURS = {NodeKind.FEATURE: "#ff7f0e", NodeKind.ERROR: "#7f7f7f", NodeKind.EMBEDDING: "#2ca02c",
                NodeKind.LOGIT: "#9467bd"}


def node_xy(graph: Graph) -> torch.Tensor:
    """[node, 2] plot coordinates: x the position (features of one cell spread sideways), y the layer
    (embeddings at -1, logits at n_layers)."""
    nodes = graph.nodes
    x = nodes.pos.to(torch.float64).clone()
    y = nodes.layer.to(torch.float64).clone()
    y[nodes.kind == int(NodeKind.EMBEDDING)] = -1.0
    y[nodes.kind == int(NodeKind.LOGIT)] = float(graph.n_layers)
    # Error nodes sit at the right of their cell; the features sharing a cell spread across [-0.35, 0.25].
    x[nodes.kind == int(NodeKind.ERROR)] += 0.35
    cell = (y + 1) * (int(nodes.pos.max()) + 2 if len(nodes) else 1) + x  # errors land in cells of their own
    order = torch.argsort(cell, stable=True)
    sorted_cells = cell[order]
    starts = torch.ones_like(sorted_cells, dtype=torch.bool)
    starts[1:] = sorted_cells[1:] != sorted_cells[:-1]
    group = torch.cumsum(starts.long(), 0) - 1
    counts = torch.bincount(group).to(torch.float64)
    first = torch.zeros_like(counts, dtype=torch.long)
    first[1:] = torch.cumsum(counts.long(), 0)[:-1]
    rank = torch.arange(len(order), dtype=torch.float64) - first[group].to(torch.float64)
    offset = torch.where(counts[group] > 1, (rank / (counts[group] - 1).clamp(min=1) - 0.6) * 0.6, 0.0)
    x[order] += offset
    if graph.nodes.kind.numel() and (graph.nodes.kind == int(NodeKind.LOGIT)).any():
        # Logits all sit at the last position: spread them over the prompt's width instead.
        logit = (graph.nodes.kind == int(NodeKind.LOGIT)).nonzero().flatten()
        last = float(nodes.pos.max())
        x[logit] = last - torch.linspace(0, min(last, 0.5 * len(logit)), len(logit), dtype=torch.float64)
    return torch.stack([x, y], dim=1)


def plot_graph(
    graph: Graph,
    path: str | Path,
    tokens: Sequence[str] | None = None,
    highlight: Sequence[Sequence[int]] = (),
    labels: dict[int, str] | None = None,
    title: str | None = None,
    max_edges: int = 800,
) -> Path:
    """Draw `graph` (a pruned one: thousands of edges, not millions) to a PNG at `path`, written
    atomically. `highlight`: paths (node index lists) drawn on top in black; `labels`: text per node."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    tokens = list(tokens if tokens is not None else graph.metadata.get("tokens") or [])
    xy = node_xy(graph).numpy()
    n_pos = int(graph.nodes.pos.max()) + 1 if graph.n_nodes else 1
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * n_pos), 9.0), dpi=110)

    from matplotlib.collections import LineCollection

    w = graph.edge_weight.abs()
    keep = torch.argsort(w, descending=True)[:max_edges].flip(0)  # strongest drawn last, on top
    wmax = float(w.max()) if w.numel() else 1.0
    rel = (w[keep] / wmax).numpy()
    src, dst = graph.edge_source[keep].numpy(), graph.edge_target[keep].numpy()
    segments = [[tuple(xy[a]), tuple(xy[b])] for a, b in zip(src, dst)]
    positive = (graph.edge_weight[keep] > 0).numpy()
    colours = [(*matplotlib.colors.to_rgb(POSITIVE if p else NEGATIVE), 0.1 + 0.6 * r) for p, r in zip(positive, rel)]
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.3 + 3.0 * rel, zorder=1))
    for p in highlight:
        ax.plot(xy[list(p), 0], xy[list(p), 1], color="black", linewidth=2.0, alpha=0.8, zorder=2)

    kinds = graph.nodes.kind
    for kind, colour in NODE_COLOURS.items():
        m = (kinds == int(kind)).numpy()
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=28 if kind == NodeKind.FEATURE else 40, c=colour,
                       marker="s" if kind == NodeKind.ERROR else "o", edgecolors="white", linewidths=0.5,
                       label=kind.name.lower(), zorder=3)
    for i, text in (labels or {}).items():
        ax.annotate(text, xy[i], xytext=(4, 4), textcoords="offset points", fontsize=8, zorder=4,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})

    ax.set_xticks(range(n_pos))
    ax.set_xticklabels([repr(t)[1:-1] for t in tokens[:n_pos]] + [""] * max(0, n_pos - len(tokens)),
                       rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("layer (embeddings below, logits on top)")
    ax.set_ylim(-2, graph.n_layers + 1.5)
    ax.set_xlim(-0.8, n_pos - 0.2)
    ax.grid(axis="y", alpha=0.15)
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=4)
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


__all__ = ["node_xy", "plot_graph"]
