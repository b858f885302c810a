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

from common import RESULTS


def points() -> list[dict]:
    """(label, l0, nmse, top1) of every evaluated CLT in the training results."""
    out = []
    default = json.loads((RESULTS / "train_default_preset.json").read_text())
    p = default["default_preset"]
    out.append({"label": f"default: {p['n_features']}f, {p['total_tokens'] // 1000}k tok, λ {p['sparsity_lambda']:g}",
                "l0": default["eval"]["l0_mean"], "nmse": default["eval"]["nmse_mean"], "top1": default["eval"]["spliced_top1"]})
    for s in default["previous_session"]["sweep_n128_100k_tokens"]:
        out.append({"label": f"{s['n_features']}f, {s['train_tokens'] // 1000}k tok, λ {s['sparsity_lambda']:g}",
                    "l0": s["l0_mean"], "nmse": s["nmse_mean"], "top1": s["spliced_top1"]})
    quality = json.loads((RESULTS / "train_quality_preset.json").read_text())
    q = quality["points"][0]
    out.append({"label": f"quality: {q['n_features']}f, {q['total_tokens'] // 10**6}M tok, λ {q['sparsity_lambda']:g}",
                "l0": q["l0_mean"], "nmse": q["nmse_mean"], "top1": q["spliced_top1"]})
    earlier = quality["previous_run"]  # unmixed contexts, 20% decay
    q = earlier["preset"]
    out.append({"label": f"{q['n_features']}f, {q['total_tokens'] // 10**6}M tok, λ {q['sparsity_lambda']:g}, unmixed",
                "l0": earlier["eval"]["l0_mean"], "nmse": earlier["eval"]["nmse_mean"], "top1": earlier["eval"]["spliced_top1"]})
    s = earlier["sweep_point_150k"]
    out.append({"label": "256f, 150k tok, λ 0.0015", "l0": s["l0_mean"], "nmse": s["nmse_mean"], "top1": s["spliced_top1"]})
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
        ax.scatter(p["l0"], p["nmse"], s=30, color="#1f77b4" if p["label"].startswith(("default", "quality")) else "#888")
        ax.annotate(f"{p['label']}\n(top-1 {100 * p['top1']:.0f}%)", (p["l0"], p["nmse"]), fontsize=7,
                    xytext=(5, -20 if p["label"].startswith("quality") else 3), textcoords="offset points")
    ax.set_xlabel("mean L0 (active features per layer and token)")
    ax.set_ylabel("mean NMSE (held-out)")
    ax.set_title("CLTs on SmolLM2-135M: reconstruction against sparsity (bar: NMSE ≤ 0.35 at L0 ≤ 64)", fontsize=9)
    ax.set_xlim(0, max(p["l0"] for p in pts) * 1.45)
    ax.set_ylim(0.25, max(p["nmse"] for p in pts) + 0.05)
    fig.tight_layout()
    path = RESULTS / "nmse_l0.png"
    fig.savefig(path, dpi=130)
    for p in sorted(pts, key=lambda p: p["l0"]):
        print(f"L0 {p['l0']:6.1f}  NMSE {p['nmse']:.3f}  top-1 {100 * p['top1']:4.1f}%  {p['label']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
