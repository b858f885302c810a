"""A circuit as a paper-style diagram (PNG, matplotlib).

The prompt's tokens along the bottom (only those the circuit uses, in order), each supernode as a
labelled box at its position and mean layer, the target on top; edges drawn with width by |weight|
and coloured by sign (blue pushes the target up, red down), box borders by the sign of the
supernode's effect. Each box shows its name, layers, effect and, once validated, the predicted and
actual change of the target's probability when it is ablated; the foot of the picture the
circuit's own validation.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from cltrace.atomic import atomic_path
from cltrace.graph.circuit import Circuit, CircuitNode

#: Colours of what pushes the target up and down, in this picture and the full graph's.
POSITIVE = "#1f77b4"
NEGATIVE = "#d62728"
#: The circuit's picture in a trace folder, beside its circuit.json.
CIRCUIT_PICTURE = "circuit.png"


def circuit_title(circuit: Circuit) -> str:
    """The picture's title: the prompt, the target and its probability."""
    p = circuit.target.get("probability")
    return f"{circuit.prompt!r} → {circuit.target.get('label', '')!r}" + (
        f" ({100 * p:.0f}%)" if isinstance(p, (int, float)) else "")


def _columns(circuit: Circuit) -> dict[int, int]:
    """Position → column, over the positions the circuit's inputs and supernodes use."""
    used = sorted({int(i["pos"]) for i in circuit.inputs} | {sn.pos for sn in circuit.supernodes})
    return {p: c for c, p in enumerate(used)}


def _rows(nodes: list[CircuitNode]) -> list[list[CircuitNode]]:
    """The boxes of one column in rows, bottom to top: a box joins the row below when its mean layer is
    less than 4 layers above that row's first box (so that their boxes would overlap)."""
    rows: list[list[CircuitNode]] = []
    for sn in sorted(nodes, key=_mean_layer):
        if rows and _mean_layer(sn) - _mean_layer(rows[-1][0]) < 4:
            rows[-1].append(sn)
        else:
            rows.append([sn])
    return rows


def _mean_layer(sn: CircuitNode) -> float:
    return sum(sn.layers) / len(sn.layers)


def circuit_layout(circuit: Circuit, n_layers: int) -> dict[str, tuple[float, float]]:
    """Node id → (x, y): y a supernode's mean layer (inputs at -3, the output at n_layers + 3); x its
    position's column, each column as wide as its widest row of boxes, boxes of a row side by side."""
    by_col: dict[int, list[CircuitNode]] = {}
    cols = _columns(circuit)
    for sn in circuit.supernodes:
        by_col.setdefault(cols[sn.pos], []).append(sn)
    rows = {c: _rows(nodes) for c, nodes in by_col.items()}
    centre, left = {}, 0.0
    for c in range(len(cols)):
        width = max((len(r) for r in rows.get(c, [])), default=1)
        centre[c] = left + (width - 1) / 2
        left += width + 0.2
    xy: dict[str, tuple[float, float]] = {i["id"]: (centre[cols[int(i["pos"])]], -3.0) for i in circuit.inputs}
    for c, col_rows in rows.items():
        for row in col_rows:
            for k, sn in enumerate(row):
                xy[sn.id] = (centre[c] + k - (len(row) - 1) / 2, _mean_layer(sn))
    for o in circuit.outputs:
        xy[o["id"]] = (max(centre.values(), default=0.0), float(n_layers) + 3.0)
    return xy


def _fmt_p(x: float | None) -> str:
    return "?" if x is None else f"{x:+.2f}"


def box_text(sn: CircuitNode) -> str:
    """The text of a supernode's box."""
    layers = sn.layers
    where = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}–{layers[-1]}"
    lines = textwrap.wrap(sn.name, 24)[:2] or [sn.id]
    lines.append(f"{where} · {len(sn.members)} feat. · effect {sn.effect:+.2f}")
    abl = (sn.validation or {}).get("ablate")
    if abl:
        lines.append(f"ablated Δp: pred {_fmt_p(abl.get('predicted'))}, real {_fmt_p(abl.get('actual'))}")
    steer = (sn.validation or {}).get("steer")
    if steer:
        lines.append(f"steer {'/'.join(steer['tokens'][:2])}: {'pass' if steer['passed'] else 'fail'}")
    return "\n".join(lines)


