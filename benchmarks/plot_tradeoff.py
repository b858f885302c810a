"""The NMSE-L0 trade-off of every CLT trained for the benchmarks, as one picture.

Reads the evaluated points recorded in benchmarks/results/train_default_preset.json and
train_quality_preset.json (nothing is trained) and draws mean NMSE against mean L0, one marker per
CLT labelled with its features per layer, tokens and λ, with the quality bar (NMSE <= 0.35 at
L0 <= 64) shaded. Writes benchmarks/results/nmse_l0.png.

    .venv/bin/python benchmarks/plot_tradeoff.py
"""

from __future__ import annotations

import json
import sys

from common import RESULTS, save_figure


def points() -> list[dict]:
    """(label, l0, nmse, top1, drawn) of every evaluated CLT in the training results. `drawn`: scored on 33k
    held-out tokens drawn across the split (the presets' runs); otherwise on the ~4k the run itself scored,
    in order (older runs, kept for the shape of the trade-off)."""
    def row(label: str, figures: dict, drawn: bool) -> dict:
        return {"label": label, "l0": figures["l0_mean"], "nmse": figures["nmse_mean"], "top1": figures["spliced_top1"],
                "drawn": drawn}

    default = json.loads((RESULTS / "train_default_preset.json").read_text())
    p = default["default_preset"]
    out = [row(f"default: {p['n_features']}f, {p['total_tokens'] // 1000}k tok, λ {p['sparsity_lambda']:g}",
               default["eval_drawn_across_split"]["tokens_32768"], True)]
    for s in default["previous_session"]["sweep_n128_100k_tokens"]:
        out.append(row(f"{s['n_features']}f, {s['train_tokens'] // 1000}k tok, λ {s['sparsity_lambda']:g}", s, False))
    quality = json.loads((RESULTS / "train_quality_preset.json").read_text())
    q = quality["points"][0]
    out.append(row(f"quality: {q['n_features']}f, {q['total_tokens'] / 10**6:g}M tok, λ {q['sparsity_lambda']:g}",
                   q["eval_more_tokens"], True))
    earlier = quality["previous_run"]  # the 3M-token, λ 7e-4 run
    q = earlier["points"][0]
    out.append(row(f"{q['n_features']}f, {q['total_tokens'] / 10**6:g}M tok, λ {q['sparsity_lambda']:g}",
                   earlier["eval_drawn_across_split"]["tokens_32768"], True))
    first = earlier["previous_run"]  # unmixed contexts, 20% decay
    q = first["preset"]
    out.append(row(f"{q['n_features']}f, {q['total_tokens'] / 10**6:g}M tok, λ {q['sparsity_lambda']:g}, unmixed",
                   first["eval"], False))
    out.append(row("256f, 150k tok, λ 0.0015", first["sweep_point_150k"], False))
    return out


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pts = points()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.add_patch(Rectangle((0, 0), 64, 0.35, color="#e8f4e8", zorder=0))  # the bar: both bounds at once
    ax.axvline(64, color="#999", lw=0.8, ls="--")
    ax.axhline(0.35, color="#999", lw=0.8, ls="--")
    for p in pts:
        preset = p["label"].startswith(("default", "quality"))
        color = "#1f77b4" if preset else "#888"
        ax.scatter(p["l0"], p["nmse"], s=30, edgecolors=color, facecolors=color if p["drawn"] else "none")
        ax.annotate(f"{p['label']}\n(top-1 {100 * p['top1']:.0f}%)", (p["l0"], p["nmse"]), fontsize=7,
                    xytext=(5, -20 if p["label"].startswith("quality") else 3), textcoords="offset points")
    ax.set_xlabel("mean L0 (active features per layer and token)")
    ax.set_ylabel("mean NMSE (held-out; filled: 33k tokens drawn across the split)")
    ax.set_title("CLTs on SmolLM2-135M: reconstruction against sparsity (bar: NMSE ≤ 0.35 at L0 ≤ 64)", fontsize=9)
    ax.set_xlim(0, max(p["l0"] for p in pts) * 1.45)
    ax.set_ylim(0.25, max(p["nmse"] for p in pts) + 0.05)
    path = save_figure(fig, "nmse_l0", dpi=130)
    for p in sorted(pts, key=lambda p: p["l0"]):
        print(f"L0 {p['l0']:6.1f}  NMSE {p['nmse']:.3f}  top-1 {100 * p['top1']:4.1f}%  {p['label']}"
              f"{'' if p['drawn'] else '  (~4k tokens in order)'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
