"""Global weights: the prompt-independent virtual weights between a transcoder's features.

A feature s of layer l writes its decoder vectors into the MLP outputs of layers l.. (a CLT) or l
(a PLT); a feature t of layer l' > l reads resid_mid of l' through its encoder row. Along the
residual stream alone (no attention, no MLP in between) s reaches t with the virtual weight

    V(s, t) = (Σ_{j = l}^{l'−1} W_dec[s → j]) · W_enc[t]

(the transcoder reads resid_mid unnormalised, so no norm is folded in). Most large virtual weights
join features that never fire together; the target-weighted variant multiplies V(s, t) by the mean
activation of s over the tokens where t fires (0 where they never do), from a pass over text.

Both are kept sparsely, top-k per feature by |weight| in each direction (a feature's strongest
downstream targets and its strongest upstream sources), and stored in the feature store's table
``global_weights`` (created here; the store's other tables are not touched).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cltrace.errors import CltraceError
from cltrace.features.database import connect, read_meta
from cltrace.fingerprint import transcoder_fingerprint
from cltrace.transcoder import Transcoder

KINDS = ("virtual", "target_weighted")
DIRECTIONS = ("down", "up")
TABLE = """CREATE TABLE IF NOT EXISTS global_weights (
    kind TEXT NOT NULL, direction TEXT NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    rank INTEGER NOT NULL, other_layer INTEGER NOT NULL, other_feature INTEGER NOT NULL, weight REAL NOT NULL,
    PRIMARY KEY (kind, direction, layer, feature, rank)
) WITHOUT ROWID"""


@dataclass
class TopK:
    """Per feature, its k partners of largest |weight| (strongest first; layer −1 pads a short list)."""

    layer: torch.Tensor  # [L, F, k] int64
    feature: torch.Tensor  # [L, F, k] int64
    weight: torch.Tensor  # [L, F, k] float32

    @classmethod
    def empty(cls, n_layers: int, n_features: int, k: int) -> TopK:
        shape = (n_layers, n_features, k)
        return cls(torch.full(shape, -1), torch.full(shape, -1), torch.zeros(shape))

    def merge(self, layer: int, cand_layer: torch.Tensor, cand_feature: torch.Tensor, cand_weight: torch.Tensor) -> None:
        """Fold candidates [F, c] for the features of `layer` into their top k (a zero weight is no partner)."""
        k = self.weight.shape[-1]
        cand_layer = torch.where(cand_weight != 0, cand_layer, torch.full_like(cand_layer, -1))
        lay = torch.cat([self.layer[layer], cand_layer], 1)  # [F, k + c]
        feat = torch.cat([self.feature[layer], cand_feature], 1)
        w = torch.cat([self.weight[layer], cand_weight], 1)
        score = torch.where(lay >= 0, w.abs(), torch.full_like(w, -1.0))  # padding never beats a partner
        order = score.topk(min(k, w.shape[1]), dim=1).indices  # [F, k]
        lay, feat, w = lay.gather(1, order), feat.gather(1, order), w.gather(1, order)
        none = lay < 0
        self.layer[layer], self.feature[layer] = lay, feat.masked_fill(none, -1)
        self.weight[layer] = w.masked_fill(none, 0.0)


@dataclass
class CoActivation:
    """How features fire together: per target t, how often it fires and the summed activation of
    every feature over the tokens where t fires."""

    count: torch.Tensor  # [L·F] tokens on which each feature fired
    sums: torch.Tensor  # [L·F source, L·F target] Σ over the target's firing tokens of the source's activation
    n_tokens: int = 0

    @classmethod
    def zeros(cls, n_layers: int, n_features: int, device: torch.device | str = "cpu") -> CoActivation:
        n = n_layers * n_features
        return cls(torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, n, device=device), 0)

    def add(self, acts: torch.Tensor) -> None:
        """Count a batch of tokens' activations [tokens, L, F]."""
        flat = acts.reshape(acts.shape[0], -1).float()  # [tokens, L·F]
        fired = flat != 0
        self.count += fired.sum(0).double()
        self.n_tokens += flat.shape[0]
        a = flat.to_sparse().t().coalesce()  # [L·F, tokens]
        m = fired.float().to_sparse()  # [tokens, L·F]
        with warnings.catch_warnings():  # sparse-sparse products go through CSR, which torch calls beta
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pairs = torch.sparse.mm(a, m).coalesce()  # [L·F, L·F], one entry per co-firing pair
        idx = pairs.indices()
        self.sums.view(-1).index_add_(0, idx[0] * self.sums.shape[1] + idx[1], pairs.values())

    def mean_source_when(self, sources: slice, targets: slice) -> torch.Tensor:
        """[sources, targets]: each source's mean activation over the tokens where each target fired."""
        return self.sums[sources, targets] / self.count[targets].clamp_min(1).float()


