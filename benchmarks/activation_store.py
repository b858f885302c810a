"""The activation store on the default model: harvest speed, training speed from it, bytes per token.

1. Harvest to store: `harvest_to_store` of `--contexts` contexts of the default corpus (packing,
   forward pass, bf16/fp16 shards with sha256, per-layer norm sums, manifest) against the plain
   forward pass of the language model (logits included) on the same contexts. Target: >= 90%.
   Timed with the model in fp32 and under bf16 autocast (`--compute-dtype`).
2. Training from the store: the default preset's transcoder (30 layers x 256 features, bf16 products,
   dense decode), trained by the `Trainer` from a `StoreSource` for `--steps` steps (reading and
   verifying shards included), against the same steps from a buffer held in memory.
3. Disk bytes per stored token.

Each harvest figure is the best of `--repeats` runs (the machine may be shared: the best run is the
one least disturbed); the load average at the start and end is recorded beside the figures.

    .venv/bin/python benchmarks/activation_store.py [--contexts 64] [--steps 14] [--repeats 2]

Writes benchmarks/results/activation_store.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cltrace.data.harvest import Harvester
from cltrace.data.packing import model_packing, pack_batches
from cltrace.data.sources import open_text_source
from cltrace.data.store import ActivationStore, bytes_per_token, harvest_to_store
from cltrace.model import load_model
from cltrace.train import Trainer, preset
from cltrace.train.data import ActivationSource, StoreSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result


class MemorySource(ActivationSource):
    """The store's first buffer, held in memory and yielded again and again (the no-I/O reference)."""

    def __init__(self, store: ActivationStore, buffer_contexts: int) -> None:
        self.store, self.n_layers, self.d_model = store, store.n_layers, store.d_model
        self.x, self.y = store.read_contexts(0, buffer_contexts)

    def fingerprint(self) -> dict[str, Any]:
        return self.store.fingerprint

    def buffers(self, start: dict[str, Any] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        i = start["i"] if start else 0
        while True:
            i += 1
            yield self.x, self.y, {"i": i}


def train_tokens_per_s(data: ActivationSource, steps: int, out: Path) -> float:
    """Training tokens/s of the default preset from `data`, over steps 2..steps (the first one warms up)."""
    cfg = dataclasses.replace(preset("default"), total_tokens=(steps + 100) * preset("default").batch_tokens,
                              log_every=1, checkpoint_every=10**6)
    Trainer(cfg, data, out, progress=False, stop_after=steps).run()  # stops before any checkpoint or save
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return (rows[-1]["tokens"] - rows[0]["tokens"]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=64, help="contexts harvested (the default preset's shuffle buffer)")
    parser.add_argument("--steps", type=int, default=14, help="training steps timed from the store")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="store dtype")
    parser.add_argument("--compute-dtypes", default="float32,bfloat16")
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temporary folder)")
    args = parser.parse_args()
    cfg = preset("default")
    figures: dict[str, Any] = {"load_average_start": os.getloadavg()[0], "n_ctx": cfg.n_ctx, "contexts": args.contexts,
                               "store_dtype": args.dtype}
    loaded = load_model("default")
    source = open_text_source("default")
    tokenize, pack = model_packing(loaded, cfg.n_ctx, args.contexts)
    ids = next(pack_batches(source, tokenize, pack)).tokens  # [contexts, n_ctx]: what the store harvests
    n_tok = ids.numel()
    positions = Harvester(loaded).positions_per_context(cfg.n_ctx)  # stored tokens per context
    work = Path(args.dir or tempfile.mkdtemp(prefix="cltrace-store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store_dir = work / "store"
    try:
        harvest: dict[str, Any] = {}
        for compute in args.compute_dtypes.split(","):
            bf16 = compute == "bfloat16"

            def forward(bf16: bool = bf16) -> None:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    for chunk in ids.split(cfg.harvest_batch):
                        loaded.model(input_ids=chunk, use_cache=False)

            def to_store(compute: str = compute) -> None:
                shutil.rmtree(store_dir, ignore_errors=True)
                harvest_to_store(loaded, source, store_dir, args.contexts * positions, model_spec="default",
                                 source_spec="default", n_ctx=cfg.n_ctx, dtype=args.dtype, harvest_dtype=compute,
                                 harvest_batch=cfg.harvest_batch, progress=False)

            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loaded.model(input_ids=ids[:2, :16], use_cache=False)  # warm-up: kernels picked
            t_fwd, t_store = [], []
            for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits both
                t = time.perf_counter()
                forward()
                t_fwd.append(time.perf_counter() - t)
                t = time.perf_counter()
                to_store()
                t_store.append(time.perf_counter() - t)
            store = ActivationStore(store_dir)
            assert store.contexts == args.contexts, store.contexts
            harvest[compute] = {
                "forward_tokens_per_s": round(n_tok / min(t_fwd), 1),
                "store_tokens_per_s": round(n_tok / min(t_store), 1),
                "store_over_forward": round(min(t_fwd) / min(t_store), 3),
                "forward_seconds": [round(t, 2) for t in t_fwd],
                "store_seconds": [round(t, 2) for t in t_store],
            }
            print(f"harvest to store ({compute} compute, {args.dtype} shards): forward {n_tok / min(t_fwd):.0f} tokens/s, "
                  f"to store {n_tok / min(t_store):.0f} tokens/s ({100 * min(t_fwd) / min(t_store):.0f}% of the forward pass)",
                  flush=True)
        figures["harvest"] = harvest
        store = ActivationStore(store_dir)
        figures["disk"] = {
            "bytes_per_token": round(store.disk_bytes() / store.tokens, 1),
            "payload_bytes_per_token": bytes_per_token(store.n_layers, store.d_model, args.dtype),
            "shards": len(store.shards),
            "tokens": store.tokens,
        }
        print(f"disk: {store.disk_bytes() / store.tokens / 1024:.1f} KiB per token ({len(store.shards)} shards, "
              f"{store.tokens} tokens)", flush=True)
        write_result("activation_store", {**figures, "load_average_end": os.getloadavg()[0]})  # kept if training is cut short

        training = {"n_features": cfg.n_features, "batch_tokens": cfg.batch_tokens, "dtype": cfg.dtype,
                    "decode": cfg.decode, "steps": args.steps}
        training["from_store_tokens_per_s"] = round(
            train_tokens_per_s(StoreSource(store, cfg.shuffle_contexts), args.steps, work / "run-store"), 1)
        training["from_memory_tokens_per_s"] = round(
            train_tokens_per_s(MemorySource(store, cfg.shuffle_contexts), args.steps, work / "run-memory"), 1)
        training["store_over_memory"] = round(training["from_store_tokens_per_s"] / training["from_memory_tokens_per_s"], 3)
        print(f"training from the store: {training['from_store_tokens_per_s']:.0f} tokens/s "
              f"(from memory: {training['from_memory_tokens_per_s']:.0f} tokens/s)", flush=True)
        figures["training"] = training
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    figures["load_average_end"] = os.getloadavg()[0]
    print(f"wrote {write_result('activation_store', figures)}")


if __name__ == "__main__":
    main()
