"""Transcoder modules: encode/decode against naive references, sparse decode, activations, config."""

from __future__ import annotations

import math

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.train.config import TrainConfig
from cltrace.transcoder import (
    CrossLayerTranscoder,
    JumpReLU,
    PerLayerTranscoder,
    TopK,
    Transcoder,
    TranscoderConfig,
    make_activation,
    make_transcoder,
)
from cltrace.transcoder.sparse_decode import decode_sparse_matmul

L, D, F = 4, 6, 10


def config(kind: str = "clt", activation: str = "jumprelu", **kw) -> TranscoderConfig:
    topk_k = 3 if activation == "topk" else None
    return TranscoderConfig(kind=kind, n_layers=L, d_model=D, n_features=F, activation=activation, topk_k=topk_k, **kw)


def randomized(cfg: TranscoderConfig, seed: int = 0) -> Transcoder:
    """A random transcoder whose biases, thresholds and skip are nonzero too, so every term shows."""
    tc = Transcoder.random(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in tc.parameters():
            if p is not tc.W_enc and all(p is not w for w in tc._decoder_parameters()):
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.4 - 0.1)
    return tc


def inputs(*batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, L, D, generator=g, dtype=torch.float64) * 3).to(dtype)


# -- encoder and dense decoder against loops ------------------------------------------------------


def test_encode_pre_matches_per_layer_matmul() -> None:
    tc = randomized(config(dtype="float64"))
    x = inputs(2, 3)
    expected = torch.stack([x[..., l, :] @ tc.W_enc[l].T + tc.b_enc[l] for l in range(L)], dim=-2)
    torch.testing.assert_close(tc.encode_pre(x), expected, rtol=1e-12, atol=1e-12)


def naive_clt_decode(tc: CrossLayerTranscoder, acts: torch.Tensor) -> torch.Tensor:
    rows = acts.reshape(-1, L, F)
    out = torch.zeros(rows.shape[0], L, D, dtype=torch.float64)
    for r in range(rows.shape[0]):
        for target in range(L):
            total = tc.b_dec[target].detach().clone()
            for source in range(target + 1):
                for f in range(F):
                    total += rows[r, source, f] * tc.W_dec[source][f, target - source]
            out[r, target] = total
    return out.reshape(*acts.shape[:-2], L, D)


def test_clt_dense_decode_matches_naive_loop() -> None:
    tc = randomized(config("clt", dtype="float64"))
    acts = torch.rand(2, 3, L, F, dtype=torch.float64) * (torch.rand(2, 3, L, F) < 0.4)
    torch.testing.assert_close(tc.decode(acts), naive_clt_decode(tc, acts).detach(), rtol=1e-12, atol=1e-12)


def test_plt_dense_decode_with_skip_matches_naive_loop() -> None:
    tc = randomized(config("plt", dtype="float64", skip=True))
    x = inputs(5)
    acts = torch.rand(5, L, F, dtype=torch.float64)
    expected = torch.zeros(5, L, D, dtype=torch.float64)
    for r in range(5):
        for l in range(L):
            expected[r, l] = tc.b_dec[l] + sum(acts[r, l, f] * tc.W_dec[l, f] for f in range(F))
            expected[r, l] += sum(x[r, l, i] * tc.W_skip[l, i] for i in range(D))  # x_l @ W_skip_l
    torch.testing.assert_close(tc.decode(acts, x), expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kind,activation,skip", [("clt", "jumprelu", False), ("plt", "jumprelu", True), ("clt", "topk", False), ("plt", "relu", False)]
)
def test_per_layer_encode_and_decode_match_the_naive_loops(kind: str, activation: str, skip: bool) -> None:
    tc = randomized(config(kind, activation, dtype="float64", skip=skip))
    x = inputs(4, 3)
    acts = [tc.encode_layer(l, x[..., l, :]) for l in range(L)]  # each [4, 3, F]
    for l in range(L):
        pre = x[..., l, :] @ tc.W_enc[l].T + tc.b_enc[l]  # [4, 3, F]
        torch.testing.assert_close(tc.encode_layer_pre(l, x[..., l, :]), pre, rtol=1e-12, atol=1e-12)
        if activation == "jumprelu":
            expected = torch.where(pre > tc.activation.threshold[l], pre, torch.zeros_like(pre))
        elif activation == "relu":
            expected = pre.clamp_min(0)
        else:  # the k largest of each row, ReLU'd
            kth = pre.sort(dim=-1, descending=True).values[..., 2:3]
            expected = torch.where(pre >= kth, pre.clamp_min(0), torch.zeros_like(pre))
        torch.testing.assert_close(acts[l], expected, rtol=0, atol=0)
    dense = torch.stack(acts, dim=-2)  # [4, 3, L, F]
    expected_recon = naive_clt_decode(tc, dense) if kind == "clt" else None
    for l in range(L):
        got = tc.decode_layer(l, acts, x[..., l, :])  # [4, 3, D]
        if kind == "clt":
            want = expected_recon[..., l, :]
        else:
            want = tc.b_dec[l] + dense[..., l, :] @ tc.W_dec[l]
            if skip:
                want = want + torch.einsum("...i,io->...o", x[..., l, :], tc.W_skip[l])
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_training_decodes_match_decode_values_and_gradients() -> None:
    for kind, skip in (("clt", False), ("plt", True)):
        tc = randomized(config(kind, dtype="float64", skip=skip))
        x = inputs(6)
        acts = tc.encode(x).detach().requires_grad_(True)  # [6, L, F]
        rows, layers, features = (acts != 0).nonzero(as_tuple=True)
        reference = tc.decode(acts, x)
        grad = torch.randn_like(reference)
        (g_ref,) = torch.autograd.grad((reference * grad).sum(), acts)
        dense = tc.decode_dense(acts, x, torch.float64)
        (g_dense,) = torch.autograd.grad((dense * grad).sum(), acts)
        torch.testing.assert_close(dense, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_dense, g_ref, rtol=1e-12, atol=1e-12)
        values = acts[rows, layers, features]
        sparse = decode_sparse_matmul(tc, rows, layers, features, values, 6, x).recon
        (g_values,) = torch.autograd.grad((sparse * grad).sum(), values)
        torch.testing.assert_close(sparse, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_values, g_ref[rows, layers, features], rtol=1e-12, atol=1e-12)