@dataclass
class GlobalWeights:
    """Top-k virtual weights per feature, downstream and upstream; the target-weighted ones if computed."""

    top: dict[tuple[str, str], TopK]  # (kind, direction) -> TopK
    n_tokens: int = 0  # tokens the co-activation statistics came from (0: none)


def _decoder_prefix_sums(tc: Transcoder, layer: int) -> torch.Tensor:
    """[F, L − layer − 1, d]: slice t − layer − 1 holds each feature's decoders into layers layer..t−1 summed."""
    out = tc.output_layers(layer)
    every = torch.arange(tc.n_features, device=tc.W_enc.device)
    dec = tc.decoder_vectors(layer, every).float().cumsum(1)  # [F, n_out, d]
    last = torch.tensor([min(t - 1, out.stop - 1) - out.start for t in range(layer + 1, tc.n_layers)], dtype=torch.long)
    return dec[:, last.to(dec.device)]


@torch.no_grad()
def global_weights(tc: Transcoder, top_k: int = 10, coactivation: CoActivation | None = None) -> GlobalWeights:
    """Every feature's top-k virtual weights in both directions (and target-weighted ones, given
    co-activation statistics), from one [F, F] product per (source layer, target layer) pair."""
    if top_k < 1:
        raise CltraceError(f"top_k must be at least 1, got {top_k}")
    L, F = tc.n_layers, tc.n_features
    kinds = KINDS if coactivation is not None else KINDS[:1]
    top = {(kind, d): TopK.empty(L, F, top_k) for kind in kinds for d in DIRECTIONS}
    enc = tc.W_enc.detach().float()  # [L, F, d]
    for s in range(L - 1):
        prefix = _decoder_prefix_sums(tc, s)  # [F, L − s − 1, d]
        blocks: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        for t in range(s + 1, L):
            v = prefix[:, t - s - 1] @ enc[t].T  # [F source, F target]
            weights = {"virtual": v}
            if coactivation is not None:
                weights["target_weighted"] = v * coactivation.mean_source_when(
                    slice(s * F, (s + 1) * F), slice(t * F, (t + 1) * F)
                ).to(v)
            for kind, w in weights.items():
                blocks[kind].append(w)
                k = min(top_k, F)
                up = w.abs().topk(k, dim=0).indices.T  # [F target, k]
                top[kind, "up"].merge(t, torch.full_like(up, s), up, w.T.gather(1, up))
        for kind in kinds:
            row = torch.cat(blocks[kind], dim=1)  # [F, (L − s − 1)·F]
            k = min(top_k, row.shape[1])
            idx = row.abs().topk(k, dim=1).indices  # [F, k]
            top[kind, "down"].merge(s, s + 1 + idx // F, idx % F, row.gather(1, idx))
    return GlobalWeights(top, 0 if coactivation is None else coactivation.n_tokens)


def gather_coactivation(tc: Transcoder, batches: Iterable[torch.Tensor], harvester: Any, n_tokens: int) -> CoActivation:
    """Co-activation statistics over token batches [batch, n_ctx] (BOS first), run through `harvester`
    (a `cltrace.data.harvest.Harvester`: resid_mid of every non-BOS position) and the transcoder's
    encoder, until `n_tokens` tokens are counted. The counts live on the transcoder's device."""
    device = tc.W_enc.device
    stats = CoActivation.zeros(tc.n_layers, tc.n_features, device)
    for tokens in batches:
        x = harvester.harvest(tokens).x  # [tokens, L, d]
        with torch.no_grad():
            stats.add(tc.encode(x.to(device))[: n_tokens - stats.n_tokens])
        if stats.n_tokens >= n_tokens:
            break
    if stats.n_tokens == 0:
        raise CltraceError("the text gave no tokens for co-activation statistics: give a longer source")
    return stats


def check_store(db: str | Path, tc: Transcoder) -> None:
    """Raise a one-line CltraceError unless `db` is a feature store built for `tc`."""
    path = Path(db)
    if not path.is_file():
        raise CltraceError(f"no feature store at {path}: build one with `cltrace features build` first")
    conn = connect(path, wal=False)
    try:
        fingerprint = read_meta(conn).get("fingerprint")
    finally:
        conn.close()
    if fingerprint not in (None, transcoder_fingerprint(tc)):
        raise CltraceError(f"the feature store {path} belongs to another transcoder: give this transcoder's store")


def write_global_weights(db: str | Path, tc: Transcoder, weights: GlobalWeights) -> int:
    """Store the weights in the feature store `db` (built for `tc`), replacing any earlier ones; returns the row count."""
    check_store(db, tc)
    conn = connect(Path(db))
    try:
        rows = []
        for (kind, direction), top in weights.top.items():
            L, F, k = top.weight.shape
            lay, feat, w = top.layer.tolist(), top.feature.tolist(), top.weight.tolist()
            for layer in range(L):
                for f in range(F):
                    rows += [
                        (kind, direction, layer, f, r, lay[layer][f][r], feat[layer][f][r], w[layer][f][r])
                        for r in range(k) if lay[layer][f][r] >= 0
                    ]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(TABLE)
        conn.execute("DELETE FROM global_weights")
        conn.executemany("INSERT INTO global_weights VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        info = {"n_tokens": weights.n_tokens, "kinds": sorted({kind for kind, _ in weights.top}), "written": time.time()}
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('global_weights', ?)", (json.dumps(info),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return len(rows)


def read_global_weights(db: str | Path, layer: int, feature: int, k: int = 10) -> dict[str, list[dict[str, Any]]]:
    """A feature's stored global weights, each partner with its label (a person's, else the automatic
    one): {"virtual_down": [{layer, feature, weight, label}, …], …}; {} if none are stored."""
    conn = connect(Path(db), wal=False)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'global_weights'").fetchone() is None:
            return {}
        out: dict[str, list[dict[str, Any]]] = {}
        rows = conn.execute(
            "SELECT g.kind, g.direction, g.other_layer, g.other_feature, g.weight, "
            "COALESCE(l.label, f.auto_label, '') FROM global_weights g "
            "LEFT JOIN labels l ON l.layer = g.other_layer AND l.feature = g.other_feature "
            "LEFT JOIN features f ON f.layer = g.other_layer AND f.feature = g.other_feature "
            "WHERE g.layer = ? AND g.feature = ? AND g.rank < ? ORDER BY g.kind, g.direction, g.rank",
            (layer, feature, k),
        )
        for kind, direction, other_layer, other_feature, weight, label in rows:
            out.setdefault(f"{kind}_{direction}", []).append(
                {"layer": other_layer, "feature": other_feature, "weight": weight, "label": label}
            )
        return out
    finally:
        conn.close()


def format_global_weights(weights: dict[str, list[dict[str, Any]]], k: int = 5) -> str:
    """The section of a feature's page listing its strongest inputs and outputs by global weight."""
    titles = {
        "virtual_up": "inputs (virtual weight)", "virtual_down": "outputs (virtual weight)",
        "target_weighted_up": "inputs (target-weighted)", "target_weighted_down": "outputs (target-weighted)",
    }
    lines = ["  global weights:"]
    for key, title in titles.items():
        if key in weights:
            cells = [f"{p['layer']}:{p['feature']} {p['weight']:+.3f}" + (f" ({p['label']})" if p["label"] else "")
                     for p in weights[key][:k]]
            lines.append(f"    {title}: " + ("; ".join(cells) or "-"))
    return "\n".join(lines)
