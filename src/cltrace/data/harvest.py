"""Harvest: run a model and collect every layer's transcoder input and target.

For each layer l the transcoder reads `resid_mid` (the input of the MLP block's pre-norm) and
reconstructs what the MLP block adds to the residual stream (the output of the adapter's
`mlp_output_module`). :class:`Harvester` runs the base transformer (the module under the language
model head, so no unembedding is computed) with one pre-hook and one hook per layer that copy those
tensors straight into preallocated buffers, with no gradient and no other bookkeeping, so a
harvest costs about one plain forward pass.

Every context starts with BOS. Positions before :data:`FIRST_POSITION` (BOS and the first token)
are left out of what is returned: both are attention sinks whose activations are outliers that no
feature should spend capacity on (in SmolLM2 the first token's MLP output reaches 438x the median
norm at layer 11, and alone makes up 99% of that layer's squared target mass in a batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from cltrace.errors import CltraceError
from cltrace.model.hooks import mlp_hooks
from cltrace.model.load import LoadedModel

FIRST_POSITION = 2
"""First position of a context that training, evaluation and feature statistics look at: 0 is BOS
and 1 the first token, both attention sinks with outlier norms. Spliced evaluation keeps the model's
own MLP outputs there (as a replacement model's error nodes would)."""


class Harvest(NamedTuple):
    """One harvested batch: transcoder inputs and targets of every token from FIRST_POSITION on."""

    x: torch.Tensor
    """[tokens, n_layers, d_model] resid_mid of every layer (the transcoder's input)."""
    y: torch.Tensor
    """[tokens, n_layers, d_model] what every layer's MLP block adds (the transcoder's target)."""


def base_transformer(loaded: LoadedModel) -> nn.Module:
    """The module under the language-model head (e.g. `LlamaModel`, `GPT2Model`): no unembedding."""
    model = loaded.model
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return model
    return base


class Harvester:
    """Runs a model on token batches and returns (x, y) per token, the sink positions left out.

    `harvest(tokens)` takes [batch, n_ctx] token ids whose column 0 is BOS and returns
    :class:`Harvest` tensors of shape [batch * (n_ctx - first_position), n_layers, d_model] in `dtype`
    (default: the model's), on `out_device` (default: the CPU; the model's device keeps a GPU's
    activations on the GPU, with no copy through the host). `max_batch` bounds how many contexts go
    through the model at once; `autocast_bf16` runs the model's matrix products in bfloat16 (faster
    where the hardware has it).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        dtype: torch.dtype | None = None,
        max_batch: int = 16,
        autocast_bf16: bool = False,
        first_position: int = FIRST_POSITION,
        out_device: torch.device | str = "cpu",
    ) -> None:
        self.loaded = loaded
        self.out_device = torch.device(out_device)
        self.base = base_transformer(loaded)
        adapter = loaded.adapter
        self.layers = adapter.decoder_layers(loaded.model)
        self.mlp_in = [adapter.mlp_input_module(layer) for layer in self.layers]
        self.mlp_out = [adapter.mlp_output_module(layer) for layer in self.layers]
        self.n_layers = len(self.layers)
        self.d_model = loaded.d_model
        self.dtype = dtype or next(loaded.model.parameters()).dtype
        if max_batch < 1:
            raise CltraceError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.autocast_bf16 = autocast_bf16
        if first_position < 1:
            raise CltraceError(f"first_position must be at least 1 (BOS is never harvested), got {first_position}")
        self.first_position = first_position

    def positions_per_context(self, n_ctx: int) -> int:
        """How many positions of an `n_ctx`-token context a harvest returns."""
        return n_ctx - self.first_position

    @torch.no_grad()
    def harvest(self, tokens: torch.Tensor) -> Harvest:
        """(x, y), each [batch * (n_ctx - first_position), n_layers, d_model], of token ids [batch, n_ctx]."""
        if tokens.dim() != 2 or tokens.shape[1] <= self.first_position:
            raise CltraceError(
                f"harvest needs token ids shaped [batch, n_ctx > {self.first_position}] with BOS first, "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.loaded.max_context:
            raise CltraceError(
                f"contexts of {tokens.shape[1]} tokens exceed the model's context of {self.loaded.max_context}; "
                "lower n_ctx"
            )
        B, T = tokens.shape
        L, d = self.n_layers, self.d_model
        P = T - self.first_position
        device = self.loaded.device
        x = torch.empty(B, P, L, d, dtype=self.dtype, device=self.out_device)  # [batch, pos, layer, d_model]
        y = torch.empty(B, P, L, d, dtype=self.dtype, device=self.out_device)
        # The hooks write each layer into a chunk on the model's device; a chunk bound for another device
        # crosses in one copy (per layer, the copies would each wait for the GPU).
        staged = device != self.out_device
        tokens = tokens.to(device)
        for start in range(0, B, self.max_batch):
            chunk = tokens[start : start + self.max_batch]
            n = chunk.shape[0]
            if not staged:
                self._run(chunk, x[start : start + n], y[start : start + n])
                continue
            x_chunk = torch.empty(n, P, L, d, dtype=self.dtype, device=device)  # [chunk, pos, layer, d_model]
            y_chunk = torch.empty(n, P, L, d, dtype=self.dtype, device=device)
            self._run(chunk, x_chunk, y_chunk)
            x[start : start + n].copy_(x_chunk)
            y[start : start + n].copy_(y_chunk)
        return Harvest(x.view(B * P, L, d), y.view(B * P, L, d))

    def _run(self, ids: torch.Tensor, x_out: torch.Tensor, y_out: torch.Tensor) -> None:
        first = self.first_position

        def grab_in(l: int, x: torch.Tensor) -> None:
            x_out[:, :, l].copy_(x[:, first:])  # sink positions left out

        def grab_out(l: int, y: torch.Tensor) -> None:
            y_out[:, :, l].copy_(y[:, first:])

        with (
            mlp_hooks(self.loaded, grab_in, grab_out),
            torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16),
        ):
            self.base(input_ids=ids, use_cache=False)

    def stream(self, batches: Iterator) -> Iterator[tuple[Harvest, object]]:
        """Harvest every `PackedBatch` of `batches`; yields (Harvest, the batch's resume position)."""
        for batch in batches:
            yield self.harvest(batch.tokens), batch.position


__all__ = ["FIRST_POSITION", "Harvest", "Harvester", "base_transformer"]
