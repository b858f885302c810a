"""Edge assembly: from the rows computed to the graph's sorted edges, its constant terms and the `Graph`.

`_EdgeAssembly` is the part of `cltrace.graph.attribution._Attribution` that runs once the rows are
chosen: the fp32 rows kept (or the visited rows computed again, exactly), each row's constant term
and the node table and metadata.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time

import torch
from tqdm import tqdm

from cltrace.fingerprint import transcoder_fingerprint
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.graph.state import _AttributionState


class _EdgeAssembly(_AttributionState):
    """The graph's edges, constants and metadata (mixed into `cltrace.graph.attribution._Attribution`)."""

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
            feat = tc.feature_pre_activations(resid, sl, sf)  # [2, n_sel]
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
