"""Training one transcoder on several processes: features sharded across ranks, data split across groups.

Launched by `torchrun --nproc-per-node N -m cltrace train ...` (torch.distributed: NCCL on GPUs,
gloo on CPUs; no transport of our own). The world of W ranks is a grid of `data_parallel` ×
`feature_parallel` ranks, rank = dp_rank · feature_parallel + fp_rank, so the ranks of one
feature group are neighbours (one machine, where they are many):

- **feature parallel**: fp_rank owns features [start, end) of *every* layer: their encoder rows,
  encoder biases, thresholds and decoder rows (all their target layers). Each rank decodes its own
  features into a partial reconstruction; the partials are summed with one all_reduce per step
  (`_SumOverRanks`, autograd-aware), and the replicated decoder bias b_dec (and a PLT's skip path)
  is added once, after the sum. Every rank of a feature group sees the same batch.
- **data parallel**: each feature group takes its own equal part of every batch; gradients are
  averaged across the groups with one all_reduce, so a step is the same as one process's step on
  the whole batch (to rounding), and training matches one process whatever the grid.

Checkpoints are sharded: `checkpoint/step-<step>/shard-<i>-of-<n>.pt` (one per feature slice, with
its optimiser state and dead-feature counters), `common.pt` (step, schedule position, data
position, RNG, normalisation) and `checkpoint/manifest.json`, written last, naming the step folder.
A reader takes the parts of every shard that overlap its own slice, so a checkpoint resumes on any
number of ranks (one process included), and one process's `state.pt` resumes on many.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cltrace.atomic import atomic_write, atomic_write_text
from cltrace.distributed import (
    Layout,
    RankFailure,
    current_layout,
    failures_as_errors,
    init_layout,
    launched,
    on_main,
    shutdown,
)
from cltrace.errors import CltraceError
from cltrace.train.checkpoint import (
    COMMON_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    _narrow,
    checkpoint_file,
    describe_checkpoint,
    feature_axis,
    feature_slice,
    has_checkpoint,
    load_optimizer_by_name,
    optimizer_by_name,
    read_checkpoint,
    remove_stale,
)
from cltrace.train.losses import loss_terms
from cltrace.transcoder import JumpReLU, Transcoder, TranscoderConfig, make_transcoder
from cltrace.transcoder.sparse_decode import decode_sparse_matmul
from cltrace.transcoder.transcoder import skip_all


class ShardedTranscoder(nn.Module):
    """One rank's features [start, end) of every layer, plus the replicated b_dec (and PLT skip path).

    `local` is a transcoder of end − start features whose own b_dec stays zero and frozen: the
    shared bias is added once, after the partial reconstructions are summed.
    """

    def __init__(self, full: Transcoder, start: int, end: int) -> None:
        super().__init__()
        self.full_config = full.config
        self.start, self.end = start, end
        local_config = replace(full.config, n_features=end - start, skip=False)
        self.local = make_transcoder(local_config).to(full.W_enc.dtype)
        if isinstance(full.activation, JumpReLU) and isinstance(self.local.activation, JumpReLU):
            self.local.activation.bandwidth = full.activation.bandwidth
        self.local.b_dec.requires_grad_(False)
        self.b_dec = nn.Parameter(full.b_dec.detach().clone())
        skip = getattr(full, "W_skip", None)
        self.W_skip = nn.Parameter(skip.detach().clone()) if skip is not None else None
        self.load_full(full.state_dict())

    def named_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """(full-transcoder name, parameter) of every trained tensor, sliced or replicated."""
        out = [(name, p) for name, p in self.local.named_parameters() if name != "b_dec"]
        out.append(("b_dec", self.b_dec))
        if self.W_skip is not None:
            out.append(("W_skip", self.W_skip))
        return out

    def load_full(self, tensors: dict[str, torch.Tensor], sliced: bool = False) -> None:
        """Copy this rank's part of full-transcoder tensors (or, with `sliced`, tensors already cut to it)."""
        kind = self.full_config.kind
        with torch.no_grad():
            for name, p in self.named_tensors():
                t = tensors[name] if sliced else _narrow(tensors[name], feature_axis(name, kind), self.start, self.end)
                p.copy_(t)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) of partial reconstructions in the forward; the identity in the backward.

    Every rank of the group computes the same loss from the same summed tensor, so the gradient of
    the loss with respect to this rank's partial is the gradient with respect to the sum: no
    communication is needed backwards (an all_reduce there would count it group-size times).
    """

    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor, group: Any) -> torch.Tensor:
        out = partial.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sharded_loss(
    shard: ShardedTranscoder,
    x: torch.Tensor,
    y: torch.Tensor,
    sparsity_lambda: float,
    sparsity_c: float,
    preact_lambda: float,
    decode: str,
    group: Any,
    n_ranks: int,
) -> dict[str, torch.Tensor]:
    """The loss of `cltrace.train.losses.transcoder_loss` for one rank's features, x, y [N, L, d].

    `mse` (and its per-layer terms) are of the whole reconstruction, the same on every rank of the
    group; `sparsity`, `preact`, `l0_per_layer` and `fired` [L, F_local] cover this rank's features
    only (their sums over the group are the one-process values). `total` = mse + this rank's
    penalties: its gradient is the one-process gradient for this rank's parameters.
    """
    tc = shard.local
    N = x.shape[0]
    pre = tc.encode_pre(x)  # [N, L, F_local]
    acts = tc.activation(pre)  # [N, L, F_local]
    norms = tc.decoder_norms()  # [L, F_local]
    if decode == "sparse":
        rows, layers, features = tc.activation.support(pre, with_grad=True).nonzero(as_tuple=True)
        values = acts[rows, layers, features]  # [n]
        with torch.autocast(x.device.type, enabled=False):
            # [N, L, d] (local b_dec is zero), [n]
            partial, entry_norms = decode_sparse_matmul(tc, rows, layers, features, values, N, decoder_norms=norms)
        sparsity_sum = torch.tanh(sparsity_c * entry_norms * values).sum()
        compute = shard.b_dec.dtype
    elif decode == "dense":
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else shard.b_dec.dtype
        with torch.autocast(x.device.type, enabled=False):
            partial = tc.decode_dense(acts, None, compute)  # [N, L, d]
        sparsity_sum = torch.tanh(sparsity_c * norms * acts).sum()
    else:
        raise CltraceError(f"decode must be 'sparse' or 'dense', got {decode!r}")
    recon = (_SumOverRanks.apply(partial, group) if n_ranks > 1 else partial) + shard.b_dec  # [N, L, d]
    if shard.W_skip is not None:
        # the skip path is replicated: added once, after the sum, in the same dtype as one process does
        recon = recon + skip_all(x, shard.W_skip, compute).to(shard.b_dec.dtype)

    return loss_terms(tc, pre, acts, norms, recon, y, sparsity_sum, sparsity_lambda, preact_lambda)


# -- what the trainer asks of the ranks --------------------------------------------------------------


class FeatureShards:
    """One rank's share of a training run: its features, its part of each batch, and the collectives."""

    def __init__(self, layout: Layout, full: Transcoder) -> None:
        cfg = full.config
        if cfg.activation == "topk" and layout.feature_parallel > 1:
            raise CltraceError("activation 'topk' picks the top features of a whole layer and cannot be feature-sharded; "
                               "use --feature-parallel 1 (data parallel only) or another activation")
        self.layout = layout
        self.n_features = cfg.n_features
        self.start, self.end = feature_slice(cfg.n_features, layout.feature_parallel, layout.fp_rank)
        self.shard = ShardedTranscoder(full, self.start, self.end).to(layout.device)

    # the trained tensors, by full-transcoder name
    def named_tensors(self) -> list[tuple[str, nn.Parameter]]:
        return self.shard.named_tensors()

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_tensors()]

    def batch_part(self, t: torch.Tensor) -> torch.Tensor:
        """This feature group's equal part of a batch [N, ...] (data parallel); the whole batch otherwise."""
        dp = self.layout.data_parallel
        if dp == 1:
            return t
        if t.shape[0] % dp:
            raise CltraceError(f"batch_tokens={t.shape[0]} must be a multiple of the {dp} data-parallel groups")
        n = t.shape[0] // dp
        return t[self.layout.dp_rank * n : (self.layout.dp_rank + 1) * n]

    def loss(self, x: torch.Tensor, y: torch.Tensor, lam: float, c: float, lam_p: float, decode: str) -> dict[str, torch.Tensor]:
        """Loss terms for backward (`total`, local) and, detached, the one-process values of the whole batch."""
        lay = self.layout
        x, y = x.to(lay.device), y.to(lay.device)
        terms = sharded_loss(self.shard, x, y, lam, c, lam_p, decode, lay.fp_group, lay.feature_parallel)
        L = x.shape[1]
        main_fp = 1.0 if lay.fp_rank == 0 else 0.0  # values the whole feature group shares count once
        finite = torch.isfinite(terms["total"].detach())
        packed = torch.cat([
            (terms["mse"].detach().double() * main_fp).reshape(1),
            terms["sparsity"].detach().double().reshape(1),
            terms["preact"].detach().double().reshape(1),
            (~finite).double().reshape(1),
            terms["mse_per_layer"].double() * main_fp,
            terms["nmse_per_layer"].double() * main_fp,
            terms["l0_per_layer"].double(),
        ])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)  # sums over features, then over data groups
        dp = lay.data_parallel
        nonfinite = packed[3] > 0
        packed = packed / dp
        fired = terms["fired"]
        if dp > 1:  # a feature fired if it fired in some group's part of the batch
            fired = fired.to(torch.uint8)
            dist.all_reduce(fired, op=dist.ReduceOp.MAX, group=lay.dp_group)
            fired = fired.bool()
        mse, sparsity, preact = packed[0], packed[1], packed[2]
        return {
            "loss": terms["total"], "nonfinite": nonfinite,
            "mse": mse, "sparsity": sparsity, "preact": preact, "total": mse + sparsity + preact,
            "mse_per_layer": packed[4 : 4 + L], "nmse_per_layer": packed[4 + L : 4 + 2 * L],
            "l0_per_layer": packed[4 + 2 * L :], "fired": fired,  # on the device, as the trainer's counters
        }

    def sync_and_clip(self, grad_clip: float) -> torch.Tensor:
        """Average gradients across data groups, then clip to the global norm; returns that norm."""
        lay = self.layout
        grads = [(n, p.grad) for n, p in self.named_tensors() if p.grad is not None]
        if lay.data_parallel > 1:
            flat = torch.cat([g.reshape(-1) for _, g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=lay.dp_group)
            flat /= lay.data_parallel
            at = 0
            for _, g in grads:
                g.copy_(flat[at : at + g.numel()].view_as(g))
                at += g.numel()
        kind = self.shard.full_config.kind
        sharded = [g.double().pow(2).sum() for n, g in grads if feature_axis(n, kind) is not None]
        replicated = [g.double().pow(2).sum() for n, g in grads if feature_axis(n, kind) is None]
        sq = torch.stack(sharded).sum() if sharded else torch.zeros((), dtype=torch.float64, device=lay.device)
        if lay.feature_parallel > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=lay.fp_group)
        if replicated:
            sq = sq + torch.stack(replicated).sum()  # the same on every rank: counted once
        gnorm = sq.sqrt()
        if grad_clip > 0:  # as torch.nn.utils.clip_grad_norm_ does
            coef = torch.clamp(grad_clip / (gnorm + 1e-6), max=1.0)
            for _, g in grads:
                g.mul_(coef.to(g.dtype))
        return gnorm

    def dead_count(self, dead: torch.Tensor) -> float:
        """Share of all features dead, from this rank's dead mask [L, F_local]."""
        counts = torch.tensor([float(dead.sum()), float(dead.numel())], dtype=torch.float64)
        if self.layout.feature_parallel > 1:
            counts = counts.to(self.layout.device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.layout.fp_group)
        return float(counts[0] / counts[1])

    def gather(self, config: TranscoderConfig, bandwidth: float | None = None) -> Transcoder:
        """The whole transcoder (every rank gets it, on the CPU): slices gathered across the feature group."""
        lay = self.layout
        kind = self.shard.full_config.kind
        full = {}
        for name, p in self.named_tensors():
            axis = feature_axis(name, kind)
            t = p.detach()
            if axis is not None and lay.feature_parallel > 1:
                parts = [feature_slice(self.n_features, lay.feature_parallel, i) for i in range(lay.feature_parallel)]
                width = max(e - s for s, e in parts)
                pad = list(t.shape)
                pad[axis] = width - t.shape[axis]
                padded = torch.cat([t, t.new_zeros(pad)], dim=axis)  # all_gather needs equal shapes
                got = [torch.empty_like(padded) for _ in parts]
                dist.all_gather(got, padded.contiguous(), group=lay.fp_group)
                t = torch.cat([g.narrow(axis, 0, e - s) for g, (s, e) in zip(got, parts)], dim=axis)
            full[name] = t.cpu()
        out = make_transcoder(config)  # right class and shapes; every tensor is overwritten
        out.load_state_dict(full)
        if isinstance(out.activation, JumpReLU) and bandwidth is not None:
            out.activation.bandwidth = bandwidth
        return out

    def barrier(self) -> None:
        dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, ckpt_dir: Path, common: dict[str, Any], adam: dict[str, dict[str, torch.Tensor]],
                        last_fired: torch.Tensor) -> None:
        """Write this rank's shard (one rank per feature slice), then rank 0 the manifest, naming the step folder."""
        lay = self.layout
        step = int(common["step"])
        folder = ckpt_dir / f"step-{step:09d}"
        folder.mkdir(parents=True, exist_ok=True)
        fp = lay.feature_parallel
        name = f"shard-{lay.fp_rank:03d}-of-{fp:03d}.pt"
        if lay.dp_rank == 0:  # data groups hold the same features: one of them writes
            shard = {
                "start": self.start, "end": self.end, "n_features": self.n_features,
                "tensors": {n: p.detach().cpu() for n, p in self.named_tensors()},
                "adam": {n: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()} for n, st in adam.items()},
                "last_fired": last_fired.cpu(),
            }
            atomic_write(folder / name, lambda tmp: torch.save(shard, tmp), what="checkpoint shard")
        if lay.is_main:
            atomic_write(folder / COMMON_FILE, lambda tmp: torch.save(common, tmp), what="checkpoint")
        dist.barrier()  # every shard is on disk before the manifest points at them
        if lay.is_main:
            manifest = {
                "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "folder": folder.name,
                "n_features": self.n_features, "feature_parallel": fp, "data_parallel": lay.data_parallel,
                "shards": [{"file": f"shard-{i:03d}-of-{fp:03d}.pt", "start": s, "end": e}
                           for i, (s, e) in ((i, feature_slice(self.n_features, fp, i)) for i in range(fp))],
            }
            atomic_write_text(ckpt_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n", what="checkpoint manifest")
            remove_stale(ckpt_dir, keep=folder.name)


__all__ = [
    "FeatureShards", "Layout", "RankFailure", "ShardedTranscoder", "checkpoint_file", "current_layout", "describe_checkpoint",
    "failures_as_errors",
    "feature_axis", "feature_slice", "has_checkpoint", "init_layout", "launched", "load_optimizer_by_name", "on_main",
    "optimizer_by_name", "read_checkpoint", "remove_stale", "sharded_loss", "shutdown",
]
