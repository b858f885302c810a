"""Why a wide default CLT does not fit this machine's budget, as one picture.

Reads (nothing is trained) benchmarks/results/decode_width.json (training-step tokens/s at each
width, the fastest of the dense and sparse paths) and train_wide.json (the runs of
`train_sweep.py --name train_wide`: their training curves, held-out NMSE, L0 and graph scores), and
draws three panels: the tokens a 30-minute run can train on at each width beside the tokens the
256-wide presets used; NMSE against minutes for each run; held-out NMSE against L0, annotated with
the replacement score (BOS errors left out). Writes benchmarks/results/frontier.png.

    .venv/bin/python benchmarks/plot_frontier.py
"""

from __future__ import annotations

import json
import sys

from common import RESULTS, save_figure

BUDGET_S = 30 * 60


def tokens_per_budget() -> list[tuple[int, float, str]]:
    """(width, tokens trainable in 30 minutes, fastest path) from the width benchmark's step timings."""
    rows = json.loads((RESULTS / "decode_width.json").read_text())["widths"]
    out = []
    for r in rows:
        steps = r["step_tokens_per_s"]
        if steps:
            path, rate = max(steps.items(), key=lambda kv: kv[1])
            out.append((r["width"], rate * BUDGET_S, path))
    return out


def runs() -> list[dict]:
    """The train_wide points: label, curve, held-out NMSE / L0 / top-1 and the no-BOS replacement score."""
    points = json.loads((RESULTS / "train_wide.json").read_text())["points"]
    out = []
    for i, p in enumerate(points):
        held = p.get("eval_more_tokens") or p
        graphs = (held.get("graphs") or {}).get("mean") or {}
        out.append({"label": f"{p['n_features']} features, {p['train_tokens'] // 1000}k tokens",
                    "curve": p["curve"], "nmse": held["nmse_mean"], "l0": held["l0_mean"], "top1": held["spliced_top1"],
                    "replacement": graphs.get("replacement_score_no_bos"), "color": f"C{i + 1}"})
    return out


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, points = tokens_per_budget(), runs()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    ax.plot([w for w, _, _ in budget], [t for _, t, _ in budget], "o-")
    for w, t, path in budget:
        ax.annotate(path.replace("_", " "), (w, t), fontsize=7, xytext=(4, 4), textcoords="offset points")
    for tokens, what in ((500_000, "default preset (256 wide): NMSE 0.40"), (2_700_000, "quality preset (256 wide): NMSE 0.33")):
        ax.axhline(tokens, color="#999", ls="--", lw=0.8)
        ax.text(budget[0][0], tokens * 1.08, what, fontsize=7, color="#555")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("features per layer")
    ax.set_ylabel("tokens trained in 30 min (fastest step)")
    ax.set_title("What 30 minutes buys on this CPU", fontsize=9)
    ax = axes[1]
    for p in points:
        ax.plot([c["minutes"] for c in p["curve"]], [c["nmse"] for c in p["curve"]], label=p["label"], color=p["color"])
    ax.axhline(0.30, color="#999", ls="--", lw=0.8)
    ax.axvline(30, color="#999", ls="--", lw=0.8)
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("NMSE on the training batches")
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=7)
    ax.set_title("NMSE against minutes (bar: 0.30 within 30 minutes)", fontsize=9)
    ax = axes[2]
    for i, p in enumerate(sorted(points, key=lambda p: p["l0"])):
        ax.scatter(p["l0"], p["nmse"], color=p["color"])
        score = f", replacement {p['replacement']:.2f}" if p["replacement"] is not None else ""
        ax.annotate(f"{p['label']}\n(top-1 {100 * p['top1']:.0f}%{score})", (p["l0"], p["nmse"]), fontsize=7,
                    xytext=(5, 3 if i % 2 == 0 else -24), textcoords="offset points")  # alternate: neighbours overlap
    ax.axhline(0.30, color="#999", ls="--", lw=0.8)
    ax.axvline(64, color="#999", ls="--", lw=0.8)
    ax.set_xlim(0, max(70, max(p["l0"] for p in points) * 1.6))
    ax.set_ylim(0, max(0.6, max(p["nmse"] for p in points) * 1.2))
    ax.set_xlabel("mean L0 (held out)")
    ax.set_ylabel("mean NMSE (held out)")
    ax.set_title("Held-out NMSE against L0 (bar: ≤ 0.30 at L0 ≤ 64)", fontsize=9)
    path = save_figure(fig, "frontier")
    for w, t, p in budget:
        print(f"{w:5d} features per layer: {t / 1000:8.0f}k tokens in 30 minutes ({p})")
    for p in points:
        print(f"{p['label']}: NMSE {p['nmse']:.3f}, L0 {p['l0']:.1f}, top-1 {100 * p['top1']:.1f}%, "
              f"replacement (no BOS) {p['replacement']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
