"""Where each family computes its attention scores, as linear maps of the residual stream.

With the prompt's norm denominators frozen, a head's query at position q is an affine function of
the residual stream entering its layer at q: the layer's input norm (frozen scale), the query
projection (with its bias, if any), the QK-norm (frozen scale, Qwen 3 and Gemma 3) and the rotary
embedding of position q (a fixed rotation). The same holds for keys. `AttentionSites` gathers what
those maps need (the residual stream at every layer's input, from the replacement run; each layer's
rotary cos/sin, from the model's rotary module) and applies them to any batch of
residual-stream vectors: the linear part to nodes, the constant part once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from cltrace.errors import CltraceError
from cltrace.model.freeze import frozen_norm
from cltrace.model.load import LoadedModel
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun

Side = Literal["query", "key"]
Position = int | torch.Tensor  # one position, or [n] positions (one per row of the vectors)


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


class _Stop(Exception):
    """Ends a forward pass once what it was run for has been read."""


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
        self.base = loaded.model.base_model
        self._rotary: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.resid_pre = self._residuals(loaded, run)  # [pos, layer, d_model]
        self.memo: dict[object, torch.Tensor] = {}  # what later stages derive once per run (QK's decoder sums)

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
    def _residuals(self, loaded: LoadedModel, run: ReplacementRun) -> torch.Tensor:
        """[pos, layer, d_model]: each layer's input residual. Layer 0's is read from the model (a
        forward pass stopped there); layer l's is resid_mid + MLP output of layer l − 1, from the run."""
        grabbed: list[torch.Tensor] = []

        def grab(_m: nn.Module, args: tuple) -> None:
            grabbed.append(args[0][0].float())  # [pos, d_model]
            raise _Stop

        handle = self._input_norm(0).register_forward_pre_hook(grab)
        try:
            loaded.model(input_ids=run.input_ids[None], use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        above = (run.resid_mid[:, :-1] + run.mlp_out[:, :-1]).float()  # [pos, layer - 1, d_model]
        return torch.cat([grabbed[0][:, None], above], dim=1)

    def _rotary_of(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (cos, sin) [pos, d_head] the layer's attention rotates by, from the model's rotary module."""
        if layer not in self._rotary:
            rotary = getattr(self.base, "rotary_emb", None)
            if rotary is None:
                self._rotary[layer] = None
            else:
                positions = torch.arange(self.run.n_pos, device=self.resid_pre.device)[None]
                extra: tuple[object, ...] = ()
                layer_type = getattr(self.attention(layer), "layer_type", None)
                if layer_type is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
                    extra = (layer_type,)
                cos, sin = rotary(self.resid_pre[None, :, 0], positions, *extra)
                self._rotary[layer] = (cos[0].float(), sin[0].float())
        return self._rotary[layer]

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
            fused = attn.get_submodule("c_attn")
            w = cast(torch.Tensor, fused.weight)[:, offset : offset + dh]  # Conv1D stores [d_in, d_out]
            b = cast(torch.Tensor, fused.bias)[offset : offset + dh]
            return w.float(), b.float()
        proj = cast(nn.Linear, attn.get_submodule("q_proj" if side == "query" else "k_proj"))
        w = proj.weight[index * dh : (index + 1) * dh].T  # [d_model, d_head]
        b = None if proj.bias is None else proj.bias[index * dh : (index + 1) * dh].float()
        return w.float(), b

    def _qk_norm(self, layer: int, side: Side, head: int, pos: Position, x: torch.Tensor) -> torch.Tensor:
        """The frozen QK-norm of head vectors x [n, d_head] at `pos` (identity where there is none)."""
        layout = self.sites.qk_norm_layout
        if layout == "none":
            return x
        attn = self.attention(layer)
        module = attn.get_submodule("q_norm" if side == "query" else "k_norm")
        index = head if side == "query" else self.kv_head(head)
        scales = self.run.freeze_state.norm_scales[module]  # [1, pos, head, 1] or [1, head, pos, 1]
        scale = scales[0, pos, index] if layout == "pos_head" else scales[0, index, pos]
        return frozen_norm(self.norm_kinds[module], module, x, scale.float())

    def _rope(self, layer: int, pos: Position, x: torch.Tensor) -> torch.Tensor:
        rotary = self._rotary_of(layer)
        if rotary is None:
            return x
        cos, sin = rotary[0][pos], rotary[1][pos]  # [d_head] or [n, d_head]
        if cos.shape[-1] != x.shape[-1]:
            raise CltraceError("QK attribution supports rotary embeddings over the whole head dimension only")
        return x * cos + _rotate_half(x) * sin

    def _norm_scale(self, layer: int, pos: Position) -> torch.Tensor:
        """The input norm's frozen scale at `pos`: [1], or [n, 1] for n positions."""
        return self.run.freeze_state.norm_scales[self._input_norm(layer)][0, pos].float()

    def head_vectors(self, layer: int, side: Side, head: int, pos: Position, x: torch.Tensor) -> torch.Tensor:
        """The linear part of the map from residual vectors x [n, d_model] at `pos` (one position, or
        one per row) to the head's rotated queries (or keys) [n, d_head], every norm frozen at the
        prompt's values."""
        norm = self._input_norm(layer)
        kind, scale = self.norm_kinds[norm], self._norm_scale(layer, pos)
        x = x.float()
        normed = frozen_norm(kind, norm, x, scale) - frozen_norm(kind, norm, torch.zeros_like(x[:1]), scale)
        w, _ = self._projection(layer, side, head)
        out = self._qk_norm(layer, side, head, pos, normed @ w)  # [n, d_head]
        return self._rope(layer, pos, out)

    def head_constant(self, layer: int, side: Side, head: int, pos: Position) -> torch.Tensor:
        """What the query (or key) holds whatever the residual (norm and projection biases):
        [d_head] at one position, [n, d_head] at n."""
        norm = self._input_norm(layer)
        zero = torch.zeros(1, self.resid_pre.shape[-1], device=self.resid_pre.device)
        w, b = self._projection(layer, side, head)
        out = frozen_norm(self.norm_kinds[norm], norm, zero, self._norm_scale(layer, pos)) @ w  # [1 or n, d_head]
        if b is not None:
            out = out + b
        out = self._rope(layer, pos, self._qk_norm(layer, side, head, pos, out))
        return out[0] if isinstance(pos, int) else out
