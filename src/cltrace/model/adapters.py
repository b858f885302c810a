"""One adapter per model family: where the MLP block starts and ends, and what each norm is.

A transcoder reads the residual stream just before the MLP block's pre-norm (`resid_mid`) and
reconstructs what the whole block adds to the residual stream: the MLP's output, after the
post-norm in families that have one (Gemma). The adapter names those places in the Hugging Face
module tree, and says how each norm computes, so that `freeze` can hold its denominator fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from torch import nn

from cltrace.errors import CltraceError
from cltrace.model.freeze import NormKind


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its layers, MLP blocks and norms."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # dotted path from the causal-LM module to the list of decoder layers
    mlp_in: str  # the module whose input is resid_mid: the MLP block's pre-norm
    mlp_out: str  # the module whose output is what the block adds to the residual stream
    rms_kind: NormKind = "rms"  # how this family's RMSNorm applies its weight

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers, bottom to top."""
        return list(cast(nn.ModuleList, model.get_submodule(self.layers)))

    def mlp_input_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_in)

    def mlp_output_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_out)

    def norms(self, model: nn.Module) -> dict[nn.Module, NormKind]:
        """Every norm module of the model (layer norms, QK-norms, the final norm) with its kind."""
        found: dict[nn.Module, NormKind] = {}
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                found[module] = "layer"
            elif type(module).__name__.endswith("RMSNorm"):
                found[module] = self.rms_kind
        return found


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama",), "model.layers", "post_attention_layernorm", "mlp"),
    Adapter("qwen2", ("qwen2",), "model.layers", "post_attention_layernorm", "mlp"),
    Adapter("qwen3", ("qwen3",), "model.layers", "post_attention_layernorm", "mlp"),
    Adapter(
        "gemma2", ("gemma2",), "model.layers", "pre_feedforward_layernorm", "post_feedforward_layernorm",
        rms_kind="rms_offset",
    ),
    Adapter(
        "gemma3", ("gemma3_text",), "model.layers", "pre_feedforward_layernorm",
        "post_feedforward_layernorm", rms_kind="rms_offset",
    ),
    Adapter("gpt2", ("gpt2",), "transformer.h", "ln_2", "mlp"),
)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a `config.model_type`, or a clear error naming the supported families."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise CltraceError(f"model type '{model_type}' is not supported yet; supported: {supported}")
