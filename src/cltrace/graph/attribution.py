"""Computing an attribution graph: the direct effects between the nodes of the local replacement model.

For one prompt the frozen replacement model (attention patterns and norm denominators held at their
values on the prompt, MLP blocks replaced by what their slots emit) is affine in what the MLP
slots emit and in the token embeddings. So every target quantity, a feature's pre-activation or a
logit target's demeaned logit, is

    value(t) = Σ_s edge(s → t) + constant(t)

where the sources s are the graph's nodes (active features, error nodes, token embeddings) and
edge(s → t) = output(s) · ∂value(t)/∂(what s writes): for a feature, its activation times its
decoder vectors into every slot it writes; for an error node (layer l, pos p), the error vector
at that slot; for an embedding, the embedding vector. Gradients come from batched backward passes
through `ReplacementModel.frozen`, which never passes through an MLP (the slots are inputs), only
through the residual stream, attention OV circuits and, for a PLT with a skip path, the linear skip.

What the edges leave out is each row's constant term, stored in the metadata: biases (encoder,
decoder, attention, norms, position embeddings), features at position 0 (the BOS attention sink,
not nodes), and active features beyond the node cap. Rows are visited in order of estimated
influence on the logits (logit rows first, then feature rows by their influence through the rows
known so far, as circuit-tracer does), up to `max_feature_nodes` feature rows.

A row of layer l has sources below l only (features and error nodes of layers < l, and the
embeddings), so each row is kept dense over that prefix of the column space. In fp32 the kept rows
are the graph's edges. On long prompts, where fp32 rows of every active feature would not fit, the
rows are kept in bfloat16 for the influence ordering only, and the rows finally visited are
computed again, exactly, keeping just the columns of the graph's nodes (a second pass).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.graph import get_gradient_edge
from tqdm import tqdm

from cltrace.errors import CltraceError
from cltrace.fingerprint import transcoder_fingerprint
from cltrace.resources import return_freed_memory
from cltrace.graph.config import AttributionConfig, resolve_config
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.graph.targets import LogitTarget, TargetSpec, select_targets
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun


def attribute(
    replacement: ReplacementModel,
    prompt: str | torch.Tensor,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    config: AttributionConfig | None = None,
) -> Graph:
    """The attribution graph of `prompt` (text, BOS rule applied, or token ids [pos]).

    `targets`: None for the most probable next tokens (see AttributionConfig), else token ids,
    one-token strings or `LogitDifference`s. `max_feature_nodes`, `batch_size` and `progress`,
    where given, override the same fields of `config`.
    """
    cfg = resolve_config(config, max_feature_nodes=max_feature_nodes, batch_size=batch_size, progress=progress)
    with torch.enable_grad():
        return _Attribution(replacement, prompt, targets, cfg).build()


#: Memory of the batched forward and one backward pass, per row of the batch, in [pos, layer, d_model]
#: fp32 tensors (at most 2 at 100 tokens and about 2.5 at 1,024 on the default model since the forward
#: keeps neither its inputs nor its resid_mid outputs; 4 before, 6 before freed memory went back to the
#: kernel).
_COPIES_PER_ROW = 2

#: The share of a row's graph columns that hold an edge at 100 tokens or fewer (seen on the default
#: model: 27% at 9 tokens, 26% at 100); longer prompts have relatively fewer (14% at 1,024).
_EDGE_DENSITY = 0.3


def _edge_density(n_tokens: int) -> float:
    """The expected share of a row's graph columns holding an edge (see _EDGE_DENSITY)."""
    return _EDGE_DENSITY * min(1.0, (100 / max(n_tokens, 1)) ** 0.3)


#: Resident memory of the interpreter with torch and transformers imported (0.34 GB on Linux).
_RUNTIME_BYTES = 350 * 2**20


@dataclass(frozen=True)
class AttributionEstimate:
    """What building one graph is expected to take (see `estimate_attribution`)."""

    n_tokens: int
    n_active_features: int
    n_feature_rows: int
    n_logit_rows: int
    n_batches: int
    batch_size: int
    peak_bytes: int
    """Estimated peak resident memory of the whole process, model included."""
    flops: float
    """Floating-point work of the passes and products (see `seconds`)."""
    overhead_s: float
    """Time spent besides the floating-point work (a fixed cost per pass)."""
    decoders_cached: bool
    recompute_rows: bool = False
    """Whether the rows are kept in bfloat16 and the graph's edges computed again (long prompts)."""
    row_bytes: int = 0
    """Of peak_bytes, the rows kept between passes."""

    @property
    def seconds(self) -> float:
        """Estimated time of the attribution itself (model loading not included), at this machine's
        matrix-product rate (measured on first use: building a graph needs only the memory figures)."""
        return self.flops / (_ACHIEVED_RATE * _matmul_rate()) + self.overhead_s

    def summary(self) -> str:
        """One line: tokens, active features, rows, time and memory."""
        return (
            f"{self.n_tokens} tokens, {self.n_active_features} active features, {self.n_feature_rows} feature rows + "
            f"{self.n_logit_rows} logit rows in {self.n_batches} passes of {self.batch_size}: about "
            f"{_duration(self.seconds)} and {self.peak_bytes / 2**30:.2f} GB peak memory"
            + (" (rows kept in bf16, edges computed in a second pass)" if self.recompute_rows else "")
        )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


