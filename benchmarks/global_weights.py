"""Global weights of a CLT of the default shape (30 layers x 256 features, d_model 576): time.

The transcoder is attribution_long.py's seeded random CLT (about 4.6 active features per layer and
token). Timed apart: the co-activation pass (the default model over packed text of the default
corpus, the transcoder's encoder, the pair counts), the virtual and target-weighted top-k over all
pairs of features, and writing them into a feature store (an empty one of the store's schema).
Writes benchmarks/results/global_weights.json.

    .venv/bin/python benchmarks/global_weights.py [--tokens 20000] [--top-k 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_long import realistic_random_clt  # noqa: E402
from common import write_result  # noqa: E402


def main() -> int:
    from cltrace.data import open_text_source
    from cltrace.data.harvest import Harvester
    from cltrace.data.packing import model_packing, pack_batches
    from cltrace.features.global_weights import gather_coactivation, global_weights, write_global_weights
    from cltrace.features.store import SCHEMA, connect
    from cltrace.model import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    model = load_model()
    tc = realistic_random_clt(model)
    t = time.perf_counter()
    tokenize, pack = model_packing(model, 128, 8, split="train", heldout_fraction=0.0)
    batches = (b.tokens for b in pack_batches(open_text_source("default"), tokenize, pack))
    stats = gather_coactivation(tc, batches, Harvester(model, first_position=1), args.tokens)
    coactivation_s = time.perf_counter() - t
    t = time.perf_counter()
    weights = global_weights(tc, top_k=args.top_k, coactivation=stats)
    weights_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "features.db"
        conn = connect(db)
        conn.executescript(SCHEMA)
        conn.close()
        t = time.perf_counter()
        n_rows = write_global_weights(db, tc, weights)
        write_s = time.perf_counter() - t
    total = coactivation_s + weights_s + write_s
    figures = {
        "transcoder": "random 30x256 CLT, d_model 576 (attribution_long.realistic_random_clt)",
        "n_tokens": stats.n_tokens, "top_k": args.top_k, "coactivation_s": coactivation_s,
        "global_weights_s": weights_s, "write_s": write_s, "rows": n_rows, "total_s": total, "budget_s": 600.0,
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
    }
    path = write_result("global_weights", figures)
    print(f"co-activation {coactivation_s:.1f} s over {stats.n_tokens:,} tokens, weights {weights_s:.1f} s, "
          f"write {write_s:.1f} s ({n_rows:,} rows): {total:.1f} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
