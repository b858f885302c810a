"""The state one graph's computation shares between `cltrace.graph.attribution._Attribution` and its parts.

`_Attribution.__init__` sets every attribute and defines every method named here; the parts
(`_Estimating`, `_EdgeAssembly`) inherit these declarations so that each reads as typed code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cltrace.graph.config import AttributionConfig
from cltrace.graph.decoders import _SlotDecoders
from cltrace.graph.targets import LogitTarget
from cltrace.model.load import LoadedModel
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun
from cltrace.transcoder.transcoder import Transcoder


class _AttributionState:
    """Declarations only: the attributes and row helpers of one graph's computation."""

    t0: float
    rm: ReplacementModel
    cfg: AttributionConfig
    prompt: str | torch.Tensor
    model: LoadedModel
    tc: Transcoder
    ids: torch.Tensor  # [pos]
    limit: int | None  # bytes (None: no limit)
    run: ReplacementRun
    device: torch.device
    n_pos: int
    n_layers: int
    d: int
    live_skip: bool
    targets: list[LogitTarget]
    f_layer: torch.Tensor  # [n_act]
    f_pos: torch.Tensor  # [n_act]
    f_feat: torch.Tensor  # [n_act]
    f_act: torch.Tensor  # [n_act]
    n_act: int
    ERR0: int
    n_cols: int
    max_rank: int
    slots: list[_SlotDecoders | None]
    decoder_cache_bytes: int  # every slot's padded decoders
    cached_decoder_bytes: int  # of them, those kept between passes
    embeds: torch.Tensor  # [1, pos, d]
    n_below: list[int]  # [L + 1]
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    blocks: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    row_dtype: torch.dtype
    max_row_bytes: int
    timing: dict[str, float]
    raw_logits: torch.Tensor  # [vocab]
    batch: int

    _width: Callable[[int], int]
    _prefix: Callable[[torch.Tensor, int], torch.Tensor]
    _prefix_nodes: Callable[[torch.Tensor, int], torch.Tensor]
    _rows: Callable[[list[tuple[str, int]]], torch.Tensor]
    _layer_runs: Callable[[list[tuple[str, int]]], list[tuple[int, int, int]]]
    _columns: Callable[[list[tuple[str, int]]], list[int]]
