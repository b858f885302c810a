"""The training loss of DESIGN.md "Method defaults", as named terms.

On inputs x and targets y scaled per layer to mean norm √d_model (so a target element has mean
square about 1), for a batch of N tokens:

    mse      = Σ_l (1/N) Σ_t mean_d (ŷ_{t,l} − y_{t,l})²          (per-layer MSE, summed over layers)
    sparsity = λ (1/N) Σ_t Σ_{l,i} tanh(c · ‖W_dec,l,i‖ · a_{t,l,i})
    preact   = λ_p (1/N) Σ_t Σ_{l,i} ReLU(θ_{l,i} − h_{t,l,i}) · ‖W_dec,l,i‖
    total    = mse + sparsity + preact

‖W_dec,l,i‖ is the norm of all of feature (l, i)'s decoder vectors concatenated, h the
pre-activation, θ the JumpReLU threshold (0 for ReLU; TopK has no pre-activation loss).

Two decode paths give the same loss and gradients: "sparse" decodes only the support of the
activation (active features plus the zeros inside the JumpReLU estimator's window, through which
the threshold still gets gradient), "dense" multiplies the full activation matrix by the decoder.
"""

from __future__ import annotations

import warnings

import torch

from cltrace.errors import CltraceError
from cltrace.transcoder import JumpReLU, ReLU, Transcoder


