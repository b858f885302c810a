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
import logging
import os
import re
import shutil
import signal
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cltrace.atomic import atomic_write, atomic_write_text
from cltrace.errors import CltraceError, first_line
from cltrace.train.losses import dense_decode, loss_terms, sparse_decode
from cltrace.transcoder import JumpReLU, Transcoder, TranscoderConfig, make_transcoder

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
COMMON_FILE = "common.pt"
SINGLE_STATE_FILE = "state.pt"  # the one-process checkpoint (see cltrace.train.trainer)
MANIFEST_FORMAT = "cltrace-sharded-checkpoint"
MANIFEST_VERSION = 1
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


class RankFailure(CltraceError):
    """Another rank died or the launcher stopped this one: the run stops, and resumes from its checkpoint."""


# -- the grid of ranks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the data_parallel × feature_parallel grid of ranks."""

    world: int
    rank: int
    feature_parallel: int
    fp_group: Any  # ProcessGroup of this rank's feature group (None: the whole world)
    dp_group: Any  # ProcessGroup of the ranks holding the same features (None: no data parallelism)
    device: torch.device

    @property
    def data_parallel(self) -> int:
        return self.world // self.feature_parallel

    @property
    def fp_rank(self) -> int:
        return self.rank % self.feature_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.feature_parallel

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's shared files (metrics, curves, manifest, final transcoder)."""
        return self.rank == 0

    def describe(self) -> str:
        return (f"{self.world} ranks = {self.data_parallel} data-parallel x {self.feature_parallel} "
                f"feature-parallel, backend {dist.get_backend()}, device {self.device}")


_LAYOUT: Layout | None = None


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or the same environment variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_layout() -> Layout | None:
    """The layout set up by `init_layout`, or None in a one-process run."""
    return _LAYOUT


