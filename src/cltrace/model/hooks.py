"""Reading and replacing what each layer's MLP block reads (resid_mid) and adds (mlp_out), and
reading the unembedding's output.

The family's adapter says which modules those are; `mlp_hooks` hooks every layer's pair for the
duration of a `with` block, and calls back with the layer's index and the tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cltrace.model.load import LoadedModel

#: Called with (layer index, tensor [batch, pos, d_model]); a tensor it returns replaces that tensor.
MlpCallback = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def mlp_hooks(
    loaded: LoadedModel,
    on_input: MlpCallback | None = None,
    on_output: MlpCallback | None = None,
) -> Iterator[None]:
    """While open, every layer's MLP block calls `on_input(layer, resid_mid)` before it runs and
    `on_output(layer, mlp_out)` after; a tensor returned replaces the block's input or output."""
    adapter = loaded.adapter
    handles = []
    try:
        for index, layer in enumerate(adapter.decoder_layers(loaded.model)):
            if on_input is not None:
                handles.append(adapter.mlp_input_module(layer).register_forward_pre_hook(_input_hook(index, on_input)))
            if on_output is not None:
                handles.append(adapter.mlp_output_module(layer).register_forward_hook(_output_hook(index, on_output)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def raw_logits(loaded: LoadedModel) -> Iterator[list[torch.Tensor]]:
    """While open, collects each output of the unembedding (the logits before any final soft-capping)
    into the list it yields."""
    unembed = loaded.model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    handle = unembed.register_forward_hook(lambda _m, _i, out: captured.append(out))
    # With logits_to_keep the unembedding gets a strided slice of the last positions, and torch's
    # linear then multiplies it by a broadcast copy of the weight per batch row, much slower than
    # the same product on a contiguous input.
    contiguous = unembed.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield captured
    finally:
        handle.remove()
        contiguous.remove()


def _input_hook(index: int, callback: MlpCallback) -> Callable[[nn.Module, tuple], tuple | None]:
    def hook(_module: nn.Module, args: tuple) -> tuple | None:
        new = callback(index, args[0])
        return None if new is None else (new, *args[1:])

    return hook


def _output_hook(index: int, callback: MlpCallback) -> Callable[[nn.Module, tuple, Any], Any]:
    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        is_tuple = isinstance(output, tuple)
        new = callback(index, output[0] if is_tuple else output)
        if new is None:
            return None
        return (new, *output[1:]) if is_tuple else new

    return hook


__all__ = ["MlpCallback", "mlp_hooks", "raw_logits"]
