"""The held-out passes: run the model and the transcoder over contexts the feature store never
saw. The even contexts are text labels may be chosen on (`selection_pass`: where each feature is
active); the odd ones are the test (`heldout_counts`: for every feature at once, how often its
chosen pattern matches where it is active and where it is not, and the held-out places where it
fires most, the steering sites).

The contexts come from the store's own text source, packed as the store packs them, starting where
the store's build stopped (its saved data position), so none of them is one the store analysed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cltrace.data.harvest import Harvester
from cltrace.data.packing import PackPosition, model_packing, pack_batches
from cltrace.errors import CltraceError
from cltrace.features.build import _describe_source
from cltrace.features.label_data import progress_bar
from cltrace.features.patterns import Atom, Pattern, Sites, Vocab, atom_matches, context_sites

log = logging.getLogger(__name__)

_NEVER: Atom = ("ctx", "never", None)
_ALWAYS: Atom = ("ctx", "always", None)


@dataclass
class HeldoutCounts:
    """Per feature [L, F]: tokens where it is active (at or above its threshold) and where its pattern
    matches there too; tokens where it is inactive (0) and where its pattern matches there; the
    held-out contexts and each feature's strongest sites."""

    tokens: int
    active: np.ndarray  # [L, F]
    hits: np.ndarray  # [L, F]
    negatives: np.ndarray  # [L, F]
    false_matches: np.ndarray  # [L, F]
    contexts: np.ndarray  # [C, n_ctx] token ids, BOS first
    site_act: np.ndarray  # [L, F, k] activations of the strongest sites, descending (0: none)
    site_gid: np.ndarray  # [L, F, k] their flat index ctx * n_ctx + pos (-1: none)
    start: dict[str, Any] | None = None
    """The data position the held-out contexts start at (None: the source's start)."""


class _Compiled:
    """Every feature's pattern as indices into one list of distinct atoms (two per feature)."""

    def __init__(self, patterns: dict[tuple[int, int], Pattern | None], L: int, Fn: int) -> None:
        atoms: dict[Atom, int] = {_NEVER: 0, _ALWAYS: 1}
        self.first = np.zeros((L, Fn), dtype=np.int64)  # unknown features never match
        self.second = np.ones((L, Fn), dtype=np.int64)
        for (l, f), pattern in patterns.items():
            if not pattern:
                continue
            idx = [atoms.setdefault(a, len(atoms)) for a in pattern[:2]]
            self.first[l, f] = idx[0]
            self.second[l, f] = idx[1] if len(idx) > 1 else 1
        self.atoms = list(atoms)

    def table(self, sites: Any, vocab: Vocab) -> np.ndarray:
        """[n_atoms, N] bool: each atom on each site."""
        out = np.empty((len(self.atoms), len(sites)), dtype=bool)
        out[0], out[1] = False, True
        for i, atom in enumerate(self.atoms[2:], start=2):
            out[i] = atom_matches(atom, sites, vocab)
        return out


def heldout_stream(store: Any, loaded: Any, source: Any, n_contexts: int, batch_size: int,
                   tokenize: Any = None, bos_id: int | None = None, part: int | None = None) -> tuple[Any, Any]:
    """(batches of `n_contexts` contexts of `source` packed like the store's, the start position):
    after the store's saved position when `source` is the store's own text source. `part` 0 or 1:
    only the even or the odd contexts of the stream (up to `n_contexts` of them)."""
    params = store.meta["params"]
    tokenize, pack = model_packing(loaded, int(params["n_ctx"]), batch_size, tokenize=tokenize, bos_id=bos_id,
                                   split="train", heldout_fraction=0.0)
    saved = store.meta.get("position")
    same = _describe_source(source) == params.get("source") and pack.stream_key() == params.get("stream_key")
    start = PackPosition.from_dict(saved) if same and saved else None
    if not same:
        log.warning("held-out contexts come from a source other than the store's (%s): from its start", params.get("source"))

    def batches() -> Any:
        done = seen = 0
        try:
            for batch in pack_batches(source, tokenize, pack, start=start):
                tokens = batch.tokens  # [B, n_ctx]
                if part is not None:  # contexts of one parity, counted over the whole stream
                    tokens = tokens[(seen + torch.arange(tokens.shape[0])) % 2 == part]
                seen += batch.tokens.shape[0]
                if tokens.shape[0] == 0:
                    continue
                yield tokens[: n_contexts - done]
                done += tokens.shape[0]
                if done >= n_contexts:
                    return
        except CltraceError as exc:
            if done == 0:
                raise CltraceError(
                    f"no held-out text after the feature store's contexts ({exc}); pass a larger text source"
                ) from None
    return batches(), start


