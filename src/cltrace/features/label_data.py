"""What the labeller reads from a feature store: every feature's examples in bulk (checked against
their seals), the contexts as pattern sites, and the split of each feature's examples into a
training half (labels come from it) and a held-out half (labels are scored on it), by context."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cltrace.features.database import EXAMPLE_COLUMNS, _rows_digest
from cltrace.features.patterns import Sites, Vocab, context_sites
from cltrace.fingerprint import sha256_hex

MASK32 = 0xFFFFFFFF
#: The last vocabulary's attributes, by the digest of its texts.
_VOCABS: dict[str, Vocab] = {}


@dataclass
class Window:
    """One example: the marked position and the activations of its window of tokens."""

    kind: str
    ctx_id: int
    pos: int
    act: float
    acts: np.ndarray  # [W] activations at positions pos - window_before .. pos + window_after


@dataclass
class FeatureExamples:
    """A feature's row of the store and its examples."""

    layer: int
    feature: int
    count: int
    density: float
    max_act: float
    windows: list[Window] = field(default_factory=list)
    hist: list[int] = field(default_factory=list)
    """Its activation histogram (see `BuildParams.hist_edges`)."""

    def share_above(self, threshold: float, edges: list[float]) -> float:
        """The share of its activations at or above `threshold`, from the histogram (within the bin
        the threshold falls in, spread evenly in log scale, as the bins are)."""
        if threshold <= 0:
            return 1.0
        if not self.count or not self.hist:
            return 0.0
        above = 0.0
        for j, c in enumerate(self.hist[1:], start=1):  # bin j >= 1 holds [edges[j-1], edges[j]); bin 0 what is below
            lo, hi = edges[j - 1], edges[j] if j < len(edges) else math.inf
            if lo >= threshold:
                above += c
            elif hi > threshold:
                above += c * (math.log(hi / threshold) / math.log(hi / lo) if math.isfinite(hi) else 1.0)
        return min(above / self.count, 1.0)


@dataclass
class Half:
    """Tokens of one half of a feature's example windows: active ones, inactive ones, and the examples."""

    pos: Sites
    near: Sites
    windows: list[Window]


class StoreText:
    """The store's vocabulary and contexts, as pattern sites (each context's computed once)."""

    def __init__(self, store: Any) -> None:
        conn = store.conn
        texts = [t for (t,) in conn.execute("SELECT text FROM vocab ORDER BY token_id")]
        key = sha256_hex("\x00".join(texts))
        if key not in _VOCABS:  # its token classes take seconds for a large vocabulary
            _VOCABS.clear()
            _VOCABS[key] = Vocab(texts)
        self.vocab = _VOCABS[key]
        params = store.meta["params"]
        self.before, self.after = int(params["window_before"]), int(params["window_after"])
        self.first_position = int(params.get("first_position", 1))
        self.excluded = np.asarray(params.get("exclude_tokens", []), dtype=np.int64)
        self.contexts = {
            int(c): np.frombuffer(b, dtype="<i4").astype(np.int64)
            for c, b in conn.execute("SELECT ctx_id, tokens FROM contexts")
        }
        self._sites: dict[int, Sites] = {}

    def sites(self, ctx_id: int) -> Sites:
        if ctx_id not in self._sites:
            self._sites[ctx_id] = context_sites(self.vocab, self.contexts[ctx_id][None])
        return self._sites[ctx_id]

    def analysed(self, tokens: np.ndarray) -> np.ndarray:
        """[T] bool: the positions of a context that a build analyses."""
        keep = np.arange(len(tokens)) >= max(self.first_position, 1)
        return keep & ~np.isin(tokens, self.excluded)

    def random_sites(self, n_tokens: int, seed: int = 0) -> tuple[Sites, np.ndarray]:
        """Sites of about `n_tokens` analysed tokens of randomly chosen contexts, and their token ids."""
        ids = sorted(self.contexts)
        order = np.random.default_rng(seed).permutation(len(ids))
        parts, tokens, total = [], [], 0
        for i in order:
            toks = self.contexts[ids[i]]
            keep = np.nonzero(self.analysed(toks))[0]
            parts.append(self.sites(ids[i]).take(keep))
            tokens.append(toks[keep])
            total += len(keep)
            if total >= n_tokens:
                break
        return Sites.concat(parts), np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)


def in_training_half(ctx_id: int, seed: int) -> bool:
    """Whether context `ctx_id` is in the half that labels are derived from (a fixed hash of the id)."""
    x = ((ctx_id + 1) * 0x9E3779B1 + seed * 0x85EBCA6B) & MASK32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & MASK32
    x ^= x >> 12
    return bool(x & 1)


