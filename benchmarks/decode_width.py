"""The training decode's speed against the CLT's width: the dense decode beside the sparse one.

At each width (features per layer) on the default model's shape (30 layers, d_model 576), with the
JumpReLU thresholds set so that about `--l0` features per layer and token fire, it times

1. the decode alone, forward and backward (tokens/s): "dense" (every feature's decoder, bf16
   products, as the default preset trains), "sparse" (only the active features, dense gradients)
   and "sparse_rows" (the same, with gradients over the decoder rows read only);
2. the whole training step (encoder, loss, backward, clipping, optimiser): dense decode with
   Adam, sparse decode with Adam, and sparse decode with lazy Adam (`optimizer="lazy_adam"`).

A case whose estimated memory exceeds `--max-gb` is skipped and says why. Each figure is the
best of `--repeats` timed runs after a warm-up (the machine may be shared); the load average at
the start and end is recorded, and the crossover width (the narrowest width where a sparse path
beats the dense one) is printed and written.

    .venv/bin/python benchmarks/decode_width.py [--widths 256,512,1024,2048,4096,8192] [--l0 32]

Writes benchmarks/results/decode_width.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

from cltrace.model import load_model
from cltrace.train.losses import transcoder_loss
from cltrace.train.optimizer import LazyAdam, clip_grad_norm
from cltrace.transcoder import Transcoder, TranscoderConfig
from cltrace.transcoder.sparse_decode import decode_sparse_matmul

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, write_result

GB = 2**30
DECODES = ("dense", "sparse", "sparse_rows")
STEPS = {"dense_adam": ("dense", "adam"), "sparse_adam": ("sparse", "adam"), "sparse_lazy_adam": ("sparse", "lazy_adam")}


def memory_gb(params: int, case: str) -> float:
    """Estimated peak memory of a case in GB: bytes per decoder weight of the fp32 weights (4), their
    gradient (4; a row-sparse one is as large when most features fire in a batch), the bf16 copies of
    the dense decode (2 + 2), Adam's moments (8), the decoder norms' gradient before it is summed in
    (4) and a lazy update's coalesced gradient (4); 1 GB more for activations."""
    per = {"dense": 4 + 4 + 2, "sparse": 4 + 4, "sparse_rows": 4 + 4,
           "dense_adam": 4 + 4 + 2 + 8 + 4, "sparse_adam": 4 + 4 + 8 + 4, "sparse_lazy_adam": 4 + 4 + 8 + 4}[case]
    return params * per / GB + 1.0


def make_transcoder(L: int, d: int, width: int, x: torch.Tensor, l0: int) -> Transcoder:
    """A random CLT whose thresholds leave about `l0` features per layer active on x."""
    tc = Transcoder.random(TranscoderConfig("clt", L, d, width))
    with torch.no_grad():
        pre = tc.encode_pre(x[:256])  # [256, L, F]
        tc.activation.threshold.copy_(torch.quantile(pre.float().transpose(0, 1).reshape(L, -1), 1 - l0 / width, dim=1)[:, None])
    return tc


def time_decode(tc: Transcoder, x: torch.Tensor, case: str, repeats: int) -> float:
    """Seconds per forward and backward of the decode alone on x's activations."""
    with torch.no_grad():
        acts = tc.encode(x)  # [N, L, F]
    grad = torch.randn(x.shape[0], tc.n_layers, tc.d_model)
    rows, layers, features = (acts != 0).nonzero(as_tuple=True)
    values = acts[rows, layers, features]

    def run() -> None:
        tc.zero_grad(set_to_none=True)
        if case == "dense":
            recon = tc.decode_dense(acts, None, torch.bfloat16)
        else:
            recon = decode_sparse_matmul(tc, rows, layers, features, values, x.shape[0], row_grads=case == "sparse_rows").recon
        (recon * grad).sum().backward()

    t = best_of(run, repeats, warmup=True)
    tc.zero_grad(set_to_none=True)
    return t


