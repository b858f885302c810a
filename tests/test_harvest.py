"""Harvest: every layer's resid_mid and MLP-block output, sink positions left out, as a plain forward pass."""

from __future__ import annotations

import pytest
import torch
from helpers.models import VOCAB, tiny_model

from cltrace.data.harvest import FIRST_POSITION, Harvester, base_transformer
from cltrace.errors import CltraceError
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig


@pytest.mark.parametrize("first", [1, FIRST_POSITION])
def test_harvest_matches_replacement_run(family: str, first: int) -> None:
    loaded = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (3, 9), generator=g)
    tokens[:, 0] = 0
    harvester = Harvester(loaded, max_batch=2, first_position=first)
    x, y = harvester.harvest(tokens)
    P = 9 - first
    assert harvester.positions_per_context(9) == P
    assert x.shape == y.shape == (3 * P, loaded.n_layers, loaded.d_model)
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 4))
    rm = ReplacementModel(loaded, tc)
    for b in range(3):
        run = rm.run(tokens[b])
        torch.testing.assert_close(x[b * P : (b + 1) * P], run.resid_mid[first:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y[b * P : (b + 1) * P], run.mlp_out[first:], atol=1e-4, rtol=1e-4)


def test_default_leaves_out_bos_and_the_first_token() -> None:
    """BOS and the first token are the attention sinks training never sees."""
    assert FIRST_POSITION == 2
    assert Harvester(tiny_model("llama")).first_position == FIRST_POSITION
    with pytest.raises(CltraceError, match="first_position"):
        Harvester(tiny_model("llama"), first_position=0)


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
