"""Autograd kernels of the training decode paths: sparse-dense products and a CLT's dense decode.

They give the same values and gradients as the transcoders' plain `decode` / `decode_sparse`, in
less memory: the sparse products never gather one decoder row per active feature, the CLT decodes
(dense and sparse) accumulate every source layer into one output buffer, and, where asked, the
sparse paths hand back decoder gradients as sparse tensors over the rows of the features present,
so that a lazy optimiser updates those rows only.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch


def _csr(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, (n_rows, n_cols))


def _sparse_rows(index: torch.Tensor, values: torch.Tensor, shape: torch.Size, row_dims: int) -> torch.Tensor:
    """A coalesced sparse COO tensor of `shape` whose rows `index` [U] (sorted, flat over the first
    `row_dims` dimensions) hold `values` [U, *shape[row_dims:]]."""
    coords = torch.stack(torch.unravel_index(index, tuple(shape[:row_dims])))  # [row_dims, U]
    return torch.sparse_coo_tensor(coords, values, shape, is_coalesced=True, check_invariants=False)


def _sparse_grads(ctx_needs: tuple[bool, bool], values: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor,
                  col: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, row_grads: bool, row_dims: int = 1,
                  norm_grads: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of out = A @ W for A [n_rows, F] (CSR `crow`, `col`, `values`; `rows` the entries' row
    indices) and W = `weight` with its first `row_dims` dimensions flattened into F rows and the rest
    into M columns, given grad [n_rows, M]: (d values [n], d weight, dense or, with `row_grads`, a
    sparse COO tensor over the rows of `weight` that A's columns name).

    With `row_grads`, `norm_grads` (each entry's feature's row norm [n], the gradient reaching it [n])
    adds the gradient of those norms, w_i / ‖w_i‖ per unit, to the same rows."""
    n_rows = grad.shape[0]
    w2 = weight.flatten(0, row_dims - 1).flatten(1)  # [F, M]
    Fn = w2.shape[0]
    grad_values = grad_weight = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ctx_needs[0]:
            pattern = _csr(torch.zeros_like(values), crow, col, n_rows, Fn)
            grad_values = torch.sparse.sampled_addmm(pattern, grad, w2.t(), beta=0.0).values()
        if ctx_needs[1]:
            if row_grads:  # only the columns present: a compact [U, M] product, returned as sparse rows
                present, compact = torch.unique(col, sorted=True, return_inverse=True)  # [U], [n]
                At = torch.sparse_coo_tensor(torch.stack([compact, rows]), values, (present.numel(), n_rows))
                part = torch.sparse.mm(At.coalesce(), grad)  # [U, M]
                if norm_grads is not None:
                    norms, g_norms = norm_grads
                    per_row = torch.zeros_like(part[:, 0]).index_add_(0, compact, g_norms.to(part.dtype))  # [U]
                    row_norm = torch.zeros_like(per_row).index_copy_(0, compact, norms.to(part.dtype))  # [U]
                    part += (per_row / row_norm.clamp_min(1e-30))[:, None] * w2.index_select(0, present)
                grad_weight = _sparse_rows(present, part.view(present.numel(), *weight.shape[row_dims:]), weight.shape,
                                           row_dims)
            else:
                At = torch.sparse_coo_tensor(torch.stack([col, rows]), values, (Fn, n_rows))
                grad_weight = torch.sparse.mm(At.coalesce(), grad).view(weight.shape)
    return grad_values, grad_weight