def time_step(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, case: str, repeats: int) -> float:
    """Seconds per training step (bf16 autocast, as the presets train)."""
    decode, optimizer = STEPS[case]
    opt: torch.optim.Optimizer = (LazyAdam(tc.parameters(), lr=1e-5) if optimizer == "lazy_adam"
                                  else torch.optim.Adam(tc.parameters(), lr=1e-5, fused=True))

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = transcoder_loss(tc, x, y, 1e-4, 1.0, 3e-6, decode=decode, row_grads=optimizer == "lazy_adam")
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        clip_grad_norm(list(tc.parameters()), 1.0)
        opt.step()

    t = best_of(run, repeats, warmup=True)
    tc.zero_grad(set_to_none=True)
    return t


def crossover(results: list[dict], key: str, sparse: str, dense: str) -> int | None:
    """The narrowest width from which `sparse` has more tokens/s than `dense` at every width measured
    (a dense case skipped for memory counts as beaten); None if it never does."""
    found = None
    for r in reversed(results):
        s, d = r[key].get(sparse), r[key].get(dense)
        if not isinstance(s, float) or (isinstance(d, float) and s <= d):
            break
        found = r["width"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--l0", type=int, default=32, help="active features per layer and token")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=20.0, help="skip cases whose estimated memory exceeds this")
    parser.add_argument("--name", default="decode_width")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    loaded = load_model("default")
    L, d = loaded.n_layers, loaded.d_model
    del loaded
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_tokens, L, d, generator=g)  # normalised inputs: the timing depends on L0, not content
    y = torch.randn(args.batch_tokens, L, d, generator=g)
    results = []
    for width in (int(w) for w in args.widths.split(",")):
        params = width * d * L * (L + 1) // 2  # decoder weights
        row: dict = {"width": width, "decoder_params": params, "decode_tokens_per_s": {}, "step_tokens_per_s": {}, "skipped": {}}
        fits = {case: memory_gb(params, case) <= args.max_gb for case in (*DECODES, *STEPS)}
        for case, ok in fits.items():
            if not ok:
                row["skipped"][case] = f"needs about {memory_gb(params, case):.0f} GB, more than --max-gb {args.max_gb:g}"
        if not any(fits.values()):
            results.append(row)
            continue
        tc = make_transcoder(L, d, width, x, args.l0)
        with torch.no_grad():
            row["l0_per_layer"] = round(float((tc.encode(x) != 0).sum(-1).float().mean()), 1)
        for case in DECODES:
            if fits[case]:
                row["decode_tokens_per_s"][case] = round(args.batch_tokens / time_decode(tc, x, case, args.repeats), 1)
                gc.collect()
        for case in STEPS:
            if fits[case]:
                row["step_tokens_per_s"][case] = round(args.batch_tokens / time_step(tc, x, y, case, args.repeats), 1)
                gc.collect()
        print(f"width {width}: L0 {row['l0_per_layer']}, decode tokens/s {row['decode_tokens_per_s']}, "
              f"step tokens/s {row['step_tokens_per_s']}" + (f", skipped {sorted(row['skipped'])}" if row["skipped"] else ""),
              flush=True)
        results.append(row)
        del tc
        gc.collect()
    figures = {
        "load_average_start": load_start,
        "shape": {"n_layers": L, "d_model": d},
        "batch_tokens": args.batch_tokens,
        "l0_target": args.l0,
        "max_gb": args.max_gb,
        "widths": results,
        "crossover_width": {
            "decode_sparse_vs_dense": crossover(results, "decode_tokens_per_s", "sparse", "dense"),
            "decode_sparse_rows_vs_dense": crossover(results, "decode_tokens_per_s", "sparse_rows", "dense"),
            "step_sparse_lazy_adam_vs_dense_adam": crossover(results, "step_tokens_per_s", "sparse_lazy_adam", "dense_adam"),
            "step_sparse_adam_vs_dense_adam": crossover(results, "step_tokens_per_s", "sparse_adam", "dense_adam"),
        },
        "load_average_end": os.getloadavg()[0],
    }
    print(f"crossover widths: {figures['crossover_width']}")
    print(f"wrote {write_result(args.name, figures)}")


if __name__ == "__main__":
    main()
