"""The pages of a feature store: every feature's page written from the build's running state, in one transaction."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch

from cltrace.features.database import AUTO_LABELS_TABLE, LABEL_CONTEXTS_TABLE, seal_store, transaction, write_meta
from cltrace.features.page import Example, FeaturePage, Labeller, TokenScore
from cltrace.features.state import BuildParams, _load_state, _save_state
from cltrace.features.views import token_views

log = logging.getLogger(__name__)


# -- pages -----------------------------------------------------------------------------------------


def _stored_token_views(conn: Any, loaded: Any, tc: Any, p: BuildParams, timings: dict[str, float]) -> torch.Tensor:
    """Promoted, suppressed and input tokens of every feature [6, L, F, n]: stored, or computed and stored."""
    L, Fn = tc.n_layers, tc.n_features
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
    return views


def _write_pages(conn: Any, feature_rows: list[tuple], example_rows: list[tuple], tokens: int) -> None:
    """Replace the pages in one transaction and mark the store complete."""
    with transaction(conn):
        conn.execute("DELETE FROM features")
        conn.execute("DELETE FROM examples")
        # measured labels came from the old pages and held-out text the store may now include
        conn.execute(AUTO_LABELS_TABLE)
        conn.execute(LABEL_CONTEXTS_TABLE)
        conn.execute("DELETE FROM auto_labels")
        conn.execute("DELETE FROM label_contexts")
        conn.execute("DELETE FROM meta WHERE key='auto_labels'")
        conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", feature_rows)
        conn.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", example_rows)
        write_meta(conn, {"status": "complete", "finalized_tokens": tokens, "finalized": time.time()})
        seal_store(conn)  # last: it digests the pages and meta just written


def _finalize(
    conn: Any, loaded: Any, tc: Any, state: dict[str, torch.Tensor], p: BuildParams, tokens: int, labeller: Labeller
) -> dict[str, float]:
    """Write every feature's page from the running state, in one transaction; returns the seconds spent."""
    timings: dict[str, float] = {}
    L, Fn, T1 = tc.n_layers, tc.n_features, p.n_ctx - 1
    views = _stored_token_views(conn, loaded, tc, p, timings)  # [6, L, F, n]
    t = time.monotonic()
    views_np = views.numpy()
    vocab = [t for (t,) in conn.execute("SELECT text FROM vocab ORDER BY token_id")]

    def token_list(i: int, l: int, f: int) -> list[tuple[int, float]]:
        return [(int(t), round(float(s), 5)) for t, s in zip(views_np[2 * i, l, f], views_np[2 * i + 1, l, f])]

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
    _write_pages(conn, feature_rows, example_rows, tokens)
    timings["pages_s"] = round(time.monotonic() - t, 2)
    log.info("wrote the pages of %d features (%d contexts shown): %.1f s", L * Fn, len(example_rows), timings["pages_s"])
    return timings
