"""QK attribution is exact: pairs sum to the scores the model really computes, on every family.

The ground truth is read from the Hugging Face attention modules themselves: an attention function
registered for the test records the queries and keys each module passes to it (after its own
projections, QK-norms and rotary embeddings) and the scaling it uses.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import prompt_ids, tiny_model
from helpers.transcoders import CASE_IDS, CASES, random_transcoder
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from cltrace.errors import CltraceError
from cltrace.graph.qk import qk_attribution, residual_nodes
from cltrace.graph.qk_sites import AttentionSites
from cltrace.model.freeze import freeze, frozen_attention
from cltrace.replacement import ReplacementModel

CAPTURE = "cltrace_test_capture"
_SCORES: dict[torch.nn.Module, torch.Tensor] = {}


def _capture(module, query, key, value, attention_mask, scaling=None, **kwargs):  # noqa: ANN001, ANN202
    groups = query.shape[1] // key.shape[1]
    key_full = key.repeat_interleave(groups, dim=1)
    _SCORES[module] = (query @ key_full.transpose(2, 3)).float() * scaling  # [batch, head, q, k], before any cap
    return frozen_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(CAPTURE, _capture)
AttentionMaskInterface.register(CAPTURE, eager_mask)


def _set_impl(model: torch.nn.Module, name: str) -> None:
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def true_scores(rm: ReplacementModel, run, mlp_out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every layer's scores [head, q, k] as the model computes them with the run's frozen norms."""
    _SCORES.clear()
    sites = AttentionSites(rm, run)
    with freeze(rm.model.model, rm._norms, run.freeze_state.replaying()), rm._slots(
        (run.reconstruction + run.error)[None] if mlp_out is None else mlp_out[None]
    ):
        _set_impl(rm.model.model, CAPTURE)  # freeze restores the previous implementation on exit
        rm.model.model(input_ids=run.input_ids[None], use_cache=False)
    return [_SCORES[sites.attention(layer)][0] for layer in range(rm.model.n_layers)]


def setup(family: str, kind: str):  # noqa: ANN201
    model = tiny_model(family)
    rm = ReplacementModel(model, random_transcoder(model, kind))
    run = rm.run(prompt_ids(9))
    return rm, run


@pytest.mark.parametrize(("family", "kind"), CASES, ids=CASE_IDS)
def test_residual_nodes_sum_to_the_residual_stream(family: str, kind: str) -> None:
    rm, run = setup(family, kind)
    sites = AttentionSites(rm, run)
    assert any(len(residual_nodes(sites, rm, 2, p)) > 5 for p in range(run.n_pos))
    for layer in range(rm.model.n_layers):
        for pos in (0, 4, 8):
            nodes = residual_nodes(sites, rm, layer, pos)
            torch.testing.assert_close(nodes.vectors.sum(0), sites.resid_pre[pos, layer], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "kind"), CASES, ids=CASE_IDS)
def test_pairs_sum_to_the_models_scores(family: str, kind: str) -> None:
    rm, run = setup(family, kind)
    truth = true_scores(rm, run)
    sites = AttentionSites(rm, run)
    for layer in range(rm.model.n_layers):
        for head in range(sites.n_heads):
            for q in range(run.n_pos):
                result = qk_attribution(rm, run, layer, head, q, key_positions=list(range(q + 1)), sites=sites)
                want = truth[layer][head, q, : q + 1]
                got = torch.tensor([key.score for key in result.keys])
                assert (got - want).abs().max() <= 1e-4 * want.abs().max().clamp_min(1.0), (layer, head, q)
                torch.testing.assert_close(result.scores, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_perturbing_a_key_feature_moves_the_score_as_predicted(family: str) -> None:
    rm, run = setup(family, "clt")
    layer, head, q = 2, 1, 8
    result = qk_attribution(rm, run, layer, head, q, key_positions=list(range(q)))
    # A feature of the layer just below: it reaches layer 2's input only at its own position, so
    # with norms and patterns frozen the key-side change is all there is.
    candidates = [
        (key, i) for key in result.keys for i in range(len(key.key_nodes))
        if key.key_nodes.kind[i] == "feature" and key.key_nodes.layer[i] == 1
    ]
    key, node = max(candidates, key=lambda c: abs(float(c[0].pairs[:, c[1]].sum())))
    feature, act = int(key.key_nodes.feature[node]), float(key.key_nodes.activation[node])
    predicted_per_unit = float(key.pairs[:, node].sum()) / act
    delta = 0.7
    mlp_out = (run.reconstruction + run.error).clone()
    mlp_out[key.key_pos, 1:] += delta * rm.transcoder.W_dec[1][feature].to(mlp_out)  # its decoders to layers 1, 2
    with torch.no_grad():
        before = true_scores(rm, run)[layer][head, q, key.key_pos]
        after = true_scores(rm, run, mlp_out)[layer][head, q, key.key_pos]
    assert abs(predicted_per_unit) > 1e-3
    assert float(after - before) == pytest.approx(delta * predicted_per_unit, rel=1e-3, abs=1e-5)


def test_qk_attribution_rejects_bad_positions() -> None:
    rm, run = setup("llama", "clt")
    with pytest.raises(CltraceError, match="head 9 is out of range"):
        qk_attribution(rm, run, 0, 9, 3)
    with pytest.raises(CltraceError, match="key position 5 is not in 0..3"):
        qk_attribution(rm, run, 0, 0, 3, key_positions=[5])


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "gpt2"])
def test_sites_hold_the_residual_stream_each_layer_reads(family: str) -> None:
    rm, run = setup(family, "clt")
    sites = AttentionSites(rm, run)
    seen: list[torch.Tensor] = []
    norms = [layer.get_submodule(sites.sites.input_norm) for layer in sites.layers]
    handles = [n.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0])) for n in norms]
    with torch.no_grad():
        rm.model.model(input_ids=run.input_ids[None], use_cache=False)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(sites.resid_pre, torch.stack(seen, dim=1), rtol=1e-5, atol=1e-5)