class SparseMatmul(torch.autograd.Function):
    """(out [N, M] = A @ W, norms) for a sparse A [N, F] given in CSR form (row-sorted entries) and
    W = `weight` with its first `row_dims` dimensions flattened into F rows and the rest into M columns.

    Forward and both backward products run as sparse-dense kernels (MKL on CPU), so memory stays
    O(N·M + nnz) and the cost scales with the number of active entries:
    dW = Aᵀ @ G (COO transpose), dvalues = (G @ Wᵀ) sampled at A's pattern (sampled_addmm).
    `norms` [n] (each entry's row norm of W) passes through for the sparsity loss. With `row_grads`,
    dW is a sparse COO tensor over the rows of W that A's columns name, the norms' gradient
    (w_i / ‖w_i‖ per unit) added to the same rows; otherwise the norms' gradient goes back to `norms`.
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, norms: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor,
                col: torch.Tensor, rows: torch.Tensor, n_rows: int, row_grads: bool = False,
                row_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        w2 = weight.flatten(0, row_dims - 1).flatten(1)  # [F, M]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch.sparse.mm(_csr(values, crow, col, n_rows, w2.shape[0]), w2)
        ctx.save_for_backward(values, norms, weight, crow, col, rows)
        ctx.row_grads, ctx.row_dims = row_grads, row_dims
        return out, norms.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, grad_norms: torch.Tensor) -> tuple:
        values, norms, weight, crow, col, rows = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        norm_grads = (norms, grad_norms) if ctx.row_grads else None
        grad_values, grad_weight = _sparse_grads(needs, values, weight, crow, col, rows, grad.contiguous(), ctx.row_grads,
                                                 ctx.row_dims, norm_grads=norm_grads)
        return grad_values, None if ctx.row_grads else grad_norms, grad_weight, None, None, None, None, None, None


class SparseLayout(NamedTuple):
    """One source layer's share of a sparse decode's entries: positions in the entry list, CSR form."""

    at: torch.Tensor  # [n_l] positions of this layer's entries among all entries
    crow: torch.Tensor  # [n_rows + 1] CSR row offsets
    col: torch.Tensor  # [n_l] feature of each entry
    rows: torch.Tensor  # [n_l] row of each entry


class SparseCltDecode(torch.autograd.Function):
    """(recon_flat [N, L·d], norms [n]): recon_flat = Σ_l A_l @ W_dec[l] placed at target layers l..L-1
    (columns l·d onward), for sparse activations A_l given per source layer by `layout` (entries'
    values in `values` [n]); `norms` [n] passes each entry's decoder norm through.

    Every layer's product is accumulated into one output buffer, and each layer's gradient is
    taken from its slice of the incoming gradient: no padded copies, no gathered decoder rows.
    With `row_grads`, each decoder's gradient is one sparse COO tensor over the rows of the features
    present, holding the gradient reaching `norms` too (the norms given must then carry none);
    otherwise that gradient is handed back to `norms`.
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, norms: torch.Tensor, layout: list[SparseLayout], n_rows: int,
                row_grads: bool, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, d = len(weights), weights[0].shape[-1]
        out = weights[0].new_zeros(n_rows, L * d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for l, (part, w) in enumerate(zip(layout, weights)):
                if part.at.numel():
                    A = _csr(values.index_select(0, part.at), part.crow, part.col, n_rows, w.shape[0])
                    out[:, l * d :] += torch.sparse.mm(A, w.reshape(w.shape[0], -1))
        ctx.save_for_backward(values, norms, *weights)
        ctx.layout, ctx.row_grads = layout, row_grads
        return out, norms.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, grad_norms: torch.Tensor) -> tuple:
        values, norms, *weights = ctx.saved_tensors
        d = weights[0].shape[-1]
        grad_values = torch.zeros_like(values) if ctx.needs_input_grad[0] else None
        grad_ws: list[torch.Tensor | None] = []
        for l, (part, w) in enumerate(zip(ctx.layout, weights)):
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[5 + l])
            if not part.at.numel():
                grad_ws.append(None)
                continue
            norm_grads = (norms.index_select(0, part.at), grad_norms.index_select(0, part.at)) if ctx.row_grads else None
            gv, gw = _sparse_grads(needs, values.index_select(0, part.at), w, part.crow, part.col, part.rows,
                                   grad[:, l * d :].contiguous(), ctx.row_grads, norm_grads=norm_grads)
            if grad_values is not None and gv is not None:
                grad_values.index_copy_(0, part.at, gv)
            grad_ws.append(gw)
        return (grad_values, None if ctx.row_grads else grad_norms, None, None, None, *grad_ws)


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


__all__ = ["DenseCltDecode", "SparseCltDecode", "SparseLayout", "SparseMatmul"]
