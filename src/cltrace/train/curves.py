"""Training curves: the metrics a run logs, read back and drawn into a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cltrace.atomic import atomic_write


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> None:
    """Draw loss terms, NMSE, L0 and dead fraction against training tokens into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return
    tokens = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    for key in ("total", "mse", "sparsity", "preact"):
        ax.plot(tokens, [max(r[key], 1e-12) for r in rows], label=key)
    ax.set_yscale("log")
    ax.set_title("loss terms")
    ax.legend()
    axes[0, 1].plot(tokens, [r["nmse"] for r in rows])
    axes[0, 1].set_title("NMSE (mean over layers, training batches)")
    axes[1, 0].plot(tokens, [r["l0"] for r in rows])
    axes[1, 0].set_title("L0 (mean active features per layer and token)")
    axes[1, 1].plot(tokens, [r["dead_fraction"] for r in rows])
    axes[1, 1].set_title("dead fraction")
    from matplotlib.ticker import EngFormatter

    for a in axes.flat:
        a.set_xlabel("training tokens")
        a.xaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, not 400000 running into its neighbour
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), what="training curves")
    plt.close(fig)


__all__ = ["plot_curves", "read_metrics"]
