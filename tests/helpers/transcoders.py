"""Random transcoders with non-zero biases and thresholds, the attribution test cases, and equality."""

from __future__ import annotations

import torch

from cltrace.transcoder import Transcoder, TranscoderConfig
from helpers.models import FAMILIES

CASES = [(family, "clt") for family in FAMILIES] + [("llama", "plt"), ("gemma2", "plt"), ("gpt2", "plt")]

CASE_IDS = [f"{family}-{kind}" for family, kind in CASES]


def random_transcoder(model, kind: str, seed: int = 0) -> Transcoder:
    """A random transcoder with non-zero biases and thresholds; a PLT gets a skip path."""
    cfg = TranscoderConfig(
        kind=kind, n_layers=model.n_layers, d_model=model.d_model, n_features=16, activation="jumprelu",
        skip=kind == "plt",
    )
    tc = Transcoder.random(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tc.b_enc.copy_(0.1 * torch.randn(tc.b_enc.shape, generator=g))
        tc.b_dec.copy_(0.1 * torch.randn(tc.b_dec.shape, generator=g))
        tc.activation.threshold.copy_(0.05 * torch.rand(tc.activation.threshold.shape, generator=g))
        if getattr(tc, "W_skip", None) is not None:
            tc.W_skip.copy_(0.05 * torch.randn(tc.W_skip.shape, generator=g))
    return tc


def assert_identical(a: Transcoder, b: Transcoder) -> None:
    assert type(a) is type(b)
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
