"""The local replacement model of one prompt.

The original model with every MLP block replaced by the transcoder's reconstruction plus an error
term (what the transcoder misses at that layer and position). With the error included it gives the
original output exactly. Its *frozen* form holds the prompt's attention patterns and norm
denominators fixed and takes the MLP slots' outputs as inputs, so the logits and every layer's
residual stream are affine in what the slots emit: the substrate of attribution and of
constrained interventions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cltrace.errors import CltraceError
from cltrace.model.freeze import FreezeState, freeze
from cltrace.model.load import LoadedModel
from cltrace.transcoder import Transcoder


@dataclass
class ReplacementRun:
    """Everything the replacement model saw on one prompt (positions first, then layers)."""

    input_ids: torch.Tensor  # [pos]
    logits: torch.Tensor  # [pos, vocab] the original model's output, unchanged
    resid_mid: torch.Tensor  # [pos, layer, d_model] the transcoder's input
    mlp_out: torch.Tensor  # [pos, layer, d_model] what each MLP block really adds
    pre_activations: torch.Tensor  # [pos, layer, n_features]
    activations: torch.Tensor  # [pos, layer, n_features]
    reconstruction: torch.Tensor  # [pos, layer, d_model] the transcoder's estimate of mlp_out
    error: torch.Tensor  # [pos, layer, d_model] mlp_out − reconstruction: the error nodes
    freeze_state: FreezeState  # the prompt's attention patterns and norm denominators

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class FrozenOutput:
    """What the frozen replacement model computes from given MLP-slot outputs."""

    logits: torch.Tensor  # [batch, pos, vocab] the unembedding's output, before any final soft-capping
    resid_mid: torch.Tensor  # [batch, pos, layer, d_model] what the transcoder's encoder would read


class ReplacementModel:
    """A model and a transcoder over it, checked to fit each other."""

    def __init__(self, model: LoadedModel, transcoder: Transcoder) -> None:
        cfg = transcoder.config
        if cfg.n_layers != model.n_layers or cfg.d_model != model.d_model:
            raise CltraceError(
                f"the transcoder ({cfg.n_layers} layers, d_model {cfg.d_model}) does not fit model "
                f"'{model.name}' ({model.n_layers} layers, d_model {model.d_model}): use a transcoder "
                "trained for this model"
            )
        self.model = model
        self.transcoder = transcoder
        self._layers = model.adapter.decoder_layers(model.model)
        self._norms = model.adapter.norms(model.model)

    def input_ids(self, prompt: str | torch.Tensor) -> torch.Tensor:
        """Token ids [pos] of a prompt given as text (BOS rule applied) or as ids."""
        if isinstance(prompt, str):
            return self.model.encode(prompt)
        ids = prompt.reshape(-1).long()
        if ids.numel() == 0:
            raise CltraceError("the prompt has no tokens: give at least one token id")
        return self.model.check_length(ids)

    @torch.no_grad()
    def run(self, prompt: str | torch.Tensor) -> ReplacementRun:
        """Run the model on a prompt and the transcoder on every layer, recording the frozen constants."""
        ids = self.input_ids(prompt).to(self.model.device)
        state = FreezeState("record")
        with freeze(self.model.model, self._norms, state), self._slots() as slots:
            logits = self.model.model(input_ids=ids[None], use_cache=False).logits[0]  # [pos, vocab]
        resid_mid = torch.stack(slots.resid_mid, dim=2)[0]  # [pos, layer, d_model]
        mlp_out = torch.stack(slots.mlp_out, dim=2)[0]  # [pos, layer, d_model]
        tc = self.transcoder
        x = resid_mid.to(tc.W_enc.dtype)
        pre = tc.encode_pre(x)  # [pos, layer, n_features]
        acts = tc.activation(pre)
        recon = tc.decode(acts, x).to(mlp_out.dtype)  # [pos, layer, d_model]
        return ReplacementRun(ids, logits, resid_mid, mlp_out, pre, acts, recon, mlp_out - recon, state)

    def frozen(
        self, run: ReplacementRun, mlp_out: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> FrozenOutput:
        """The frozen replacement model of `run`'s prompt, evaluated on given MLP-slot outputs.

        `mlp_out` [batch, pos, layer, d_model] (or without batch) replaces what each MLP block emits;
        by default it is reconstruction + error, which gives back the original model. Attention
        patterns and norm denominators are the prompt's, replayed, so the result is affine in
        `mlp_out` (and in `inputs_embeds`, if given) and differentiable with respect to both.
        """
        if mlp_out is None:
            mlp_out = run.reconstruction + run.error
        if mlp_out.dim() == 3:
            mlp_out = mlp_out[None]
        batch = mlp_out.shape[0]
        if mlp_out.shape[1:] != run.mlp_out.shape:
            raise CltraceError(
                f"MLP outputs of shape {tuple(mlp_out.shape[1:])} do not match the prompt's {tuple(run.mlp_out.shape)}"
            )
        inputs: dict[str, torch.Tensor] = (
            {"inputs_embeds": inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds[None]}
            if inputs_embeds is not None
            else {"input_ids": run.input_ids[None].expand(batch, -1)}
        )
        unembed = self.model.model.get_output_embeddings()
        captured: list[torch.Tensor] = []
        handle = unembed.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with freeze(self.model.model, self._norms, run.freeze_state.replaying()), self._slots(mlp_out) as slots:
                self.model.model(**inputs, use_cache=False)
        finally:
            handle.remove()
        return FrozenOutput(captured[0], torch.stack(slots.resid_mid, dim=2))

    @contextlib.contextmanager
    def _slots(self, override: torch.Tensor | None = None) -> Iterator[_Slots]:
        """Capture resid_mid and the MLP blocks' outputs; with `override`, make each block emit it instead."""
        slots = _Slots([], [])
        handles = []
        for layer_index, layer in enumerate(self._layers):
            adapter = self.model.adapter
            handles.append(adapter.mlp_input_module(layer).register_forward_pre_hook(slots.capture_input))
            handles.append(
                adapter.mlp_output_module(layer).register_forward_hook(slots.output_hook(layer_index, override))
            )
        try:
            yield slots
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class _Slots:
    resid_mid: list[torch.Tensor]  # per layer: [batch, pos, d_model]
    mlp_out: list[torch.Tensor]  # per layer: [batch, pos, d_model]

    def capture_input(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.resid_mid.append(args[0])

    def output_hook(self, layer: int, override: torch.Tensor | None):  # noqa: ANN201 - a forward hook
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            self.mlp_out.append(output)
            if override is None:
                return None
            return override[:, :, layer].to(output.dtype)  # cuts the path back through the MLP

        return hook
