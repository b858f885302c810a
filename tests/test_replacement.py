"""The replacement model reproduces the model exactly; its frozen form is affine in the MLP slots."""

from __future__ import annotations

import pytest
import torch
from helpers.models import prompt_ids, tiny_model

from cltrace.errors import CltraceError
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig

KINDS = [("clt", False), ("plt", True)]


def random_transcoder(model, kind: str = "clt", skip: bool = False, seed: int = 0) -> Transcoder:
    cfg = TranscoderConfig(
        kind=kind, n_layers=model.n_layers, d_model=model.d_model, n_features=24, activation="jumprelu", skip=skip
    )
    tc = Transcoder.random(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases and varied thresholds, so every term is exercised
        tc.b_enc.copy_(0.1 * torch.randn(tc.b_enc.shape, generator=g))
        tc.b_dec.copy_(0.1 * torch.randn(tc.b_dec.shape, generator=g))
        tc.activation.threshold.copy_(0.05 * torch.rand(tc.activation.threshold.shape, generator=g))
        if skip:
            tc.W_skip.copy_(0.05 * torch.randn(tc.W_skip.shape, generator=g))
    return tc


@pytest.fixture(params=KINDS, ids=[k for k, _ in KINDS])
def replacement(request: pytest.FixtureRequest, family: str) -> ReplacementModel:
    model = tiny_model(family)
    kind, skip = request.param
    return ReplacementModel(model, random_transcoder(model, kind, skip))


def test_replacement_reproduces_model_logits(replacement: ReplacementModel) -> None:
    ids = prompt_ids()
    expected = replacement.model.model(input_ids=ids[None]).logits[0]
    run = replacement.run(ids)
    assert (run.activations > 0).any(), "the test transcoder must have active features"
    assert (run.error.abs() > 1e-3).any(), "a random transcoder leaves a real error term"
    assert (run.logits - expected).abs().max() < 1e-5
    torch.testing.assert_close(run.reconstruction + run.error, run.mlp_out, rtol=0, atol=1e-6)
    frozen = replacement.frozen(run)  # reconstruction + error in every slot
    assert (replacement.model.finalize_logits(frozen.logits[0]) - expected).abs().max() < 1e-5
    torch.testing.assert_close(frozen.resid_mid[0], run.resid_mid, rtol=1e-5, atol=1e-5)


def test_slot_override_reaches_downstream_only(replacement: ReplacementModel) -> None:
    """Changing layer 0's MLP slot moves layer 1's input and leaves layer 0's own input alone."""
    run = replacement.run(prompt_ids())
    slots = (run.reconstruction + run.error).clone()
    slots[:, 0] = 0
    out = replacement.frozen(run, slots).resid_mid[0]
    before = replacement.frozen(run).resid_mid[0]
    torch.testing.assert_close(out[:, 0], before[:, 0], rtol=0, atol=0)  # upstream of the slot
    # At position 0 attention sees only itself, so layer 1's input drops by exactly the slot's value
    # plus what layer 1's attention makes of it: at least the residual part must show.
    assert not torch.allclose(out[:, 1], before[:, 1])
    moved = before[0, 1] - out[0, 1]
    cos = torch.nn.functional.cosine_similarity(moved, run.mlp_out[0, 0], dim=0)
    assert cos > 0.2, cos


def frozen_logits(replacement: ReplacementModel, run, slots: torch.Tensor) -> torch.Tensor:
    return replacement.frozen(run, slots).logits


def test_frozen_jacobian_matches_finite_differences(replacement: ReplacementModel) -> None:
    run = replacement.run(prompt_ids())
    base = (run.reconstruction + run.error).detach()  # [pos, layer, d_model]
    g = torch.Generator().manual_seed(3)
    probes = torch.randn((3, *frozen_logits(replacement, run, base).shape[1:]), generator=g)  # [probe, pos, vocab]
    for layer in range(base.shape[1]):
        # a perturbation of this layer's MLP output only, at every position
        direction = torch.zeros_like(base)
        direction[:, layer] = torch.randn(direction[:, layer].shape, generator=g)
        plus = frozen_logits(replacement, run, base + direction)[0]
        minus = frozen_logits(replacement, run, base - direction)[0]
        finite = (plus - minus) / 2  # exact for an affine map, whatever the step
        slots = base.clone().requires_grad_(True)
        out = frozen_logits(replacement, run, slots)[0]
        for probe in probes:
            (grad,) = torch.autograd.grad((out * probe).sum(), slots, retain_graph=True)
            predicted = (grad * direction).sum()
            measured = (finite * probe).sum()
            assert abs(predicted - measured) <= 1e-4 * (abs(measured) + probe.abs().sum().sqrt()), (layer, predicted, measured)


def test_frozen_model_is_linear_in_mlp_slots(replacement: ReplacementModel) -> None:
    run = replacement.run(prompt_ids())
    base = run.reconstruction + run.error
    g = torch.Generator().manual_seed(5)
    a = base.std() * torch.randn(base.shape, generator=g)
    b = base.std() * torch.randn(base.shape, generator=g)
    f = lambda s: replacement.frozen(run, s).logits  # noqa: E731
    residual = f(base + a + b) - f(base + a) - f(base + b) + f(base)
    scale = (f(base + a) - f(base)).abs().max()
    assert scale > 1e-2, "the perturbation must move the logits"
    assert residual.abs().max() <= 1e-5 * scale.clamp(min=1) * 10


def test_batched_frozen_evaluation_matches_one_at_a_time(replacement: ReplacementModel) -> None:
    run = replacement.run(prompt_ids())
    base = run.reconstruction + run.error
    batch = torch.stack([base, 0.5 * base, torch.zeros_like(base)])  # [batch, pos, layer, d_model]
    together = replacement.frozen(run, batch).logits
    for i in range(3):
        torch.testing.assert_close(together[i], replacement.frozen(run, batch[i]).logits[0], rtol=1e-5, atol=1e-5)


def test_frozen_model_accepts_embeddings(replacement: ReplacementModel) -> None:
    run = replacement.run(prompt_ids())
    embeds = replacement.model.model.get_input_embeddings()(run.input_ids[None])
    torch.testing.assert_close(
        replacement.frozen(run, inputs_embeds=embeds).logits, replacement.frozen(run).logits, rtol=1e-5, atol=1e-5
    )


def test_transcoder_that_does_not_fit_is_refused() -> None:
    model = tiny_model("llama")
    cfg = TranscoderConfig(kind="clt", n_layers=model.n_layers + 1, d_model=model.d_model, n_features=8, activation="relu")
    with pytest.raises(CltraceError, match="does not fit"):
        ReplacementModel(model, Transcoder.random(cfg))
    cfg = TranscoderConfig(kind="clt", n_layers=model.n_layers, d_model=model.d_model * 2, n_features=8, activation="relu")
    with pytest.raises(CltraceError, match="d_model"):
        ReplacementModel(model, Transcoder.random(cfg))


def test_prompt_bad_lengths_are_refused() -> None:
    model = tiny_model("llama")
    rm = ReplacementModel(model, random_transcoder(model))
    with pytest.raises(CltraceError, match="no tokens"):
        rm.run(torch.tensor([], dtype=torch.long))
    with pytest.raises(CltraceError, match="longer than the model's context"):
        rm.run(torch.zeros(model.max_context + 1, dtype=torch.long))
