"""The decoders of the active features, laid out per MLP slot for the edge products of attribution.

`_SlotDecoding` is the part of `cltrace.graph.attribution._Attribution` that builds, for each slot,
a table of the decoder vectors writing into it and the position groups that index it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cltrace.errors import CltraceError
from cltrace.transcoder.transcoder import Transcoder


@dataclass
class _DecoderGroup:
    """Positions of one slot whose windows are padded to one width (see `_Attribution._slot_decoders`)."""

    positions: torch.Tensor | None  # [k] the positions, ascending (None: every position)
    index: torch.Tensor  # [k, width] row of the slot's table at each window place; padding: the last row
    target: torch.Tensor  # [k * width] flat (pos * max_rank + rank) the product goes to; padding: the last
    keep: bool = False  # whether the gathered decoders are kept between passes (see `keep_decoders`)
    cached: torch.Tensor | None = None  # [k, width, d] the gathered decoders, while they are kept


@dataclass
class _SlotDecoders:
    """The decoders writing into one MLP slot: a table and its position groups."""

    table: torch.Tensor  # [n_rows, d] decoder vectors towards this slot; the last row is zeros
    groups: list[_DecoderGroup]

    def group_bytes(self, group: _DecoderGroup) -> int:
        return group.index.numel() * self.table.shape[1] * 4

    @property
    def padded_bytes(self) -> int:
        return sum(self.group_bytes(g) for g in self.groups)

    def gather(self, group: _DecoderGroup) -> torch.Tensor:
        return self.table[group.index]  # [k, width, d]

    def uncached_bytes(self) -> int:
        """The widest group gathered on each pass (0: every group kept)."""
        return max((self.group_bytes(g) for g in self.groups if not g.keep), default=0)


def keep_decoders(slots: list[_SlotDecoders | None], budget: int) -> int:
    """Mark the position groups whose gathered decoders are kept between passes, lowest slot first
    while they fit in `budget` bytes (a low slot serves the rows of every layer above it, so its
    bytes save the most gathers); returns the bytes marked. The rest are gathered on each pass."""
    used = 0
    for slot in filter(None, slots):
        for group in slot.groups:
            size = slot.group_bytes(group)
            group.keep = used + size <= budget
            used += size if group.keep else 0
    return used


#: Positions whose window of decoders is over 2**-k of a slot's widest go into group k (the last
#: group takes the rest): the sink position's window can be several times wider than the others',
#: and one padding width for all positions made most of the products and gathers zeros.
_MAX_DECODER_GROUPS = 4


def _dot_per_position(grad: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """grad [n, pos, d] · vectors [pos, d] → [n, pos]: each row's gradient against each position's vector."""
    if grad.numel() <= 1 << 21:
        return torch.linalg.vecdot(grad, vectors)  # faster than einsum's batched product when small
    return torch.einsum("bpd,pd->bp", grad, vectors)  # no [n, pos, d] temporary on long prompts


class _SlotDecoding:
    """Slot decoder tables of one graph's computation (mixed into `cltrace.graph.attribution._Attribution`)."""

    # set by `_Attribution.__init__`
    tc: Transcoder
    device: torch.device
    n_pos: int
    n_layers: int
    d: int
    max_rank: int

    def _slot_decoders(
        self, t: int, layers: torch.Tensor, positions: torch.Tensor, features: torch.Tensor, rank: torch.Tensor
    ) -> _SlotDecoders | None:
        """Where slot t's decoders come from and where its products go (see __init__)."""
        tc, P, F = self.tc, self.n_pos, self.tc.config.n_features
        sources = [s for s in range(self.n_layers) if t in self.tc.output_layers(s)]
        if not sources:
            return None
        if sources != list(range(sources[0], sources[-1] + 1)):
            raise CltraceError(f"the layers writing to layer {t} ({sources}) are not consecutive: unsupported transcoder")
        writes = (layers >= sources[0]) & (layers <= sources[-1])
        at = writes.nonzero(as_tuple=True)[0]
        if at.numel() == 0:
            return None
        pos, r = positions[at], rank[at]
        lo = torch.full((P,), self.max_rank, dtype=torch.long, device=self.device)
        lo.scatter_reduce_(0, pos, r, reduce="amin")
        j = r - lo[pos]  # place within the position's window
        # Rows of the slot's decoder table: the distinct active features of the source layers (not
        # all of them: on short prompts that would copy the whole decoder), towards slot t, in
        # (layer, feature) order; one zero row last for the padding.
        key = (layers[at] - sources[0]) * F + features[at]
        distinct, row = torch.unique(key, return_inverse=True)  # sorted: layer-major, as the loop below
        d_layer, d_feat = distinct // F + sources[0], distinct % F
        table = torch.cat([
            *(tc.decoder_vectors(s, d_feat[d_layer == s])[:, t - tc.output_layers(s).start] for s in sources),
            torch.zeros(1, self.d, dtype=tc.W_enc.dtype, device=self.device),
        ]).float()  # [n_distinct + 1, d]
        # Positions grouped by window width (powers of two below the widest), each group padded to its own.
        counts = torch.bincount(pos, minlength=P)  # [pos] window width
        present = counts > 0
        group_of = torch.full((P,), -1, dtype=torch.long, device=self.device)
        group_of[present] = torch.log2(counts.max() / counts[present].double()).floor().long().clamp(max=_MAX_DECODER_GROUPS - 1)
        groups = []
        for k in group_of[present].unique().tolist():
            members = (group_of == k).nonzero(as_tuple=True)[0]  # [m] ascending
            local = torch.full((P,), -1, dtype=torch.long, device=self.device)
            local[members] = torch.arange(members.numel(), device=self.device)
            mine = (group_of[pos] == k).nonzero(as_tuple=True)[0]
            at_g, j_g = local[pos[mine]], j[mine]
            width = int(counts[members].max())
            index = torch.full((members.numel(), width), table.shape[0] - 1, dtype=torch.long, device=self.device)
            index[at_g, j_g] = row[mine]
            target = torch.full((members.numel(), width), P * self.max_rank, dtype=torch.long, device=self.device)
            target[at_g, j_g] = pos[mine] * self.max_rank + r[mine]
            groups.append(_DecoderGroup(None if members.numel() == P else members, index, target.reshape(-1)))
        return _SlotDecoders(table, groups)