def validation_text(circuit: Circuit) -> str:
    """One or two lines on the circuit as a whole."""
    parts = [f"{len(circuit.supernodes)} supernodes of {circuit.n_candidates} carry {100 * circuit.coverage:.0f}% of "
             "their summed |effect|"]
    v = circuit.validation
    if v:
        c, r = v["circuit_ablation"], v["random_ablation"]
        ratio = v.get("ratio")
        parts.append(
            f"circuit ablated: p {c['p_before']:.2f} → {c['p_after']:.2f} ({-100 * c['relative_drop']:+.0f}%); "
            f"{r['n_features']} matched random features: {-100 * r['relative_drop_mean']:+.1f}%"
            + (f" ({ratio:.0f}×)" if ratio is not None else "")
        )
        if v.get("pearson_r") is not None:
            parts[-1] += f"; predicted vs real Δp over supernodes r = {v['pearson_r']:.2f}"
    return "\n".join(parts)


def plot_circuit(circuit: Circuit, path: str | Path, n_layers: int, title: str | None = None) -> Path:
    """Draw `circuit` to a PNG at `path`, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    xy = circuit_layout(circuit, n_layers)
    xs = [x for x, _ in xy.values()] or [0.0]
    fig, ax = plt.subplots(figsize=(min(24.0, max(9.0, 2.3 * (max(xs) - min(xs) + 1.5))), 10.0), dpi=100)
    biggest = max((abs(e["weight"]) for e in circuit.edges), default=1.0) or 1.0
    for e in sorted(circuit.edges, key=lambda e: abs(e["weight"])):
        if e["source"] not in xy or e["target"] not in xy:
            continue
        rel = abs(e["weight"]) / biggest
        ax.add_patch(FancyArrowPatch(
            xy[e["source"]], xy[e["target"]], arrowstyle="-|>", mutation_scale=8 + 8 * rel,
            color=POSITIVE if e["weight"] > 0 else NEGATIVE, alpha=0.25 + 0.6 * rel, linewidth=0.5 + 6 * rel,
            shrinkA=18, shrinkB=18, zorder=1, connectionstyle="arc3,rad=0.08"))
    for i in circuit.inputs:
        _box(ax, xy[i["id"]], repr(i["token"]), "#eeeeee", "#555555")
    for sn in circuit.supernodes:
        face = "#dbe9f6" if sn.effect >= 0 else "#f8dcdc"
        _box(ax, xy[sn.id], box_text(sn), face, POSITIVE if sn.effect >= 0 else NEGATIVE, dashed=sn.unclear, size=7.5)
    p = circuit.target.get("probability")
    for o in circuit.outputs:
        text = f"{o['label']!r}" + (f"  p = {p:.2f}" if isinstance(p, (int, float)) else "")
        _box(ax, xy[o["id"]], text, "#e6dcf3", "#6a3d9a", size=10)
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ax.set_ylim(-4.5, n_layers + 4.5)
    ax.set_yticks([-3, *range(0, n_layers, 5), n_layers + 3])
    ax.set_yticklabels(["tokens", *[f"L{y}" for y in range(0, n_layers, 5)], "output"], fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"{circuit.prompt!r} → {circuit.target.get('label', '')!r}", fontsize=11)
    fig.text(0.5, 0.01, validation_text(circuit), ha="center", va="bottom", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _box(ax: Any, at: tuple[float, float], text: str, face: str, edge: str, dashed: bool = False,
         size: float = 9.0) -> None:
    ax.text(*at, text, ha="center", va="center", fontsize=size, zorder=3,
            bbox={"boxstyle": "round,pad=0.35", "fc": face, "ec": edge, "lw": 1.4, "ls": "--" if dashed else "-"})


__all__ = ["CIRCUIT_PICTURE", "NEGATIVE", "POSITIVE", "box_text", "circuit_layout", "circuit_title", "plot_circuit",
           "validation_text"]