@dataclass
class _Batch:
    """One batch of held-out contexts, encoded."""

    ids: torch.Tensor  # [B, T] token ids, BOS first
    keep: torch.Tensor  # [B·(T-1)] bool: the tokens the store analyses (its first position on, excluded tokens left out)
    acts: torch.Tensor  # [B·(T-1), L, F] the transcoder's activations (BOS left out)
    sites: Sites  # [B·(T-1)] the tokens as pattern sites (BOS left out)


def _encoded(store: Any, loaded: Any, tc: Any, source: Any, vocab: Vocab, n_contexts: int, batch_size: int,
             tokenize: Any, bos_id: int | None, autocast_bf16: bool, part: int | None) -> tuple[Iterator[_Batch], Any]:
    """(the held-out contexts of `heldout_stream`, encoded batch by batch, their start position)."""
    params = store.meta["params"]
    first_position = int(params.get("first_position", 1))
    excluded = torch.tensor(params.get("exclude_tokens", []), dtype=torch.long)
    batches, start = heldout_stream(store, loaded, source, n_contexts, batch_size, tokenize, bos_id, part)
    harvester = Harvester(loaded, first_position=1, autocast_bf16=autocast_bf16)

    def encoded() -> Iterator[_Batch]:
        for ids in batches:
            B, T = ids.shape
            keep = torch.ones(B, T - 1, dtype=torch.bool)
            keep[:, : first_position - 1] = False
            keep &= ~torch.isin(ids[:, 1:], excluded)
            with torch.no_grad():
                acts = tc.encode(harvester.harvest(ids).x.to(loaded.device)).float().cpu()  # [B·(T-1), L, F]
            sites = context_sites(vocab, ids.numpy()).take(np.nonzero(np.arange(B * T) % T)[0])  # BOS left out
            yield _Batch(ids, keep.reshape(-1), acts, sites)
    return encoded(), start


@torch.no_grad()
def heldout_counts(
    store: Any, loaded: Any, tc: Any, source: Any, patterns: dict[tuple[int, int], Pattern | None], vocab: Vocab,
    thresholds: np.ndarray, n_contexts: int = 128, batch_size: int = 8, n_sites: int = 8, progress: bool = True,
    tokenize: Any = None, bos_id: int | None = None, autocast_bf16: bool = False, part: int | None = None,
) -> HeldoutCounts:
    """Run `tc` over `n_contexts` held-out contexts (`part`: of one parity, see `heldout_stream`) and
    count every feature's pattern hits (see the module docstring); a feature is active where its
    activation is above 0 and at least its threshold [L, F], inactive where it is 0."""
    L, Fn = tc.n_layers, tc.n_features
    compiled = _Compiled(patterns, L, Fn)
    batches, start = _encoded(store, loaded, tc, source, vocab, n_contexts, batch_size, tokenize, bos_id, autocast_bf16,
                              part)
    active = np.zeros((L, Fn), dtype=np.int64)
    hits, negatives, false_matches = np.zeros_like(active), np.zeros_like(active), np.zeros_like(active)
    site_act = torch.zeros(L, Fn, n_sites)
    site_gid = torch.full((L, Fn, n_sites), -1, dtype=torch.long)
    contexts: list[torch.Tensor] = []
    tokens = 0
    bar = progress_bar(progress, n_contexts, "held-out pass", "ctx")
    for batch in batches:
        ids, acts = batch.ids, batch.acts  # [B, T], [B·(T-1), L, F]
        B, T = ids.shape
        acts[~batch.keep] = 0.0
        table = compiled.table(batch.sites, vocab)  # [n_atoms, N]
        k = batch.keep.numpy()
        for l in range(L):
            a = acts[:, l].numpy().T  # [F, N]
            on = (a > 0) & (a >= thresholds[l][:, None])
            off = (a <= 0) & k
            match = table[compiled.first[l]] & table[compiled.second[l]]  # [F, N]
            active[l] += on.sum(1)
            hits[l] += (on & match).sum(1)
            negatives[l] += off.sum(1)
            false_matches[l] += (off & match).sum(1)
        offset = sum(c.shape[0] for c in contexts) * T
        gids = offset + torch.arange(B * T).view(B, T)[:, 1:].reshape(-1)  # [N] flat index in the contexts
        _merge_sites(site_act, site_gid, acts, gids)
        contexts.append(ids)
        tokens += int(batch.keep.sum())
        bar.update(B)
    bar.close()
    if not contexts:
        raise CltraceError("the held-out text source gave no contexts: pass a larger text source")
    return HeldoutCounts(tokens, active, hits, negatives, false_matches, torch.cat(contexts).numpy(), site_act.numpy(),
                         site_gid.numpy(), start.to_dict() if start else None)


