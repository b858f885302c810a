"""Attribution on several ranks: each computes its share of the target rows, and every rank gathers all of them.

`torchrun --nproc-per-node N -m cltrace attribute ...` runs one copy of the model and transcoder per
rank. Rows are computed in batches exactly as in one process (`cltrace.graph.attribution`); batch k
of each round goes to rank k mod N, and after the round every rank receives every batch's edges
(`all_gather_object`), in batch order. Every rank so holds the same edges as one process, in the
same order, and picks the next round's rows by the same influence estimate: the graph equals the
one-process graph. Rank 0 writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from cltrace.distributed import init_layout
from cltrace.graph.attribution import AttributionConfig, _Attribution, resolve_config
from cltrace.graph.graph import Graph
from cltrace.graph.targets import TargetSpec
from cltrace.replacement.replacement_model import ReplacementModel


class _ShardedAttribution(_Attribution):
    """`_Attribution` whose row batches are shared out across the ranks of the default process group."""

    def _process(self, rows: list[tuple[str, int]], bar: tqdm) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        B = self.batch
        chunks = [rows[s : s + B] for s in range(0, len(rows), B)]
        mine: dict[int, list[tuple[int, list[tuple[torch.Tensor, ...]]]]] = {}
        for k in range(rank, len(chunks), world):
            before = [len(blocks) for blocks in self.blocks]
            super()._process(chunks[k], bar)  # appends this batch's edge blocks: take them back out
            produced = []
            for layer, blocks in enumerate(self.blocks):
                if len(blocks) > before[layer]:
                    produced.append((layer, [tuple(t.cpu() for t in b) for b in blocks[before[layer] :]]))
                    del blocks[before[layer] :]
            mine[k] = produced
        parts: list[Any] = [None] * world  # all_gather_object puts each rank's dict in its slot
        dist.all_gather_object(parts, mine)
        merged = {k: v for part in parts for k, v in part.items()}
        for k in range(len(chunks)):  # in batch order, as one process stores them
            for layer, blocks in merged[k]:
                self.blocks[layer].extend(tuple(t.to(self.device) for t in b) for b in blocks)
        bar.update(sum(len(chunks[k]) for k in range(len(chunks)) if k % world != rank))


def attribute_sharded(
    replacement: ReplacementModel,
    prompt: str | torch.Tensor,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    config: AttributionConfig | None = None,
) -> Graph:
    """`cltrace.graph.attribution.attribute` with the target rows split across the ranks torchrun started.

    Every rank returns the same graph; it equals the one-process graph. Joins the process group
    (gloo on CPUs, NCCL on GPUs) if it is not joined yet; with one rank it is plain `attribute`.
    """
    layout = init_layout()
    if layout is not None and not layout.is_main:
        progress = False  # one progress bar (rank 0's, which counts every rank's rows)
    cfg = resolve_config(config, max_feature_nodes=max_feature_nodes, batch_size=batch_size, progress=progress)
    engine = _ShardedAttribution if layout is not None else _Attribution
    with torch.enable_grad():
        return engine(replacement, prompt, targets, cfg).build()


__all__ = ["attribute_sharded"]
