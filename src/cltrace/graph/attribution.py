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
import sys
import time
from collections.abc import Sequence

import torch
from torch.autograd.graph import get_gradient_edge
from tqdm import tqdm

from cltrace.errors import CltraceError
from cltrace.graph.config import AttributionConfig, resolve_config
from cltrace.graph.decoders import _dot_per_position, _SlotDecoders, _SlotDecoding, keep_decoders
from cltrace.graph.edges import _EdgeAssembly
from cltrace.graph.estimate import AttributionEstimate, _Estimating
from cltrace.graph.graph import Graph
from cltrace.graph.targets import LogitTarget, TargetSpec, select_targets
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun
from cltrace.resources import return_freed_memory


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


class _Attribution(_Estimating, _SlotDecoding, _EdgeAssembly):
    """One graph's computation; column space: [active features | errors (layer, pos) | embeddings | logits]."""

    def __init__(self, replacement: ReplacementModel, prompt: str | torch.Tensor, targets, cfg: AttributionConfig) -> None:
        self.t0 = time.perf_counter()
        return_freed_memory()  # passes free as much as they allocate: without it, the heap only grows
        self.rm, self.cfg, self.prompt = replacement, cfg, prompt
        self.model, self.tc = replacement.model, replacement.transcoder
        self.ids = replacement.input_ids(prompt)
        self.limit = cfg.memory_limit(self.model.device)  # the GPU's memory where the model runs on one
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
        # few per slot). Decoders are kept unscaled (the activations multiply the result), and
        # cached up to AttributionConfig.decoder_cache_bytes, the rest gathered from the slot's table
        # on each pass, so memory stays bounded on long prompts.
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
            self.cached_decoder_bytes = keep_decoders(self.slots, cfg.decoder_cache_bytes)  # gathered in build()
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
        self._fit_decoders()

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

    # -- the batched frozen forward and its backward passes --------------------------------------

    def _forward(self, batch: int) -> None:
        run = self.run
        base = (run.reconstruction + run.error).detach()  # [pos, layer, d]
        # The batch copies are broadcast views of one [1, pos, d] leaf each, not copies: the passes ask
        # for gradients at the views, one per copy, while no [batch, pos, d] input is held per layer.
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
            outputs,  # type: ignore[arg-type]  # torch takes a mix of tensors and gradient edges; its annotation does not
            [*self.slots_in[:top], self.emb_in], list(seeds.values()), retain_graph=True, allow_unused=True,
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

    # -- the whole computation -------------------------------------------------------------------

    def _fit_decoders(self) -> None:
        """Keep half as many decoders, as often as needed, where the graph would not fit in the memory
        allowed: gathering them on each pass costs less than the rows' second pass or a refusal."""
        recompute = bool(self.cfg.recompute_rows)
        while self.limit is not None and self.cached_decoder_bytes and self.estimate(recompute).peak_bytes > self.limit:
            self.cached_decoder_bytes = keep_decoders(self.slots, self.cached_decoder_bytes // 2)

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
        with torch.no_grad():
            for slot in filter(None, self.slots):
                for group in slot.groups:
                    group.cached = slot.gather(group) if group.keep else None
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

