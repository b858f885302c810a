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

import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cltrace.data.harvest import FIRST_POSITION, Harvester
from cltrace.data.packing import PackPosition, model_packing, pack_batches
from cltrace.data.sources import open_text_source
from cltrace.errors import CltraceError
from cltrace.features.database import SCHEMA, SCHEMA_VERSION, connect, read_meta, transaction, write_meta
from cltrace.features.page import Labeller, TokenLabeller
from cltrace.features.pages import _finalize
from cltrace.features.state import (
    STATE_NAMES,
    BuildParams,
    _feature_offsets,
    _init_state,
    _load_state,
    _save_state,
    update_state,
)
from cltrace.fingerprint import sha256_hex, transcoder_fingerprint
from cltrace.model import load_model
from cltrace.transcoder import Transcoder, load_transcoder

log = logging.getLogger(__name__)

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
    model: Any, transcoder: Any, source: Any = "default", n_tokens: int = 100_000,
    out: str | os.PathLike[str] = "features.db", n_ctx: int = 128, batch_size: int = 8,
    resume: bool = True, overwrite: bool = False,
    top_k: int = 20, n_bands: int = 4, per_band: int = 5, window_before: int = 24, window_after: int = 8,
    labeller: Labeller | None = None, tokenize: Callable[[str], Sequence[int]] | None = None, bos_id: int | None = None,
    first_position: int = FIRST_POSITION, exclude_tokens: Sequence[int] | None = None,
    checkpoint_seconds: float = 60.0, checkpoint_batches: int | None = None, progress: bool = True,
    max_batches: int | None = None, keep_state: bool = True, autocast_bf16: bool = False,
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
        autocast_bf16: run the model's matrix products in bfloat16 (faster on CPUs with bf16
            units; activations differ a little from float32 ones, which moves no page much).

    Returns the path of the database. Raises CltraceError for a database built for another
    transcoder, model or settings, or for a model the transcoder does not fit.
    """
    out = Path(out)
    loaded = model if not isinstance(model, (str, type(None))) else load_model(model)
    tc = transcoder if isinstance(transcoder, Transcoder) else load_transcoder(transcoder)
    _check_sizes(loaded, tc, n_tokens, n_ctx, top_k, n_bands, per_band, window_before, window_after)
    tokenize, pack = model_packing(
        loaded, n_ctx, batch_size, tokenize=tokenize, bos_id=bos_id, split="train", heldout_fraction=0.0
    )
    excluded = _excluded_tokens(loaded, pack, exclude_tokens, first_position, n_ctx)
    text_source = open_text_source(source) if isinstance(source, str) else source
    params = BuildParams(
        n_ctx=n_ctx, top_k=top_k, n_bands=n_bands, per_band=per_band, window_before=window_before,
        window_after=window_after, source=_describe_source(text_source), stream_key=pack.stream_key(),
        first_position=first_position, exclude_tokens=excluded,
    )
    conn, fresh = _open_path(out, resume, overwrite)
    try:
        state, meta = _start(conn, out, fresh, loaded, tc, params, n_tokens)
        tokens = int(meta["tokens"])
        timings: dict[str, float] = {}
        if tokens < n_tokens and (max_batches is None or max_batches > 0):
            stream = _Stream(conn, state, params, meta, n_tokens, max_batches, checkpoint_seconds, checkpoint_batches)
            tokens, timings = stream.run(loaded, tc, text_source, tokenize, pack, progress, autocast_bf16)
        if max_batches is not None and tokens < n_tokens:
            return out  # stopped early on purpose: leave it resumable, unfinished
        _finish(conn, loaded, tc, state, params, tokens, labeller or TokenLabeller(), timings, keep_state)
    finally:
        conn.close()
    return out


def _check_sizes(loaded: Any, tc: Any, n_tokens: int, n_ctx: int, top_k: int, n_bands: int, per_band: int,
                 window_before: int, window_after: int) -> None:
    """Raise CltraceError for a transcoder that does not fit the model or an impossible size."""
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


def _excluded_tokens(loaded: Any, pack: Any, exclude_tokens: Sequence[int] | None, first_position: int,
                     n_ctx: int) -> tuple[int, ...]:
    """The token ids not analysed (default: the tokenizer's special tokens, BOS and the separator), sorted."""
    bos, sep = pack.bos_id, pack.sep_id
    if exclude_tokens is None:
        special = set(getattr(loaded.tokenizer, "all_special_ids", None) or [])
        exclude_tokens = sorted(special | {bos} | ({sep} if sep is not None else set()))
    if not 1 <= first_position < n_ctx:
        raise CltraceError(f"first_position must be in [1, n_ctx={n_ctx}), got {first_position}")
    return tuple(sorted(int(t) for t in exclude_tokens))


def _describe_source(text_source: Any) -> str:
    """How the build's parameters name the text source (documents given in memory: by their content)."""
    if hasattr(text_source, "describe"):
        return text_source.describe()
    if isinstance(text_source, (list, tuple)):
        return f"{len(text_source)} documents sha256:" + sha256_hex("\x00".join(text_source))[:16]
    return f"<{type(text_source).__name__}>"


def _open_path(out: Path, resume: bool, overwrite: bool) -> tuple[sqlite3.Connection, bool]:
    """Connect to `out` after checking what is there (a store to resume, one to overwrite, or nothing);
    also whether the store is new."""
    kind = _existing_kind(out)
    if kind == "other":
        raise CltraceError(f"'{out}' exists and is not a feature store: choose another path")
    if kind == "store" and not resume and not overwrite:
        raise CltraceError(f"'{out}' already exists: resume it, pass overwrite to start afresh, or choose another path")
    if kind == "empty" or (kind == "store" and overwrite):
        _remove_db(out)  # an empty file is what a build killed before its first commit leaves
    fresh = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    return connect(out), fresh


def _start(conn: Any, out: Path, fresh: bool, loaded: Any, tc: Any, params: BuildParams,
           n_tokens: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The running state and meta of a new store (its schema and vocabulary written) or of the one at `out`."""
    fingerprint = transcoder_fingerprint(tc)
    device = loaded.device
    L, Fn = tc.n_layers, tc.n_features
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
        return _init_state(L, Fn, params, device), read_meta(conn)
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
    return state, meta


class _Stream:
    """Harvest batches into the running state, committing the state, the new contexts and the data
    position together at checkpoints (a killed build resumes from its last commit)."""

    def __init__(self, conn: Any, state: dict[str, torch.Tensor], params: BuildParams, meta: dict[str, Any],
                 n_tokens: int, max_batches: int | None, checkpoint_seconds: float, checkpoint_batches: int | None) -> None:
        self.conn, self.state, self.params = conn, state, params
        self.n_tokens, self.max_batches = n_tokens, max_batches
        self.checkpoint_seconds, self.checkpoint_batches = checkpoint_seconds, checkpoint_batches
        self.tokens = int(meta["tokens"])
        self.contexts = int(meta["contexts"])
        self.position = PackPosition.from_dict(meta["position"]) if meta["position"] else None
        self.pending: list[tuple[int, bytes]] = []
        self.last_commit = time.monotonic()
        self.since_commit = 0

    def commit(self) -> None:
        conn = self.conn
        with transaction(conn):
            conn.executemany("INSERT OR REPLACE INTO contexts (ctx_id, tokens) VALUES (?, ?)", self.pending)
            _save_state(conn, self.state)
            write_meta(conn, {
                "tokens": self.tokens, "contexts": self.contexts, "status": "building",
                "position": self.position.to_dict() if self.position else None,
            })
        self.pending, self.last_commit, self.since_commit = [], time.monotonic(), 0

    def run(self, loaded: Any, tc: Any, text_source: Any, tokenize: Any, pack: Any, progress: bool,
            autocast_bf16: bool) -> tuple[int, dict[str, float]]:
        """Stream until n_tokens are analysed, the source runs out or max_batches are done: (tokens, timings)."""
        params, n_tokens, max_batches = self.params, self.n_tokens, self.max_batches
        first_position, T1 = params.first_position, params.n_ctx - 1
        harvester = Harvester(loaded, first_position=1, autocast_bf16=autocast_bf16)  # every non-BOS position; masked below
        offsets = _feature_offsets(tc.n_layers, tc.n_features, loaded.device)
        device = loaded.device
        done = 0
        bar = _progress(progress, n_tokens, self.tokens)
        stream_start, tokens_before = time.monotonic(), self.tokens
        try:
            for batch in pack_batches(text_source, tokenize, pack, start=self.position):
                ids = batch.tokens
                B = ids.shape[0]
                first_ctx = batch.position.contexts - B
                if first_ctx != self.contexts:
                    raise CltraceError(f"data position out of step ({first_ctx} != {self.contexts}); rebuild the store")
                keep = torch.ones(B, T1, dtype=torch.bool)
                keep[:, : first_position - 1] = False
                if params.exclude_tokens:
                    keep &= ~torch.isin(ids[:, 1:], torch.tensor(params.exclude_tokens))
                with torch.no_grad():
                    x = harvester.harvest(ids).x  # [B * T1, L, d], BOS left out
                    acts = tc.encode(x.to(device))  # [B * T1, L, F]
                    acts[~keep.view(-1).to(device)] = 0.0
                update_state(self.state, acts, self.contexts * T1, T1, params, offsets)
                del x, acts
                self.pending.extend((self.contexts + b, ids[b].to(torch.int32).numpy().astype("<i4").tobytes()) for b in range(B))
                self.contexts += B
                self.tokens += int(keep.sum())
                self.position = batch.position
                self.since_commit += 1
                done += 1
                bar.update(int(keep.sum()))
                if (
                    time.monotonic() - self.last_commit >= self.checkpoint_seconds
                    or (self.checkpoint_batches is not None and self.since_commit >= self.checkpoint_batches)
                ):
                    self.commit()
                if self.tokens >= n_tokens or (max_batches is not None and done >= max_batches):
                    break
        finally:
            bar.close()
        if self.since_commit:
            self.commit()
        timings = {"stream_s": round(time.monotonic() - stream_start, 2), "stream_tokens": self.tokens - tokens_before}
        if self.tokens < n_tokens and (max_batches is None or done < max_batches):
            log.warning("the text source ran out after %d tokens (asked for %d)", self.tokens, n_tokens)
        return self.tokens, timings


def _finish(conn: Any, loaded: Any, tc: Any, state: dict[str, torch.Tensor], params: BuildParams, tokens: int,
            labeller: Labeller, timings: dict[str, float], keep_state: bool) -> None:
    """Write the pages unless they are up to date, record the timings, and drop the state unless it is kept."""
    if read_meta(conn).get("status") != "complete" or int(read_meta(conn).get("finalized_tokens", -1)) != tokens:
        timings.update(_finalize(conn, loaded, tc, state, params, tokens, labeller))
    if timings:
        with transaction(conn):
            write_meta(conn, {"last_build": timings})
    if not keep_state and conn.execute("SELECT COUNT(*) FROM state WHERE name != 'say'").fetchone()[0]:
        with transaction(conn):
            conn.execute("DELETE FROM state WHERE name != 'say'")
            conn.execute("DELETE FROM meta WHERE key GLOB 'state_sha256.*' AND key != 'state_sha256.say'")
            write_meta(conn, {"extendable": False})
        conn.execute("VACUUM")


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




__all__ = ["BuildParams", "build_feature_store", "transcoder_fingerprint", "update_state"]

