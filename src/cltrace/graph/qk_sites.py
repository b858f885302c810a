"""Where each family computes its attention scores, as linear maps of the residual stream.

With the prompt's norm denominators frozen, a head's query at position q is an affine function of
the residual stream entering its layer at q: the layer's input norm (frozen scale), the query
projection (with its bias, if any), the QK-norm (frozen scale, Qwen 3 and Gemma 3) and the rotary
embedding of position q (a fixed rotation). The same holds for keys. `AttentionSites` records what
those maps need from one frozen forward pass of the replacement model (the residual stream at every
layer's input, the rotary cos/sin each layer received) and applies them to any batch of
residual-stream vectors: the linear part to nodes, the constant part once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cltrace.errors import CltraceError
from cltrace.model.freeze import frozen_norm
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun

Side = Literal["query", "key"]


@dataclass(frozen=True)
class _FamilySites:
    """Module names inside one decoder layer."""

    input_norm: str
    attention: str
    qk_norm_layout: Literal["none", "pos_head", "head_pos"] = "none"  # axis order the QK-norm saw
    fused_qkv: bool = False  # GPT-2's c_attn: one Conv1D with [d, 3d] weights
    value: str = "v_proj"  # the module whose output holds the values (GPT-2: c_attn, its last third)
    out: str = "o_proj"  # the attention's output projection; its input holds every head's mix of values
    position_table: str | None = None  # learned absolute positions, added to the embeddings


_SITES = {
    "llama": _FamilySites("input_layernorm", "self_attn"),
    "qwen2": _FamilySites("input_layernorm", "self_attn"),
    "qwen3": _FamilySites("input_layernorm", "self_attn", "pos_head"),
    "gemma2": _FamilySites("input_layernorm", "self_attn"),
    "gemma3": _FamilySites("input_layernorm", "self_attn", "head_pos"),
    "gpt2": _FamilySites("ln_1", "attn", fused_qkv=True, position_table="transformer.wpe", value="c_attn", out="c_proj"),
}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AttentionSites:
    """The residual stream at every layer's input and the maps from it to each head's queries and keys."""

    def __init__(self, replacement: ReplacementModel, run: ReplacementRun) -> None:
        loaded = replacement.model
        family = loaded.adapter.family
        if family not in _SITES:
            raise CltraceError(f"QK attribution does not know where family '{family}' keeps its attention yet")
        self.sites = _SITES[family]
        self.run = run
        self.layers = loaded.adapter.decoder_layers(loaded.model)
        self.norm_kinds = loaded.adapter.norms(loaded.model)
        cfg = loaded.config
        self.n_heads = int(cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        attn0 = self.attention(0)
        self.head_dim = int(getattr(attn0, "head_dim", loaded.d_model // self.n_heads))
        self.position_table: nn.Module | None = (
            loaded.model.get_submodule(self.sites.position_table) if self.sites.position_table else None
        )
        self.resid_pre, self._rotary = self._capture(replacement, run)

    def attention(self, layer: int) -> nn.Module:
        """The attention module of a layer (the key of its frozen pattern)."""
        return self.layers[layer].get_submodule(self.sites.attention)

    def value_module(self, layer: int) -> nn.Module:
        """The module whose output holds the layer's values: see `values`."""
        return self.attention(layer).get_submodule(self.sites.value)

    def values(self, output: torch.Tensor) -> torch.Tensor:
        """[..., kv_head, d_head]: the values in an output of `value_module`."""
        if self.sites.fused_qkv:
            output = output[..., 2 * self.n_heads * self.head_dim :]
        return output.unflatten(-1, (self.n_kv_heads, self.head_dim))

    def out_module(self, layer: int) -> nn.Module:
        """The attention's output projection, whose input is [..., head · d_head] (heads side by side)."""
        return self.attention(layer).get_submodule(self.sites.out)

    def _input_norm(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.sites.input_norm)

    @torch.no_grad()
    def _capture(
        self, replacement: ReplacementModel, run: ReplacementRun
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """One frozen forward pass: each layer's input residual and the rotary (cos, sin) it used."""
        resid: list[torch.Tensor] = []
        rotary: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        handles = []

        def grab_resid(_m: nn.Module, args: tuple) -> None:
            resid.append(args[0][0].float())  # [pos, d_model]

        def grab_rotary(_m: nn.Module, _args: tuple, kwargs: dict) -> None:
            pe = kwargs.get("position_embeddings")
            rotary.append(None if pe is None else (pe[0][0].float(), pe[1][0].float()))  # [pos, d_head] each

        try:
            for layer in range(len(self.layers)):
                handles.append(self._input_norm(layer).register_forward_pre_hook(grab_resid))
                handles.append(self.attention(layer).register_forward_pre_hook(grab_rotary, with_kwargs=True))
            replacement.frozen(run, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(resid, dim=1), rotary  # [pos, layer, d_model]

    def position_term(self) -> torch.Tensor | None:
        """[pos, d_model]: the learned position embeddings added to the tokens' (GPT-2), else None."""
        if self.position_table is None:
            return None
        positions = torch.arange(self.run.n_pos, device=self.resid_pre.device)
        return self.position_table(positions).float()

    def kv_head(self, head: int) -> int:
        """The key/value head that query head `head` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    def scaling(self, layer: int) -> float:
        """The factor the family multiplies q·k by."""
        attn = self.attention(layer)
        scale = getattr(attn, "scaling", None)
        return float(self.head_dim**-0.5 if scale is None else scale)

    def softcap(self, layer: int) -> float | None:
        """The attention-logit soft-capping of the layer (Gemma), or None."""
        cap = getattr(self.attention(layer), "attn_logit_softcapping", None)
        return None if cap is None else float(cap)

    def _projection(self, layer: int, side: Side, head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W [d_model, d_head], b [d_head] or None) of one head's query or key projection."""
        attn = self.attention(layer)
        dh = self.head_dim
        index = head if side == "query" else self.kv_head(head)
        if self.sites.fused_qkv:
            offset = (0 if side == "query" else self.n_heads * dh) + index * dh
            w = attn.c_attn.weight[:, offset : offset + dh]  # Conv1D stores [d_in, d_out]
            b = attn.c_attn.bias[offset : offset + dh]
            return w.float(), b.float()
        proj = attn.q_proj if side == "query" else attn.k_proj
        w = proj.weight[index * dh : (index + 1) * dh].T  # [d_model, d_head]
        b = None if proj.bias is None else proj.bias[index * dh : (index + 1) * dh].float()
        return w.float(), b

    def _qk_norm(self, layer: int, side: Side, head: int, pos: int, x: torch.Tensor) -> torch.Tensor:
        """The frozen QK-norm of head vectors x [n, d_head] at `pos` (identity where there is none)."""
        layout = self.sites.qk_norm_layout
        if layout == "none":
            return x
        attn = self.attention(layer)
        module = attn.q_norm if side == "query" else attn.k_norm
        index = head if side == "query" else self.kv_head(head)
        scales = self.run.freeze_state.norm_scales[module]  # [1, pos, head, 1] or [1, head, pos, 1]
        scale = scales[0, pos, index] if layout == "pos_head" else scales[0, index, pos]
        return frozen_norm(self.norm_kinds[module], module, x, scale.float())

    def _rope(self, layer: int, pos: int, x: torch.Tensor) -> torch.Tensor:
        rotary = self._rotary[layer]
        if rotary is None:
            return x
        cos, sin = rotary[0][pos], rotary[1][pos]  # [d_head]
        if cos.shape[-1] != x.shape[-1]:
            raise CltraceError("QK attribution supports rotary embeddings over the whole head dimension only")
        return x * cos + _rotate_half(x) * sin

    def head_vectors(self, layer: int, side: Side, head: int, pos: int, x: torch.Tensor) -> torch.Tensor:
        """The linear part of the map from residual vectors x [n, d_model] at `pos` to the head's
        rotated queries (or keys) [n, d_head], with every norm frozen at the prompt's values."""
        norm = self._input_norm(layer)
        kind = self.norm_kinds[norm]
        scale = self.run.freeze_state.norm_scales[norm][0, pos].float()  # [1]
        x = x.float()
        normed = frozen_norm(kind, norm, x, scale) - frozen_norm(kind, norm, torch.zeros_like(x[:1]), scale)
        w, _ = self._projection(layer, side, head)
        out = self._qk_norm(layer, side, head, pos, normed @ w)  # [n, d_head]
        return self._rope(layer, pos, out)

    def head_constant(self, layer: int, side: Side, head: int, pos: int) -> torch.Tensor:
        """[d_head]: what the query (or key) holds whatever the residual: norm and projection biases."""
        norm = self._input_norm(layer)
        scale = self.run.freeze_state.norm_scales[norm][0, pos].float()
        zero = torch.zeros(1, self.resid_pre.shape[-1], device=self.resid_pre.device)
        w, b = self._projection(layer, side, head)
        out = frozen_norm(self.norm_kinds[norm], norm, zero, scale) @ w  # [1, d_head]
        if b is not None:
            out = out + b
        return self._rope(layer, pos, self._qk_norm(layer, side, head, pos, out))[0]
