"""QK attribution of one head at one query position on a 100-token prompt of the default model.

The transcoder is the seeded random 30 x 256 CLT of attribution_long.py (about 4.6 active features
per layer and token). Timed, for a head of a low, a middle and the top layer (median of 3 runs each): QK from scratch
(`AttentionSites`, the layer's decoder sums, scores to every key, pairs for the 5 most attended
keys) and again for another head of a layer already asked about. The replacement model's own run
(`ReplacementModel.run`, shared with attribution) is timed apart; the machine's load average is
recorded beside the figures. Writes benchmarks/results/qk.json.

    .venv/bin/python benchmarks/qk.py [--tokens 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_long import realistic_random_clt  # noqa: E402
from attribution_vs_circuit_tracer import LONG_TEXT  # noqa: E402
from common import write_result  # noqa: E402


def _median_s(fn, repeats: int = 3) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    from cltrace.graph.qk import qk_attribution
    from cltrace.graph.qk_sites import AttentionSites
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    model = load_model()
    rm = ReplacementModel(model, realistic_random_clt(model))
    ids = model.encode(LONG_TEXT * 4)[: args.tokens]
    t = time.perf_counter()
    run = rm.run(ids)
    run_s = time.perf_counter() - t
    q = run.n_pos - 1
    by_threads = {}
    for threads in (1, 2):
        # Both figures: on a machine shared with other jobs, two threads lose more to waiting on
        # each other than they gain.
        torch.set_num_threads(threads)
        per_layer = {}
        for layer in (1, model.n_layers // 2, model.n_layers - 1):
            sites = AttentionSites(rm, run)
            result = qk_attribution(rm, run, layer, 0, q, sites=sites)
            per_layer[str(layer)] = {
                # from scratch: the capture and the layer's decoder sums, then the decomposition
                "cold_s": _median_s(lambda layer=layer: qk_attribution(rm, run, layer, 0, q)),
                # another head or query of a layer already asked about: the decomposition alone
                "warm_s": _median_s(lambda layer=layer, sites=sites: qk_attribution(rm, run, layer, 1, q, sites=sites)),
                "query_nodes": len(result.query_nodes),
                "key_nodes": [len(key.key_nodes) for key in result.keys],
            }
        by_threads[str(threads)] = {"per_layer": per_layer, "qk_one_head_s": max(v["cold_s"] for v in per_layer.values())}
    worst = min(v["qk_one_head_s"] for v in by_threads.values())
    figures = {
        "model": model.name, "transcoder": "random 30x256 CLT (attribution_long.realistic_random_clt)",
        "n_tokens": run.n_pos, "query_pos": q, "n_keys_decomposed": 5, "replacement_run_s": run_s,
        "by_torch_threads": by_threads, "qk_one_head_s": worst, "budget_s": 2.0, "load_average": os.getloadavg()[0],
    }
    path = write_result("qk", figures)
    print(f"QK of one head at one query, from scratch: ≤ {worst:.3f} s (run {run_s:.2f} s apart) -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
