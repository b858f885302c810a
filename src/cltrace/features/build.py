"""Building a feature store: run a transcoder over a corpus and keep, per feature, what its page shows.

Streaming with bounded memory. Everything kept is a fixed-size tensor on the model's device:

- top-k: per feature the k highest activations [L, F, k], their token ids and the activations of
  a window of tokens around each [L, F, k, W]. Each batch contributes its own top k per feature
  (one `topk` over [L, F, tokens]) and is merged with a stable sort: no Python per token.
- a uniform sample of each feature's nonzero activations (bottom-m sampling: every (token, feature)
  gets a pseudo-random priority frac(u_token + v_feature), fixed by the token's global index, and
  the m lowest are kept), cut into activation quantile bands when the pages are written;
- counts, activation sums and a histogram over fixed log-spaced bins.

At checkpoints the running tensors, the new contexts and the data position are committed in one
SQLite transaction (WAL), so a killed build resumes exactly where its last commit left it and a
build extended to more tokens equals one done at once. Pages (the `features` and `examples`
tables) are written from the running tensors in one transaction at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cltrace.data.harvest import FIRST_POSITION, Harvester
from cltrace.errors import CltraceError
from cltrace.fingerprint import sha256_hex, transcoder_fingerprint
from cltrace.features.store import (
    SCHEMA,
    SCHEMA_VERSION,
    Example,
    FeaturePage,
    Labeller,
    TokenLabeller,
    TokenScore,
    connect,
    read_meta,
    seal_store,
    transaction,
    write_meta,
)

log = logging.getLogger(__name__)

HIST_EDGES = [10.0 ** (-4 + j / 8) for j in range(65)]  # 8 bins per decade from 1e-4 to 1e4 (see hist_bins)
MASK32 = 0xFFFFFFFF


@dataclass
class BuildParams:
    """Settings of a build that stay fixed for the life of its database (a resume must match them)."""

    n_ctx: int = 128
    """Tokens per context, BOS included."""
    top_k: int = 20
    """Top contexts kept per feature."""
    n_bands: int = 4
    """Activation quantile bands of the sampled contexts."""
    per_band: int = 5
    """Sampled contexts per band."""
    window_before: int = 24
    """Tokens shown before the marked token."""
    window_after: int = 8
    """Tokens shown after it."""
    n_tokens_shown: int = 10
    """Promoted, suppressed and input tokens kept per feature."""
    first_position: int = FIRST_POSITION
    """First position of each context analysed (0 is BOS, never analysed). The default, the one
    training uses (`cltrace.data.harvest.FIRST_POSITION`), leaves out position 1 too: it sees no
    context, and in SmolLM2 it often carries outlier norms (e.g. 13,413 against about 160 elsewhere
    at layer 15)."""
    exclude_tokens: tuple[int, ...] = ()
    """Token ids whose positions are not analysed: by default the tokenizer's special tokens (BOS,
    EOS, the document separator), which are attention sinks with outlier norms."""
    source: str = ""
    """The text source, as described by the source."""
    stream_key: str = ""
    """The packing settings (n_ctx, BOS, separator, split)."""
    hist_edges: tuple[float, ...] = tuple(HIST_EDGES)
    """Histogram bin edges (log-spaced)."""

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after

    @property
    def n_samples(self) -> int:
        return self.n_bands * self.per_band

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hist_edges"] = list(self.hist_edges)
        d["exclude_tokens"] = list(self.exclude_tokens)
        return d


# -- static views: what a feature says and what drives it ------------------------------------------


def final_norm_weight(loaded: Any) -> torch.Tensor:
    """The elementwise weight of the model's final norm [d] (Gemma's 1 + w), ones if there is none."""
    from cltrace.data.harvest import base_transformer

    base = base_transformer(loaded)
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(base, name, None)
        weight = getattr(module, "weight", None)
        if weight is not None:
            w = weight.detach().float()
            return 1.0 + w if loaded.adapter.rms_kind == "rms_offset" else w
    return torch.ones(loaded.d_model, device=loaded.device)


def unembedding_directions(loaded: Any) -> torch.Tensor:
    """[d, V]: the directions whose product with a residual-stream vector gives its direct logit effect
    (final norm weight times the unembedding; the norm's denominator and bias left out)."""
    W_U = loaded.model.get_output_embeddings().weight.detach().float()  # [V, d]
    return final_norm_weight(loaded).to(W_U.device)[:, None] * W_U.T  # [d, V]


def summed_decoders(tc: Any, layer: int, features: torch.Tensor | None = None) -> torch.Tensor:
    """[F, d] (or [len(features), d]): each feature of `layer`'s decoder vectors summed over its output
    layers; `features` picks some of them (default: all)."""
    if features is None:
        features = torch.arange(tc.n_features, device=tc.W_enc.device)
    return tc.decoder_vectors(layer, features).detach().float().sum(1)


@torch.no_grad()
def token_views(loaded: Any, tc: Any, n: int = 10, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Per feature [L, F, n]: the promoted tokens (top of decoder · unembedding), the suppressed
    ones (bottom), and the input tokens whose embedding its encoder reads most (encoder · embedding),
    as ids and scores."""
    U = unembedding_directions(loaded)  # [d, V]
    E = loaded.model.get_input_embeddings().weight.detach().float()  # [V, d]
    L, Fn = tc.n_layers, tc.n_features
    n = min(n, U.shape[1])
    out = {k: [] for k in ("promoted_ids", "promoted", "suppressed_ids", "suppressed", "inputs_ids", "inputs")}
    for layer in range(L):
        D = summed_decoders(tc, layer).to(U.device)  # [F, d]
        W = tc.W_enc[layer].detach().float().to(E.device)  # [F, d]
        for s in range(0, Fn, chunk):
            logits = D[s : s + chunk] @ U  # [c, V]
            top = logits.topk(n, dim=-1)
            bot = logits.topk(n, dim=-1, largest=False)
            inp = (W[s : s + chunk] @ E.T).topk(n, dim=-1)  # [c, n]
            for key, res in (("promoted", top), ("suppressed", bot), ("inputs", inp)):
                out[key].append(res.values.cpu())
                out[key + "_ids"].append(res.indices.cpu())
    return {k: torch.cat(v).view(L, Fn, n) for k, v in out.items()}


# -- running state ---------------------------------------------------------------------------------

STATE_NAMES = (
    "top_val", "top_gid", "top_win", "res_score", "res_gid", "res_val", "res_win", "count", "act_sum", "hist",
)


def _init_state(L: int, Fn: int, p: BuildParams, device: torch.device) -> dict[str, torch.Tensor]:
    k, m, W, nb = p.top_k, p.n_samples, p.window, len(p.hist_edges) + 1
    ninf = float("-inf")
    return {
        "top_val": torch.full((L, Fn, k), ninf, device=device),
        "top_gid": torch.full((L, Fn, k), -1, dtype=torch.long, device=device),
        "top_win": torch.zeros(L, Fn, k, W, dtype=torch.float16, device=device),
        "res_score": torch.full((L, Fn, m), ninf, device=device),
        "res_gid": torch.full((L, Fn, m), -1, dtype=torch.long, device=device),
        "res_val": torch.zeros(L, Fn, m, device=device),
        "res_win": torch.zeros(L, Fn, m, W, dtype=torch.float16, device=device),
        "count": torch.zeros(L, Fn, dtype=torch.long, device=device),
        "act_sum": torch.zeros(L, Fn, dtype=torch.float64, device=device),
        "hist": torch.zeros(L, Fn, nb, dtype=torch.long, device=device),
    }


def _hash_uniform(gid: torch.Tensor) -> torch.Tensor:
    """A pseudo-random number in [0, 1) per global token index (a 32-bit integer hash)."""
    x = ((gid & MASK32) * 0x9E3779B1) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    x = x ^ (x >> 16)
    return x.double() / 2.0**32


def _feature_offsets(L: int, Fn: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x5EED)
    return torch.rand(L, Fn, generator=g, dtype=torch.float64).to(device)


def _merge_topk(
    keep: int,
    old_score: torch.Tensor,
    new_score: torch.Tensor,
    new_idx: torch.Tensor,
    A: torch.Tensor,
    gid0: int,
    T1: int,
    p: BuildParams,
    old: dict[str, torch.Tensor],
    with_value: bool,
) -> dict[str, torch.Tensor]:
    """Merge a batch's candidates into a running top list.

    old_score [L, F, keep] and new_score [L, F, k'] (descending order not needed) are the ranking
    scores; new_idx [L, F, k'] the candidates' rows in A [L, F, N]. The best `keep` of both are
    kept by a stable sort (running entries, i.e. earlier tokens, win ties). Windows of
    activations are gathered only for the candidates that get in. `old` holds "score", "gid",
    "win" (and "val" with `with_value`); returns the same keys, merged.
    """
    L, Fn, N = A.shape
    k_old = old_score.shape[-1]
    order = torch.sort(torch.cat([old_score, new_score], dim=-1), dim=-1, descending=True, stable=True).indices
    order = order[..., :keep]  # [L, F, keep]
    from_new = order >= k_old
    old_slot = order.clamp(max=k_old - 1)
    new_slot = (order - k_old).clamp(min=0)
    score = torch.where(from_new, new_score.gather(-1, new_slot), old_score.gather(-1, old_slot))
    rows = new_idx.gather(-1, new_slot)  # [L, F, keep] row in A of a new entry
    valid_new = from_new & (score > float("-inf"))
    gid = torch.where(from_new, torch.where(valid_new, rows + gid0, -1), old["gid"].gather(-1, old_slot))
    win = old["win"].gather(2, old_slot[..., None].expand(-1, -1, -1, old["win"].shape[-1]))
    win[from_new] = 0.0
    l, f, slot = valid_new.nonzero(as_tuple=True)  # the new entries that got in
    if l.numel():
        r = rows[l, f, slot]  # [n]
        offsets = torch.arange(-p.window_before, p.window_after + 1, device=A.device)  # [W]
        pos = (r % T1)[:, None] + offsets  # [n, W] position in the context (BOS excluded)
        flat = ((l * Fn + f) * N)[:, None] + (r[:, None] + offsets).clamp(0, N - 1)
        w = A.view(-1)[flat].masked_fill((pos < 0) | (pos >= T1), 0.0)
        win[l, f, slot] = w.to(win.dtype)
    out = {"score": score, "gid": gid, "win": win}
    if with_value:
        val = torch.where(from_new, A.view(L * Fn, N).gather(-1, rows.view(L * Fn, -1)).view_as(rows), old["val"].gather(-1, old_slot))
        out["val"] = val.masked_fill(gid < 0, 0.0)
    return out


@torch.no_grad()
def update_state(
    state: dict[str, torch.Tensor], acts: torch.Tensor, gid0: int, T1: int, p: BuildParams, offsets: torch.Tensor
) -> None:
    """Fold activations acts [N, L, F] of N consecutive tokens (global indices gid0 .. gid0 + N - 1,
    contexts of T1 tokens each) into the running state."""
    A = acts.float().permute(1, 2, 0).contiguous()  # [L, F, N]
    L, Fn, N = A.shape
    ninf = float("-inf")
    # counts, sums and the histogram from the active entries only (cost scales with density)
    lf, n = (A.view(L * Fn, N) > 0).nonzero(as_tuple=True)
    v = A.view(L * Fn, N)[lf, n]
    state["count"] += torch.bincount(lf, minlength=L * Fn).view(L, Fn)
    state["act_sum"] += torch.bincount(lf, weights=v.double(), minlength=L * Fn).view(L, Fn)
    nb = state["hist"].shape[-1]
    bins = hist_bins(v, nb)
    state["hist"] += torch.bincount(lf * nb + bins, minlength=L * Fn * nb).view(L, Fn, nb)
    del lf, n, v, bins
    # top-k by activation (inactive entries are 0 and never enter)
    bv, bi = A.topk(min(p.top_k, N), dim=-1)
    bv = bv.masked_fill(bv <= 0, ninf)
    old = {"gid": state["top_gid"], "win": state["top_win"]}
    merged = _merge_topk(p.top_k, state["top_val"], bv, bi, A, gid0, T1, p, old, with_value=False)
    state["top_val"], state["top_gid"], state["top_win"] = merged["score"], merged["gid"], merged["win"]
    # uniform sample: the m lowest priorities frac(v_feature + u_token) among active entries
    u = _hash_uniform(torch.arange(gid0, gid0 + N, device=A.device)).float()  # [N]
    pri = offsets.float()[..., None] + u  # [L, F, N]
    pri.frac_()
    pri.masked_fill_(A <= 0, 2.0)
    sv, si = pri.topk(min(p.n_samples, N), dim=-1, largest=False)
    del pri
    sv = torch.where(sv > 1.5, ninf, -sv)  # score: higher is better
    old = {"gid": state["res_gid"], "win": state["res_win"], "val": state["res_val"]}
    merged = _merge_topk(p.n_samples, state["res_score"], sv, si, A, gid0, T1, p, old, with_value=True)
    state["res_score"], state["res_gid"], state["res_val"], state["res_win"] = (
        merged["score"], merged["gid"], merged["val"], merged["win"],
    )


def hist_bins(v: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Histogram bin of each positive activation: bin j in 1..n_bins-2 holds
    [10^(-4 + (j-1)/8), 10^(-4 + j/8)); bin 0 what is below 1e-4, the last bin what is at or above 1e4."""
    return (v.log10().add_(4.0).mul_(8.0).floor_().add_(1.0)).clamp_(0, n_bins - 1).long()


def _state_digest(dtype: str, shape: str, data: bytes) -> str:
    """sha256 of one running tensor as stored (dtype, shape and bytes)."""
    return sha256_hex([f"{dtype}|{shape}|", data])


def _save_state(conn: Any, state: dict[str, torch.Tensor], names: Sequence[str] = STATE_NAMES) -> None:
    """Store running tensors as raw blobs, each with its sha256 in meta (`state_sha256.NAME`), inside
    the caller's transaction: SQLite checks its pages' structure, not what a blob holds, and a
    flipped bit in a running top-k would silently change every page an extension writes."""
    rows = []
    for name in names:
        t = state[name].detach().cpu().contiguous()
        rows.append((name, str(t.dtype).removeprefix("torch."), json.dumps(list(t.shape)), t.view(torch.uint8).numpy().tobytes()))
    conn.executemany("INSERT OR REPLACE INTO state (name, dtype, shape, data) VALUES (?, ?, ?, ?)", rows)
    write_meta(conn, {f"state_sha256.{name}": _state_digest(dtype, shape, data) for name, dtype, shape, data in rows})


def _load_state(conn: Any, names: Sequence[str], device: torch.device, where: str = "the feature store") -> dict[str, torch.Tensor]:
    """The running tensors `names` that are stored (checked against their sha256 where one is recorded)."""
    out = {}
    q = ",".join("?" * len(names))
    digests = dict(conn.execute(f"SELECT key, value FROM meta WHERE key IN ({q})", [f"state_sha256.{n}" for n in names]))
    for name, dtype, shape, data in conn.execute(f"SELECT name, dtype, shape, data FROM state WHERE name IN ({q})", list(names)):
        want = digests.get(f"state_sha256.{name}")
        ok = isinstance(dtype, str) and isinstance(shape, str) and isinstance(data, bytes)
        if not ok or (want is not None and json.loads(want) != _state_digest(dtype, shape, data)):
            raise CltraceError(
                f"the build state '{name}' in {where} is damaged (it does not match its recorded sha256): "
                "rebuild the store with `cltrace features build ... --overwrite`"
            )
        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            out[name] = raw.view(getattr(torch, dtype)).view(*json.loads(shape)).to(device)
        except (AttributeError, RuntimeError, TypeError, ValueError):  # a store written before the digests
            raise CltraceError(
                f"the build state '{name}' in {where} is damaged: rebuild the store with `cltrace features build ... --overwrite`"
            ) from None
    return out


# -- the build -------------------------------------------------------------------------------------


def _existing_kind(path: Path) -> str:
    """"none", "empty" (no tables yet), "store" (has a meta table) or "other"."""
    if not path.exists():
        return "none"
    if path.is_dir():
        return "other"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return "other"
    if not tables:
        return "empty"
    return "store" if "meta" in tables else "other"


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        q = Path(str(path) + suffix)
        if q.exists():
            q.unlink()


def _vocab_texts(loaded: Any, V: int) -> list[str]:
    tok = loaded.tokenizer
    if tok is None:
        return [f"<{i}>" for i in range(V)]
    texts = tok.batch_decode([[i] for i in range(V)])
    return [str(t) for t in texts]


def build_feature_store(
    model: Any,
    transcoder: Any,
    source: Any = "default",
    n_tokens: int = 100_000,
    out: str | os.PathLike[str] = "features.db",
    n_ctx: int = 128,
    batch_size: int = 8,
    resume: bool = True,
    overwrite: bool = False,
    top_k: int = 20,
    n_bands: int = 4,
    per_band: int = 5,
    window_before: int = 24,
    window_after: int = 8,
    labeller: Labeller | None = None,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    bos_id: int | None = None,
    first_position: int = FIRST_POSITION,
    exclude_tokens: Sequence[int] | None = None,
    checkpoint_seconds: float = 60.0,
    checkpoint_batches: int | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    keep_state: bool = True,
    autocast_bf16: bool = False,
) -> Path:
    """Build (or resume, or extend) the feature store `out` for `transcoder` over `n_tokens` tokens.

    Args:
        model: a :class:`~cltrace.model.LoadedModel`, or a name for :func:`~cltrace.model.load_model`.
        transcoder: a :class:`~cltrace.transcoder.Transcoder`, or a directory to load one from.
        source: a text source spec ("default", a path, "hf:...") or a :class:`TextSource`.
        n_tokens: tokens to analyse in all (BOS positions not counted); whole batches are taken,
            so a few more may be analysed. Running again with a larger value extends the store.
        out: the SQLite file.
        resume: continue an existing `out` built for the same transcoder (else it is an error
            for `out` to exist, unless `overwrite`).
        overwrite: delete an existing `out` and start afresh.
        labeller: makes `auto_label` from each page (default :class:`TokenLabeller`).
        tokenize, bos_id: override the model's tokenizer and BOS (for models without one).
        first_position, exclude_tokens: positions not analysed (see :class:`BuildParams`); their
            activations count as zero everywhere and they are not counted in the tokens analysed.
        checkpoint_seconds / checkpoint_batches: commit at least this often.
        max_batches: stop after this many batches in this call (for tests), leaving the store resumable.
        keep_state: keep the running tensors, so that the store can be extended later; False drops
            them once the pages are written (a smaller file that can no longer be extended).
        autocast_bf16: run the model's matrix products in bfloat16 (about 3x faster on CPUs with
            AVX512-BF16; activations differ from float32 ones by about 3%, which moves no page much).

    Returns the path of the database. Raises CltraceError for a database built for another
    transcoder, model or settings, or for a model the transcoder does not fit.
    """
    from cltrace.data import open_text_source
    from cltrace.data.packing import PackPosition, model_packing, pack_batches
    from cltrace.model import load_model
    from cltrace.transcoder import Transcoder, load_transcoder

    out = Path(out)
    loaded = model if not isinstance(model, (str, type(None))) else load_model(model)
    tc = transcoder if isinstance(transcoder, Transcoder) else load_transcoder(transcoder)
    if tc.n_layers != loaded.n_layers or tc.d_model != loaded.d_model:
        raise CltraceError(
            f"the transcoder ({tc.n_layers} layers, d_model {tc.d_model}) does not fit model '{loaded.name}' "
            f"({loaded.n_layers} layers, d_model {loaded.d_model})"
        )
    if n_tokens < 1:
        raise CltraceError(f"n_tokens must be at least 1, got {n_tokens}")
    if n_ctx < 2 or n_ctx > loaded.max_context:
        raise CltraceError(f"n_ctx must be in [2, {loaded.max_context}] for this model, got {n_ctx}")
    if top_k < 1 or n_bands < 1 or per_band < 1 or window_before < 0 or window_after < 0:
        raise CltraceError("top_k, n_bands and per_band must be >= 1 and the window sizes >= 0")
    tokenize, pack = model_packing(
        loaded, n_ctx, batch_size, tokenize=tokenize, bos_id=bos_id, split="train", heldout_fraction=0.0
    )
    bos, sep = pack.bos_id, pack.sep_id
    if exclude_tokens is None:
        special = set(getattr(loaded.tokenizer, "all_special_ids", None) or [])
        exclude_tokens = sorted(special | {bos} | ({sep} if sep is not None else set()))
    if not 1 <= first_position < n_ctx:
        raise CltraceError(f"first_position must be in [1, n_ctx={n_ctx}), got {first_position}")
    text_source = open_text_source(source) if isinstance(source, str) else source
    if hasattr(text_source, "describe"):
        describe = text_source.describe()
    elif isinstance(text_source, (list, tuple)):  # documents given in memory: identify them by content
        describe = f"{len(text_source)} documents sha256:" + sha256_hex("\x00".join(text_source))[:16]
    else:
        describe = f"<{type(text_source).__name__}>"
    params = BuildParams(
        n_ctx=n_ctx, top_k=top_k, n_bands=n_bands, per_band=per_band, window_before=window_before,
        window_after=window_after, source=describe, stream_key=pack.stream_key(),
        first_position=first_position, exclude_tokens=tuple(sorted(int(t) for t in exclude_tokens)),
    )
    fingerprint = transcoder_fingerprint(tc)
    device = loaded.device
    L, Fn, T1 = tc.n_layers, tc.n_features, n_ctx - 1

    kind = _existing_kind(out)
    if kind == "other":
        raise CltraceError(f"'{out}' exists and is not a feature store: choose another path")
    if kind == "store" and not resume and not overwrite:
        raise CltraceError(f"'{out}' already exists: resume it, pass overwrite to start afresh, or choose another path")
    if kind == "empty" or (kind == "store" and overwrite):
        _remove_db(out)  # an empty file is what a build killed before its first commit leaves
    fresh = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(out)
    try:
        if fresh:
            with transaction(conn):
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                write_meta(conn, {
                    "schema_version": SCHEMA_VERSION,
                    "transcoder": tc.config.to_dict(),
                    "fingerprint": fingerprint,
                    "model": loaded.name,
                    "params": params.to_dict(),
                    "tokens": 0,
                    "contexts": 0,
                    "position": None,
                    "status": "building",
                    "vocab_size": loaded.vocab_size,
                    "created": time.time(),
                })
                conn.executemany(
                    "INSERT INTO vocab (token_id, text) VALUES (?, ?)", enumerate(_vocab_texts(loaded, loaded.vocab_size))
                )
            state = _init_state(L, Fn, params, device)
            meta = read_meta(conn)
        else:
            meta = _check_existing(conn, out, fingerprint, loaded.name, params)
            if meta.get("extendable") is False and n_tokens > int(meta["tokens"]):
                raise CltraceError(
                    f"'{out}' was compacted (its build state dropped) and cannot be extended: build a new store"
                )
            state = _load_state(conn, STATE_NAMES, device, f"'{out}'")
            if set(state) != set(STATE_NAMES):
                if int(meta["tokens"]) != 0 and meta.get("extendable") is not False:
                    raise CltraceError(f"'{out}' has no build state to extend: build a new store")
                state = _init_state(L, Fn, params, device)
        tokens = int(meta["tokens"])
        contexts = int(meta["contexts"])
        position = PackPosition.from_dict(meta["position"]) if meta["position"] else None
        offsets = _feature_offsets(L, Fn, device)
        timings: dict[str, float] = {}

        if tokens < n_tokens and (max_batches is None or max_batches > 0):
            harvester = Harvester(loaded, first_position=1, autocast_bf16=autocast_bf16)  # every non-BOS position; masked below
            pending: list[tuple[int, bytes]] = []
            last_commit = time.monotonic()
            since_commit = 0
            done = 0
            bar = _progress(progress, n_tokens, tokens)
            stream_start, tokens_before = time.monotonic(), tokens

            def commit() -> None:
                nonlocal pending, last_commit, since_commit
                with transaction(conn):
                    conn.executemany("INSERT OR REPLACE INTO contexts (ctx_id, tokens) VALUES (?, ?)", pending)
                    _save_state(conn, state)
                    write_meta(conn, {
                        "tokens": tokens, "contexts": contexts, "status": "building",
                        "position": position.to_dict() if position else None,
                    })
                pending, last_commit, since_commit = [], time.monotonic(), 0

            try:
                for batch in pack_batches(text_source, tokenize, pack, start=position):
                    ids = batch.tokens
                    B = ids.shape[0]
                    first_ctx = batch.position.contexts - B
                    if first_ctx != contexts:
                        raise CltraceError(f"data position out of step ({first_ctx} != {contexts}); rebuild the store")
                    keep = torch.ones(B, T1, dtype=torch.bool)
                    keep[:, : first_position - 1] = False
                    if params.exclude_tokens:
                        keep &= ~torch.isin(ids[:, 1:], torch.tensor(params.exclude_tokens))
                    with torch.no_grad():
                        x = harvester.harvest(ids).x  # [B * T1, L, d], BOS left out
                        acts = tc.encode(x.to(device))  # [B * T1, L, F]
                        acts[~keep.view(-1).to(device)] = 0.0
                    update_state(state, acts, contexts * T1, T1, params, offsets)
                    del x, acts
                    pending.extend((contexts + b, ids[b].to(torch.int32).numpy().astype("<i4").tobytes()) for b in range(B))
                    contexts += B
                    tokens += int(keep.sum())
                    position = batch.position
                    since_commit += 1
                    done += 1
                    bar.update(int(keep.sum()))
                    if (
                        time.monotonic() - last_commit >= checkpoint_seconds
                        or (checkpoint_batches is not None and since_commit >= checkpoint_batches)
                    ):
                        commit()
                    if tokens >= n_tokens or (max_batches is not None and done >= max_batches):
                        break
            finally:
                bar.close()
            if since_commit:
                commit()
            timings["stream_s"] = round(time.monotonic() - stream_start, 2)
            timings["stream_tokens"] = tokens - tokens_before
            if tokens < n_tokens and (max_batches is None or done < max_batches):
                log.warning("the text source ran out after %d tokens (asked for %d)", tokens, n_tokens)
        if max_batches is not None and tokens < n_tokens:
            return out  # stopped early on purpose: leave it resumable, unfinished
        if read_meta(conn).get("status") != "complete" or int(read_meta(conn).get("finalized_tokens", -1)) != tokens:
            timings.update(_finalize(conn, loaded, tc, state, params, tokens, labeller or TokenLabeller()))
        if timings:
            with transaction(conn):
                write_meta(conn, {"last_build": timings})
        if not keep_state and conn.execute("SELECT COUNT(*) FROM state WHERE name != 'say'").fetchone()[0]:
            with transaction(conn):
                conn.execute("DELETE FROM state WHERE name != 'say'")
                conn.execute("DELETE FROM meta WHERE key GLOB 'state_sha256.*' AND key != 'state_sha256.say'")
                write_meta(conn, {"extendable": False})
            conn.execute("VACUUM")
    finally:
        conn.close()
    return out


def _check_existing(conn: Any, out: Path, fingerprint: str, model_name: str, params: BuildParams) -> dict[str, Any]:
    try:
        meta = read_meta(conn)
    except Exception as exc:  # noqa: BLE001 - any SQLite problem means it is not ours
        raise CltraceError(f"'{out}' is not a feature store ({exc}); choose another path") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CltraceError(
            f"'{out}' is not a feature store of schema version {SCHEMA_VERSION} (found {meta.get('schema_version')}); "
            "choose another path or pass overwrite"
        )
    if meta.get("fingerprint") != fingerprint:
        raise CltraceError(
            f"'{out}' was built for another transcoder (fingerprint {str(meta.get('fingerprint'))[:12]}…, this one "
            f"{fingerprint[:12]}…): choose another path, or pass overwrite to rebuild it"
        )
    if meta.get("model") != model_name:
        raise CltraceError(
            f"'{out}' was built with model '{meta.get('model')}', not '{model_name}': use the same model or another path"
        )
    saved = meta.get("params", {})
    for key, value in params.to_dict().items():
        if saved.get(key) != value:
            raise CltraceError(
                f"'{out}' was built with {key}={saved.get(key)!r}, not {value!r}: use the same settings or another path"
            )
    return meta


class _NoBar:
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, file=sys.stderr, desc="features")


# -- pages -----------------------------------------------------------------------------------------


def _finalize(
    conn: Any, loaded: Any, tc: Any, state: dict[str, torch.Tensor], p: BuildParams, tokens: int, labeller: Labeller
) -> dict[str, float]:
    """Write every feature's page from the running state, in one transaction; returns the seconds spent."""
    timings = {}
    L, Fn, T1 = tc.n_layers, tc.n_features, p.n_ctx - 1
    views = _load_state(conn, ("say",), torch.device("cpu")).get("say")
    if views is None:
        t = time.monotonic()
        tv = token_views(loaded, tc, p.n_tokens_shown)
        timings["token_views_s"] = round(time.monotonic() - t, 2)
        log.info("promoted, suppressed and input tokens of %d features: %.1f s", L * Fn, timings["token_views_s"])
        names = ("promoted_ids", "promoted", "suppressed_ids", "suppressed", "inputs_ids", "inputs")
        views = torch.stack([tv[k].double() for k in names])  # [6, L, F, n] (ids exact in float64)
        with transaction(conn):
            _save_state(conn, {"say": views}, ("say",))
    t = time.monotonic()
    views_np = views.numpy()
    vocab = [t for (t,) in conn.execute("SELECT text FROM vocab ORDER BY token_id")]

    def token_list(i: int, l: int, f: int) -> list[list[float]]:
        return [[int(t), round(float(s), 5)] for t, s in zip(views_np[2 * i, l, f], views_np[2 * i + 1, l, f])]

    count = state["count"].cpu().numpy()
    act_sum = state["act_sum"].cpu().numpy()
    hist = state["hist"].cpu().numpy()
    top_val = state["top_val"].cpu().numpy()
    top_gid = state["top_gid"].cpu().numpy()
    top_win = state["top_win"].cpu().numpy().astype("<f2")
    res_gid = state["res_gid"].cpu().numpy()
    res_val = state["res_val"].cpu().numpy()
    res_win = state["res_win"].cpu().numpy().astype("<f2")
    ctx_cache: dict[int, np.ndarray] = {}

    def ctx_tokens(cid: int) -> np.ndarray:
        if cid not in ctx_cache:
            row = conn.execute("SELECT tokens FROM contexts WHERE ctx_id=?", (cid,)).fetchone()
            ctx_cache[cid] = np.frombuffer(row[0], dtype="<i4")
        return ctx_cache[cid]

    def example(gid: int, act: float, win: np.ndarray, band: int | None) -> Example:
        cid, pos = divmod(int(gid), T1)
        pos += 1
        toks = ctx_tokens(cid)
        lo, hi = max(1, pos - p.window_before), min(len(toks) - 1, pos + p.window_after)
        w = win.astype(np.float64)[lo - (pos - p.window_before) : hi + 1 - (pos - p.window_before)]
        ids = toks[lo : hi + 1].tolist()
        return Example(cid, pos, float(act), ids, [vocab[t] for t in ids], w.tolist(), pos - lo, band)

    feature_rows, example_rows = [], []
    for l in range(L):
        for f in range(Fn):
            c = int(count[l, f])
            valid = top_gid[l, f] >= 0
            tops = [example(g, v, w, None) for g, v, w in zip(top_gid[l, f][valid], top_val[l, f][valid], top_win[l, f][valid])]
            for r, (g, v, w) in enumerate(zip(top_gid[l, f][valid], top_val[l, f][valid], top_win[l, f][valid])):
                cid, pos = divmod(int(g), T1)
                example_rows.append((l, f, "top", r, cid, pos + 1, float(v), w.tobytes()))
            svalid = res_gid[l, f] >= 0
            order = np.argsort(res_val[l, f][svalid], kind="stable")
            sg, sv, sw = res_gid[l, f][svalid][order], res_val[l, f][svalid][order], res_win[l, f][svalid][order]
            for band, idx in enumerate(np.array_split(np.arange(len(sg)), p.n_bands)):
                for r, i in enumerate(idx):
                    cid, pos = divmod(int(sg[i]), T1)
                    example_rows.append((l, f, f"q{band}", r, cid, pos + 1, float(sv[i]), sw[i].tobytes()))
            page = FeaturePage(
                layer=l, feature=f, label=None, auto_label="", count=c, density=c / max(tokens, 1),
                max_act=float(top_val[l, f, 0]) if c else 0.0, mean_act=float(act_sum[l, f] / c) if c else 0.0,
                hist_edges=list(p.hist_edges), hist_counts=hist[l, f].tolist(),
                promoted=[TokenScore(t, vocab[t], s) for t, s in token_list(0, l, f)],
                suppressed=[TokenScore(t, vocab[t], s) for t, s in token_list(1, l, f)],
                inputs=[TokenScore(t, vocab[t], s) for t, s in token_list(2, l, f)],
                top=tops, tokens_analysed=tokens,
            )
            auto = str(labeller(page))
            feature_rows.append((
                l, f, c, page.density, page.max_act, page.mean_act, json.dumps(page.hist_counts),
                json.dumps(token_list(0, l, f)), json.dumps(token_list(1, l, f)), json.dumps(token_list(2, l, f)), auto,
            ))
    with transaction(conn):
        conn.execute("DELETE FROM features")
        conn.execute("DELETE FROM examples")
        conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", feature_rows)
        conn.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", example_rows)
        write_meta(conn, {"status": "complete", "finalized_tokens": tokens, "finalized": time.time()})
        seal_store(conn)  # last: it digests the pages and meta just written
    timings["pages_s"] = round(time.monotonic() - t, 2)
    log.info("wrote the pages of %d features (%d contexts shown): %.1f s", L * Fn, len(example_rows), timings["pages_s"])
    return timings


__all__ = ["BuildParams", "build_feature_store", "token_views", "transcoder_fingerprint", "update_state"]

