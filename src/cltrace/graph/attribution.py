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
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.graph.targets import LogitTarget, TargetSpec, select_targets
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun


@dataclass
class AttributionConfig:
    """How an attribution graph is computed."""

    max_feature_nodes: int = 7500
    """At most this many feature nodes (rows); active features beyond it are left out of the graph
    and their effect goes into the targets' constant terms."""

    batch_size: int = 32
    """Target rows per backward pass (copies of the prompt in the one batched forward): memory
    grows with it as batch × positions × layers × d_model."""

    max_n_logits: int = 10
    """With no targets given: at most this many logit targets."""

    desired_logit_prob: float = 0.95
    """With no targets given: the most probable tokens until their cumulative probability reaches this."""

    update_interval: int = 4
    """Feature rows are chosen in rounds of update_interval × batch_size, re-estimating every
    feature's influence on the logits between rounds."""

    progress: bool = True
    """Show a progress bar (tqdm, on stderr)."""

    def validate(self) -> None:
        """Raise CltraceError naming the first impossible value."""
        checks = [
            (isinstance(self.max_feature_nodes, int) and self.max_feature_nodes >= 0, "max_feature_nodes must be an integer >= 0"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1"),
            (isinstance(self.max_n_logits, int) and self.max_n_logits >= 1, "max_n_logits must be an integer >= 1"),
            (0 < self.desired_logit_prob <= 1, "desired_logit_prob must be in (0, 1]"),
            (isinstance(self.update_interval, int) and self.update_interval >= 1, "update_interval must be an integer >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise CltraceError(f"attribution config: {message}")


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
    cfg = dataclasses.replace(config) if config is not None else AttributionConfig()
    for name, value in (("max_feature_nodes", max_feature_nodes), ("batch_size", batch_size), ("progress", progress)):
        if value is not None:
            setattr(cfg, name, value)
    cfg.validate()
    with torch.enable_grad():
        return _Attribution(replacement, prompt, targets, cfg).build()


class _Attribution:
    """One graph's computation; column space: [active features | errors (layer, pos) | embeddings | logits]."""

    def __init__(self, replacement: ReplacementModel, prompt: str | torch.Tensor, targets, cfg: AttributionConfig) -> None:
        self.t0 = time.perf_counter()
        self.rm, self.cfg, self.prompt = replacement, cfg, prompt
        self.model, self.tc = replacement.model, replacement.transcoder
        self.ids = replacement.input_ids(prompt)
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

        # What each feature writes: its decoder vectors scaled by its activation. A transcoder whose
        # features write to one layer (PLT) is contracted per source layer, gathering the gradient
        # at each feature's position; a CLT per position, with each feature's decoders laid out
        # over all L slots (zeros below its layer), so that one matrix product per position serves
        # every source layer and every slot.
        self.single_slot = all(len(self.tc.output_layers(s)) == 1 for s in range(L))
        self.by_layer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (cols, pos, out [n_s, d])
        self.by_pos: list[tuple[torch.Tensor, torch.Tensor]] = []  # (cols, out [n_p, L * d])
        with torch.no_grad():
            if self.single_slot:
                for s in range(L):
                    if self.tc.output_layers(s).start != s:
                        raise CltraceError("a transcoder writing to one layer must write to its own layer")
                    cols = (layers == s).nonzero(as_tuple=True)[0]
                    vecs = self.tc.decoder_vectors(s, features[cols])[:, 0].float() * self.f_act[cols, None]
                    self.by_layer.append((cols, positions[cols], vecs))  # [n_s, d]
            else:
                # Features grouped by position (stable: (layer, feature) order within a position),
                # so that each position's block of the padded decoders is a view.
                by_pos = torch.argsort(positions, stable=True)
                rank = torch.empty_like(by_pos)
                rank[by_pos] = torch.arange(self.n_act, device=self.device)
                padded = torch.zeros(self.n_act, L, self.d, device=self.device)
                for s in range(L):
                    cols = (layers == s).nonzero(as_tuple=True)[0]
                    if cols.numel():
                        vecs = self.tc.decoder_vectors(s, features[cols]).float() * self.f_act[cols, None, None]
                        first = self.tc.output_layers(s).start
                        padded[rank[cols], first : first + vecs.shape[1]] = vecs
                counts = torch.bincount(positions, minlength=P).tolist()
                start = 0
                for count in counts:
                    block = padded[start : start + count].view(count, L * self.d)
                    self.by_pos.append((by_pos[start : start + count], block))
                    start += count
            self.embeds = self.model.model.get_input_embeddings()(self.ids[None].to(self.device)).detach()  # [1, pos, d]
            self.error = run.error.float()  # [pos, layer, d]
        self.W_enc, self.b_enc = self.tc.W_enc.detach(), self.tc.b_enc.detach()
        # Per row layer (L: logits), blocks of edges (row node, source col, weight, |weight| / row's
        # Σ|weight|), int32 indices: the second weight feeds the influence estimate.
        self.blocks: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(L + 1)]
        self.timing: dict[str, float] = {}

    # -- the batched frozen forward and its backward passes --------------------------------------

    def _forward(self, batch: int) -> None:
        run = self.run
        base = (run.reconstruction + run.error).detach()  # [pos, layer, d]
        self.slots_in = [
            base[:, layer][None].expand(batch, -1, -1).clone().requires_grad_(True) for layer in range(self.n_layers)
        ]
        self.emb_in = self.embeds.expand(batch, -1, -1).clone().requires_grad_(True)
        out = self.rm.frozen(run, self.slots_in, self.emb_in, live_skip=self.live_skip, logits_to_keep=1)
        self.out_logits = out.logits[:, -1]  # [batch, vocab], before any soft-capping
        self.out_resid = out.resid_mid_layers  # per layer [batch, pos, d]
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
                seeds[layer] = torch.zeros_like(self.out_resid[layer])
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
                edges[:, self.EMB0 : self.LOG0] = torch.einsum("bpd,pd->bp", g_emb[:n].float(), self.embeds[0].float())
            g = [torch.zeros(n, P, d, device=self.device) if t is None else t[:n].float() for t in g_slots]
            for t in range(top):  # error nodes (layer t, every position)
                edges[:, self.ERR0 + t * P : self.ERR0 + (t + 1) * P] = torch.einsum("bpd,pd->bp", g[t], self.error[:, t])
            if top == 0:
                return edges
            if self.single_slot:
                for s in range(top):
                    cols, pos, vecs = self.by_layer[s]
                    if cols.numel():
                        edges[:, cols] = torch.einsum("bcd,cd->bc", g[s][:, pos], vecs)
            else:
                stacked = torch.stack(g, dim=2)  # [n, pos, top, d]
                for p, (cols, out) in enumerate(self.by_pos):
                    if cols.numel():
                        edges[:, cols] = stacked[:, p].reshape(n, top * d) @ out[:, : top * d].T
        return edges

    def _process(self, rows: list[tuple[str, int]], bar: tqdm) -> None:
        """Compute rows in batches and store their nonzero edges."""
        B = self.batch
        for start in range(0, len(rows), B):
            chunk = rows[start : start + B]
            dense = self._rows(chunk)
            with torch.no_grad():
                nodes = torch.tensor(
                    [self.LOG0 + i if kind == "logit" else i for kind, i in chunk], dtype=torch.int32, device=self.device
                )
                layer_of = [self.n_layers if kind == "logit" else self.f_layer_list[i] for kind, i in chunk]
                r, c = dense.nonzero(as_tuple=True)  # row-major: rows of one layer are contiguous
                w = dense[r, c]
                norm = dense.abs().sum(1).clamp(min=1e-8)  # row sums of |A|, for the influence estimate
                wn = w.abs() / norm[r]
                bounds = torch.searchsorted(r, torch.arange(len(chunk) + 1, device=self.device)).tolist()
                lo = 0
                while lo < len(chunk):  # one stored block per run of rows of one layer
                    hi = lo
                    while hi < len(chunk) and layer_of[hi] == layer_of[lo]:
                        hi += 1
                    at = slice(bounds[lo], bounds[hi])
                    self.blocks[layer_of[lo]].append((nodes[r[at]], c[at].to(torch.int32), w[at], wn[at]))
                    lo = hi
            bar.update(len(chunk))

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
        for layer in range(self.n_layers, -1, -1):
            for nodes, cols, _, wn in self.blocks[layer]:
                mass.index_add_(0, cols, mass[nodes] * wn.double())
        return mass - seed

    # -- the whole computation -------------------------------------------------------------------

    def build(self) -> Graph:
        cfg = self.cfg
        n_feature_rows = min(cfg.max_feature_nodes, self.n_act)
        n_rows = len(self.targets) + n_feature_rows
        batch = min(cfg.batch_size, max(len(self.targets), n_feature_rows, 1))  # copies in the forward
        self.timing["setup_s"] = time.perf_counter() - self.t0
        t = time.perf_counter()
        self._forward(batch)
        self.timing["forward_s"] = time.perf_counter() - t
        bar = tqdm(total=n_rows, desc="attribution", unit="row", file=sys.stderr, disable=not cfg.progress, leave=False)
        try:
            t = time.perf_counter()
            self._process([("logit", i) for i in range(len(self.targets))], bar)
            self.timing["logit_rows_s"] = time.perf_counter() - t
            t = time.perf_counter()
            visited = torch.zeros(self.n_act, dtype=torch.bool, device=self.device)
            n_visited = 0
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
        del self.slots_in, self.emb_in, self.out_logits, self.out_resid  # frees the batched autograd graph
        t = time.perf_counter()
        graph = self._graph(visited)
        graph.metadata["timing"]["graph_s"] = time.perf_counter() - t
        return graph

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

    def _graph(self, selected: torch.Tensor) -> Graph:
        run, L, P = self.run, self.n_layers, self.n_pos
        sel = selected.nonzero(as_tuple=True)[0]
        n_sel, n_logits = int(sel.numel()), len(self.targets)
        n_nodes = n_sel + L * P + P + n_logits
        col_to_node = torch.full((self.n_cols,), -1, dtype=torch.long, device=self.device)
        col_to_node[sel] = torch.arange(n_sel, device=self.device)
        col_to_node[self.ERR0 :] = torch.arange(n_sel, n_nodes, device=self.device)

        blocks = [block for layer in self.blocks for block in layer]
        if blocks:
            rows = torch.cat([b[0] for b in blocks]).long()
            cols = torch.cat([b[1] for b in blocks]).long()
            weights = torch.cat([b[2] for b in blocks])
            self.blocks = []
        else:
            rows = cols = torch.zeros(0, dtype=torch.long, device=self.device)
            weights = torch.zeros(0, device=self.device)
        target, source = col_to_node[rows], col_to_node[cols]
        keep = source >= 0
        target, source, weights = target[keep], source[keep], weights[keep]
        order = torch.argsort(target * n_nodes + source)
        target, source, weights = target[order], source[order], weights[order]

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
            "settings": {**dataclasses.asdict(self.cfg), "live_skip": self.live_skip},
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
        }
        return Graph(nodes, target.cpu(), source.cpu(), weights.float().cpu(), metadata)
