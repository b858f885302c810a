"""Activation functions of transcoder features.

Every activation acts on pre-activations shaped [..., n_layers, n_features] (one row of features
per layer) and returns activations of the same shape and dtype.

JumpReLU follows Rajamanoharan et al., "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders" (2024): the output is pre · H(pre − θ), and the threshold θ, which
gets no gradient from the step itself, is trained through a straight-through estimator with a
rectangle kernel K(u) = 1[−½ < u < ½] of width ε (the bandwidth):

    ∂ JumpReLU / ∂ pre := H(pre − θ)
    ∂ JumpReLU / ∂ θ   := −(θ / ε) · K((pre − θ) / ε)
    ∂ H(pre − θ) / ∂ θ := −(1 / ε) · K((pre − θ) / ε)      (for L0-style losses)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cltrace.errors import CltraceError

ACTIVATIONS = ("jumprelu", "relu", "topk")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[−½ < u < ½], in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_threshold(grad: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Sum a gradient shaped [..., L, F] over its leading (broadcast) dims to the threshold's [L, F]."""
    return grad.reshape(-1, *threshold.shape).sum(0)


class _JumpReLUFunction(torch.autograd.Function):
    """pre · 1[pre > θ] with the rectangle-kernel straight-through estimator for θ."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)  # [..., L, F], pre's dtype

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            # The kernel is evaluated in fp32 whatever pre's dtype: θ is an fp32 parameter.
            kernel = _rectangle((pre.float() - threshold) / eps)  # [..., L, F]
            grad_threshold = _sum_to_threshold(-(threshold / eps) * kernel * grad_out.float(), threshold)
        return grad_pre, grad_threshold, None


class _StepFunction(torch.autograd.Function):
    """H(pre − θ) = 1[pre > θ]: no gradient to pre, rectangle-kernel estimator for θ."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)  # [..., L, F]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            kernel = _rectangle((pre.float() - threshold) / eps)  # [..., L, F]
            grad_threshold = _sum_to_threshold(-(1.0 / eps) * kernel * grad_out.float(), threshold)
        # As in the JumpReLU paper, the L0 term trains the threshold only, not the encoder.
        return None, grad_threshold, None


class Activation(nn.Module):
    """Base class: a feature nonlinearity on pre-activations [..., n_layers, n_features]."""

    name: str = ""

    def forward(self, pre: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def support(self, pre: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
        """Boolean mask [..., L, F] of the entries that are active.

        With `with_grad`, also the entries that are zero but still pass gradient to a parameter of
        the activation (the JumpReLU threshold's estimator window), so that a sparse decode over
        this support gives the same gradients as a dense one.
        """
        return self(pre) != 0

    def at_layer(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """Activations [..., F] of layer `layer`'s features from their pre-activations pre [..., F].

        ReLU and TopK act on each row of features alone, so one layer's row needs nothing else.
        """
        return self(pre)

    def preact_threshold(self, dtype: torch.dtype) -> torch.Tensor | None:
        """θ [L, F] (or a scalar) of the pre-activation loss ReLU(θ − pre): the level a feature's
        pre-activation must pass to fire; None where the loss does not apply (TopK)."""
        return None


class JumpReLU(Activation):
    """JumpReLU with a learned per-feature threshold θ [n_layers, n_features], kept in fp32.

    `bandwidth` is the width ε of the rectangle kernel of the threshold's straight-through
    estimator; it matters only in training. The default 0.1 is a few times the initial threshold
    (0.03, for inputs scaled to mean norm √d_model), so a feature's estimator window starts
    narrow compared with the spread of its pre-activations.
    """

    name = "jumprelu"

    def __init__(self, n_layers: int, n_features: int, threshold_init: float = 0.03, bandwidth: float = 0.1) -> None:
        super().__init__()
        if bandwidth <= 0:
            raise CltraceError(f"JumpReLU bandwidth must be positive, got {bandwidth}; pass a value such as 0.1")
        self.bandwidth = float(bandwidth)
        self.threshold = nn.Parameter(torch.full((n_layers, n_features), float(threshold_init), dtype=torch.float32))

    def _apply(self, fn: Any, recurse: bool = True) -> JumpReLU:
        # `.to(dtype)` / `.half()` on the transcoder must not round the thresholds: restore fp32.
        super()._apply(fn, recurse)
        if self.threshold.is_floating_point() and self.threshold.dtype != torch.float32:
            self.threshold.data = self.threshold.data.float()
        return self

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFunction.apply(pre, self.threshold, self.bandwidth)

    def at_layer(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """pre [..., F] · 1[pre > θ_layer], compared in fp32 as `forward` does."""
        return _JumpReLUFunction.apply(pre, self.threshold[layer], self.bandwidth)

    def step(self, pre: torch.Tensor) -> torch.Tensor:
        """1[pre > θ] in pre's dtype, with the rectangle-kernel estimator for θ (for L0 losses)."""
        return _StepFunction.apply(pre, self.threshold, self.bandwidth)

    def support(self, pre: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
        if with_grad:
            # The kernel is nonzero for |pre − θ| < ε/2, and entries above the window are active.
            return pre > self.threshold - self.bandwidth / 2
        return pre > self.threshold

    def preact_threshold(self, dtype: torch.dtype) -> torch.Tensor:
        return self.threshold

    def extra_repr(self) -> str:
        return f"n_layers={self.threshold.shape[0]}, n_features={self.threshold.shape[1]}, bandwidth={self.bandwidth}"


class ReLU(Activation):
    """max(pre, 0)."""

    name = "relu"

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def support(self, pre: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
        return pre > 0

    def preact_threshold(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((), dtype=dtype)


class TopK(Activation):
    """Keep the k largest pre-activations of each (..., layer) row, ReLU'd; zero the rest."""

    name = "topk"

    def __init__(self, k: int) -> None:
        super().__init__()
        if k < 1:
            raise CltraceError(f"TopK needs k >= 1, got {k}")
        self.k = int(k)

    def _check(self, pre: torch.Tensor) -> None:
        if pre.shape[-1] < self.k:
            raise CltraceError(f"TopK k={self.k} exceeds the {pre.shape[-1]} features per layer; lower k")

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        self._check(pre)
        values, indices = pre.topk(self.k, dim=-1)  # [..., L, k]
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def support(self, pre: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
        self._check(pre)
        indices = pre.topk(self.k, dim=-1).indices
        kept = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, indices, True)
        return kept & (pre > 0)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def make_activation(
    name: str,
    n_layers: int,
    n_features: int,
    *,
    topk_k: int | None = None,
    threshold_init: float = 0.03,
    bandwidth: float = 0.1,
) -> Activation:
    """Build the activation called `name` ("jumprelu" | "relu" | "topk") for [n_layers, n_features] rows."""
    if name == "jumprelu":
        return JumpReLU(n_layers, n_features, threshold_init=threshold_init, bandwidth=bandwidth)
    if name == "relu":
        return ReLU()
    if name == "topk":
        if topk_k is None:
            raise CltraceError("activation 'topk' needs topk_k; set it to the number of features kept per layer")
        return TopK(topk_k)
    raise CltraceError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