def init_layout(feature_parallel: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Layout | None:
    """Join the process group torchrun describes and split it into feature and data groups.

    `feature_parallel`: ranks per feature group (None or 0: all of them, no data parallelism); it
    must divide the world size. `timeout_s` bounds how long a rank waits in a collective for a rank
    that stopped answering. Returns None (and does nothing) when not launched with several ranks.
    """
    global _LAYOUT
    if not launched():
        return None
    if _LAYOUT is not None:
        return _LAYOUT
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise CltraceError(f"cannot join the torch.distributed process group ({_short_reason(exc)}); "
                               "launch with torchrun and check MASTER_ADDR/MASTER_PORT (or --rdzv-endpoint)") from None
    world, rank = dist.get_world_size(), dist.get_rank()
    fp = feature_parallel or world
    if fp < 1 or world % fp:
        raise CltraceError(f"--feature-parallel {fp} must divide the number of ranks ({world}); "
                           f"choose one of {', '.join(str(k) for k in range(1, world + 1) if world % k == 0)}")
    dp = world // fp
    fp_group = dp_group = None
    if dp > 1:  # every rank creates every group, in the same order (torch.distributed requires it)
        for k in range(dp):
            g = dist.new_group(list(range(k * fp, (k + 1) * fp)))
            if rank // fp == k:
                fp_group = g
        for j in range(fp):
            g = dist.new_group(list(range(j, world, fp)))
            if rank % fp == j:
                dp_group = g
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    _LAYOUT = Layout(world, rank, fp, fp_group, dp_group, device)
    _install_sigterm(rank, world)
    log.info("rank %d: %s", rank, _LAYOUT.describe())
    return _LAYOUT


def shutdown() -> None:
    """Leave the process group (after a finished run)."""
    global _LAYOUT
    if dist.is_initialized():
        dist.destroy_process_group()
    _LAYOUT = None


def _install_sigterm(rank: int, world: int) -> None:
    """torchrun stops the surviving ranks with SIGTERM when one dies: say so in one line."""

    def handler(signum: int, frame: Any) -> None:
        raise RankFailure(f"rank {rank}/{world} was stopped by the launcher (SIGTERM), most likely because another rank failed")

    signal.signal(signal.SIGTERM, handler)


def _short_reason(exc: BaseException) -> str:
    """An exception's first sentence, without gloo's source-file prefix, for a one-line message."""
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc)).split(". ")[0][:200]


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` says a collective failed (a peer died, a connection closed, a timeout)."""
    if isinstance(exc, RankFailure) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe"))


def on_main(layout: Layout | None, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank; a CltraceError there is raised everywhere."""
    if layout is None:
        return fn()
    box: list[Any] = [None]
    if layout.is_main:
        try:
            box[0] = ("ok", fn())
        except CltraceError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CltraceError(value)
    return value


# -- slicing features --------------------------------------------------------------------------------


def feature_slice(n_features: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` of `parts` near-equal parts of n_features features (the first ones larger)."""
    if n_features < parts:
        raise CltraceError(f"n_features={n_features} is fewer than the {parts} feature-parallel ranks; "
                           "lower --feature-parallel or raise n_features")
    base, extra = divmod(n_features, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def feature_axis(name: str, kind: str) -> int | None:
    """The feature axis of full-transcoder tensor `name` (a state_dict key), None if replicated."""
    if name in ("W_enc", "b_enc", "activation.threshold"):
        return 1  # [L, F, d], [L, F], [L, F]
    if name == "W_dec":
        return 1  # PLT [L, F, d]
    if name.startswith("W_dec."):
        return 0  # CLT layer l: [F, L - l, d]
    if name in ("b_dec", "W_skip"):
        return None
    raise CltraceError(f"unknown transcoder tensor {name!r} in a checkpoint")


def _narrow(t: torch.Tensor, axis: int | None, start: int, end: int) -> torch.Tensor:
    return t if axis is None else t.narrow(axis, start, end - start)


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
        if isinstance(full.activation, JumpReLU):
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
            partial = sparse_decode(tc, rows, layers, features, values, N)  # [N, L, d], local b_dec is zero
        sparsity_sum = torch.tanh(sparsity_c * norms[layers, features] * values).sum()
        compute = shard.b_dec.dtype
    elif decode == "dense":
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else shard.b_dec.dtype
        with torch.autocast(x.device.type, enabled=False):
            partial = dense_decode(tc, acts, None, compute)  # [N, L, d]
        sparsity_sum = torch.tanh(sparsity_c * norms * acts).sum()
    else:
        raise CltraceError(f"decode must be 'sparse' or 'dense', got {decode!r}")
    recon = (_SumOverRanks.apply(partial, group) if n_ranks > 1 else partial) + shard.b_dec  # [N, L, d]
    if shard.W_skip is not None:
        # the skip path is replicated: added once, after the sum, in the same dtype as one process does
        recon = recon + torch.einsum("nli,lio->nlo", x.to(compute), shard.W_skip.to(compute)).to(shard.b_dec.dtype)

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
            "l0_per_layer": packed[4 + 2 * L :], "fired": fired.cpu(),
        }

    def sync_and_clip(self, grad_clip: float) -> torch.Tensor:
        """Average gradients across data groups, then clip to the global norm; returns that norm."""
        lay = self.layout
        named = [(n, p) for n, p in self.named_tensors() if p.grad is not None]
        if lay.data_parallel > 1:
            flat = torch.cat([p.grad.reshape(-1) for _, p in named])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=lay.dp_group)
            flat /= lay.data_parallel
            at = 0
            for _, p in named:
                p.grad.copy_(flat[at : at + p.numel()].view_as(p.grad))
                at += p.numel()
        kind = self.shard.full_config.kind
        sharded = [p.grad.double().pow(2).sum() for n, p in named if feature_axis(n, kind) is not None]
        replicated = [p.grad.double().pow(2).sum() for n, p in named if feature_axis(n, kind) is None]
        sq = torch.stack(sharded).sum() if sharded else torch.zeros((), dtype=torch.float64, device=lay.device)
        if lay.feature_parallel > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=lay.fp_group)
        if replicated:
            sq = sq + torch.stack(replicated).sum()  # the same on every rank: counted once
        gnorm = sq.sqrt()
        if grad_clip > 0:  # as torch.nn.utils.clip_grad_norm_ does
            coef = torch.clamp(grad_clip / (gnorm + 1e-6), max=1.0)
            for _, p in named:
                p.grad.mul_(coef.to(p.grad.dtype))
        return gnorm.cpu()

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


# -- reading and writing checkpoints of any layout ---------------------------------------------------


def has_checkpoint(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds a checkpoint of either layout."""
    return (ckpt_dir / MANIFEST_FILE).is_file() or (ckpt_dir / SINGLE_STATE_FILE).is_file()


