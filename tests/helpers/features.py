"""A small feature store built from word documents through a tiny model: its corpus, tokenizer and builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cltrace.features import build_feature_store
from cltrace.transcoder import Transcoder, TranscoderConfig
from helpers.models import VOCAB

N_CTX, BATCH, BOS = 16, 4, 1

T1 = N_CTX - 1

K = 5


def corpus(n_docs: int = 40) -> list[str]:
    """Documents of words w0..w89 with repeats, so that features see recurring contexts."""
    g = np.random.default_rng(0)
    return [" ".join(f"w{int(x)}" for x in g.integers(0, VOCAB - 6, int(g.integers(5, 40)))) for _ in range(n_docs)]


def tokenize(text: str) -> list[int]:
    return [int(w[1:]) + 2 for w in text.split()]


def transcoder(kind: str = "clt", seed: int = 1, n_features: int = 16) -> Transcoder:
    return Transcoder.random(TranscoderConfig(kind, 3, 32, n_features), seed=seed)


def build(loaded, tc, out: Path, n_tokens: int, **kw):
    kw = {
        "resume": True, "top_k": K, "n_bands": 2, "per_band": 3, "window_before": 4, "window_after": 2,
        "first_position": 1, **kw,
    }
    return build_feature_store(
        loaded, tc, corpus(), n_tokens, out, n_ctx=N_CTX, batch_size=BATCH, tokenize=tokenize, bos_id=BOS,
        progress=False, **kw,
    )
