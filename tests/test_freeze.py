"""Frozen norms and attention give the family's own forward values, and only OV gradients."""

from __future__ import annotations

import torch
from helpers.models import prompt_ids, tiny_model

from cltrace.model import FreezeState, freeze


def test_frozen_norms_match_family_modules(family: str) -> None:
    model = tiny_model(family)
    norms = model.adapter.norms(model.model)
    assert norms, "every family has norms"
    g = torch.Generator().manual_seed(0)
    inputs = {m: 3 * torch.randn(2, 5, m.weight.shape[0], generator=g) + 0.5 for m in norms}
    expected = {m: m(x) for m, x in inputs.items()}
    with freeze(model.model, norms, FreezeState("record")):
        for m, x in inputs.items():
            torch.testing.assert_close(m(x), expected[m], rtol=1e-6, atol=1e-6)
    # The class's own forward is back afterwards.
    for m, x in inputs.items():
        assert "forward" not in vars(m)
        torch.testing.assert_close(m(x), expected[m], rtol=0, atol=0)


def test_frozen_norm_denominator_carries_no_gradient(family: str) -> None:
    model = tiny_model(family)
    norms = model.adapter.norms(model.model)
    module, kind = next(iter(norms.items()))
    x = torch.randn(1, 3, module.weight.shape[0], requires_grad=True)
    with freeze(model.model, norms, FreezeState("record")):
        y = module(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    # With the denominator constant, the norm is affine in x: the gradient of sum(y) is the same
    # for x and for 2x once the recorded scale is replayed.
    state = FreezeState("record")
    with freeze(model.model, norms, state):
        module(x.detach())
    x2 = (2 * x.detach()).requires_grad_(True)
    with freeze(model.model, norms, state.replaying()):
        (grad2,) = torch.autograd.grad(module(x2).sum(), x2)
    torch.testing.assert_close(grad, grad2)
    # and the live norm's gradient is different (the frozen one is not a no-op)
    x3 = x.detach().requires_grad_(True)
    (live,) = torch.autograd.grad(module(x3).sum(), x3)
    assert not torch.allclose(live, grad, atol=1e-4)


def test_frozen_forward_matches_model_and_freezes_patterns(family: str) -> None:
    model = tiny_model(family)
    ids = prompt_ids()[None]
    expected = model.model(input_ids=ids).logits
    state = FreezeState("record")
    with freeze(model.model, model.adapter.norms(model.model), state):
        got = model.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    n_layers = model.n_layers
    assert len(state.patterns) == n_layers
    for pattern in state.patterns.values():
        assert not pattern.requires_grad
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
        assert torch.all(pattern.triu(1) == 0), "causal"
    # The attention implementation is put back.
    assert model.model.config._attn_implementation != "cltrace_frozen"