class _SparseMatmul(torch.autograd.Function):
    """out [N, M] = A @ W for a sparse A [N, F] given in CSR form (row-sorted entries), W [F, M].

    Forward and both backward products run as sparse-dense kernels (MKL on CPU), so memory stays
    O(N·M + nnz) and the cost scales with the number of active entries:
    dW = Aᵀ @ G (COO transpose), dvalues = (G @ Wᵀ) sampled at A's pattern (sampled_addmm).
    """

    @staticmethod
    def forward(ctx, values, weight, crow, col, rows, n_rows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            A = torch.sparse_csr_tensor(crow, col, values, (n_rows, weight.shape[0]))
            out = torch.sparse.mm(A, weight)
        ctx.save_for_backward(values, weight, crow, col, rows)
        ctx.n_rows = n_rows
        return out

    @staticmethod
    def backward(ctx, grad):
        values, weight, crow, col, rows = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_weight = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ctx.needs_input_grad[0]:
                pattern = torch.sparse_csr_tensor(crow, col, torch.zeros_like(values), (ctx.n_rows, weight.shape[0]))
                grad_values = torch.sparse.sampled_addmm(pattern, grad, weight.t(), beta=0.0).values()
            if ctx.needs_input_grad[1]:
                At = torch.sparse_coo_tensor(torch.stack([col, rows]), values, (weight.shape[0], ctx.n_rows))
                grad_weight = torch.sparse.mm(At.coalesce(), grad)
        return grad_values, grad_weight, None, None, None, None


class _DenseCltDecode(torch.autograd.Function):
    """recon_flat [N, L·d] = Σ_l acts_l @ W_dec[l] placed at target layers l..L-1 (columns l·d onward).

    One GEMM per source layer, accumulated in place into one output buffer (no padded copies), with
    the products in `compute_dtype` (bf16 where asked) and the sums in the weights' dtype.
    """

    @staticmethod
    def forward(ctx, acts, compute_dtype, *weights):
        N, L, Fn = acts.shape
        d = weights[0].shape[-1]
        out = weights[0].new_zeros(N, L * d)
        a_c = acts.to(compute_dtype)
        w_c = [w.reshape(Fn, -1).to(compute_dtype) for w in weights]
        for l in range(L):
            out[:, l * d :] += a_c[:, l] @ w_c[l]
        ctx.save_for_backward(a_c, *w_c)
        ctx.dtypes = (acts.dtype, weights[0].dtype, [tuple(w.shape) for w in weights])
        return out

    @staticmethod
    def backward(ctx, grad):
        a_c, *w_c = ctx.saved_tensors
        acts_dtype, w_dtype, shapes = ctx.dtypes
        L = a_c.shape[1]
        d = shapes[0][-1]
        g_c = grad.to(a_c.dtype)
        grad_acts = grad_ws = None
        if ctx.needs_input_grad[0]:
            grad_acts = torch.stack([g_c[:, l * d :] @ w_c[l].T for l in range(L)], dim=1).to(acts_dtype)
        grad_ws = [
            (a_c[:, l].T @ g_c[:, l * d :]).to(w_dtype).view(shapes[l]) if ctx.needs_input_grad[2 + l] else None
            for l in range(L)
        ]
        return (grad_acts, None, *grad_ws)


def dense_decode(tc: Transcoder, acts: torch.Tensor, x: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """`tc.decode(acts, x)` for acts [N, L, F], with the products in `compute_dtype` (a training fast path)."""
    N, L, _ = acts.shape
    if tc.config.kind == "clt":
        flat = _DenseCltDecode.apply(acts, compute_dtype, *tc.W_dec)
        recon = flat.view(N, L, tc.d_model) + tc.b_dec
    else:
        recon = torch.einsum("nlf,lfd->nld", acts.to(compute_dtype), tc.W_dec.to(compute_dtype)).to(tc.b_dec.dtype) + tc.b_dec
        if getattr(tc, "W_skip", None) is not None:
            recon = recon + torch.einsum("nli,lio->nlo", x.to(compute_dtype), tc.W_skip.to(compute_dtype)).to(tc.b_dec.dtype)
    return recon


def sparse_decode(
    tc: Transcoder,
    rows: torch.Tensor,
    layers: torch.Tensor,
    features: torch.Tensor,
    values: torch.Tensor,
    n_rows: int,
    x: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruction [n_rows, L, d] from the listed active features, for training.

    The same result and gradients as `tc.decode_sparse`, but each source layer's decode is one
    sparse-dense product (see `_SparseMatmul`) instead of a gather of every active feature's decoder
    rows, which needs n_active × L × d memory. Entries must be in row-major order (as `nonzero`
    gives them).
    """
    L, Fn, d = tc.n_layers, tc.n_features, tc.d_model
    dtype = tc.b_dec.dtype
    values = values.to(dtype)
    recon_flat: torch.Tensor | None = None  # [n_rows, L·d]: target layer j occupies columns j·d:(j+1)·d
    outs: list[torch.Tensor] = []
    is_clt = tc.config.kind == "clt"
    for l in range(L):
        at = (layers == l).nonzero().squeeze(1)
        r, f, v = rows.index_select(0, at), features.index_select(0, at), values.index_select(0, at)
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.bincount(r, minlength=n_rows).cumsum(0)
        weight = tc.W_dec[l].reshape(Fn, -1) if is_clt else tc.W_dec[l]  # [F, (L - l)·d] or [F, d]
        out = _SparseMatmul.apply(v, weight, crow, f, r, n_rows)
        if is_clt:
            # layer l's features write to target layers l..L-1: the last (L - l)·d columns
            padded = torch.nn.functional.pad(out, (l * d, 0))
            recon_flat = padded if recon_flat is None else recon_flat + padded
        else:
            outs.append(out)
    if is_clt:
        recon = recon_flat.view(n_rows, L, d) + tc.b_dec
    else:
        recon = torch.stack(outs, dim=1) + tc.b_dec  # [n_rows, L, d]
    if getattr(tc, "W_skip", None) is not None:
        recon = recon + torch.einsum("nli,lio->nlo", x.to(dtype), tc.W_skip)
    return recon


def transcoder_loss(
    tc: Transcoder,
    x: torch.Tensor,
    y: torch.Tensor,
    sparsity_lambda: float,
    sparsity_c: float,
    preact_lambda: float,
    decode: str = "sparse",
) -> dict[str, torch.Tensor]:
    """Loss terms of a batch x, y [N, L, d] (normalised).

    Returns a dict of scalars `mse`, `sparsity`, `preact`, `total` (with gradient) and, detached,
    `mse_per_layer` [L], `nmse_per_layer` [L] (batch-centred), `l0_per_layer` [L] (mean active
    features per token) and `fired` [L, F] (bool: fired on some token of the batch).
    """
    if x.dim() != 3 or x.shape != y.shape:
        raise CltraceError(f"x and y must both be [tokens, n_layers, d_model], got {tuple(x.shape)} and {tuple(y.shape)}")
    N = x.shape[0]
    pre = tc.encode_pre(x)  # [N, L, F]
    acts = tc.activation(pre)  # [N, L, F]
    norms = tc.decoder_norms()  # [L, F]
    skip_x = x if getattr(tc, "W_skip", None) is not None else None
    if decode == "sparse":
        support = tc.activation.support(pre, with_grad=True)  # [N, L, F]
        rows, layers, features = support.nonzero(as_tuple=True)
        values = acts[rows, layers, features]  # [n]
        with torch.autocast(x.device.type, enabled=False):  # sparse kernels run in the weights' dtype
            recon = sparse_decode(tc, rows, layers, features, values, N, x=skip_x)  # [N, L, d]
        sparsity_sum = torch.tanh(sparsity_c * norms[layers, features] * values).sum()
    elif decode == "dense":
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else tc.b_dec.dtype
        with torch.autocast(x.device.type, enabled=False):
            recon = dense_decode(tc, acts, skip_x, compute)  # [N, L, d]
        sparsity_sum = torch.tanh(sparsity_c * norms * acts).sum()
    else:
        raise CltraceError(f"decode must be 'sparse' or 'dense', got {decode!r}")

    return loss_terms(tc, pre, acts, norms, recon, y, sparsity_sum, sparsity_lambda, preact_lambda)


def loss_terms(
    tc: Transcoder,
    pre: torch.Tensor,
    acts: torch.Tensor,
    norms: torch.Tensor,
    recon: torch.Tensor,
    y: torch.Tensor,
    sparsity_sum: torch.Tensor,
    sparsity_lambda: float,
    preact_lambda: float,
) -> dict[str, torch.Tensor]:
    """The named loss terms and batch metrics from a reconstruction recon [N, L, d] of targets y,
    the pre-activations and activations [N, L, F] behind it, the decoder norms [L, F] and the summed
    tanh sparsity term (the part shared by one process and a feature-sharded rank, whose `acts`,
    `pre` and `norms` cover its own features only)."""
    N = y.shape[0]
    y = y.to(recon.dtype)
    sq = (recon - y).pow(2)  # [N, L, d]
    mse_per_layer = sq.mean(dim=(0, 2))  # [L]
    mse = mse_per_layer.sum()
    sparsity = sparsity_lambda * sparsity_sum / N

    act = tc.activation
    if preact_lambda > 0 and isinstance(act, (JumpReLU, ReLU)):
        theta = act.threshold if isinstance(act, JumpReLU) else torch.zeros((), dtype=pre.dtype)
        preact = preact_lambda * (torch.relu(theta - pre) * norms).sum() / N
    else:
        preact = pre.new_zeros(())
    total = mse + sparsity + preact

    with torch.no_grad():
        active = acts != 0  # [N, L, F]
        yd = y.detach()
        var = (yd - yd.mean(0)).pow(2).sum(dim=(0, 2))  # [L]
        nmse_per_layer = sq.detach().sum(dim=(0, 2)) / var.clamp_min(1e-12)
        l0_per_layer = active.sum(dim=(0, 2)).to(torch.float64) / N
        fired = active.any(0)
    return {
        "mse": mse,
        "sparsity": sparsity,
        "preact": preact,
        "total": total,
        "mse_per_layer": mse_per_layer.detach(),
        "nmse_per_layer": nmse_per_layer,
        "l0_per_layer": l0_per_layer,
        "fired": fired,
    }


__all__ = ["dense_decode", "loss_terms", "sparse_decode", "transcoder_loss"]
