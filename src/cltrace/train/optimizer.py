"""Adam with lazy row updates, and gradient clipping that takes sparse gradients.

A wide CLT's decoders hold most of its weights, yet on a step only the features that fired (and
those inside the JumpReLU estimator's window) get decoder gradient. Dense Adam would still read
and write every decoder weight and both its moments on every step; `LazyAdam` updates only the
rows a sparse gradient names (as `torch.optim.SparseAdam` does) and every dense gradient as Adam
does, so one optimiser holds the whole transcoder and checkpoints like Adam (`step`, `exp_avg`,
`exp_avg_sq` per tensor). A row that gets no gradient keeps its weights and its moments; the bias
correction follows the tensor's step count, as in SparseAdam and TensorFlow's LazyAdam.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adam import adam

CHUNK_ELEMENTS = 1 << 24  # weights gathered at once by a lazy update (64 MB in fp32)


class LazyAdam(torch.optim.Optimizer):
    """Adam over dense gradients; over sparse COO gradients, only the rows they name.

    Both run torch's fused Adam kernel (`torch.optim.adam.adam(fused=True)`): on the whole tensor,
    or on the named rows gathered from the weights and moments and written back.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                tensors = (p, state["exp_avg"], state["exp_avg_sq"])
                if p.grad.is_sparse:
                    _rows_update(tensors, p.grad, state["step"], group)
                else:
                    _adam_update(tensors, p.grad, state["step"], group)


def _adam_update(tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], grad: torch.Tensor, step: torch.Tensor,
                 group: dict[str, Any]) -> None:
    """Adam's update, in place, of (param, exp_avg, exp_avg_sq), all of one shape; `step` counts up by one."""
    p, m, v = tensors
    beta1, beta2 = group["betas"]
    adam([p], [grad], [m], [v], [], [step], fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
         weight_decay=0.0, eps=group["eps"], maximize=False)


def _rows_update(tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], grad: torch.Tensor, step: torch.Tensor,
                 group: dict[str, Any]) -> None:
    """Adam's update of the rows a sparse gradient names (its sparse dimensions flattened into one)."""
    grad = grad.coalesce()
    k = grad.sparse_dim()
    index = grad.indices()  # [k, U]
    shape = tensors[0].shape
    rows = index[0]
    for dim in range(1, k):  # row-major flat index over the first k dimensions
        rows = rows * shape[dim] + index[dim]
    flat = [t.view(-1, *shape[k:]) for t in tensors]  # [rows, *rest]
    values = grad.values()  # [U, *rest]
    # In chunks of rows, so that the gathered copies stay small when most rows are named; the step
    # counts once for the whole tensor.
    chunk = max(1, CHUNK_ELEMENTS // max(1, values[0].numel()))
    count = step.clone()
    for start in range(0, rows.numel(), chunk):
        part = rows[start : start + chunk]
        gathered = [t.index_select(0, part) for t in flat]  # [chunk, *rest]
        step.copy_(count)
        _adam_update((gathered[0], gathered[1], gathered[2]), values[start : start + chunk], step, group)
        for whole, rows_part in zip(flat, gathered):
            whole.index_copy_(0, part, rows_part)


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global norm of the gradients, which are then scaled to at most `max_norm` (0: left as they
    are): `torch.nn.utils.clip_grad_norm_`, extended to sparse COO gradients."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0 and not any(g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    parts = [g.coalesce().values() if g.is_sparse else g for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in parts]))
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            (g._values() if g.is_sparse else g).mul_(coef.to(g.dtype))
    return total


__all__ = ["LazyAdam", "clip_grad_norm"]