#: The share of the square matrix-product rate that the passes achieve (seen: about 0.4 at 10 and 100
#: tokens on the default model, with the backward's smaller products and the decoder gathers).
_ACHIEVED_RATE = 0.4


@functools.cache
def _matmul_rate() -> float:
    """This machine's fp32 matrix-product rate in FLOP/s, measured once (about 0.1 s)."""
    a = torch.randn(512, 512)
    torch.mm(a, a)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.1:
        torch.mm(a, a)
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0)


def estimate_attribution(
    replacement: ReplacementModel,
    prompt: str | torch.Tensor,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    config: AttributionConfig | None = None,
) -> AttributionEstimate:
    """The estimated time and peak memory of `attribute` with the same arguments, from one forward
    pass of the prompt (no graph is computed)."""
    cfg = dataclasses.replace(config) if config is not None else AttributionConfig()
    cfg.validate()
    return _Attribution(replacement, prompt, targets, cfg).estimate()


@dataclass
class _DecoderGroup:
    """Positions of one slot whose windows are padded to one width (see `_Attribution._slot_decoders`)."""

    positions: torch.Tensor | None  # [k] the positions, ascending (None: every position)
    index: torch.Tensor  # [k, width] row of the slot's table at each window place; padding: the last row
    target: torch.Tensor  # [k * width] flat (pos * max_rank + rank) the product goes to; padding: the last
    cached: torch.Tensor | None = None  # [k, width, d] the gathered decoders, when they are kept


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


#: Positions whose window of decoders is over 2**-k of a slot's widest go into group k (the last
#: group takes the rest): the sink position's window can be several times wider than the others',
#: and one padding width for all positions made most of the products and gathers zeros.
_MAX_DECODER_GROUPS = 4


