"""The NMSE-L0 trade-off: train several CLTs that differ in size or sparsity, evaluate each, write the table.

Each point is a `cltrace train --preset PRESET --set ...` run (the default model and corpus), so a point
is exactly what a user would get with those overrides. Runs that already finished are read back, not
trained again, and a stopped one is resumed, so the sweep can be stopped and restarted. Each point
says whether it meets the quality bar (mean NMSE <= 0.35, spliced top-1 >= 30%, mean L0 <= 64).

    .venv/bin/python benchmarks/train_sweep.py --work /tmp/sweep \
        --point n_features=256,sparsity_lambda=1.5e-3 --point n_features=256,sparsity_lambda=7e-4 \
        --set total_tokens=150000
    .venv/bin/python benchmarks/train_sweep.py --preset quality --work /tmp/q --name train_quality_preset \
        --more-tokens 32768
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

KEYS = ("nmse_mean", "l0_mean", "spliced_top1", "spliced_kl", "dead_fraction", "n_tokens", "train_seconds", "train_tokens")
BAR = {"nmse_mean_max": 0.35, "spliced_top1_min": 0.30, "l0_mean_max": 64}


def training_curve(run: Path, every: int = 5) -> list[dict]:
    """Every `every`-th line of a run's metrics.jsonl: minutes, tokens, training-batch NMSE and L0."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"minutes": round(r["elapsed_s"] / 60, 2), "tokens": r["tokens"], "nmse": round(r["nmse"], 4),
             "l0": round(r["l0"], 2)} for r in rows[::every] + rows[-1:]]


def run_point(work: Path, overrides: list[str], name: str, preset: str = "default", more_tokens: int = 0,
              graph_scores: bool = False) -> dict:
    """Train and evaluate one point (or read it back if its run folder already holds eval.json); with
    `more_tokens`, evaluate it again on that many held-out tokens (kept in eval_MORE.json), and with
    `graph_scores` also score the attribution graphs of `cltrace eval`'s committed prompt set."""
    out = work / name
    eval_path = out / "eval.json"
    seconds = None
    if not eval_path.exists():
        cmd = [sys.executable, "-m", "cltrace", "train", "--preset", preset, "-o", str(out), "--quiet"]
        if (out / "config.json").exists():
            cmd.append("--resume")
        for item in overrides:
            cmd += ["--set", item]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t
    figures = json.loads(eval_path.read_text())
    config = json.loads((out / "config.json").read_text())
    meets = (figures["nmse_mean"] <= BAR["nmse_mean_max"] and figures["spliced_top1"] >= BAR["spliced_top1_min"]
             and figures["l0_mean"] <= BAR["l0_mean_max"])
    more = None
    if more_tokens:
        more_path = out / f"eval_{more_tokens}.json"
        if not more_path.exists():
            subprocess.run([sys.executable, "-m", "cltrace", "eval", "-t", str(out / "transcoder"), "--tokens", str(more_tokens),
                            "--prompts", "default" if graph_scores else "none", "-o", str(more_path)],
                           check=True, stdout=subprocess.DEVNULL)
        evaluated = json.loads(more_path.read_text())
        more = {k: v for k, v in evaluated.items() if k in (*KEYS, "nmse_per_layer", "l0_per_layer")}
        if "graphs" in evaluated:
            more["graphs"] = {k: evaluated["graphs"][k] for k in ("n_prompts", "mean", "median")}
    return {"name": name, "preset": preset, "overrides": overrides, "wall_seconds": seconds, "meets_bar": meets,
            "n_features": config["n_features"], "sparsity_lambda": config["sparsity_lambda"],
            "total_tokens": config["total_tokens"], **{k: figures.get(k) for k in KEYS},
            "nmse_per_layer": figures.get("nmse_per_layer"), "l0_per_layer": figures.get("l0_per_layer"),
            "eval_more_tokens": more, "curve": training_curve(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the run folders")
    parser.add_argument("--preset", default="default", help="the preset every point starts from")
    parser.add_argument("--point", action="append", default=None,
                        help="comma-separated KEY=VALUE overrides of one point (repeatable; none: the preset itself, "
                             "in WORK/PRESET)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override shared by every point")
    parser.add_argument("--more-tokens", type=int, default=0,
                        help="also evaluate each point on this many held-out tokens (the run's own evaluation uses about "
                             "4k, which moves by about 0.02 NMSE with its sample)")
    parser.add_argument("--graph-scores", action="store_true",
                        help="with --more-tokens, also score the graphs of cltrace eval's prompt set (minutes per point)")
    parser.add_argument("--name", default="train_sweep", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in args.point or [""]:
        overrides = [*args.set, *filter(None, point.split(","))]
        name = point.replace(",", "_").replace("=", "") or args.preset
        rows.append(run_point(args.work, overrides, name, args.preset, args.more_tokens, args.graph_scores))
        row = rows[-1]
        print(f"{name}: NMSE {row['nmse_mean']:.3f}  L0 {row['l0_mean']:.1f}  top-1 {row['spliced_top1']:.1%}  "
              f"KL {row['spliced_kl']:.2f}  {'meets' if row['meets_bar'] else 'misses'} the bar", flush=True)
    path = write_result(args.name, {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
                                    "load_average_end": os.getloadavg()[0], "bar": BAR, "points": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
