"""Row-sparse decoder gradients and lazy Adam, against dense autograd, torch's Adam and a by-hand update."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.train import Planted, planted_config

from cltrace.errors import CltraceError
from cltrace.train import Trainer, optimizer, transcoder_loss
from cltrace.train.optimizer import LazyAdam, clip_grad_norm
from cltrace.transcoder import Transcoder, TranscoderConfig
from cltrace.transcoder.kernels import SparseMatmul
from cltrace.transcoder.sparse_decode import csr_offsets, decode_sparse_matmul


def _random_tc(kind: str) -> Transcoder:
    cfg = TranscoderConfig(kind, 3, 8, 16, activation="relu", dtype="float64")
    tc = Transcoder.random(cfg, seed=2)
    with torch.no_grad():
        tc.b_enc.fill_(-1.0)  # a few features per token, so that some rows of every decoder stay unread
    return tc


@pytest.mark.parametrize("row_dims", [1, 2])
def test_sparse_product_and_row_norms_give_the_dense_gradients_as_sparse_rows(row_dims: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    n_rows, cols = (4, torch.tensor([1, 3, 3, 0])) if row_dims == 1 else (3, torch.tensor([2, 7, 19, 7]))
    rows = torch.tensor([0, 0, 2, 3]) if row_dims == 1 else torch.tensor([0, 1, 1, 2])
    values = torch.randn(4, generator=g, dtype=torch.float64)
    w2 = w.flatten(0, row_dims - 1)  # [F, rest]
    dense_a = torch.zeros(n_rows, w2.shape[0], dtype=torch.float64).index_put((rows, cols), values)  # [n_rows, F]
    expected = dense_a @ w2.flatten(1)
    crow = csr_offsets(rows, n_rows)
    entry_norms = w2.flatten(1).norm(dim=1).detach()[cols]  # [n] each entry's row norm, without gradient
    out, norms = SparseMatmul.apply(values, entry_norms, w, crow, cols, rows, n_rows, True, row_dims)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(norms, entry_norms)
    present = torch.unique(cols)
    grad, norm_grad = torch.randn_like(out), torch.randn_like(norms)
    ((out * grad).sum() + (norms * norm_grad).sum()).backward()
    (dense,) = torch.autograd.grad((expected * grad).sum() + (w2.flatten(1)[cols].norm(dim=1) * norm_grad).sum(), w)
    assert w.grad.is_sparse
    torch.testing.assert_close(w.grad.to_dense(), dense)
    named = w.grad.coalesce().indices()
    flat = named[0] if row_dims == 1 else named[0] * 5 + named[1]
    assert sorted(set(flat.tolist())) == present.tolist()


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_row_sparse_decode_matches_the_dense_decode_and_touches_only_present_rows(kind: str) -> None:
    tc = _random_tc(kind)
    x = torch.randn(12, 3, 8, dtype=torch.float64) * 2
    acts = tc.encode(x).detach()  # [12, L, F]
    rows, layers, features = (acts != 0).nonzero(as_tuple=True)
    values = acts[rows, layers, features]
    grad = torch.randn(12, 3, 8, dtype=torch.float64)
    recon, norms = decode_sparse_matmul(tc, rows, layers, features, values, 12, row_grads=True)
    (recon * grad).sum().backward()
    sparse_grads = [p.grad for p in tc._decoder_parameters()]
    tc.zero_grad(set_to_none=True)
    (tc.decode(acts) * grad).sum().backward()
    torch.testing.assert_close(recon, tc.decode(acts))
    torch.testing.assert_close(norms, tc.decoder_norms()[layers, features].detach())
    for p, g in zip(tc._decoder_parameters(), sparse_grads):
        assert g.is_sparse
        torch.testing.assert_close(g.to_dense(), p.grad)
    present = set(zip(layers.tolist(), features.tolist()))
    assert len(present) < 3 * 16, "every feature fired: the test would not see untouched rows"
    if kind == "plt":  # one decoder tensor [L, F, d]: rows named by (layer, feature)
        named = {tuple(ix) for ix in sparse_grads[0].coalesce().indices().T.tolist()}
    else:  # one decoder tensor per source layer, [F, L - l, d]
        named = {(l, i) for l, g in enumerate(sparse_grads) for i in g.coalesce().indices()[0].tolist()}
    assert named == present


def test_loss_with_row_grads_has_the_dense_gradients() -> None:
    x = torch.randn(20, 3, 8, dtype=torch.float64) * 2
    y = torch.randn(20, 3, 8, dtype=torch.float64)
    grads = {}
    for row_grads, preact in [(True, 0.0), (False, 0.0), (True, 0.05), (False, 0.05)]:
        tc = _random_tc("clt")
        decode = "sparse" if row_grads else "dense"
        terms = transcoder_loss(tc, x, y, 0.3, 2.0, preact, decode=decode, row_grads=row_grads)
        terms["total"].backward()
        grads[row_grads, preact] = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad)
                                    for n, p in tc.named_parameters() if p.grad is not None}
    for name, g in grads[False, 0.0].items():
        torch.testing.assert_close(grads[True, 0.0][name], g, msg=name)
    # with the pre-activation loss, only the decoders differ: its decoder norms are constants there
    for name, g in grads[False, 0.05].items():
        if not name.startswith("W_dec"):
            torch.testing.assert_close(grads[True, 0.05][name], g, msg=name)
    assert any(not torch.equal(grads[True, 0.05][n], grads[False, 0.05][n]) for n in grads[False, 0.05] if n.startswith("W_dec"))


def test_lazy_adam_on_dense_gradients_is_adam() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    lazy, adam = LazyAdam([a], lr=0.01, betas=(0.8, 0.95)), torch.optim.Adam([b], lr=0.01, betas=(0.8, 0.95), foreach=False)
    for _ in range(5):
        grad = torch.randn(6, 4, generator=g, dtype=torch.float64)
        a.grad, b.grad = grad.clone(), grad.clone()
        lazy.step()
        adam.step()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 3])  # one chunk; one row per chunk
def test_lazy_adam_updates_only_named_rows_with_the_by_hand_update(chunk_elements: int, monkeypatch) -> None:
    monkeypatch.setattr(optimizer, "CHUNK_ELEMENTS", chunk_elements)
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = LazyAdam([p], lr=0.1, betas=(0.5, 0.75), eps=1e-8)
    g1, g3 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64)
    for step_rows in ([(1, g1)], [(2, g3)], [(1, g3), (2, g1)]):  # row 1 at steps 1 and 3, row 2 at 2 and 3, 0 and 3 never
        index = torch.tensor([[r for r, _ in step_rows]])
        p.grad = torch.sparse_coo_tensor(index, torch.stack([v for _, v in step_rows]), (4, 3)).coalesce()
        opt.step()
    # row 1, by hand: moments skip step 2; bias correction follows the tensor's step count (3)
    m1, v1 = 0.5 * g1, 0.25 * g1**2
    p1 = -0.1 / (1 - 0.5) * m1 / (torch.sqrt(v1) / math.sqrt(1 - 0.75) + 1e-8)
    m3, v3 = 0.5 * m1 + 0.5 * g3, 0.75 * v1 + 0.25 * g3**2
    p3 = p1 - 0.1 / (1 - 0.5**3) * m3 / (torch.sqrt(v3) / math.sqrt(1 - 0.75**3) + 1e-8)
    torch.testing.assert_close(p[1], p3)
    torch.testing.assert_close(opt.state[p]["exp_avg"][1], m3)
    assert float(opt.state[p]["step"]) == 3
    assert p[0].eq(0).all() and p[3].eq(0).all()
    assert opt.state[p]["exp_avg"][[0, 3]].eq(0).all() and opt.state[p]["exp_avg_sq"][[0, 3]].eq(0).all()


def test_clip_grad_norm_with_sparse_gradients_matches_torch_on_the_dense_ones() -> None:
    g = torch.Generator().manual_seed(1)
    dense_grads = [torch.randn(5, 3, generator=g), torch.zeros(4, 2)]
    dense_grads[1][2] = torch.randn(2, generator=g)
    ours = [torch.nn.Parameter(torch.zeros_like(t)) for t in dense_grads]
    ref = [torch.nn.Parameter(torch.zeros_like(t)) for t in dense_grads]
    ours[0].grad, ours[1].grad = dense_grads[0].clone(), dense_grads[1].to_sparse(1)
    ref[0].grad, ref[1].grad = dense_grads[0].clone(), dense_grads[1].clone()
    total = clip_grad_norm(ours, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(ours[1].grad.to_dense(), ref[1].grad)
    torch.testing.assert_close(ours[0].grad, ref[0].grad)


def test_lazy_adam_needs_the_sparse_decode() -> None:
    with pytest.raises(CltraceError, match="lazy_adam.*sparse"):
        planted_config(optimizer="lazy_adam", decode="dense")
    with pytest.raises(CltraceError, match="optimizer must be"):
        planted_config(optimizer="sgd")


def test_lazy_adam_recovers_planted_features_and_resumes_exactly(tmp_path: Path) -> None:
    src = Planted()
    cfg = planted_config(optimizer="lazy_adam", n_features=128, checkpoint_every=40)
    whole = Trainer(cfg, src, tmp_path / "whole", progress=False).run()
    for l in range(src.n_layers):
        W = whole.W_dec[l][:, 0]  # decoders of layer l's features towards layer l
        W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        best = (src.D[l] @ W.T).max(dim=1).values  # [planted]: best cosine with a learned feature
        assert (best >= 0.9).float().mean() >= 0.9, best
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nmse"] < 0.05
    Trainer(cfg, src, tmp_path / "halves", progress=False, stop_after=120).run()
    resumed = Trainer(cfg, src, tmp_path / "halves", progress=False, resume=True).run()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
