"""The running state of a feature-store build: fixed-size tensors per feature, merged batch by batch.

Top-k activations with their windows, a bottom-m sample of the nonzero activations, counts, sums
and a histogram (see `cltrace.features.build`); stored in the database as checked blobs at each
checkpoint, so that a killed build resumes from its last commit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cltrace.data.harvest import FIRST_POSITION
from cltrace.errors import CltraceError
from cltrace.features.database import write_meta
from cltrace.fingerprint import sha256_hex

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
    context, and in SmolLM2 it often carries outlier norms, many times those of other positions."""
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


__all__ = ["HIST_EDGES", "STATE_NAMES", "BuildParams", "hist_bins", "update_state"]