def test_plt_equals_clt_whose_off_diagonal_decoders_are_zero() -> None:
    plt = randomized(config("plt", activation="relu", dtype="float64"))
    clt = make_transcoder(config("clt", activation="relu", dtype="float64"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(clt, name).copy_(getattr(plt, name))
        for l in range(L):
            clt.W_dec[l][:, 0].copy_(plt.W_dec[l])  # own layer only; later layers stay zero
    x = inputs(3, 2)
    plt_acts, plt_recon = plt(x)
    clt_acts, clt_recon = clt(x)
    assert torch.equal(plt_acts, clt_acts)
    torch.testing.assert_close(clt_recon, plt_recon, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(clt.decoder_norms(), plt.decoder_norms(), rtol=1e-12, atol=0)


def test_decoder_norms_vectors_and_output_layers() -> None:
    tc = randomized(config("clt", dtype="float64"))
    norms = tc.decoder_norms()
    assert norms.shape == (L, F)
    for l in range(L):
        for f in range(F):
            concatenated = torch.cat([tc.W_dec[l][f, k] for k in range(L - l)])
            assert math.isclose(norms[l, f].item(), concatenated.norm().item(), rel_tol=1e-12)
    feats = torch.tensor([7, 2])
    vectors = tc.decoder_vectors(1, feats)
    assert vectors.shape == (2, L - 1, D)
    assert torch.equal(vectors[0, 2], tc.W_dec[1][7, 2])  # feature 7 of layer 1 towards layer 3
    assert list(tc.output_layers(1)) == [1, 2, 3]
    plt = randomized(config("plt"))
    assert list(plt.output_layers(2)) == [2]
    assert torch.equal(plt.decoder_vectors(2, feats)[:, 0], plt.W_dec[2, feats])


# -- sparse decoding ------------------------------------------------------------------------------


CASES = [
    ("clt", "jumprelu", False),
    ("clt", "relu", False),
    ("clt", "topk", False),
    ("plt", "jumprelu", True),
    ("plt", "topk", False),
]


@pytest.mark.parametrize("kind,activation,skip", CASES)
def test_decode_sparse_matches_dense_values_and_gradients(kind: str, activation: str, skip: bool) -> None:
    tc = randomized(config(kind, activation, skip=skip, dtype="float64"))
    if isinstance(tc.activation, JumpReLU):
        tc.activation.bandwidth = 0.5  # a wide estimator window, so inactive features get threshold gradient
    x = inputs(3, 4).reshape(-1, L, D)  # [12, L, d]
    weight = torch.randn(12, L, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def grads() -> dict[str, torch.Tensor]:
        out = {name: p.grad.clone() for name, p in tc.named_parameters()}
        tc.zero_grad(set_to_none=True)
        return out

    acts = tc.encode(x)
    acts.retain_grad()
    dense = tc.decode(acts, x)
    (dense * weight).sum().backward()
    dense_grads = grads()

    sparse_acts = tc.encode_sparse(x, with_grad=True)
    sparse_acts.values.retain_grad()
    sparse = tc.decode_sparse(*sparse_acts, x=x)
    (sparse * weight).sum().backward()
    sparse_grads = grads()

    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    assert dense_grads.keys() == sparse_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    rows, layers, features = sparse_acts.rows, sparse_acts.layers, sparse_acts.features
    torch.testing.assert_close(sparse_acts.values.grad, acts.grad[rows, layers, features], rtol=1e-12, atol=1e-12)

    # The comparison must not be vacuous: sparse, and (JumpReLU) zeros in the window carry gradient.
    assert 0 < len(rows) < acts.numel()
    if activation == "jumprelu":
        assert (sparse_acts.values == 0).any()
        assert dense_grads["activation.threshold"].abs().sum() > 0

    # Without the estimator window, only active features are listed, and the forward is unchanged.
    active = tc.encode_sparse(x)
    assert (active.values != 0).all() and len(active.values) == int((acts != 0).sum())
    torch.testing.assert_close(tc.decode_sparse(*active, x=x), dense, rtol=1e-12, atol=1e-12)


def test_decode_sparse_with_no_active_features_gives_decoder_bias() -> None:
    tc = randomized(config("clt"))
    empty = torch.zeros(0, dtype=torch.long)
    out = tc.decode_sparse(empty, empty, empty, torch.zeros(0), n_rows=2)
    assert torch.equal(out, tc.b_dec.detach().expand(2, L, D))


def test_decode_sparse_rejects_bad_indices() -> None:
    tc = randomized(config("plt"))
    idx = torch.tensor([0])
    with pytest.raises(CltraceError, match="features index 10"):
        tc.decode_sparse(idx, idx, torch.tensor([F]), torch.ones(1), n_rows=1)
    with pytest.raises(CltraceError, match="one length"):
        tc.decode_sparse(idx, idx, idx, torch.ones(2), n_rows=1)


# -- activations ----------------------------------------------------------------------------------


def hand_made() -> tuple[JumpReLU, torch.Tensor, torch.Tensor]:
    act = JumpReLU(n_layers=1, n_features=3, bandwidth=0.4)
    with torch.no_grad():
        act.threshold.copy_(torch.tensor([[0.5, 1.0, 2.0]]))
    # Window half-width is 0.2: entries (0,0), (1,0), (0,2), (1,2) fall inside, (·,1) outside.
    pre = torch.tensor([[[0.6, 0.7, 2.1]], [[0.45, 1.3, 1.95]]], requires_grad=True)  # [2, 1, 3]
    grad_out = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]])
    return act, pre, grad_out


def test_jumprelu_forward_and_straight_through_gradients_by_hand() -> None:
    act, pre, grad_out = hand_made()
    out = act(pre)
    assert torch.equal(out.detach(), torch.tensor([[[0.6, 0.0, 2.1]], [[0.0, 1.3, 0.0]]]))
    out.backward(grad_out)
    # d/d pre is the indicator pre > θ.
    assert torch.equal(pre.grad, torch.tensor([[[1.0, 0.0, 3.0]], [[0.0, 5.0, 0.0]]]))
    # d/d θ = Σ −(θ/ε)·K((pre − θ)/ε)·g: feature 0: −(0.5/0.4)(1 + 4); feature 2: −(2/0.4)(3 + 6).
    torch.testing.assert_close(act.threshold.grad, torch.tensor([[-6.25, 0.0, -45.0]]))


def test_jumprelu_step_has_threshold_gradient_only() -> None:
    act, pre, grad_out = hand_made()
    out = act.step(pre)
    assert torch.equal(out.detach(), torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]]))
    out.backward(grad_out)
    assert pre.grad is None or not pre.grad.any()
    # d/d θ = Σ −(1/ε)·K(·)·g: feature 0: −2.5·5; feature 2: −2.5·9.
    torch.testing.assert_close(act.threshold.grad, torch.tensor([[-12.5, 0.0, -22.5]]))


