"""The process group torchrun starts, shared by sharded training and sharded attribution.

Launched by `torchrun --nproc-per-node N` (torch.distributed: NCCL on GPUs, gloo on CPUs; no
transport of our own). The world of W ranks is a grid of `data_parallel` × `feature_parallel`
ranks, rank = dp_rank · feature_parallel + fp_rank, so the ranks of one feature group are
neighbours. This module sits below both `cltrace.train` and `cltrace.graph`: it knows ranks and
collectives, nothing of transcoders.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cltrace.errors import CltraceError

log = logging.getLogger(__name__)

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


def init_layout(feature_parallel: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                device: torch.device | None = None) -> Layout | None:
    """Join the process group torchrun describes and split it into feature and data groups.

    `feature_parallel`: ranks per feature group (None or 0: all of them, no data parallelism); it
    must divide the world size. `timeout_s` bounds how long a rank waits in a collective for a rank
    that stopped answering. `device`: where this rank computes (`cltrace.device.rank_device`: the CPU,
    or the GPU of its LOCAL_RANK; None: that GPU where torch sees CUDA, else the CPU); the group uses
    NCCL on GPUs and gloo on the CPU. Returns None (and does nothing) when not launched with several ranks.
    """
    global _LAYOUT
    if not launched():
        return None
    if _LAYOUT is not None:
        return _LAYOUT
    if not dist.is_initialized():
        use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(device if device is not None and device.index is not None
                                  else int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise CltraceError(f"cannot join the torch.distributed process group ({_first_line(exc)}); "
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(exc).__name__  # gloo's source-file prefix
    return line.split(". ")[0][:200]


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
            f"rank {layout.rank}/{layout.world} lost contact with another rank ({_first_line(exc)})")
        raise RankFailure(f"{what}; {where()}") from None


__all__ = [
    "DEFAULT_TIMEOUT_S", "Layout", "RankFailure", "current_layout", "failures_as_errors", "init_layout",
    "is_collective_failure", "launched", "on_main", "shutdown",
]
