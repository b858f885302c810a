"""QK attribution: why a head attends where it does, as a sum over pairs of nodes.

With the prompt's norm denominators frozen, head h of layer l scores key position k from query
position q as

    score(q, k) = scaling · (A_q x_q + a_q) · (B_k x_k + b_k)

where x_q, x_k are the residual streams entering layer l and A, a (B, b) the linear and constant
parts of the query (key) map: input norm, projection, QK-norm, rotary embedding (`qk_sites`). Each
residual stream is a sum of nodes, every one a vector at one position: the token embedding (and
GPT-2's position embedding), each active feature's decoder output summed over the layers below l,
each lower layer's error vector and attention-block output, the transcoder's decoder biases, a
PLT's skip outputs. So the score splits exactly into one term per (query node, key node) pair, the
projection constants a_q and b_k counted as one more node on each side. Soft-capping (Gemma) acts
after this sum: the decomposition is of the score before the cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cltrace.errors import CltraceError
from cltrace.graph.qk_sites import AttentionSites, Side
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun

#: Node kinds of a residual-stream expansion.
NODE_KINDS = ("embedding", "position", "feature", "error", "attention", "skip", "decoder_bias", "constant")


@dataclass
class ResidualNodes:
    """The residual stream entering one layer at one position, as a list of nodes (parallel columns)."""

    pos: int
    kind: list[str]
    layer: torch.Tensor  # [node] int64: the node's layer (-1 for embeddings and constants)
    feature: torch.Tensor  # [node] int64: feature index, -1 for other kinds
    activation: torch.Tensor  # [node] the feature's activation, 0 for other kinds
    vectors: torch.Tensor  # [node, d] residual-stream vectors, or head-space ones once mapped

    def __len__(self) -> int:
        return len(self.kind)

    def label(self, i: int) -> dict[str, Any]:
        """A JSON-ready description of node i."""
        out: dict[str, Any] = {"kind": self.kind[i], "layer": int(self.layer[i]), "pos": self.pos}
        if self.kind[i] == "feature":
            out["feature"] = int(self.feature[i])
            out["activation"] = float(self.activation[i])
        return out


def _nodes(pos: int, parts: list[tuple[str, int, int, float, torch.Tensor]]) -> ResidualNodes:
    return ResidualNodes(
        pos,
        [p[0] for p in parts],
        torch.tensor([p[1] for p in parts], dtype=torch.long),
        torch.tensor([p[2] for p in parts], dtype=torch.long),
        torch.tensor([p[3] for p in parts], dtype=torch.float32),
        torch.stack([p[4] for p in parts]) if parts else torch.zeros(0, 0),
    )


def residual_nodes(sites: AttentionSites, replacement: ReplacementModel, layer: int, pos: int) -> ResidualNodes:
    """The residual stream entering `layer` at `pos` as its nodes; their vectors sum to it exactly."""
    run, tc = sites.run, replacement.transcoder
    parts: list[tuple[str, int, int, float, torch.Tensor]] = []
    embedding = sites.resid_pre[pos, 0]  # [d]
    position = sites.position_term()
    if position is not None:
        parts.append(("position", -1, -1, 0.0, position[pos]))
        embedding = embedding - position[pos]
    parts.append(("embedding", -1, -1, 0.0, embedding))
    for j in range(layer):
        parts.append(("attention", j, -1, 0.0, (run.resid_mid[pos, j].float() - sites.resid_pre[pos, j])))
        parts.append(("error", j, -1, 0.0, run.error[pos, j].float()))
    skip = getattr(tc, "W_skip", None)
    if skip is not None:
        for j in range(layer):
            parts.append(("skip", j, -1, 0.0, (run.resid_mid[pos, j].to(skip.dtype) @ skip[j]).float()))
    if layer > 0:
        parts.append(("decoder_bias", -1, -1, 0.0, tc.b_dec[:layer].float().sum(0)))
    nodes = _nodes(pos, parts)
    feats = _feature_nodes(sites, replacement, layer, pos)
    return _concat(nodes, feats)


@torch.no_grad()
def decoder_sums(sites: AttentionSites, replacement: ReplacementModel, layer: int) -> torch.Tensor:
    """[layer, F, d]: for each source layer i < `layer`, every feature's decoders into layers
    i..layer−1 summed. Computed once per layer and run, kept in `sites.memo`."""
    key = ("decoder_sums", layer)
    if key not in sites.memo:
        tc = replacement.transcoder
        every = torch.arange(tc.n_features, device=tc.W_enc.device)
        sums = torch.zeros(layer, tc.n_features, tc.d_model)
        for i in range(layer):
            out = tc.output_layers(i)  # starts at i: a feature writes its own layer first
            sums[i] = tc.decoder_vectors(i, every)[:, : min(out.stop, layer) - out.start].float().sum(1).cpu()
        sites.memo[key] = sums
    return sites.memo[key]


@torch.no_grad()
def _feature_nodes(sites: AttentionSites, replacement: ReplacementModel, layer: int, pos: int) -> ResidualNodes:
    """Active features of the layers below `layer` at `pos`, each with its decoders into those layers summed."""
    sums = decoder_sums(sites, replacement, layer)  # [layer, F, d]
    acts = sites.run.activations[pos, :layer].float().cpu()  # [layer, F]
    layers, features = acts.nonzero(as_tuple=True)  # [n] each, layer-major
    value = acts[layers, features]  # [n]
    return ResidualNodes(pos, ["feature"] * int(layers.numel()), layers, features, value,
                         sums[layers, features] * value[:, None])


def _concat(a: ResidualNodes, b: ResidualNodes) -> ResidualNodes:
    if len(b) == 0:
        return a
    return ResidualNodes(a.pos, a.kind + b.kind, torch.cat([a.layer, b.layer]), torch.cat([a.feature, b.feature]),
                         torch.cat([a.activation, b.activation]), torch.cat([a.vectors, b.vectors.to(a.vectors)]))


def head_nodes(
    sites: AttentionSites, replacement: ReplacementModel, layer: int, head: int, side: Side, pos: int
) -> ResidualNodes:
    """The nodes of the residual at `pos` mapped into the head's query (or key) space, plus the
    projection constant as a last node: their vectors [node, d_head] sum to the head's query (key)."""
    nodes = residual_nodes(sites, replacement, layer, pos)
    mapped = sites.head_vectors(layer, side, head, pos, nodes.vectors)  # [node, d_head]
    const = sites.head_constant(layer, side, head, pos)  # [d_head]
    return ResidualNodes(
        pos, [*nodes.kind, "constant"], torch.cat([nodes.layer, torch.tensor([-1])]),
        torch.cat([nodes.feature, torch.tensor([-1])]), torch.cat([nodes.activation, torch.zeros(1)]),
        torch.cat([mapped, const[None]]),
    )