def _dot_per_position(grad: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """grad [n, pos, d] · vectors [pos, d] → [n, pos]: each row's gradient against each position's vector."""
    if grad.numel() <= 1 << 21:
        return torch.linalg.vecdot(grad, vectors)  # 4x faster than einsum's batched product when small
    return torch.einsum("bpd,pd->bp", grad, vectors)  # no [n, pos, d] temporary on long prompts


class _Attribution:
    """One graph's computation; column space: [active features | errors (layer, pos) | embeddings | logits]."""

    def __init__(self, replacement: ReplacementModel, prompt: str | torch.Tensor, targets, cfg: AttributionConfig) -> None:
        self.t0 = time.perf_counter()
        return_freed_memory()  # passes free as much as they allocate: without it, the heap only grows
        self.rm, self.cfg, self.prompt = replacement, cfg, prompt
        self.model, self.tc = replacement.model, replacement.transcoder
        self.ids = replacement.input_ids(prompt)
        self.limit = cfg.memory_limit()
        self._refuse_long_prompt()
        self.run: ReplacementRun = replacement.run(self.ids)
        run = self.run
        self.device = run.resid_mid.device
        self.n_pos, self.n_layers, self.d = run.resid_mid.shape
        self.live_skip = getattr(self.tc, "W_skip", None) is not None
        self.targets: list[LogitTarget] = select_targets(
            run.logits[-1], targets, model=self.model, max_n_logits=cfg.max_n_logits,
            desired_logit_prob=cfg.desired_logit_prob,
        )

        # Active features, position 0 (the BOS attention sink) left out, ordered (layer, pos, feature).
        active = run.activations != 0  # [pos, layer, F]
        active[0] = False
        layers, positions, features = active.permute(1, 0, 2).nonzero(as_tuple=True)
        self.f_layer, self.f_pos, self.f_feat = layers, positions, features
        self.f_act = run.activations[positions, layers, features].float()  # [n_act]
        self.f_layer_list = layers.tolist()
        self.n_act = int(layers.shape[0])
        L, P = self.n_layers, self.n_pos
        self.ERR0 = self.n_act
        self.EMB0 = self.ERR0 + L * P
        self.LOG0 = self.EMB0 + P
        self.n_cols = self.LOG0 + len(self.targets)

        # What each feature writes, laid out per MLP slot t: the features writing into slot t (for
        # a CLT those of layers <= t, for a PLT those of layer t) are, at each position, a window of
        # consecutive ranks in that position's (layer, feature) order. Slot t's decoders form, per group
        # of positions with windows of similar widths, a [positions, width, d] block (zero rows past a
        # position's window), so that its edges come from one batched matrix product per group (a
        # few per slot). Decoders are kept unscaled (the activations multiply the result), and either
        # cached (short prompts) or gathered from the slot's table on each pass, so memory stays
        # bounded on long prompts.
        with torch.no_grad():
            by_pos = torch.argsort(positions, stable=True)  # (layer, feature) order within a position
            rank = torch.empty_like(by_pos)
            counts = torch.bincount(positions, minlength=P)  # [pos]
            starts = torch.cumsum(counts, 0) - counts
            rank[by_pos] = torch.arange(self.n_act, device=self.device) - starts[positions[by_pos]]
            self.max_rank = int(counts.max()) if self.n_act else 0
            self.f_flat = positions * self.max_rank + rank  # [n_act] index into [pos * max_rank]
            self.slots: list[_SlotDecoders | None] = []
            for t in range(L):
                self.slots.append(self._slot_decoders(t, layers, positions, features, rank))
            self.decoder_cache_bytes = sum(x.padded_bytes for x in self.slots if x is not None)
            self.cache_decoders = self.decoder_cache_bytes <= cfg.decoder_cache_bytes  # cached in build()
            self.embeds = self.model.model.get_input_embeddings()(self.ids[None].to(self.device)).detach()  # [1, pos, d]
            self.error = run.error.float().transpose(0, 1).contiguous()  # [layer, pos, d]
            # Row layer l's sources, its prefix of the column space: the features of layers < l
            # (columns [0, n_below[l]), the features being layer-major), the error nodes of layers < l
            # and the embeddings.
            per_layer = torch.bincount(layers, minlength=L)  # [layer]
            self.n_below = [0, *torch.cumsum(per_layer, 0).tolist()]  # [L + 1]
        self.W_enc, self.b_enc = self.tc.W_enc.detach(), self.tc.b_enc.detach()
        # Per row layer (L: logits), blocks of rows: (row nodes [k], edges [k, prefix width] dense
        # over the layer's prefix, Σ|edge| per row [k]). The row sums give the influence estimate its
        # row-normalised weights.
        self.blocks: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(L + 1)]
        self.row_dtype = torch.float32
        self.row_bytes = 0  # held in self.blocks
        self.max_row_bytes = 0
        self.row_budget: int | None = None  # bytes the rows may take (set in build)
        self.timing: dict[str, float] = {}

    def _width(self, layer: int) -> int:
        """Columns in row layer `layer`'s prefix."""
        return self.n_below[layer] + layer * self.n_pos + self.n_pos

    def _prefix(self, edges: torch.Tensor, layer: int) -> torch.Tensor:
        """edges [k, n_cols] → [k, width]: the columns a row of `layer` can have."""
        return torch.cat([
            edges[:, : self.n_below[layer]], edges[:, self.ERR0 : self.ERR0 + layer * self.n_pos], edges[:, self.EMB0 : self.LOG0],
        ], 1)

    def _scatter_prefix(self, target: torch.Tensor, values: torch.Tensor, layer: int) -> None:
        """target [n_cols] += values [width] laid out as row layer `layer`'s prefix."""
        a, e = self.n_below[layer], layer * self.n_pos
        target[:a] += values[:a]
        target[self.ERR0 : self.ERR0 + e] += values[a : a + e]
        target[self.EMB0 : self.LOG0] += values[a + e :]

    def _prefix_nodes(self, col_to_node: torch.Tensor, layer: int) -> torch.Tensor:
        """Node of each column of row layer `layer`'s prefix (-1: not a node of the graph)."""
        return self._prefix(col_to_node[None], layer)[0]

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

    # -- the batched frozen forward and its backward passes --------------------------------------

    def _forward(self, batch: int) -> None:
        run = self.run
        base = (run.reconstruction + run.error).detach()  # [pos, layer, d]
        # The batch copies are broadcast views of one [1, pos, d] leaf each, not copies: the passes ask
        # for gradients at the views, one per copy, while no [batch, pos, d] input is held per layer
        # (at batch 32 and 1,024 tokens, 2.3 GB).
        self.slots_in = [
            base[:, layer][None].clone().requires_grad_(True).expand(batch, -1, -1) for layer in range(self.n_layers)
        ]  # per layer [batch, pos, d]
        self.emb_in = self.embeds.clone().requires_grad_(True).expand(batch, -1, -1)  # [batch, pos, d]
        out = self.rm.frozen(run, self.slots_in, self.emb_in, live_skip=self.live_skip, logits_to_keep=1)
        self.out_logits = out.logits[:, -1]  # [batch, vocab], before any soft-capping
        # Where each layer's resid_mid enters the autograd graph: passes seed their gradients there,
        # and the [batch, pos, d] tensors themselves are not kept (one per layer).
        self.out_resid = [get_gradient_edge(t) for t in out.resid_mid_layers]
        self.resid_dtype = out.resid_mid_layers[0].dtype
        self.raw_logits = out.logits[0, -1].detach()
        self.batch = batch

    def _rows(self, rows: list[tuple[str, int]]) -> torch.Tensor:
        """Edges [len(rows), n_cols] of rows ("logit", target index) or ("feature", active index)."""
        P, L, d = self.n_pos, self.n_layers, self.d
        seeds: dict[int, torch.Tensor] = {}  # layer (L: logits) -> grad_output
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for b, (kind, i) in enumerate(rows):
            by_layer.setdefault(L if kind == "logit" else self.f_layer_list[i], []).append((b, i))
        for layer, items in sorted(by_layer.items()):
            b_idx = torch.tensor([b for b, _ in items], device=self.device)
            idx = torch.tensor([i for _, i in items], device=self.device)
            if layer == L:
                seeds[L] = torch.zeros_like(self.out_logits)
                seeds[L][b_idx] = torch.stack(
                    [self.targets[i].seed(seeds[L].shape[-1], seeds[L].dtype, self.device) for _, i in items]
                )
            else:
                seeds[layer] = torch.zeros(self.batch, P, d, dtype=self.resid_dtype, device=self.device)
                seeds[layer][b_idx, self.f_pos[idx]] = self.W_enc[layer, self.f_feat[idx]].to(seeds[layer].dtype)
        top = max(by_layer)
        outputs = [self.out_logits if layer == L else self.out_resid[layer] for layer in seeds]
        # Slots at or above the highest target layer cannot reach any target: not asked for.
        grads = torch.autograd.grad(
            outputs, [*self.slots_in[:top], self.emb_in], list(seeds.values()), retain_graph=True, allow_unused=True
        )
        g_slots, g_emb = grads[:top], grads[top]
        n = len(rows)
        edges = torch.zeros(n, self.n_cols, device=self.device)
        with torch.no_grad():
            if g_emb is not None:
                edges[:, self.EMB0 : self.LOG0] = _dot_per_position(g_emb[:n].float(), self.embeds[0].float())
            g = [torch.zeros(n, P, d, device=self.device) if t is None else t[:n].float() for t in g_slots]
            for t in range(top):  # error nodes (layer t, every position)
                edges[:, self.ERR0 + t * P : self.ERR0 + (t + 1) * P] = _dot_per_position(g[t], self.error[t])
            if top == 0 or self.n_act == 0:
                return edges
            # Feature sources, slot by slot: [pos, n, d] @ [pos, d, width_t] -> [pos, n, width_t],
            # added into each position's ranks; then each feature's column times its activation.
            out = torch.zeros(n, P * self.max_rank + 1, device=self.device)  # the last column takes padding
            for t in range(top):
                slot = self.slots[t]
                if slot is None:
                    continue
                for group in slot.groups:
                    vecs = group.cached if group.cached is not None else slot.gather(group)  # [k, width, d]
                    g_t = g[t] if group.positions is None else g[t][:, group.positions]  # [n, k, d]
                    part = torch.bmm(g_t.transpose(0, 1), vecs.transpose(1, 2))  # [k, n, width]
                    out.index_add_(1, group.target, part.permute(1, 0, 2).reshape(n, -1))
                    del part, vecs, g_t
            edges[:, : self.n_act] = out[:, self.f_flat] * self.f_act
        return edges

    def _process(self, rows: list[tuple[str, int]], bar: tqdm) -> None:
        """Compute rows in batches and keep them, per run of rows of one layer, dense over that layer's prefix."""
        B = self.batch
        for start in range(0, len(rows), B):
            chunk = rows[start : start + B]
            dense = self._rows(chunk)
            with torch.no_grad():
                norm = dense.abs().sum(1).clamp(min=1e-8)  # row sums of |A|, for the influence estimate
                for layer, lo, hi in self._layer_runs(chunk):
                    nodes = torch.tensor(self._columns(chunk[lo:hi]), device=self.device)
                    block = self._prefix(dense[lo:hi], layer)
                    self._keep(layer, (nodes, block, norm[lo:hi]))
                del dense
            bar.update(len(chunk))

    def _layer_runs(self, chunk: list[tuple[str, int]]) -> list[tuple[int, int, int]]:
        """(layer, start, end) of each run of consecutive rows of one layer."""
        layer_of = [self.n_layers if kind == "logit" else self.f_layer_list[i] for kind, i in chunk]
        runs, lo = [], 0
        for hi in range(1, len(chunk) + 1):
            if hi == len(chunk) or layer_of[hi] != layer_of[lo]:
                runs.append((layer_of[lo], lo, hi))
                lo = hi
        return runs

    def _columns(self, rows: list[tuple[str, int]]) -> list[int]:
        return [self.LOG0 + i if kind == "logit" else i for kind, i in rows]

    def _keep(self, layer: int, block: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Store a block of rows; past the row budget in fp32, every row so far goes to bfloat16 and the
        graph's edges will be recomputed (see AttributionConfig.recompute_rows)."""
        nodes, values, norm = block
        values = values.to(self.row_dtype)
        size = values.numel() * values.element_size()
        if self.row_budget is not None and self.row_bytes + size > self.row_budget and self.row_dtype == torch.float32:
            self.row_dtype = torch.bfloat16
            self.blocks = [[(n, v.to(torch.bfloat16), r) for n, v, r in blocks] for blocks in self.blocks]
            self.row_bytes //= 2
            values, size = values.to(torch.bfloat16), size // 2
        if self.row_budget is not None and self.row_bytes + size > self.row_budget:
            raise CltraceError(
                f"the attribution rows outgrew their {self.row_budget / 2**30:.1f} GB budget after "
                f"{sum(len(b[0]) for blocks in self.blocks for b in blocks)} rows: lower --max-feature-nodes, "
                "shorten the prompt, or raise --max-memory"
            )
        self.blocks[layer].append((nodes, values, norm))
        self.row_bytes += size
        self.max_row_bytes = max(self.max_row_bytes, self.row_bytes)

    def _influence(self) -> torch.Tensor:
        """Each node's influence on the logits through the rows known so far: Σ over paths of the
        products of row-normalised |edge| weights, starting from the logits' probabilities.

        The graph is layered (a row of layer l has sources below l only), so one pass from the top
        layer down sums every path: circuit-tracer's power iteration, done exactly in one sweep.
        """
        probs = torch.tensor([t.probability for t in self.targets], dtype=torch.float64)
        probs = probs / probs.sum() if probs.sum() > 0 else torch.full_like(probs, 1.0 / len(probs))
        mass = torch.zeros(self.n_cols, dtype=torch.float64, device=self.device)
        mass[self.LOG0 :] = probs.to(self.device)
        seed = mass.clone()
        chunk = 1 << 18  # columns per product, bounding the float64 copy of a block
        for layer in range(self.n_layers, -1, -1):
            for nodes, values, norm in self.blocks[layer]:
                factor = mass[nodes] / norm.double()  # [k]
                flow = torch.cat([
                    factor @ values[:, c : c + chunk].abs().double() for c in range(0, values.shape[1], chunk)
                ])  # [width]
                self._scatter_prefix(mass, flow, layer)
        return mass - seed

    @property
    def _heads(self) -> int:
        mcfg = self.model.config
        return getattr(mcfg, "num_attention_heads", None) or mcfg.n_head  # GPT-2 names it n_head

    @functools.cached_property
    def _weight_bytes(self) -> int:
        """The model's and the transcoder's parameters, held throughout."""
        return sum(t.numel() * t.element_size() for t in (*self.model.model.parameters(), *self.tc.parameters()))

    def _refuse_long_prompt(self) -> None:
        """Refuse a prompt whose forward run alone would not fit, before running it: the run keeps
        every layer's attention pattern ([heads, pos, pos] each), the transcoder's pre-activations and
        activations ([pos, layer, features] each) and four [pos, layer, d_model] tensors."""
        if self.limit is None:
            return
        P, L, d, F = int(self.ids.numel()), self.tc.config.n_layers, self.tc.config.d_model, self.tc.config.n_features
        need = 4 * (L * self._heads * P * P + 2 * P * L * F + 4 * P * L * d + P * self.model.vocab_size)
        params = self._weight_bytes
        if params + need > self.limit:
            raise CltraceError(
                f"a prompt of {P} tokens needs at least {(params + need) / 2**30:.1f} GB for its forward run alone "
                f"(attention patterns grow with tokens squared), more than the {self.limit / 2**30:.1f} GB "
                "allowed: shorten the prompt or raise --max-memory"
            )

    # -- the whole computation -------------------------------------------------------------------

    def _batch_size(self, n_feature_rows: int) -> int:
        """Copies in the batched forward: batch_size, fewer on long prompts (pass_memory_bytes)."""
        per_copy = _COPIES_PER_ROW * self.n_pos * self.n_layers * self.d * 4
        fits = max(1, self.cfg.pass_memory_bytes // per_copy)
        return min(self.cfg.batch_size, fits, max(len(self.targets), n_feature_rows, 1))

    def estimate(self, recompute: bool | None = None) -> AttributionEstimate:
        """What building the graph will take, from the prompt's run alone (nothing else computed).

        `recompute`: estimate with the rows in bfloat16 and a second, exact pass (True), in fp32 (False),
        or as `build` will choose (None: the config's recompute_rows, else the second pass only when
        fp32 rows would not fit in the memory limit).

        Peak memory counts what is held at once: the runtime, the model and transcoder, the prompt's
        run (activations, frozen attention patterns), and the larger of two phases. While rows are
        computed: the batched frozen forward kept for the backward passes, one pass's gradients, the
        decoders (cached or one slot's gathered) and the kept rows (dense over their layer's prefix of
        the columns; the visited rows taken to have the layers of the active features on average).
        Then their conversion into the graph's COO edges (28 bytes an edge while laid out, a share of
        each row's graph columns nonzero that falls on long prompts: `_edge_density`) beside the rows (fp32) or the forward (bf16 rows,
        computed again). Time: the floating-point
        work of the forward and backward passes and of the edge products, at this machine's measured
        matrix-product rate.
        """
        if recompute is None:
            recompute = self.cfg.recompute_rows
        if recompute is None:
            fp32 = self.estimate(recompute=False)
            return fp32 if self.limit is None or fp32.peak_bytes <= self.limit else self.estimate(recompute=True)
        cfg, L, P, d = self.cfg, self.n_layers, self.n_pos, self.d
        n_feature_rows = min(cfg.max_feature_nodes, self.n_act)
        n_rows = len(self.targets) + n_feature_rows
        batch = self._batch_size(n_feature_rows)
        n_batches = -(-len(self.targets) // batch) + -(-n_feature_rows // batch)
        params = self._weight_bytes
        run = self.run
        run_bytes = sum(t.numel() * t.element_size() for t in (
            run.logits, run.resid_mid, run.mlp_out, run.pre_activations, run.activations, run.reconstruction, run.error,
            *run.freeze_state.patterns.values(), *run.freeze_state.norm_scales.values(),
        ))
        # What autograd keeps of the batched forward, one pass's gradients and the forward's
        # transients: about _COPIES_PER_ROW [batch, pos, layer, d] fp32 tensors.
        passes = _COPIES_PER_ROW * batch * P * L * d * 4
        backward = 2 * batch * self.n_cols * 4 + batch * (P * self.max_rank + 1) * 4  # a pass's rows and their prefixes
        tables = sum(x.table.numel() * 4 for x in self.slots if x is not None)
        widest = max((x.group_bytes(g) for x in self.slots if x is not None for g in x.groups), default=0)
        decoders = tables + (self.decoder_cache_bytes if self.cache_decoders else 2 * widest)
        mean_width = (
            sum(self._width(layer) * (self.n_below[layer + 1] - self.n_below[layer]) for layer in range(L)) / self.n_act
            if self.n_act else 0.0
        )
        entries = len(self.targets) * self._width(L) + n_feature_rows * mean_width
        rows = int(entries * (2 if recompute else 4))
        # The graph's edges: 20 bytes an edge in the graph, 8 more while they are laid out.
        kept = 28 * int(_edge_density(P) * n_rows * (n_feature_rows + L * P + P))
        base = _RUNTIME_BYTES + params + run_bytes
        work = passes + backward + decoders
        if recompute:  # bf16 rows are all freed before the second pass, which needs the forward again
            peak = base + work + max(rows, kept)
        else:  # the forward and decoders are freed before the fp32 rows become edges (each block freed once read)
            peak = base + rows + max(work, kept)
        # Work: per pass the frozen backward (attention OV and output projections, pattern products)
        # over about half the layers, then the edge products with every active feature's decoders.
        mcfg, heads = self.model.config, self._heads
        kv = (getattr(mcfg, "num_key_value_heads", None) or heads) * d // heads
        layer_flops = 2 * batch * P * (d * d + d * kv) + 2 * batch * P * P * d
        pass_flops = layer_flops * L / 2 + 2 * batch * self.decoder_cache_bytes / 4  # padded slot decoders
        all_batches = n_batches * (2 if recompute else 1)
        flops = all_batches * pass_flops + 2 * layer_flops * L
        return AttributionEstimate(
            n_tokens=P, n_active_features=self.n_act, n_feature_rows=n_feature_rows, n_logit_rows=len(self.targets),
            n_batches=n_batches, batch_size=batch, peak_bytes=int(peak), flops=float(flops), overhead_s=0.02 * all_batches,
            decoders_cached=self.cache_decoders, recompute_rows=bool(recompute), row_bytes=rows,
        )

    def build(self) -> Graph:
        cfg = self.cfg
        est = self.estimate()
        if self.limit is not None:
            if est.peak_bytes > self.limit:
                raise CltraceError(
                    f"this graph needs about {est.peak_bytes / 2**30:.1f} GB ({est.summary()}), more than the "
                    f"{self.limit / 2**30:.1f} GB allowed: lower --max-feature-nodes or --batch-size, "
                    "shorten the prompt, or raise --max-memory"
                )
            # What the rows may take: the limit less all else; an fp32 start that outgrows it goes to bf16.
            self.row_budget = self.limit - (est.peak_bytes - est.row_bytes)
        self.row_dtype = torch.bfloat16 if est.recompute_rows else torch.float32
        if self.cache_decoders:
            with torch.no_grad():
                for slot in self.slots:
                    for group in slot.groups if slot is not None else []:
                        group.cached = slot.gather(group)
        n_feature_rows = min(cfg.max_feature_nodes, self.n_act)
        n_rows = len(self.targets) + n_feature_rows
        batch = self._batch_size(n_feature_rows)  # copies in the forward
        self.timing["setup_s"] = time.perf_counter() - self.t0
        t = time.perf_counter()
        self._forward(batch)
        self.timing["forward_s"] = time.perf_counter() - t
        bar = tqdm(total=n_rows, desc="attribution", unit="row", file=sys.stderr, disable=not cfg.progress, leave=False)
        try:
            logit_rows = [("logit", i) for i in range(len(self.targets))]
            visited = torch.zeros(self.n_act, dtype=torch.bool, device=self.device)
            n_visited = 0
            t = time.perf_counter()
            if n_feature_rows == self.n_act:
                # Every active feature becomes a node, so the visiting order cannot change the graph:
                # visit them layer by layer (their own order), each pass starting at its rows' layer,
                # the logit rows last (sharing the top layer's pass), with no influence estimate.
                visited[:] = True
                n_visited = self.n_act
                self._process([("feature", i) for i in range(self.n_act)] + logit_rows, bar)
                self.timing["logit_rows_s"] = 0.0  # counted in feature_rows_s
            else:
                self._process(logit_rows, bar)
                self.timing["logit_rows_s"] = time.perf_counter() - t
                t = time.perf_counter()
            while n_visited < n_feature_rows:
                influence = self._influence()[: self.n_act]
                ranked = torch.argsort(influence, descending=True, stable=True)
                ranked = ranked[~visited[ranked]]
                queue = ranked[: min(cfg.update_interval * cfg.batch_size, n_feature_rows - n_visited)]
                visited[queue] = True
                n_visited += int(queue.numel())
                # Rows of one layer together: each backward pass then starts at that layer.
                queue = queue[torch.argsort(self.f_layer[queue], stable=True)]
                self._process([("feature", int(i)) for i in queue], bar)
            self.timing["feature_rows_s"] = time.perf_counter() - t
        finally:
            bar.close()
        t = time.perf_counter()
        edges = self._edges(visited)  # frees the passes' memory once no pass is left
        self.timing["edges_s"] = time.perf_counter() - t
        t = time.perf_counter()
        graph = self._graph(visited, edges)
        graph.metadata["timing"]["graph_s"] = time.perf_counter() - t
        return graph

    def _free_forward(self) -> None:
        """Drop the batched frozen forward (and with it its autograd graph) and the cached decoders once no
        pass needs them."""
        for name in ("slots_in", "emb_in", "out_logits", "out_resid"):
            self.__dict__.pop(name, None)
        for slot in self.slots:
            for group in slot.groups if slot is not None else []:
                group.cached = None

    def _edges(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graph's edges (target node, source node, weight), sorted by target then source: from the
        fp32 rows kept, or (rows kept in bf16) from the visited rows computed again."""
        L, P = self.n_layers, self.n_pos
        sel = selected.nonzero(as_tuple=True)[0]
        n_sel = int(sel.numel())
        n_nodes = n_sel + L * P + P + len(self.targets)
        col_to_node = torch.full((self.n_cols,), -1, dtype=torch.long, device=self.device)
        col_to_node[sel] = torch.arange(n_sel, device=self.device)
        col_to_node[self.ERR0 :] = torch.arange(n_sel, n_nodes, device=self.device)
        prefix_nodes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        # Each row's edges, sources ascending (a prefix's node ids grow with its columns), as one
        # segment of a piece per block of rows; the rows are then laid out by target. No sort of the
        # edges and 8 bytes an edge held beside the graph's own 20.
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []  # (source int32 [e], weight [e]) per block
        segments: list[tuple[int, int, int, int]] = []  # (target node, piece, start, count) per row

        def take(layer: int, nodes: torch.Tensor, values: torch.Tensor) -> None:
            """Keep the nonzero edges of a block of rows [k, width] from the graph's nodes."""
            if layer not in prefix_nodes:
                node_of = self._prefix_nodes(col_to_node, layer)
                keep = (node_of >= 0).nonzero(as_tuple=True)[0]
                prefix_nodes[layer] = keep, node_of[keep]
            keep, node_of = prefix_nodes[layer]
            sub = values[:, keep].float()  # [k, kept columns]
            r, c = (sub != 0).nonzero(as_tuple=True)  # row-major: each row's edges together
            counts = torch.bincount(r, minlength=len(nodes)).tolist()
            starts = [0, *itertools.accumulate(counts)]
            segments.extend(zip(col_to_node[nodes].tolist(), itertools.repeat(len(pieces)), starts, counts))
            pieces.append((node_of[c].to(torch.int32), sub[r, c]))

        if self.row_dtype == torch.float32:
            self._free_forward()  # the edges are in the rows kept: no pass is left
            # Each block freed as soon as it is read, so the rows are never held twice in full.
            for layer, layer_blocks in enumerate(self.blocks):
                while layer_blocks:
                    nodes, values, _ = layer_blocks.pop(0)
                    take(layer, nodes, values)
        else:
            self.blocks = [[] for _ in range(L + 1)]  # the bf16 rows served the ordering only
            self.row_bytes = 0
            rows = [("logit", i) for i in range(len(self.targets))]
            feats = sel[torch.argsort(self.f_layer[sel], stable=True)]
            rows += [("feature", int(i)) for i in feats]
            bar = tqdm(total=len(rows), desc="exact edges", unit="row", file=sys.stderr, disable=not self.cfg.progress, leave=False)
            with bar:
                for start in range(0, len(rows), self.batch):
                    chunk = rows[start : start + self.batch]
                    dense = self._rows(chunk)
                    with torch.no_grad():
                        for layer, lo, hi in self._layer_runs(chunk):
                            nodes = torch.tensor(self._columns(chunk[lo:hi]), device=self.device)
                            take(layer, nodes, self._prefix(dense[lo:hi], layer))
                    del dense
                    bar.update(len(chunk))
            self._free_forward()
        self.blocks = []
        n_edges = sum(count for *_, count in segments)
        target = torch.empty(n_edges, dtype=torch.long, device=self.device)
        source = torch.empty(n_edges, dtype=torch.long, device=self.device)
        weights = torch.empty(n_edges, device=self.device)
        at = 0
        for node, piece, start, count in sorted(segments):  # one row per target node
            src, w = pieces[piece]
            target[at : at + count] = node
            source[at : at + count] = src[start : start + count]
            weights[at : at + count] = w[start : start + count]
            at += count
        return target, source, weights

    def _constants(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's value and its constant parts: ([n_sel] feature, [n_logits] logit) × (bias, all)."""
        run, tc = self.run, self.tc
        with torch.no_grad():
            # What the slots hold with no node as a source: biases (and the skip path's value at the
            # prompt, kept live in the frozen model), BOS features, and, for the second copy, the
            # active features left out of the graph.
            x = run.resid_mid.to(tc.W_enc.dtype)
            bos = (run.activations[0] != 0).nonzero(as_tuple=True)  # (layer, feature)
            out = ~selected
            pos_all = torch.cat([torch.zeros_like(bos[0]), self.f_pos[out]])
            layer_all = torch.cat([bos[0], self.f_layer[out]])
            feat_all = torch.cat([bos[1], self.f_feat[out]])
            n_bos = bos[0].numel()
            values = run.activations[pos_all, layer_all, feat_all]
            slots = torch.stack([
                tc.decode_sparse(pos_all[:n_bos], layer_all[:n_bos], feat_all[:n_bos], values[:n_bos], self.n_pos, x),
                tc.decode_sparse(pos_all, layer_all, feat_all, values, self.n_pos, x),
            ]).to(run.mlp_out.dtype)  # [2, pos, layer, d]
            zeros = torch.zeros(2, *self.embeds.shape[1:], dtype=self.embeds.dtype, device=self.device)
            frozen = self.rm.frozen(run, slots, zeros, live_skip=self.live_skip, logits_to_keep=1)
            sl, sp, sf = self.f_layer[selected], self.f_pos[selected], self.f_feat[selected]
            resid = frozen.resid_mid[:, sp, sl].float()  # [2, n_sel, d]
            feat = (resid * self.W_enc[sl, sf].float()).sum(-1) + self.b_enc[sl, sf].float()  # [2, n_sel]
            logits = frozen.logits[:, -1].float()
            logit = torch.stack([torch.stack([t.value(logits[k]) for t in self.targets]) for k in range(2)])
        return feat[0], feat[1], logit[0], logit[1]

    def _graph(self, selected: torch.Tensor, edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Graph:
        run, L, P = self.run, self.n_layers, self.n_pos
        sel = selected.nonzero(as_tuple=True)[0]
        n_sel, n_logits = int(sel.numel()), len(self.targets)
        target, source, weights = edges

        ids = self.ids.to(self.device)
        last = P - 1
        kind = torch.cat([
            torch.full((n_sel,), NodeKind.FEATURE), torch.full((L * P,), NodeKind.ERROR),
            torch.full((P,), NodeKind.EMBEDDING), torch.full((n_logits,), NodeKind.LOGIT),
        ]).to(torch.int8)
        layer = torch.cat([
            self.f_layer[sel].cpu(), torch.arange(L).repeat_interleave(P), torch.full((P,), -1), torch.full((n_logits,), L),
        ]).to(torch.int32)
        pos = torch.cat([
            self.f_pos[sel].cpu(), torch.arange(P).repeat(L), torch.arange(P), torch.full((n_logits,), last),
        ]).to(torch.int32)
        feature = torch.cat([self.f_feat[sel].cpu(), torch.full((L * P + P + n_logits,), -1)]).long()
        token = torch.cat([
            torch.full((n_sel + L * P,), -1), ids.cpu(), torch.tensor([t.token for t in self.targets], dtype=torch.long),
        ]).long()
        activation = torch.cat([self.f_act[sel].cpu(), torch.zeros(L * P + P + n_logits)]).float()
        probability = torch.cat([
            torch.zeros(n_sel + L * P + P), torch.tensor([t.probability for t in self.targets], dtype=torch.float32),
        ]).float()
        nodes = NodeTable(kind, layer, pos, feature, token, activation, probability)

        bias_f, const_f, bias_l, const_l = self._constants(selected)
        value_f = run.pre_activations[self.f_pos[sel], self.f_layer[sel], self.f_feat[sel]].float()
        value_l = torch.stack([t.value(self.raw_logits.float()) for t in self.targets]) if self.targets else value_f[:0]
        pad = torch.zeros(L * P + P, device=self.device)
        value = torch.cat([value_f, pad, value_l]).cpu()
        constant = torch.cat([const_f, pad, const_l]).cpu()
        bias = torch.cat([bias_f, pad, bias_l]).cpu()

        tokenizer = self.model.tokenizer
        metadata = {
            "prompt": self.prompt if isinstance(self.prompt, str) else None,
            "input_ids": self.ids.tolist(),
            "tokens": [self.model.decode_token(int(i)) for i in self.ids] if tokenizer is not None else None,
            "model": self.model.name,
            "n_layers": L,
            "transcoder": self.tc.config.to_dict(),
            "transcoder_fingerprint": transcoder_fingerprint(self.tc),  # the server matches feature stores by it
            "settings": {**dataclasses.asdict(self.cfg), "live_skip": self.live_skip,
                         "rows_recomputed": self.row_dtype != torch.float32},
            "targets": [t.to_dict() for t in self.targets],
            "n_active_features": self.n_act,
            "n_bos_features": int((run.activations[0] != 0).sum()),
            # Per node (0 for error and embedding nodes, which are not targets): the target's value
            # (a feature's pre-activation, a logit target's demeaned logit), the part of it its
            # incoming edges leave out, and of that the part from biases and BOS-position features
            # (the rest comes from active features beyond max_feature_nodes).
            "target_value": value.tolist(),
            "target_constant": constant.tolist(),
            "target_bias": bias.tolist(),
            "timing": {**self.timing, "total_s": time.perf_counter() - self.t0},
            "row_bytes": self.max_row_bytes,  # the most the kept rows took at once
        }
        return Graph(nodes, target.cpu(), source.cpu(), weights.float().cpu(), metadata)