def checkpoint_file(ckpt_dir: Path) -> Path:
    """The file a user would name for the checkpoint in `ckpt_dir` (manifest or state.pt)."""
    return ckpt_dir / MANIFEST_FILE if (ckpt_dir / MANIFEST_FILE).is_file() else ckpt_dir / SINGLE_STATE_FILE


def describe_checkpoint(ckpt_dir: Path) -> str:
    """Where a stopped run stands and how to continue it, for error messages."""
    manifest = ckpt_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            step = json.loads(manifest.read_text(encoding="utf-8"))["step"]
        except (OSError, ValueError, KeyError):
            step = "?"
        where = f"the last checkpoint (step {step}) is in {ckpt_dir}"
    elif (ckpt_dir / SINGLE_STATE_FILE).is_file():
        where = f"the last checkpoint is {ckpt_dir / SINGLE_STATE_FILE}"
    else:
        return "no checkpoint was written yet: start the run again"
    return f"{where}; rerun the same command with --resume (on any number of ranks) to continue from it"


def remove_stale(ckpt_dir: Path, keep: str | None) -> None:
    """Delete step folders other than `keep` and, once a sharded checkpoint exists, the one-process state.pt."""
    for old in ckpt_dir.glob("step-*"):
        if old.is_dir() and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    if keep is not None:
        (ckpt_dir / SINGLE_STATE_FILE).unlink(missing_ok=True)
    else:  # a one-process state.pt was just written: the sharded checkpoint is older
        (ckpt_dir / MANIFEST_FILE).unlink(missing_ok=True)


def _load(path: Path) -> Any:
    # torch's file is a zip whose every record carries a CRC32, but torch.load checks none of them
    # (a flipped byte in a tensor loads as a wrong weight): check them all first (a fast pass: 400 MB
    # in 0.07 s here, from the page cache).
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    # missing, truncated, not a zip; a flipped flag byte reads as encryption or an unknown compression
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
        raise CltraceError(f"cannot read checkpoint {path} ({type(exc).__name__}); delete the folder to start afresh") from None
    if damaged is not None:
        raise CltraceError(f"checkpoint {path} is damaged (its record {damaged!r} fails its CRC32); delete the folder to start afresh")
    try:
        # weights_only: tensors and plain containers only; a checkpoint never holds code to run.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged or missing file: say so, never start over silently
        raise CltraceError(f"cannot read checkpoint {path} ({type(exc).__name__}); delete the folder to start afresh") from None


def optimizer_by_name(opt: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]) -> dict[str, dict[str, Any]]:
    """Adam's per-parameter state keyed by tensor name (not by position, which differs between layouts)."""
    return {name: dict(opt.state[p]) for name, p in named if p in opt.state}


def load_optimizer_by_name(opt: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]],
                           state: dict[str, dict[str, Any]]) -> None:
    """Restore per-parameter state saved by `optimizer_by_name` (moved to each parameter's device)."""
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    sd["state"] = {
        index[id(p)]: {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state[name].items()}
        for name, p in named if name in state
    }
    opt.load_state_dict(sd)


def read_checkpoint(ckpt_dir: Path, start: int, end: int) -> dict[str, Any]:
    """The checkpoint in `ckpt_dir`, either layout, with features [start, end) of every sharded tensor.

    Returns the common fields of a one-process `state.pt` (version, config, fingerprint, step,
    tokens, data, scale_x, scale_y, rng, elapsed) and `tensors` {name: tensor}, `adam` {name:
    {step, exp_avg, exp_avg_sq}} and `last_fired` [L, end − start], cut to the slice.
    """
    try:
        return _read_checkpoint(ckpt_dir, start, end)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        # A file that loads (its CRCs hold) but lacks what a checkpoint holds: not one cltrace wrote.
        raise CltraceError(f"the checkpoint in {ckpt_dir} does not have a checkpoint's structure ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else '?'}); delete the folder to start afresh") from None