def test_jumprelu_threshold_stays_fp32_with_low_precision_inputs() -> None:
    tc = randomized(config("clt")).to(torch.bfloat16)
    assert tc.activation.threshold.dtype == torch.float32
    assert tc.W_enc.dtype == torch.bfloat16 and tc.config.dtype == "bfloat16"
    acts, recon = tc(inputs(2, dtype=torch.bfloat16))
    assert acts.dtype == recon.dtype == torch.bfloat16
    (recon.float() ** 2).sum().backward()
    assert tc.activation.threshold.grad.dtype == torch.float32


def test_topk_keeps_exactly_k_largest() -> None:
    g = torch.Generator().manual_seed(0)
    pre = torch.rand(5, L, 20, generator=g) + 0.1  # positive and distinct
    pre.requires_grad_(True)
    out = TopK(4)(pre)
    assert ((out != 0).sum(-1) == 4).all()
    kth_largest = pre.detach().topk(4, dim=-1).values[..., -1:]
    assert torch.equal(out.detach(), torch.where(pre.detach() >= kth_largest, pre.detach(), 0.0))
    out.sum().backward()
    assert torch.equal(pre.grad, (out != 0).float())
    # Negative survivors are ReLU'd away.
    assert torch.equal(TopK(3)(-pre.detach()), torch.zeros_like(pre))


