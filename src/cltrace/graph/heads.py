"""Head loadings: which attention heads carry an edge between two positions.

An edge s → t with s at position p and t at position q ≠ p exists in the frozen replacement model
only through attention: every path from p to q leaves p, for the first time, through one head h of
one layer l, which moves what the stream at p holds into some position r ≠ p. Sorting the paths by
that first move partitions them, so the edge is exactly the sum over (layer, head) of

    loading(l, h) = Σ_{r ≠ p} pattern_h[r, p] · (Δv_h(p) · g_h(r))

where Δv_h(p) is what s adds to head h's value at p along the paths that stay at p until layer l
(a forward pass in which every pattern keeps only its (p, p) entry), and g_h(r) the gradient of t's
value with respect to head h's output at r (one backward pass through the whole frozen model). Two
passes per edge, each holding what one ordinary frozen forward pass holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.qk_sites import AttentionSites
from cltrace.model.freeze import FreezeState
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun

NodeSort = Literal["feature", "error", "embedding", "logit"]


@dataclass(frozen=True)
class NodeRef:
    """One node of the replacement model: a feature, error node, embedding or (last-position) logit."""

    kind: NodeSort
    layer: int
    pos: int
    feature: int = -1
    token: int = -1


@dataclass
class HeadLoadings:
    """Each head's share of one edge; `loadings` sums to the edge's weight (all of it goes through attention)."""

    source: NodeRef
    target: NodeRef
    loadings: torch.Tensor  # [layer, head]

    @property
    def total(self) -> float:
        return float(self.loadings.sum())

    def top(self, k: int = 5) -> list[dict[str, float | int]]:
        """The k heads of largest |loading|, as JSON-ready dicts."""
        flat = self.loadings.flatten()
        n_heads = self.loadings.shape[1]
        return [
            {"layer": int(i) // n_heads, "head": int(i) % n_heads, "loading": float(flat[i])}
            for i in flat.abs().argsort(descending=True)[:k]
        ]


def _source_delta(
    rm: ReplacementModel, run: ReplacementRun, source: NodeRef
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(MLP-slot delta [pos, layer, d], embedding delta [pos, d]): what the source writes, one of them None."""
    p = source.pos
    if source.kind == "embedding":
        emb = rm.model.model.get_input_embeddings()(run.input_ids[None])[0].detach()  # [pos, d]
        delta = torch.zeros_like(emb)
        delta[p] = emb[p]
        return None, delta
    delta = torch.zeros_like(run.mlp_out)
    if source.kind == "error":
        delta[p, source.layer] = run.error[p, source.layer]
    elif source.kind == "feature":
        tc = rm.transcoder
        act = run.activations[p, source.layer, source.feature]
        if float(act) == 0.0:
            raise CltraceError(f"feature {source.layer}/{source.feature} is not active at position {p}: it has no edges")
        dec = tc.decoder_vectors(source.layer, torch.tensor([source.feature], device=act.device))[0]  # [out, d]
        layers = tc.output_layers(source.layer)
        delta[p, layers.start : layers.stop] = (act * dec).to(delta.dtype)
    else:
        raise CltraceError(f"a {source.kind} node has no outgoing edges; pick a feature, error or embedding source")
    return delta, None


def _stay_pattern(state: FreezeState, sites: AttentionSites, pos: int) -> FreezeState:
    """The run's frozen constants with every pattern cut down to its (pos, pos) entry."""
    patterns = {}
    for layer in range(len(sites.layers)):
        module = sites.attention(layer)
        full = state.patterns[module]  # [batch, head, q, k]
        kept = torch.zeros_like(full)
        kept[..., pos, pos] = full[..., pos, pos]
        patterns[module] = kept
    return FreezeState("record", patterns, state.norm_scales)