def _read_checkpoint(ckpt_dir: Path, start: int, end: int) -> dict[str, Any]:
    manifest_path = ckpt_dir / MANIFEST_FILE
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            assert manifest["format"] == MANIFEST_FORMAT
        except Exception:  # noqa: BLE001 - any damage reads the same to the user
            raise CltraceError(f"checkpoint manifest {manifest_path} is damaged; delete the folder to start afresh") from None
        if manifest.get("version") != MANIFEST_VERSION:
            raise CltraceError(f"checkpoint {manifest_path} has version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
        folder = ckpt_dir / manifest["folder"]
        state = dict(_load(folder / COMMON_FILE))
        if not 0 <= start < end <= manifest["n_features"]:
            raise CltraceError(f"checkpoint {manifest_path} has {manifest['n_features']} features per layer; "
                               f"features [{start}, {end}) were asked for")
        parts = [(s["start"], s["end"], folder / s["file"]) for s in manifest["shards"]]
        kind = state["config"]["kind"]
        opened = [(s, e, _load(path)) for s, e, path in parts if s < end and e > start]
    else:
        path = ckpt_dir / SINGLE_STATE_FILE
        whole = _load(path)
        state = {k: v for k, v in whole.items() if k not in ("transcoder", "optimizer", "last_fired")}
        kind = whole["config"]["kind"]
        names = list(whole["transcoder"])  # a module's state_dict follows its parameters' order
        adam = {names[i]: st for i, st in whole["optimizer"]["state"].items()}
        n = whole["last_fired"].shape[1]
        opened = [(0, n, {"tensors": whole["transcoder"], "adam": adam, "last_fired": whole["last_fired"]})]
    tensors: dict[str, list[torch.Tensor]] = {}
    adam_parts: dict[str, dict[str, list[Any]]] = {}
    fired: list[torch.Tensor] = []
    for s, e, shard in opened:  # each shard's overlap with [start, end), in feature order
        lo, hi = max(s, start) - s, min(e, end) - s
        for name, t in shard["tensors"].items():
            axis = feature_axis(name, kind)
            if axis is None:
                tensors.setdefault(name, [t])
                continue
            tensors.setdefault(name, []).append(_narrow(t, axis, lo, hi))
        for name, st in shard["adam"].items():
            axis = feature_axis(name, kind)
            slot = adam_parts.setdefault(name, {})
            for k, v in st.items():
                cut = torch.is_tensor(v) and v.dim() > 0 and axis is not None
                if cut or k not in slot:
                    slot.setdefault(k, []).append(_narrow(v, axis, lo, hi) if cut else v)
        fired.append(shard["last_fired"][:, lo:hi])
    state["tensors"] = {n: (torch.cat(ts, dim=feature_axis(n, kind)) if len(ts) > 1 else ts[0]).clone() for n, ts in tensors.items()}
    state["adam"] = {
        n: {k: (torch.cat(vs, dim=feature_axis(n, kind)).clone() if len(vs) > 1 else (vs[0].clone() if torch.is_tensor(vs[0]) else vs[0]))
            for k, vs in st.items()}
        for n, st in adam_parts.items()
    }
    state["last_fired"] = torch.cat(fired, dim=1).clone()
    return state


@contextmanager
def failures_as_errors(layout: Layout | None, where: Callable[[], str]) -> Iterator[None]:
    """Turn a failed collective (a rank died, a timeout, torchrun's SIGTERM) into one clear CltraceError.

    `where()` says what to do next (the last checkpoint and how to resume).
    """
    if layout is None:
        yield
        return
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if isinstance(exc, CltraceError) and not isinstance(exc, RankFailure):
            raise
        if not is_collective_failure(exc):
            raise
        what = str(exc) if isinstance(exc, RankFailure) else (
            f"rank {layout.rank}/{layout.world} lost contact with another rank ({_short_reason(exc)})")
        raise RankFailure(f"{what}; {where()}") from None


__all__ = [
    "FeatureShards", "Layout", "RankFailure", "ShardedTranscoder", "checkpoint_file", "current_layout", "describe_checkpoint",
    "failures_as_errors",
    "feature_axis", "feature_slice", "has_checkpoint", "init_layout", "launched", "load_optimizer_by_name", "on_main",
    "optimizer_by_name", "read_checkpoint", "remove_stale", "sharded_loss", "shutdown",
]
