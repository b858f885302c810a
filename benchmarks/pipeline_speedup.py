"""The circuit pipeline on one prompt, timed for this checkout and for an earlier commit, side by side.

Each side runs in its own process (`benchmarks/circuits.py`'s `run_prompt`: the graph, the
circuit's supernodes and validation, labels already built), from a git worktree of `--base` or from
this checkout, in turns, `--repeats` times each after one warm-up; the default CLT and its feature
store (`make demo` builds them) serve both.

    .venv/bin/python benchmarks/pipeline_speedup.py --base REV [--repeats 2] [--prompt TEXT --target TOKEN]

Prints each side's times and writes benchmarks/results/pipeline_speedup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

from cltrace.train.default import default_paths  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = r'''
import argparse, json, sys, time
from pathlib import Path
root, prompt, target, repeats = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path[:0] = [str(root / "src"), str(root / "benchmarks")]
import circuits as bench
import cltrace
from cltrace.model import load_model
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import load_transcoder
assert Path(cltrace.__file__).resolve().is_relative_to(root.resolve()), cltrace.__file__
loaded = load_model()
rm = ReplacementModel(loaded, load_transcoder(sys.argv[6]))
labels, store = bench.open_labels(rm, "auto")
args = argparse.Namespace(max_feature_nodes=None, tiny=False, pictures=Path(sys.argv[5]))
item = {"kind": "timing", "prompt": prompt, "target": target}
bench.run_prompt(rm, item, labels, args, 0)  # warm-up: first-call costs, the output labels measured once
runs = [bench.run_prompt(rm, item, labels, args, 0)["timing"] for _ in range(repeats)]
print(json.dumps(runs))
'''


def side(root: Path, prompt: str, target: str, repeats: int, pictures: Path, transcoder: Path) -> list[dict[str, float]]:
    """`repeats` timed runs of the pipeline with the code under `root`, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", WORKER, str(root), prompt, target, str(repeats), str(pictures),
                          str(transcoder)],
                         capture_output=True, text=True, check=False, cwd=root)
    if out.returncode != 0:
        raise SystemExit(f"the run under {root} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit to compare with")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side and turn, after one warm-up")
    parser.add_argument("--turns", type=int, default=2, help="turns of (base, this checkout)")
    parser.add_argument("--prompt", default="The first president of the United States was George")
    parser.add_argument("--target", default=" Washington")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", args.base], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    # the default CLT of this checkout, by path: an earlier commit may name its cache folder otherwise
    transcoder = default_paths()[0]
    if not transcoder.is_dir():
        raise SystemExit("no default CLT in the cache yet: run `make demo` first")
    times: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), commit], check=True, cwd=ROOT,
                       capture_output=True)
        try:
            for turn in range(args.turns):
                for name, root in (("base", worktree), ("this", ROOT)):
                    got = side(root, args.prompt, args.target, args.repeats, Path(tmp), transcoder)
                    times[name] += got
                    print(f"turn {turn + 1} {name}: total " + ", ".join(f"{t['total_s']:.1f} s" for t in got), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    summary: dict[str, Any] = {}
    for name, runs in times.items():
        summary[name] = {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
        summary[name]["runs_total_s"] = [round(r["total_s"], 2) for r in runs]
    ratio = summary["base"]["total_s"] / summary["this"]["total_s"]
    print(f"median total: base {summary['base']['total_s']} s, this checkout {summary['this']['total_s']} s ({ratio:.2f}x)")
    figures = {"prompt": args.prompt, "target": args.target, "base": commit, "this": head, "median": summary,
               "speedup_total": round(ratio, 2),
               "note": "total_s: the whole pipeline less the output labels' steering (labels count as built), "
                       "as benchmarks/circuits.py's time bar"}
    print(f"wrote {write_result('pipeline_speedup', figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
