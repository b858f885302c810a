"""Harvest: every layer's resid_mid and MLP-block output, BOS left out, as a plain forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from cltrace.data.harvest import Harvester, base_transformer
from cltrace.errors import CltraceError
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig


def test_harvest_matches_replacement_run(family: str) -> None:
    loaded = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (3, 9), generator=g)
    tokens[:, 0] = 0
    x, y = Harvester(loaded, max_batch=2).harvest(tokens)
    assert x.shape == y.shape == (3 * 8, loaded.n_layers, loaded.d_model)
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 4))
    rm = ReplacementModel(loaded, tc)
    for b in range(3):
        run = rm.run(tokens[b])
        torch.testing.assert_close(x[b * 8 : (b + 1) * 8], run.resid_mid[1:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y[b * 8 : (b + 1) * 8], run.mlp_out[1:], atol=1e-4, rtol=1e-4)


def test_harvest_skips_unembedding_and_leaves_no_hooks() -> None:
    loaded = tiny_model("llama")
    base = base_transformer(loaded)
    assert base is loaded.model.model
    calls = []
    handle = loaded.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    h = Harvester(loaded)
    h.harvest(torch.zeros(1, 5, dtype=torch.long))
    handle.remove()
    assert calls == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in h.mlp_in + h.mlp_out)


def test_harvest_rejects_bad_tokens() -> None:
    h = Harvester(tiny_model("gpt2"))
    with pytest.raises(CltraceError, match="batch, n_ctx"):
        h.harvest(torch.zeros(5, dtype=torch.long))
    with pytest.raises(CltraceError, match="context"):
        h.harvest(torch.zeros(1, 65, dtype=torch.long))


def test_harvest_bf16_autocast_is_close() -> None:
    loaded = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    x, y = Harvester(loaded).harvest(tokens)
    xb, yb = Harvester(loaded, autocast_bf16=True).harvest(tokens)
    assert xb.dtype == torch.float32
    assert (xb - x).norm() / x.norm() < 0.05 and (yb - y).norm() / y.norm() < 0.05