def iter_examples(store: Any, keys: Iterable[tuple[int, int]] | None = None) -> Iterator[FeatureExamples]:
    """Every feature of the store (or those of `keys`, in order) with its examples; a feature whose
    examples do not match their seal raises the store's one-line damage error."""
    conn = store.conn
    wanted = None if keys is None else sorted(set(keys))
    if wanted is None:
        rows = conn.execute("SELECT layer, feature, count, density, max_act, hist FROM features ORDER BY layer, feature")
        feats = [tuple(r) for r in rows]
    else:
        feats = []
        for l, f in wanted:
            r = conn.execute("SELECT layer, feature, count, density, max_act, hist FROM features WHERE layer=? AND feature=?",
                             (l, f)).fetchone()
            if r is not None:
                feats.append(tuple(r))
    seals = dict(((l, f), s) for l, f, s in conn.execute("SELECT layer, feature, sha256 FROM example_seals"))
    for layer, feature, count, density, max_act, hist in feats:
        rows = conn.execute(
            f"SELECT {EXAMPLE_COLUMNS} FROM examples WHERE layer=? AND feature=? ORDER BY kind, rank", (layer, feature)
        ).fetchall()
        if store._sealed and seals.get((layer, feature)) != _rows_digest(rows, True):
            raise store._damaged(f"the examples of feature {layer}:{feature} do not match their seal")
        windows = [Window(k, int(c), int(p), float(a), np.frombuffer(w, dtype="<f2").astype(np.float32))
                   for _, _, k, _, c, p, a, w in rows]
        yield FeatureExamples(int(layer), int(feature), int(count), float(density), float(max_act), windows,
                              [int(c) for c in json.loads(hist)])


def split_halves(ex: FeatureExamples, text: StoreText, seed: int, threshold: float = 0.0) -> tuple[Half, Half]:
    """(training half, held-out half) of a feature's example windows, split by context. Every
    analysed token of a window counts once per half: active (act above 0 and at least `threshold`),
    inactive (act 0), or, in between, neither. A feature whose examples all fall in one half is
    trained on it and leaves the held-out half empty."""
    train = [w for w in ex.windows if in_training_half(w.ctx_id, seed)]
    held = [w for w in ex.windows if not in_training_half(w.ctx_id, seed)]
    if not train:
        train, held = held, []
    return _half(train, text, threshold), _half(held, text, threshold)


def _half(windows: list[Window], text: StoreText, threshold: float) -> Half:
    ctx_parts, q_parts, a_parts = [], [], []
    for w in windows:
        toks = text.contexts[w.ctx_id]
        q = w.pos - text.before + np.arange(len(w.acts))  # [W] positions in the context
        inside = (q >= 0) & (q < len(toks))
        inside[inside] &= text.analysed(toks)[q[inside]]
        ctx_parts.append(np.full(int(inside.sum()), w.ctx_id))
        q_parts.append(q[inside])
        a_parts.append(w.acts[inside])
    if not ctx_parts:
        return Half(Sites.concat([]), Sites.concat([]), windows)
    ctx, q, a = np.concatenate(ctx_parts), np.concatenate(q_parts), np.concatenate(a_parts)
    order = np.lexsort((-a, q, ctx))  # each token once: its largest activation first
    ctx, q, a = ctx[order], q[order], a[order]
    first = np.ones(len(ctx), dtype=bool)
    first[1:] = (ctx[1:] != ctx[:-1]) | (q[1:] != q[:-1])
    ctx, q, a = ctx[first], q[first], a[first]
    pos_parts, near_parts = [], []
    for c in np.unique(ctx).tolist():
        at = ctx == c
        sites = text.sites(c)
        pos_parts.append(sites.take(q[at & (a > 0) & (a >= threshold)]))
        near_parts.append(sites.take(q[at & (a <= 0)]))
    return Half(Sites.concat(pos_parts), Sites.concat(near_parts), windows)


def next_token_lift(windows: list[Window], text: StoreText, base_counts: np.ndarray, n: int = 5,
                    min_share: float = 0.1, min_lift: float = 2.0) -> list[dict[str, Any]]:
    """The tokens that follow a feature's strongest activations in data: each token's share of the
    examples' activation-weighted next tokens, against its base rate among random tokens `base_counts`
    [V] (add-one smoothed); tokens with at least `min_share` and `min_lift`, best share first."""
    weights: dict[int, float] = {}
    for w in windows:
        toks = text.contexts[w.ctx_id]
        if w.kind == "top" and w.pos + 1 < len(toks) and w.act > 0:
            t = int(toks[w.pos + 1])
            weights[t] = weights.get(t, 0.0) + w.act
    total = sum(weights.values())
    if total <= 0:
        return []
    base_total = float(base_counts.sum()) + len(base_counts)
    out = []
    for t, wt in sorted(weights.items(), key=lambda kv: -kv[1]):
        share = wt / total
        lift = share / ((float(base_counts[t]) + 1.0) / base_total)
        if share >= min_share and lift >= min_lift:
            out.append({"token": t, "text": text.vocab.texts[t], "share": round(share, 4), "lift": round(lift, 2)})
    return out[:n]


class _NoBar:
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def progress_bar(enabled: bool, total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr, or one that shows nothing."""
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, desc=desc)


__all__ = ["FeatureExamples", "Half", "StoreText", "Window", "in_training_half", "iter_examples", "next_token_lift",
           "progress_bar", "split_halves"]
