"""Default model: first load (from the GGUF file), cached load, and forward tokens/s in fp32.

    .venv/bin/python benchmarks/model_load.py [--tokens 4096] [--ctx 256]

Prints the figures and writes benchmarks/results/model_load.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens to run through the forward pass")
    parser.add_argument("--ctx", type=int, default=256, help="context length of each sequence")
    args = parser.parse_args()
    from cltrace.model import load_model

    with tempfile.TemporaryDirectory() as cache:
        os.environ["CLTRACE_CACHE"] = cache  # an empty cache: the first load reads the GGUF file
        t = time.perf_counter()
        load_model()
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        model = load_model()
        cached_s = time.perf_counter() - t

    batch = max(1, args.tokens // args.ctx)
    ids = torch.randint(0, model.vocab_size, (batch, args.ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The cached weights are memory-mapped: the first full forward also pages them in.
        t = time.perf_counter()
        model.model(input_ids=ids[:1], use_cache=False)
        first_forward_s = time.perf_counter() - t
        t = time.perf_counter()
        model.model(input_ids=ids, use_cache=False)
        forward_s = time.perf_counter() - t
    figures = {
        "model": model.name,
        "first_load_s": round(first_s, 2),
        "cached_load_s": round(cached_s, 2),
        "first_forward_s": round(first_forward_s, 2),
        "forward_tokens": batch * args.ctx,
        "forward_ctx": args.ctx,
        "forward_tokens_per_s": round(batch * args.ctx / forward_s, 1),
        "dtype": "float32",
    }
    for key, value in figures.items():
        print(f"{key:<22} {value}")
    print(f"wrote {write_result('model_load', figures)}", file=sys.stderr)


if __name__ == "__main__":
    main()
