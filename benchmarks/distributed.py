"""Training throughput on 1 and 2 processes (torchrun, gloo on CPUs / NCCL on GPUs).

Trains a CLT of the default model's shape (30 layers, d_model 576; `--features` per layer) from
synthetic activations held in memory (so that only training is timed, not harvesting), for
`--steps` steps of `--batch` tokens, in three layouts:

- 1 process (the plain trainer), on all the machine's threads and on one,
- 2 processes, feature parallel (each rank owns half of every layer's features),
- 2 processes, data parallel (each rank owns every feature and takes half of each batch),

each launched with `torchrun --standalone`, the threads split evenly between the ranks. Throughput
is training tokens per second over the steps after the first two (warm-up), read from the run's
metrics: the mean, and the quickest step (the least disturbed on a shared machine); peak memory is
each rank's maximum resident set size. The load average before and after is recorded.

    .venv/bin/python benchmarks/distributed.py [--features 256] [--batch 512] [--steps 8]

Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result

L, D = 30, 576  # the default model (SmolLM2-135M)


def worker(args: argparse.Namespace) -> None:
    """One rank: train from synthetic activations into args.out; write this rank's figures."""
    from cltrace.train import TrainConfig, Trainer
    from cltrace.train.data import ActivationSource
    from cltrace.train.distributed import init_layout, shutdown

    class Synthetic(ActivationSource):
        n_layers, d_model = L, D

        def fingerprint(self) -> dict[str, Any]:
            return {"model": "synthetic", "n_layers": L, "d_model": D}

        def buffers(self, start: dict[str, Any] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
            i = start["i"] if start else 0
            while True:
                g = torch.Generator().manual_seed(i)
                x = torch.randn(2 * args.batch, L, D, generator=g)  # [tokens, layer, d_model]
                y = 0.5 * x + 0.1 * torch.randn(2 * args.batch, L, D, generator=g)
                i += 1
                yield x, y, {"i": i}

    layout = init_layout(args.feature_parallel or None)
    cfg = TrainConfig(
        model="synthetic", n_features=args.features, n_ctx=3, batch_tokens=args.batch, shuffle_contexts=args.batch,
        total_tokens=args.batch * args.steps, norm_tokens=args.batch, checkpoint_every=10_000, log_every=1,
        eval_tokens=0, decode="dense", dtype=args.dtype,
    )
    trainer = Trainer(cfg, Synthetic(), args.out, progress=False)
    trainer.run()
    rank = layout.rank if layout is not None else 0
    rows = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    figures = {"rank": rank, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "threads": torch.get_num_threads()}
    if rows:
        # per-step times after the first two steps (warm-up); the quickest is the one least disturbed
        # by other work on a shared machine, the mean is what a run gets
        steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[1:], rows[2:])]
        figures["seconds_per_step"] = sum(steps) / len(steps)
        figures["best_seconds_per_step"] = min(steps)
        figures["tokens_per_s"] = args.batch / figures["seconds_per_step"]
        figures["best_tokens_per_s"] = args.batch / min(steps)
    (Path(args.out) / f"bench-rank{rank}.json").write_text(json.dumps(figures))
    if layout is not None:
        shutdown()


def launch(n: int, feature_parallel: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Run the worker on n processes with `threads` threads in all; the figures of rank 0 and every rank's memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(n), __file__, "--worker", "--out", str(out),
               "--features", str(args.features), "--batch", str(args.batch), "--steps", str(args.steps),
               "--dtype", args.dtype, "--feature-parallel", str(feature_parallel)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // n))}
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"benchmark run failed ({n} processes):\n{proc.stderr[-3000:]}")
        ranks = [json.loads((out / f"bench-rank{r}.json").read_text()) for r in range(n)]
    main = ranks[0]
    return {
        "processes": n, "feature_parallel": feature_parallel if n > 1 else 1, "data_parallel": n // max(1, feature_parallel) if n > 1 else 1,
        "threads_per_process": main["threads"], "tokens_per_s": round(main["tokens_per_s"], 1),
        "best_tokens_per_s": round(main["best_tokens_per_s"], 1), "seconds_per_step": round(main["seconds_per_step"], 3),
        "max_rss_gib_per_rank": [round(r["max_rss_gib"], 2) for r in ranks], "wall_s_with_startup": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=256, help="features per layer")
    parser.add_argument("--batch", type=int, default=512, help="tokens per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--feature-parallel", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    threads = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    # one process on all the threads, and on one thread (what each of 2 ranks gets on a 2-core machine)
    runs = [launch(1, 1, args, threads), launch(1, 1, args, 1), launch(2, 2, args, threads), launch(2, 1, args, threads)]
    for r in runs:
        layout = f"one process, {r['threads_per_process']} threads" if r["processes"] == 1 else (
            f"{r['processes']} processes, " + ("feature parallel" if r["feature_parallel"] > 1 else "data parallel"))
        print(f"{layout:<36} {r['tokens_per_s']:8.1f} tokens/s (best step {r['best_tokens_per_s']:8.1f})  "
              f"{r['seconds_per_step']:6.3f} s/step  peak RSS per rank {r['max_rss_gib_per_rank']} GiB")
    params = L * args.features * D + args.features * D * L * (L + 1) // 2
    path = write_result("distributed", {
        "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
        "shape": {"n_layers": L, "d_model": D, "n_features": args.features, "batch_tokens": args.batch,
                  "steps": args.steps, "dtype": args.dtype, "decode": "dense", "parameters": params},
        "runs": runs, "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