def test_make_activation() -> None:
    assert isinstance(make_activation("topk", L, F, topk_k=2), TopK)
    assert make_activation("jumprelu", L, F).threshold.shape == (L, F)
    with pytest.raises(CltraceError, match="unknown activation"):
        make_activation("gelu", L, F)
    with pytest.raises(CltraceError, match="topk_k"):
        make_activation("topk", L, F)


# -- construction and config ----------------------------------------------------------------------


def test_random_uses_paper_init_and_is_seeded() -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=3, d_model=32, n_features=64)
    tc = Transcoder.random(cfg, seed=7)
    assert isinstance(tc, CrossLayerTranscoder)
    bound_enc, bound_dec = 1 / math.sqrt(64), 1 / math.sqrt(3 * 32)
    assert tc.W_enc.abs().max() <= bound_enc and tc.W_enc.abs().max() > 0.9 * bound_enc
    for w in tc.W_dec:
        assert w.abs().max() <= bound_dec and w.abs().max() > 0.9 * bound_dec
    assert torch.equal(tc.activation.threshold, torch.full((3, 64), 0.03))
    assert not tc.b_enc.any() and not tc.b_dec.any()
    again = Transcoder.random(cfg, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(tc.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(Transcoder.random(cfg, seed=8).W_enc, tc.W_enc)
    tuned = Transcoder.random(cfg, seed=7, threshold_init=0.5, bandwidth=0.2)
    assert torch.equal(tuned.activation.threshold, torch.full((3, 64), 0.5)) and tuned.activation.bandwidth == 0.2
    assert torch.equal(tuned.W_enc, tc.W_enc)  # the draws do not depend on the threshold settings
    plt = PerLayerTranscoder.random(TranscoderConfig(kind="plt", n_layers=2, d_model=8, n_features=16, skip=True))
    assert isinstance(plt, PerLayerTranscoder) and not plt.W_skip.any()
    with pytest.raises(CltraceError):
        PerLayerTranscoder.random(cfg)


def test_input_shape_and_skip_errors() -> None:
    tc = randomized(config("plt", skip=True))
    with pytest.raises(CltraceError, match="n_layers=4, d_model=6"):
        tc.encode(torch.zeros(2, L, D + 1))
    with pytest.raises(CltraceError, match="skip path"):
        tc.decode(torch.zeros(2, L, F))


@pytest.mark.parametrize("what", ["transcoder config", "train config"])
def test_configs_read_from_files_refuse_bad_mappings_alike(what: str) -> None:
    """Both configs a file holds are read by one rule: a JSON object, known keys, the required ones there."""
    cls, good = (TranscoderConfig, config("clt").to_dict()) if what == "transcoder config" else (TrainConfig, TrainConfig().to_dict())
    assert cls.from_dict(good).to_dict() == good
    with pytest.raises(CltraceError, match=rf"^{what} must be a JSON object, got list$"):
        cls.from_dict([1])  # type: ignore[arg-type]
    with pytest.raises(CltraceError, match=rf"^{what}: unknown key\(s\) 'a\\nb', zz; known keys: [a-z_]+, "):
        cls.from_dict({**good, "zz": 1, "a\nb": 2})
    required = [k for k in ("kind", "n_layers") if cls is TranscoderConfig]
    if required:
        with pytest.raises(CltraceError, match=rf"^{what}: missing key\(s\) kind, n_layers$"):
            cls.from_dict({k: v for k, v in good.items() if k not in required})


def test_config_round_trips_through_dict() -> None:
    cfg = config("plt", "topk", skip=True, model_id="HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16")
    assert TranscoderConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "change,match",
    [
        ({"colour": "red"}, "unknown key.*colour"),
        ({"n_layers": 0}, "n_layers must be an integer >= 1"),
        ({"n_features": 2.5}, "n_features"),
        ({"kind": "sae"}, "kind must be one of"),
        ({"activation": "topk"}, "topk_k"),
        ({"activation": "topk", "topk_k": F + 1}, "topk_k"),
        ({"topk_k": 3}, "only for activation 'topk'"),
        ({"skip": True}, "skip is only supported for kind 'plt'"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"input_hook": "resid_pre"}, "input_hook"),
    ],
)
def test_config_from_dict_rejects_bad_input(change: dict, match: str) -> None:
    data = config("clt").to_dict() | change
    with pytest.raises(CltraceError, match=match):
        TranscoderConfig.from_dict(data)


def test_config_from_dict_requires_the_dimensions() -> None:
    data = config().to_dict()
    del data["d_model"]
    with pytest.raises(CltraceError, match="missing key.*d_model"):
        TranscoderConfig.from_dict(data)
