"""Feature pages: build a store on the default model with a random CLT, then time random page reads.

    .venv/bin/python benchmarks/feature_page.py [--tokens 4096] [--features 512] [--reads 500] [--db PATH]

A random CLT (30 layers x F features, the paper's initialisation) is run over the default corpus;
the build's time, tokens/s and database size are recorded, then `FeatureStore.page` is read for
random features. The target: a page in at most 50 ms. Prints the figures and writes
benchmarks/results/feature_page.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens to build the store over")
    parser.add_argument("--features", type=int, default=512, help="features per layer of the random CLT")
    parser.add_argument("--n-ctx", type=int, default=128, help="tokens per context")
    parser.add_argument("--reads", type=int, default=500, help="random page reads to time")
    parser.add_argument("--db", type=Path, default=None, help="keep the store here (default: a temporary file)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from cltrace.features import FeatureStore, build_feature_store
    from cltrace.features.show import format_page
    from cltrace.model import load_model
    from cltrace.transcoder import Transcoder, TranscoderConfig

    loaded = load_model()
    tc = Transcoder.random(
        TranscoderConfig("clt", loaded.n_layers, loaded.d_model, args.features, model_id=loaded.name), seed=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "features.db"
        if db.exists():
            db.unlink()
        t = time.perf_counter()
        build_feature_store(loaded, tc, "default", args.tokens, db, n_ctx=args.n_ctx, batch_size=8, progress=True)
        build_s = time.perf_counter() - t

        t = time.perf_counter()
        store = FeatureStore(db)
        first = store.page(0, 0)
        open_and_first_ms = 1000 * (time.perf_counter() - t)
        stats = store.stats()
        timings = store.meta.get("last_build", {})
        rng = random.Random(0)
        times = []
        for _ in range(args.reads):
            layer, feature = rng.randrange(store.n_layers), rng.randrange(store.n_features)
            t = time.perf_counter()
            store.page(layer, feature)
            times.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        text = format_page(store.page(15, 7))
        format_ms = 1000 * (time.perf_counter() - t)
        store.close()
        del first

    times.sort()
    p50 = statistics.median(times)
    p95 = times[int(0.95 * (len(times) - 1))]
    figures = {
        "model": loaded.name,
        "transcoder": f"random clt {loaded.n_layers}x{args.features}",
        "tokens": stats["tokens"],
        "n_ctx": args.n_ctx,
        "build_s": round(build_s, 2),
        "build_tokens_per_s": round(stats["tokens"] / build_s, 1),
        "stream_s": timings.get("stream_s"),
        "stream_tokens_per_s": round(timings["stream_tokens"] / timings["stream_s"], 1) if timings.get("stream_s") else None,
        "token_views_s": timings.get("token_views_s"),
        "pages_s": timings.get("pages_s"),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "db_mib": round(stats["bytes"] / 2**20, 2),
        "reads": args.reads,
        "page_ms_p50": round(p50, 3),
        "page_ms_p95": round(p95, 3),
        "page_ms_max": round(times[-1], 3),
        "open_and_first_page_ms": round(open_and_first_ms, 2),
        "page_and_format_ms": round(format_ms, 2),
        "target_ms": 50,
        "meets_target": p95 <= 50,
    }
    print(text)
    for key, value in figures.items():
        print(f"{key:<24} {value}")
    print(f"wrote {write_result('feature_page', figures)}")


if __name__ == "__main__":
    main()
