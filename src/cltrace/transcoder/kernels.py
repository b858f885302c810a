"""Autograd kernels of the training decode paths: sparse-dense products and a CLT's dense decode.

They give the same values and gradients as the transcoders' plain `decode` / `decode_sparse`, in
less memory: the sparse product never gathers one decoder row per active feature, and the dense
CLT decode accumulates every source layer into one output buffer.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


class SparseMatmul(torch.autograd.Function):
    """out [N, M] = A @ W for a sparse A [N, F] given in CSR form (row-sorted entries), W [F, M].

    Forward and both backward products run as sparse-dense kernels (MKL on CPU), so memory stays
    O(N·M + nnz) and the cost scales with the number of active entries:
    dW = Aᵀ @ G (COO transpose), dvalues = (G @ Wᵀ) sampled at A's pattern (sampled_addmm).
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            A = torch.sparse_csr_tensor(crow, col, values, (n_rows, weight.shape[0]))
            out = torch.sparse.mm(A, weight)
        ctx.save_for_backward(values, weight, crow, col, rows)
        ctx.n_rows = n_rows
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
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


class DenseCltDecode(torch.autograd.Function):
    """recon_flat [N, L·d] = Σ_l acts_l @ W_dec[l] placed at target layers l..L-1 (columns l·d onward).

    One GEMM per source layer, accumulated in place into one output buffer (no padded copies), with
    the products in `compute_dtype` (bf16 where asked) and the sums in the weights' dtype.
    """

    @staticmethod
    def forward(ctx: Any, acts: torch.Tensor, compute_dtype: torch.dtype, *weights: torch.Tensor) -> torch.Tensor:
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
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
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


__all__ = ["DenseCltDecode", "SparseMatmul"]
