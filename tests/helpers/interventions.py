"""Interventions' test cases: tiny models with random transcoders whose features matter, the active
features of a run, and a small hand-made attribution graph."""

from __future__ import annotations

import functools

import torch

from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig
from helpers.models import tiny_model


def random_transcoder(model, kind: str, seed: int = 0, activation: str = "jumprelu") -> Transcoder:
    """A random transcoder with non-zero biases, varied thresholds and decoders large enough to matter;
    a PLT gets a skip path."""
    cfg = TranscoderConfig(
        kind=kind, n_layers=model.n_layers, d_model=model.d_model, n_features=24, activation=activation,
        skip=kind == "plt", topk_k=6 if activation == "topk" else None,
    )
    tc = Transcoder.random(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tc.b_enc.copy_(0.1 * torch.randn(tc.b_enc.shape, generator=g))
        tc.b_dec.copy_(0.1 * torch.randn(tc.b_dec.shape, generator=g))
        if activation == "jumprelu":
            tc.activation.threshold.copy_(0.05 * torch.rand(tc.activation.threshold.shape, generator=g))
        for w in tc._decoder_parameters():
            w.mul_(4.0)
        if getattr(tc, "W_skip", None) is not None:
            tc.W_skip.copy_(0.05 * torch.randn(tc.W_skip.shape, generator=g))
    return tc


@functools.cache
def case(family: str, kind: str) -> ReplacementModel:
    model = tiny_model(family)
    return ReplacementModel(model, random_transcoder(model, kind))


def active_features(run, k: int = 3, min_layer: int = 0) -> list[tuple[int, int, int]]:
    """k active (layer, feature, pos) away from position 0, spread over layers and positions."""
    acts = run.activations.clone()
    acts[0] = 0
    acts[:, :min_layer] = 0
    pos, layer, feat = (acts > 0).nonzero(as_tuple=True)
    picks = torch.linspace(0, pos.numel() - 1, k).round().long()
    return [(int(layer[i]), int(feat[i]), int(pos[i])) for i in picks]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def hand_graph() -> Graph:
    """features a (L0 #3 @1, act 2.0), b (L1 #5 @1, act 0.5); error; embedding; logits for tokens 7, 9."""
    F, E, T, Lg = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT
    nodes = NodeTable.from_columns(
        kind=[F, F, E, T, T, Lg, Lg], layer=[0, 1, 0, -1, -1, 2, 2], pos=[1, 1, 1, 0, 1, 1, 1],
        feature=[3, 5, -1, -1, -1, -1, -1], token=[-1, -1, -1, 10, 11, 7, 9],
        activation=[2.0, 0.5, 0, 0, 0, 0, 0], probability=[0, 0, 0, 0, 0, 0.6, 0.4],
    )
    edges = [(4, 0, 2.0), (0, 1, 3.0), (2, 1, -0.5), (1, 5, 2.0), (0, 5, 0.5), (1, 6, 1.0), (0, 6, -4.0)]
    return Graph.from_edges(nodes, edges, {"n_layers": 2})