@dataclass
class SelectionPass:
    """Held-out text that patterns may be chosen on: its tokens and where each feature is active."""

    sites: Sites  # [N] the analysed tokens (BOS, the first positions and excluded tokens left out)
    active: dict[tuple[int, int], np.ndarray]  # (layer, feature) -> indices into `sites`, ascending


@torch.no_grad()
def selection_pass(
    store: Any, loaded: Any, tc: Any, source: Any, vocab: Vocab, thresholds: np.ndarray, n_contexts: int = 128,
    batch_size: int = 8, progress: bool = True, tokenize: Any = None, bos_id: int | None = None,
    autocast_bf16: bool = False,
) -> SelectionPass:
    """Run `tc` over the even held-out contexts (up to `n_contexts`; `heldout_counts` tests on the odd
    ones) and keep, per feature, the tokens where it is active (above 0 and at least its threshold [L, F])."""
    Fn = tc.n_features
    floor = torch.as_tensor(thresholds, dtype=torch.float32)  # [L, F]
    batches, _ = _encoded(store, loaded, tc, source, vocab, n_contexts, batch_size, tokenize, bos_id, autocast_bf16, 0)
    parts: list[Sites] = []
    tokens, keys = [], []
    n = 0
    bar = progress_bar(progress, n_contexts, "held-out text to choose on", "ctx")
    for batch in batches:
        k = batch.keep
        acts = batch.acts[k]  # [N, L, F] the analysed tokens only
        parts.append(batch.sites.take(np.nonzero(k.numpy())[0]))
        at, layer, feature = ((acts > 0) & (acts >= floor)).nonzero(as_tuple=True)
        tokens.append(at + n)
        keys.append(layer * Fn + feature)
        n += int(k.sum())
        bar.update(batch.ids.shape[0])
    bar.close()
    if not parts:
        raise CltraceError("the held-out text source gave no contexts: pass a larger text source")
    token, key = torch.cat(tokens), torch.cat(keys)  # [E], [E]
    order = torch.argsort(key * max(n, 1) + token)  # by feature, then token
    values, counts = torch.unique_consecutive(key[order], return_counts=True)
    split = np.split(token[order].numpy(), np.cumsum(counts.numpy())[:-1])
    active = {(int(v) // Fn, int(v) % Fn): idx for v, idx in zip(values.tolist(), split)}
    return SelectionPass(Sites.concat(parts), active)


def _merge_sites(site_act: torch.Tensor, site_gid: torch.Tensor, acts: torch.Tensor, gids: torch.Tensor) -> None:
    """Fold a batch's activations acts [N, L, F] (token indices gids [N]) into the running top sites."""
    k = site_act.shape[-1]
    bv, bi = acts.permute(1, 2, 0).topk(min(k, acts.shape[0]), dim=-1)  # [L, F, k']
    both_v = torch.cat([site_act, bv], dim=-1)
    both_g = torch.cat([site_gid, torch.where(bv > 0, gids[bi], -1)], dim=-1)
    top = both_v.topk(k, dim=-1)
    site_act.copy_(top.values)
    site_gid.copy_(both_g.gather(-1, top.indices))


def heldout_scores(counts: HeldoutCounts, layer: int, feature: int) -> tuple[int, int, int, int]:
    """(active tokens, hits among them, false matches, inactive tokens) of one feature on the held-out pass."""
    at = (layer, feature)
    return int(counts.active[at]), int(counts.hits[at]), int(counts.false_matches[at]), int(counts.negatives[at])


def heldout_sites(counts: HeldoutCounts, layer: int, feature: int) -> list[tuple[int, int, float]]:
    """(context index, position, activation) of one feature's strongest held-out sites."""
    T = counts.contexts.shape[1]
    out = []
    for a, g in zip(counts.site_act[layer, feature].tolist(), counts.site_gid[layer, feature].tolist()):
        if g >= 0 and a > 0:
            out.append((int(g) // T, int(g) % T, float(a)))
    return out


__all__ = ["HeldoutCounts", "SelectionPass", "heldout_counts", "heldout_scores", "heldout_sites", "heldout_stream",
           "selection_pass"]
