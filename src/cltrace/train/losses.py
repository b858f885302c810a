"""The training loss of a transcoder, as named terms.

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

With `row_grads` (the sparse path for a lazy optimiser), each decoder's gradient is a sparse
tensor over the rows of the features in the support, and the decoder norms of the pre-activation
loss are held constant: that loss then trains the encoder and thresholds only, since its gradient
would otherwise reach every feature's decoder on every step.
"""

from __future__ import annotations

import torch

from cltrace.errors import CltraceError
from cltrace.transcoder import Transcoder
from cltrace.transcoder.sparse_decode import decode_sparse_matmul


def transcoder_loss(
    tc: Transcoder,
    x: torch.Tensor,
    y: torch.Tensor,
    sparsity_lambda: float,
    sparsity_c: float,
    preact_lambda: float,
    decode: str = "sparse",
    row_grads: bool = False,
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
    if row_grads and decode != "sparse":
        raise CltraceError("row-sparse decoder gradients need the sparse decode; set decode to 'sparse'")
    with torch.set_grad_enabled(torch.is_grad_enabled() and not row_grads):  # row_grads: constants of the pre-activation loss
        norms = tc.decoder_norms()  # [L, F]
    if decode == "sparse":
        support = tc.activation.support(pre, with_grad=True)  # [N, L, F]
        rows, layers, features = support.nonzero(as_tuple=True)
        values = acts[rows, layers, features]  # [n]
        with torch.autocast(x.device.type, enabled=False):  # sparse kernels run in the weights' dtype
            recon, entry_norms = decode_sparse_matmul(tc, rows, layers, features, values, N, x, row_grads=row_grads,
                                                     decoder_norms=norms)
        sparsity_sum = torch.tanh(sparsity_c * entry_norms * values).sum()
    elif decode == "dense":
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else tc.b_dec.dtype
        with torch.autocast(x.device.type, enabled=False):
            recon = tc.decode_dense(acts, x, compute)  # [N, L, d]
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

    theta = tc.activation.preact_threshold(pre.dtype)  # [L, F], a scalar, or None (no such loss)
    if preact_lambda > 0 and theta is not None:
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


__all__ = ["loss_terms", "transcoder_loss"]
