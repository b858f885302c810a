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
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cltrace.errors import CltraceError
from cltrace.model.freeze import FreezeState, freeze
from cltrace.model.hooks import mlp_hooks, raw_logits
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
        return self.input_ids.shape[-1]


@dataclass
class FrozenOutput:
    """What the frozen replacement model computes from given MLP-slot outputs."""

    logits: torch.Tensor  # [batch, pos, vocab] the unembedding's output, before any final soft-capping
    resid_mid_layers: list[torch.Tensor]
    """What the transcoder's encoder would read, per layer, each [batch, pos, d_model] as computed (not
    stacked): a backward pass seeded at layer l's tensor only walks the layers below l."""

    @functools.cached_property
    def resid_mid(self) -> torch.Tensor:
        """[batch, pos, layer, d_model], stacked when first asked for (a batched attribution forward
        never asks: the copy would be as large as all its layers' tensors)."""
        return torch.stack(self.resid_mid_layers, dim=2)


class ReplacementModel:
    """A model and a transcoder over it, checked to fit each other; the transcoder is moved (in place,
    once) to the model's device, where every computation on the pair runs."""

    def __init__(self, model: LoadedModel, transcoder: Transcoder) -> None:
        cfg = transcoder.config
        if cfg.n_layers != model.n_layers or cfg.d_model != model.d_model:
            raise CltraceError(
                f"the transcoder ({cfg.n_layers} layers, d_model {cfg.d_model}) does not fit model "
                f"'{model.name}' ({model.n_layers} layers, d_model {model.d_model}): use a transcoder "
                "trained for this model"
            )
        self.model = model
        self.transcoder = transcoder.to(model.device)
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
        return self._record(ids[None], batched=False)

    @torch.no_grad()
    def run_batch(self, ids: torch.Tensor) -> ReplacementRun:
        """The runs of several prompts of one length, ids [batch, pos], in one forward pass: every
        tensor of the result has the batch first ([batch, pos, ...]), the frozen constants too
        (`intervene_prompts` takes it)."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise CltraceError(f"run_batch takes token ids [batch, pos] with pos >= 1, got shape {tuple(ids.shape)}")
        return self._record(self.model.check_length(ids.long()).to(self.model.device), batched=True)

    def _record(self, ids: torch.Tensor, batched: bool) -> ReplacementRun:
        """The run of ids [batch, pos]; with `batched` False, of its one row, the batch dimension dropped."""
        state = FreezeState("record")
        with freeze(self.model.model, self._norms, state), self._slots() as slots:
            logits = self.model.model(input_ids=ids, use_cache=False).logits  # [batch, pos, vocab]
        resid_mid = torch.stack(slots.resid_mid, dim=2)  # [batch, pos, layer, d_model]
        mlp_out = torch.stack(slots.mlp_out, dim=2)  # [batch, pos, layer, d_model]
        if not batched:
            ids, logits, resid_mid, mlp_out = ids[0], logits[0], resid_mid[0], mlp_out[0]
        tc = self.transcoder
        x = resid_mid.to(tc.W_enc.dtype)
        pre = tc.encode_pre(x)  # [(batch,) pos, layer, n_features]
        acts = tc.activation(pre)  # [(batch,) pos, layer, n_features]
        recon = tc.decode(acts, x).to(mlp_out.dtype)  # [(batch,) pos, layer, d_model]
        return ReplacementRun(ids, logits, resid_mid, mlp_out, pre, acts, recon, mlp_out - recon, state)

    def frozen(
        self,
        run: ReplacementRun,
        mlp_out: torch.Tensor | list[torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        live_skip: bool = False,
        logits_to_keep: int = 0,
    ) -> FrozenOutput:
        """The frozen replacement model of `run`'s prompt, evaluated on given MLP-slot outputs.

        `mlp_out` [batch, pos, layer, d_model] (or without batch, or a list of one [batch, pos, d_model]
        tensor per layer) replaces what each MLP block emits;
        by default it is reconstruction + error, which gives back the original model. Attention
        patterns and norm denominators are the prompt's, replayed, so the result is affine in
        `mlp_out` (and in `inputs_embeds`, if given) and differentiable with respect to both.

        With `live_skip` (a PLT with a skip path), slot l emits
        mlp_out_l + (resid_mid_l − run.resid_mid_l) @ W_skip_l: the same value at the prompt, but the
        linear skip path from resid_mid_l to slot l stays live, as in circuit-tracer. `logits_to_keep`
        > 0 computes the logits of the last that many positions only (0: all positions).
        """
        if mlp_out is None:
            mlp_out = run.reconstruction + run.error
        if isinstance(mlp_out, (list, tuple)):
            # One tensor per layer, each [batch, pos, d_model]: gradients then reach each layer's
            # tensor directly, without a full-size zero gradient per layer for a slice of one tensor.
            per_layer = [t if t.dim() == 3 else t[None] for t in mlp_out]
            batch = per_layer[0].shape[0]
            n_pos, n_layers, d_model = run.mlp_out.shape
            if len(per_layer) != n_layers or any(tuple(t.shape) != (batch, n_pos, d_model) for t in per_layer):
                raise CltraceError(
                    f"MLP outputs per layer must be {n_layers} tensors of shape [batch, {n_pos}, {d_model}], "
                    f"got {[tuple(t.shape) for t in per_layer]}"
                )
            mlp_out = per_layer
        else:
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
        if live_skip and self.transcoder.W_skip is None:
            raise CltraceError("live_skip needs a transcoder with a skip path (a PLT with W_skip)")
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        with (
            raw_logits(self.model) as captured,
            freeze(self.model.model, self._norms, run.freeze_state.replaying()),
            self._slots(mlp_out, run.resid_mid if live_skip else None) as slots,
        ):
            self.model.model(**inputs, use_cache=False, **extra)
        return FrozenOutput(captured[0], list(slots.resid_mid))

    @contextlib.contextmanager
    def _slots(
        self,
        override: torch.Tensor | list[torch.Tensor] | None = None,
        skip_base: torch.Tensor | None = None,
    ) -> Iterator[_Slots]:
        """Capture resid_mid and the MLP blocks' outputs; with `override`, make each block emit it instead.

        With `skip_base` ([pos, layer, d_model]), each block emits override + the transcoder's skip
        path of (resid_mid − skip_base) instead, the skip path kept live.
        """
        slots = _Slots([], [], override, self.transcoder if skip_base is not None else None, skip_base)
        skipped: list[nn.Module] = []
        try:
            if override is not None:
                for layer in self._layers:
                    mlp = getattr(layer, "mlp", None)
                    if isinstance(mlp, nn.Module):
                        # Its output is replaced anyway: skip the MLP's computation (the costliest part
                        # of a forward pass) by having it emit zeros of the residual stream's shape.
                        mlp.forward = _zeros_like_input
                        skipped.append(mlp)
            with mlp_hooks(self.model, slots.capture_input, slots.replace_output):
                yield slots
        finally:
            for mlp in skipped:
                del mlp.forward  # the class's own forward shows through again


def _zeros_like_input(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return torch.zeros_like(x)


@dataclass
class _Slots:
    resid_mid: list[torch.Tensor]  # per layer: [batch, pos, d_model]
    mlp_out: list[torch.Tensor]  # per layer: [batch, pos, d_model]
    override: torch.Tensor | list[torch.Tensor] | None = None  # what the blocks emit instead
    skip: Transcoder | None = None  # with a live skip path: the transcoder whose W_skip it is
    skip_base: torch.Tensor | None = None  # [pos, layer, d_model] resid_mid where the skip adds nothing

    def capture_input(self, _layer: int, resid_mid: torch.Tensor) -> torch.Tensor | None:
        self.resid_mid.append(resid_mid)
        if self.override is not None and resid_mid.requires_grad:
            # The block's output is replaced, so its inside never carries gradient: run it on a
            # detached input, which spares autograd from saving its intermediate tensors.
            return resid_mid.detach()
        return None

    def replace_output(self, layer: int, output: torch.Tensor) -> torch.Tensor | None:
        self.mlp_out.append(output)
        if self.override is None:
            return None
        slot = self.override[layer] if isinstance(self.override, list) else self.override[:, :, layer]
        out = slot.to(output.dtype)  # cuts the path back through the MLP
        if self.skip is not None and self.skip_base is not None:  # set together
            x = self.resid_mid[layer]
            moved = x - self.skip_base[:, layer].to(x.dtype)  # [batch, pos, d]
            out = out + self.skip.skip_layer(layer, moved).to(output.dtype)
        return out
