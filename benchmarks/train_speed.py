"""Harvest and training speed on the default model.

1. Harvest tokens/s (every layer's resid_mid and MLP output, BOS left out) against the plain forward
   pass of the language model, in fp32 and under bf16 autocast.
2. Training tokens/s (loss, backward, clipping, Adam) at the default preset's size, from activations
   in memory, with the thresholds set so that about `--l0` features per layer fire: sparse decode
   against the dense baseline, in fp32 and bf16 autocast.

Each figure is the best of `--repeats` timed runs (the machine may be shared: the best run is the
one least disturbed). The load average at the start and end is recorded beside the figures.

    .venv/bin/python benchmarks/train_speed.py [--l0 64] [--repeats 3]

Writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from cltrace.data.harvest import Harvester
from cltrace.model import load_model
from cltrace.train import preset
from cltrace.train.losses import transcoder_loss
from cltrace.transcoder import Transcoder, TranscoderConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l0", type=int, default=64, help="active features per layer and token during the training timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--n-features", type=int, default=None, help="features per layer (default: the default preset's)")
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--sparse-batch-tokens", type=int, default=1 << 30, help="tokens per step for the sparse timing")
    parser.add_argument("--skip-harvest", action="store_true")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    cfg = preset("default")
    n_features = args.n_features or cfg.n_features
    batch_tokens = args.batch_tokens or cfg.batch_tokens
    load_start = os.getloadavg()[0]
    loaded = load_model("default")
    figures: dict = {"load_average_start": load_start, "n_ctx": cfg.n_ctx, "contexts": args.contexts}

    torch.manual_seed(0)
    ids = torch.randint(0, loaded.vocab_size, (args.contexts, cfg.n_ctx))
    ids[:, 0] = loaded.bos_id()
    n_tok = ids.numel()
    harvested = None
    if not args.skip_harvest:
        harvest = {}
        for name, bf16 in (("float32", False), ("bfloat16", True)):
            h = Harvester(loaded, max_batch=cfg.harvest_batch, autocast_bf16=bf16)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loaded.model(input_ids=ids[:2], use_cache=False)  # warm-up
                t_fwd = best_of(lambda: [loaded.model(input_ids=c, use_cache=False) for c in ids.split(cfg.harvest_batch)], args.repeats)
            t_h = best_of(lambda h=h: h.harvest(ids), args.repeats)
            harvest[name] = {
                "forward_tokens_per_s": round(n_tok / t_fwd, 1),
                "harvest_tokens_per_s": round(n_tok / t_h, 1),
                "harvest_over_forward": round(t_fwd / t_h, 3),
            }
            print(f"harvest {name}: forward {n_tok / t_fwd:.0f} tokens/s, harvest {n_tok / t_h:.0f} tokens/s "
                  f"({100 * t_fwd / t_h:.0f}% of the forward pass)", flush=True)
        figures["harvest"] = harvest
        harvested = Harvester(loaded).harvest(ids)

    L, d = loaded.n_layers, loaded.d_model
    if harvested is not None:
        x, y = harvested
    else:
        x, y = torch.randn(args.contexts * (cfg.n_ctx - 1), L, d), torch.randn(args.contexts * (cfg.n_ctx - 1), L, d)
    x = x[:batch_tokens]
    y = y[:batch_tokens]
    x = x / x.norm(dim=-1).mean(0)[:, None] * d**0.5
    y = y / y.norm(dim=-1).mean(0)[:, None] * d**0.5
    tc = Transcoder.random(TranscoderConfig("clt", L, d, n_features))
    with torch.no_grad():  # thresholds at the quantile that leaves about l0 features per layer active
        pre = tc.encode_pre(x)
        q = 1 - args.l0 / n_features
        tc.activation.threshold.copy_(torch.quantile(pre[:256].float(), q, dim=0))
        l0 = float((tc.encode(x) != 0).sum(-1).float().mean())
    opt = torch.optim.Adam(tc.parameters(), lr=1e-4)

    # --sparse-batch-tokens can time the sparse path on a smaller batch (tokens/s stay comparable).
    sparse_tokens = min(x.shape[0], args.sparse_batch_tokens)

    def step(decode: str, bf16: bool) -> None:
        n = x.shape[0] if decode == "dense" else sparse_tokens
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = transcoder_loss(tc, x[:n], y[:n], 1e-4, 1.0, 3e-6, decode)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(tc.parameters(), 1.0)
        opt.step()

    saved = {k: v.clone() for k, v in tc.state_dict().items()}
    training = {"n_features": n_features, "batch_tokens": x.shape[0], "sparse_batch_tokens": sparse_tokens,
                "l0_per_layer": round(l0, 1)}
    for dtype in args.dtypes.split(","):
        bf16 = dtype == "bfloat16"
        for decode in ("dense", "sparse"):
            tc.load_state_dict(saved)
            step(decode, bf16)  # warm-up
            tc.load_state_dict(saved)
            t = best_of(lambda decode=decode, bf16=bf16: step(decode, bf16), args.repeats)
            n = x.shape[0] if decode == "dense" else sparse_tokens
            training[f"{decode}_{dtype}_tokens_per_s"] = round(n / t, 1)
            print(f"training {decode} {dtype}: {n / t:.0f} tokens/s ({t:.2f} s per {n}-token step)", flush=True)
    for dtype in args.dtypes.split(","):
        training[f"sparse_over_dense_{dtype}"] = round(
            training[f"sparse_{dtype}_tokens_per_s"] / training[f"dense_{dtype}_tokens_per_s"], 3
        )
    figures["training"] = training
    figures["load_average_end"] = os.getloadavg()[0]
    print(f"wrote {write_result('train_speed', figures)}")


if __name__ == "__main__":
    main()