@dataclass
class KeyPairs:
    """The pair decomposition of one (query, key) score."""

    key_pos: int
    score: float  # the sum of all pairs: the pre-softmax score before any soft-capping
    weight: float  # the attention weight the prompt gave this key (the frozen pattern)
    key_nodes: ResidualNodes
    pairs: torch.Tensor  # [query node, key node]


@dataclass
class QKAttribution:
    """Why head `head` of `layer` at query position `query_pos` attends where it does."""

    layer: int
    head: int
    query_pos: int
    scores: torch.Tensor  # [key pos] pre-softmax scores to every key position ≤ query_pos (before soft-capping)
    pattern: torch.Tensor  # [key pos] the frozen attention weights
    query_nodes: ResidualNodes
    keys: list[KeyPairs] = field(default_factory=list)
    softcap: float | None = None

    def top_pairs(self, key: KeyPairs, k: int = 10) -> list[dict[str, Any]]:
        """The k pairs of largest magnitude of one key position, as JSON-ready dicts."""
        flat = key.pairs.flatten()
        order = flat.abs().argsort(descending=True)[:k]
        n_k = key.pairs.shape[1]
        return [
            {"query": self.query_nodes.label(int(i) // n_k), "key": key.key_nodes.label(int(i) % n_k),
             "value": float(flat[i])}
            for i in order
        ]

    def to_json(self, k: int = 10) -> dict[str, Any]:
        """The scores, the pattern and each decomposed key position's top pairs."""
        return {
            "layer": self.layer, "head": self.head, "query_pos": self.query_pos, "softcap": self.softcap,
            "scores": self.scores.tolist(), "pattern": self.pattern.tolist(),
            "keys": [
                {"key_pos": key.key_pos, "score": key.score, "weight": key.weight, "pairs": self.top_pairs(key, k)}
                for key in self.keys
            ],
        }


def _check(sites: AttentionSites, layer: int, head: int, query_pos: int) -> None:
    n_layers, n_pos = sites.resid_pre.shape[1], sites.resid_pre.shape[0]
    if not 0 <= layer < n_layers:
        raise CltraceError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    if not 0 <= head < sites.n_heads:
        raise CltraceError(f"head {head} is out of range: layer {layer} has heads 0..{sites.n_heads - 1}")
    if not 0 <= query_pos < n_pos:
        raise CltraceError(f"query position {query_pos} is out of range: the prompt has positions 0..{n_pos - 1}")


@torch.no_grad()
def qk_attribution(
    replacement: ReplacementModel,
    run: ReplacementRun,
    layer: int,
    head: int,
    query_pos: int,
    key_positions: list[int] | None = None,
    n_keys: int = 5,
    sites: AttentionSites | None = None,
) -> QKAttribution:
    """Decompose head `head`'s scores at `query_pos` into (query node, key node) pairs.

    Scores to every key position ≤ `query_pos` come from the whole query and key vectors; the pair
    decomposition is computed for `key_positions`, by default the `n_keys` the head attends to most.
    `sites` (from an earlier call on the same run) spares the capture pass.
    """
    sites = sites or AttentionSites(replacement, run)
    _check(sites, layer, head, query_pos)
    scaling = sites.scaling(layer)
    query = head_nodes(sites, replacement, layer, head, "query", query_pos)
    q_vec = query.vectors.sum(0)  # [d_head]
    keys_resid = sites.resid_pre[: query_pos + 1, layer]  # [key pos, d_model]
    positions = torch.arange(query_pos + 1, device=keys_resid.device)
    k_vecs = sites.head_vectors(layer, "key", head, positions, keys_resid) + sites.head_constant(
        layer, "key", head, positions
    )  # [key pos, d_head]
    scores = scaling * (k_vecs @ q_vec)  # [key pos]
    pattern_module = sites.attention(layer)
    pattern = run.freeze_state.patterns[pattern_module][0, head, query_pos, : query_pos + 1].float().cpu()
    if key_positions is None:
        key_positions = pattern.argsort(descending=True)[: min(n_keys, query_pos + 1)].tolist()
    bad = [k for k in key_positions if not 0 <= k <= query_pos]
    if bad:
        raise CltraceError(f"key position {bad[0]} is not in 0..{query_pos}: a query attends to itself and earlier positions")
    keys = []
    for k in key_positions:
        key = head_nodes(sites, replacement, layer, head, "key", k)
        pairs = scaling * (query.vectors @ key.vectors.T)  # [query node, key node]
        keys.append(KeyPairs(k, float(pairs.sum()), float(pattern[k]), key, pairs.cpu()))
    return QKAttribution(layer, head, query_pos, scores.cpu(), pattern, query, keys, sites.softcap(layer))
