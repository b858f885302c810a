"""Freezing attention patterns and normalisation denominators.

The local replacement model is linear in what the MLP slots emit only once every nonlinearity
outside the MLPs is held fixed: the softmax pattern of each attention head and the denominator of
each norm. This module makes that happen inside an unmodified Hugging Face model:

* attention goes through a function registered with transformers' `AttentionInterface` under the
  name `cltrace_frozen`; it computes the eager attention of the family (scaling, soft-capping,
  grouped keys and values) and detaches the softmax pattern, so only the OV path carries gradient;
* every norm module's `forward` is swapped, for the duration of a `freeze` block, for one that gives
  the same value with its denominator detached (mean-centring in a LayerNorm stays live: it is linear).

A `FreezeState` records the patterns and denominators of one forward pass (`mode="record"`) and can
then replay them (`mode="replay"`), so that a later forward on perturbed inputs uses exactly the
constants of the original prompt. That replay is what makes the frozen model truly linear.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from cltrace.errors import CltraceError

FROZEN_ATTENTION = "cltrace_frozen"

NormKind = Literal["rms", "rms_offset", "layer"]


@dataclass
class FreezeState:
    """The frozen constants of one prompt: attention patterns and norm scales, keyed by module."""

    mode: Literal["record", "replay"] = "record"
    patterns: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # [batch, head, q, k]
    norm_scales: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # [batch, pos, 1]

    def replaying(self) -> FreezeState:
        """The same constants, set to be replayed rather than recorded."""
        return FreezeState("replay", self.patterns, self.norm_scales)


_ACTIVE: contextvars.ContextVar[FreezeState | None] = contextvars.ContextVar("cltrace_freeze", default=None)


def _lookup(store: dict[nn.Module, torch.Tensor], module: nn.Module, what: str) -> torch.Tensor:
    try:
        return store[module]
    except KeyError:
        raise CltraceError(
            f"no frozen {what} recorded for {type(module).__name__}: record a forward pass of the same "
            "prompt before replaying it"
        ) from None


def frozen_attention(
    module: nn.Module,
    query: torch.Tensor,  # [batch, head, q, d_head]
    key: torch.Tensor,  # [batch, kv_head, k, d_head]
    value: torch.Tensor,  # [batch, kv_head, k, d_head]
    attention_mask: torch.Tensor | None,  # [batch, 1, q, k], additive
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose softmax pattern is a constant (recorded or replayed)."""
    groups = query.shape[1] // value.shape[1]
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value  # [batch, head, k, d_head]
    state = _ACTIVE.get()
    if state is not None and state.mode == "replay":
        pattern = _lookup(state.patterns, module, "attention pattern")
    else:
        key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[..., : key.shape[-2]]
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).detach()  # [batch, head, q, k]
        if state is not None:
            state.patterns[module] = pattern
    pattern = pattern.to(value.dtype)
    batch, heads, n_k, d_head = value.shape
    if pattern.shape[0] == 1 and batch > 1:
        # One recorded pattern for many copies (batched attribution): multiply it once by every
        # copy's values side by side. A broadcast matmul would copy the pattern per copy and keep
        # that copy for the backward pass: batch × head × q × k floats per layer (GBs on long prompts).
        side = value.permute(1, 2, 0, 3).reshape(heads, n_k, batch * d_head)  # [head, k, batch * d_head]
        out = torch.matmul(pattern[0], side).view(heads, -1, batch, d_head).permute(2, 0, 1, 3)  # [batch, head, q, d_head]
    else:
        out = torch.matmul(pattern, value)  # [batch, head, q, d_head]
    return out.transpose(1, 2).contiguous(), pattern


AttentionInterface.register(FROZEN_ATTENTION, frozen_attention)
# Without a registered mask the function would receive a boolean mask, and additive masking breaks.
AttentionMaskInterface.register(FROZEN_ATTENTION, eager_mask)


def norm_scale(kind: NormKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's data-dependent denominator, 1/rms or 1/std, as [..., 1] in fp32."""
    eps = cast(float, getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6))
    x = x.float()
    if kind == "layer":
        return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def frozen_norm(kind: NormKind, module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm's output with `scale` (its denominator) treated as a constant."""
    xf = x.float()
    if kind == "layer":
        out = (xf - xf.mean(-1, keepdim=True)) * scale
        weight, bias = cast(torch.Tensor | None, module.weight), cast(torch.Tensor | None, module.bias)  # a LayerNorm's
        if weight is not None:
            out = out * weight.float()
        if bias is not None:
            out = out + bias.float()
        return out.type_as(x)
    if kind == "rms_offset":  # Gemma: (1 + w), multiplied in fp32
        return (xf * scale * (1.0 + cast(torch.Tensor, module.weight).float())).type_as(x)
    return cast(torch.Tensor, module.weight) * (xf * scale).type_as(x)  # Llama, Qwen: cast, then weight


def _frozen_norm_forward(kind: NormKind):
    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        state = _ACTIVE.get()
        if state is not None and state.mode == "replay":
            scale = _lookup(state.norm_scales, module, "norm denominator")
        else:
            scale = norm_scale(kind, module, x).detach()
            if state is not None:
                state.norm_scales[module] = scale
        return frozen_norm(kind, module, x, scale)

    return forward


@contextlib.contextmanager
def freeze(model: nn.Module, norms: dict[nn.Module, NormKind], state: FreezeState) -> Iterator[FreezeState]:
    """Run `model` with frozen attention and norms inside the block, recording into or replaying `state`.

    `norms` maps each norm module to its kind (the family adapter knows which). Everything is put
    back on exit, so the model is never left half-frozen.
    """
    config = cast(PretrainedConfig, model.config)  # a transformers model
    previous_impl = cast(str, config._attn_implementation)
    token = _ACTIVE.set(state)
    swapped: list[nn.Module] = []
    try:
        _set_attn_implementation(model, FROZEN_ATTENTION)
        for module, kind in norms.items():
            module.forward = types.MethodType(_frozen_norm_forward(kind), module)
            swapped.append(module)
        yield state
    finally:
        for module in swapped:
            del module.forward  # the class's own forward shows through again
        _set_attn_implementation(model, previous_impl)
        _ACTIVE.reset(token)


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    # Every submodule reads `config._attn_implementation` at call time; sub-configs (Gemma 3's
    # text config) are separate objects, so set it on each config found.
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name