@torch.no_grad()
def _staying_values(
    rm: ReplacementModel, run: ReplacementRun, sites: AttentionSites, source: NodeRef, live_skip: bool
) -> list[torch.Tensor]:
    """Per layer, [kv_head, d_head]: what the source adds to the values at its position along the
    paths that never leave it (the linear response: perturbed minus unperturbed, same patterns)."""
    slot_delta, emb_delta = _source_delta(rm, run, source)
    base = run.reconstruction + run.error  # [pos, layer, d]
    mlp_out = torch.stack([base, base + (0 if slot_delta is None else slot_delta.to(base))])
    embeds = None
    if emb_delta is not None:
        emb = rm.model.model.get_input_embeddings()(run.input_ids[None])[0]  # [pos, d]
        embeds = torch.stack([emb, emb + emb_delta])
    stay_run = dataclasses.replace(run, freeze_state=_stay_pattern(run.freeze_state, sites, source.pos))
    values: list[torch.Tensor] = []
    handles = [
        sites.value_module(layer).register_forward_hook(
            lambda _m, _a, out: values.append(sites.values(out[1, source.pos] - out[0, source.pos]).float())
        )
        for layer in range(len(sites.layers))
    ]
    try:
        rm.frozen(stay_run, mlp_out, embeds, live_skip=live_skip, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return values


def _output_gradients(
    rm: ReplacementModel, run: ReplacementRun, sites: AttentionSites, target: NodeRef, live_skip: bool
) -> list[torch.Tensor]:
    """Per layer, [pos, head, d_head]: the gradient of the target's value with respect to each head's output."""
    probes: list[torch.Tensor] = []

    def add_probe(_m: nn.Module, args: tuple) -> tuple:
        probe = torch.zeros_like(args[0][:1], requires_grad=True)  # [1, pos, head · d_head]
        probes.append(probe)
        return (args[0] + probe, *args[1:])

    handles = [sites.out_module(layer).register_forward_pre_hook(add_probe) for layer in range(len(sites.layers))]
    try:
        with torch.enable_grad():
            out = rm.frozen(run, live_skip=live_skip, logits_to_keep=1 if target.kind == "logit" else 0)
            if target.kind == "feature":
                enc = rm.transcoder.W_enc[target.layer, target.feature].detach()  # [d]
                value = out.resid_mid_layers[target.layer][0, target.pos].to(enc.dtype) @ enc
            elif target.kind == "logit":
                logits = out.logits[0, -1].float()  # [vocab]
                value = logits[target.token] - logits.mean()
            else:
                raise CltraceError(f"a {target.kind} node has no incoming edges; pick a feature or logit target")
            grads = torch.autograd.grad(value, probes, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    n_pos = run.n_pos
    return [
        torch.zeros(n_pos, sites.n_heads, sites.head_dim) if g is None
        else g[0].float().unflatten(-1, (sites.n_heads, sites.head_dim))
        for g in grads
    ]


def head_loadings(
    replacement: ReplacementModel,
    run: ReplacementRun,
    source: NodeRef,
    target: NodeRef,
    sites: AttentionSites | None = None,
) -> HeadLoadings:
    """Each head's share of the edge source → target (at different positions, source first)."""
    if target.kind == "logit":
        target = dataclasses.replace(target, pos=run.n_pos - 1)
    if not source.pos < target.pos:
        raise CltraceError(
            f"head loadings are for edges across positions: the source (position {source.pos}) must come "
            f"before the target (position {target.pos})"
        )
    sites = sites or AttentionSites(replacement, run)
    live_skip = getattr(replacement.transcoder, "W_skip", None) is not None
    values = _staying_values(replacement, run, sites, source, live_skip)
    grads = _output_gradients(replacement, run, sites, target, live_skip)
    p, group = source.pos, sites.n_heads // sites.n_kv_heads
    loadings = torch.zeros(len(sites.layers), sites.n_heads)
    for layer in range(len(sites.layers)):
        moved = run.freeze_state.patterns[sites.attention(layer)][0, :, :, p].float().clone()  # [head, r]
        moved[:, p] = 0.0  # staying at p is not a move
        weighted = torch.einsum("hr,rhd->hd", moved, grads[layer])  # [head, d_head]
        value = values[layer].repeat_interleave(group, dim=0)  # [head, d_head]
        loadings[layer] = (weighted * value).sum(-1)
    return HeadLoadings(source, target, loadings)


def graph_node(graph: Graph, index: int) -> NodeRef:
    """The NodeRef of node `index` of a graph."""
    nodes = graph.nodes
    kind = NodeKind(int(nodes.kind[index]))
    sorts: dict[NodeKind, NodeSort] = {NodeKind.FEATURE: "feature", NodeKind.ERROR: "error",
                                       NodeKind.EMBEDDING: "embedding", NodeKind.LOGIT: "logit"}
    sort = sorts[kind]
    return NodeRef(sort, int(nodes.layer[index]), int(nodes.pos[index]), int(nodes.feature[index]),
                   int(nodes.token[index]))
