"""Crash safety: SIGKILL at random points of training, harvest, feature-store building and graph saving.

For each operation, on a tiny random model (the tests' `tiny_model`) and tiny settings:

1. a reference run, uninterrupted, in a fresh child process; its duration is measured from the
   moment the child starts the operation (imports and model building left out);
2. `--points` kill points at stratified random times (point i at (i + u) / N of the duration, u
   uniform, seeded; the duration taken a quarter longer than the reference's, and a run that
   finishes before its kill tried again at the same fraction of its own): a child starts the
   operation and is sent SIGKILL;
3. what the kill left is checked as a reader would see it (every file that reads as good must be
   good: a listed store shard equals the reference's, a checkpoint loads, a feature store passes
   SQLite's integrity check and, once it says "complete", equals the reference; a graph file is
   the old graph or the new one, never anything else);
4. the operation is run again (`--resume` for training) and its output compared with the
   reference: training weights to 1e-6 (and bit for bit), metrics and evaluation exactly; store
   shards byte for byte and the manifest (less its random store id); every table of the feature
   store; the graph's tensors and metadata. Files the reference does not have (temporary files
   a kill left behind) are reported as debris.

Then every kind of output file (checkpoint, transcoder weights and config, store shard and
manifest, feature store, graph) is damaged (truncated, one byte flipped at several places) and
read back with its loader: it must be refused with a one-line `CltraceError` (or, where the
damaged byte is one the loader never uses, read unchanged). The feature store's build state is
also damaged inside its blobs (where SQLite's own checks cannot see) and the store extended.

Children are forked from a multiprocessing fork server that has imported torch, transformers and
cltrace once (each starts in about 0.1 s instead of 4 s); every child runs torch on one thread,
so that reruns compute the same floats. Timing noise from the shared machine only moves where the
kills land.

    nice -n 10 .venv/bin/python benchmarks/crash_safety.py [--points 20] [--ops train,harvest,features,graph]
                                                            [--seed 0] [--workdir DIR] [--no-write]

Prints a table and writes benchmarks/results/crash_safety.json. The operations and their children are
crash_ops.py's; the checks of what a run wrote, and the damaged files, crash_checks.py's.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
for _p in (str(HERE), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (by the modules below) or in the fork server

from common import write_result  # noqa: E402
from crash_checks import Inconsistent, after_kill, compare, damage_checks, graph_snapshot, listing, snapshot  # noqa: E402
from crash_ops import GRAPH_EDGES, GRAPH_FILE, OPS, run_child, synthetic_graph  # noqa: E402
from helpers.train import write_text  # noqa: E402

from cltrace.errors import CltraceError  # noqa: E402

WINDOW = 1.25  # kills are spread over this multiple of the reference run's duration (see run_op)


# -- one operation: reference, kills, resumes ---------------------------------------------------------


def setup(work: Path) -> None:
    """The inputs every operation reads: the text, and the old graph that a save overwrites."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "docs.txt").exists():
        write_text(work / "docs.txt")
    if not (work / "old.safetensors").exists():
        synthetic_graph(seed=1, n_edges=GRAPH_EDGES // 2).save(work / "old.safetensors")


def fresh_output(op: str, work: Path, name: str) -> Path:
    """An empty output folder (for a graph: holding the old graph, which the save replaces)."""
    out = work / op / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if op == "graph":
        shutil.copyfile(work / "old.safetensors", out / GRAPH_FILE)
    return out


def kill_times(points: int, duration: float, seed: int) -> list[float]:
    """Stratified random times over [0, duration]: point i falls in the i-th of `points` equal slices."""
    rng = random.Random(seed)
    return [duration * (i + rng.random()) / points for i in range(points)]


def run_op(op: str, work: Path, points: int, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The reference run, then `points` kill points, each checked and resumed; the figures of `op`."""
    t0 = time.monotonic()
    ref_out = fresh_output(op, work, "reference")
    ref_run = run_child(op, work, ref_out)
    if ref_run.ended != "finished":
        raise RuntimeError(f"{op}: the reference run failed: {ref_run.error}")
    ref = snapshot(op, ref_out)
    ref_files = listing(ref_out)
    old = graph_snapshot(work / "old.safetensors") if op == "graph" else None
    results = []
    for i, at in enumerate(kill_times(points, 1.0, seed * 1000 + OPS.index(op))):
        # `at` is a fraction of the operation's duration. On a shared machine a run's speed varies,
        # so the kill is timed on a window a quarter longer than the reference (a slower run is
        # still killed late in its course), and a run that finishes before its kill is tried again
        # at the same fraction of its own duration (twice at most; a run that still finishes first
        # is checked like any other).
        duration = WINDOW * ref_run.seconds
        for _ in range(3):
            out = fresh_output(op, work, f"kill-{i:02d}")
            run = run_child(op, work, out, kill_after=at * duration)
            if run.ended != "finished":
                break
            duration = run.seconds
        point: dict[str, Any] = {"point": i, "kill_at_s": round(run.seconds, 3), "fraction": round(at, 3),
                                 "ended": run.ended}
        failure = None
        if run.ended == "failed":
            failure = f"the killed run failed before the kill: {run.error.splitlines()[0]}"
        else:
            try:
                point["after_kill"], point["state"] = after_kill(op, out, ref, old)
            except (Inconsistent, CltraceError) as exc:  # a file a kill left reads badly or wrongly
                failure = f"after the kill: {type(exc).__name__}: {exc}"
            point["debris_after_kill"] = sorted(set(listing(out)) - set(ref_files))
            again = run_child(op, work, out, resume=True)
            if again.ended != "finished":
                failure = failure or f"the rerun failed: {again.error.splitlines()[0]}"
                point["rerun_error"] = again.error[-2000:]
            else:
                same, how = compare(op, snapshot(op, out), ref)
                point["rerun"] = how
                point["identical"] = same
                if not same:
                    failure = failure or f"the rerun's output differs from the reference: {how}"
            point["debris_after_rerun"] = sorted(set(listing(out)) - set(ref_files))
        if failure:
            point["failure"] = failure
        results.append(point)
        log(f"  {op} point {i:2d}: kill at {run.seconds:6.2f} s ({at:.2f}) {run.ended:8s} "
            f"{point.get('after_kill', '-'):27s} {point.get('state', ''):32s} {point.get('rerun', '-'):16s} {failure or ''}")
        shutil.rmtree(out, ignore_errors=True)
    return {
        "reference_seconds": round(ref_run.seconds, 3),
        "points": points,
        "killed": sum(p["ended"] == "killed" for p in results),
        "finished_before_kill": sum(p["ended"] == "finished" for p in results),
        "after_kill_phases": dict(Counter(p.get("after_kill", "-") for p in results)),
        "previous_output_intact": sum(p.get("after_kill") == "old graph intact" for p in results) if op == "graph" else None,
        "resumed_identical": sum(bool(p.get("identical")) for p in results),
        "resumed_bit_identical": sum(p.get("rerun") == "bit-identical" for p in results),
        "failures": [f"point {p['point']}: {p['failure']}" for p in results if "failure" in p],
        "debris_after_kill": sum(bool(p.get("debris_after_kill")) for p in results),
        "debris_after_rerun": sorted({f for p in results for f in p.get("debris_after_rerun", [])}),
        "seconds": round(time.monotonic() - t0, 1),
        "kill_points": results,
    }


# -- main -----------------------------------------------------------------------------------------------


def run(ops: list[str], points: int, work: Path, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every selected operation's kill points, then the damage checks; the figures as one dict."""
    setup(work)
    figures: dict[str, Any] = {"points_per_op": points, "seed": seed, "ops": {}}
    t0 = time.monotonic()
    for op in ops:
        log(f"{op}: reference run and {points} kill points")
        figures["ops"][op] = run_op(op, work, points, seed, log)
    figures["damage"] = damage_checks(work, ops, seed)
    figures["seconds"] = round(time.monotonic() - t0, 1)
    return figures


def print_table(figures: dict[str, Any]) -> None:
    print(f"\n{'operation':10s} {'ref s':>6s} {'points':>6s} {'killed':>6s} {'identical':>9s} {'bit-id':>6s} "
          f"{'old kept':>8s} {'failures':>8s}  phases after the kill")
    for op, r in figures["ops"].items():
        kept = "-" if r["previous_output_intact"] is None else str(r["previous_output_intact"])
        phases = ", ".join(f"{k} {v}" for k, v in sorted(r["after_kill_phases"].items()))
        print(f"{op:10s} {r['reference_seconds']:6.2f} {r['points']:6d} {r['killed']:6d} {r['resumed_identical']:9d} "
              f"{r['resumed_bit_identical']:6d} {kept:>8s} {len(r['failures']):8d}  {phases}")
        for f in r["failures"]:
            print(f"    FAILURE {f}")
        if r["debris_after_rerun"]:
            print(f"    debris left after the rerun: {r['debris_after_rerun'][:6]}")
    print("\ndamaged files:")
    for kind, outcomes in figures["damage"].items():
        counts = Counter(outcomes.values())
        print(f"  {kind:32s} " + ", ".join(f"{k}: {v}" for k, v in counts.most_common()))
        for name, outcome in outcomes.items():
            if outcome != "refused":
                print(f"      {name}: {outcome}")
    print(f"\ntotal {figures['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20, help="kill points per operation")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/crash_safety.json")
    args = parser.parse_args()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown or args.points < 1:
        parser.error(f"unknown operation(s) {unknown}; choose from {', '.join(OPS)}" if unknown else "--points must be >= 1")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="cltrace-crash-")
    work = args.workdir or Path(tmp.name)
    try:
        figures = run(ops, args.points, work, args.seed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_table(figures)
    if not args.no_write:
        print(f"wrote {write_result('crash_safety', figures)}")


if __name__ == "__main__":
    main()
