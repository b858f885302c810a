"""Interventions: set or scale transcoder features and see how the model's output changes.

What an intervention run computes
---------------------------------
The run uses the *replacement model* of the prompt: at every layer l the MLP block's output is
replaced by what the transcoder writes there plus the error term, held at its value on the
original prompt:

    slot_l = b_dec_l + Σ_{s ≤ l} W_dec[s → l] · a_s  (+ W_skip_l · resid_mid_l for a PLT with a skip)
             + error_l,                error_l = mlp_out_l − reconstruction_l (original prompt)

For a CLT the sum runs over the features of every layer s ≤ l (a PLT writes only to its own
layer). It is computed during the forward pass, layer by layer, as
``slot_l = mlp_out_l + Σ_{s ≤ l} W_dec[s → l] · (a_s − a_s^orig) + W_skip_l · (resid_mid_l − resid_mid_l^orig)``,
which is the same quantity, so with no intervention the run reproduces the original model exactly.

* **iterative** mode: at each layer the features are recomputed from the (new) residual stream by
  the encoder and the activation function, and then the intervened ones are set (or scaled), so an
  intervention's effect propagates through every downstream feature.
* **constrained** mode over layers [lo, hi]: features of layers in that range keep their original
  activations, except the intervened ones (direct effects only); features outside the range are
  recomputed as in iterative mode. Over all layers with frozen attention, the change of every
  logit and pre-activation is exactly linear in the activation changes: it is what the
  attribution graph's edges predict.
* attention **frozen** (``freeze_attention=True``): the prompt's recorded attention patterns and
  norm denominators are replayed (see `cltrace.model.freeze`); **free**: recomputed.

An intervention ``value`` sets the feature's activation; a ``factor`` multiplies the activation it
would otherwise have in this run (the recomputed one in iterative mode, the original one where
constrained). Positions: one position, a closed range, an open-ended range (``a-``: from a to the
end of the prompt and on every generated token), or all positions (no ``@POS``: the prompt and
every generated token).

Generation (``generate=N``): greedy, N new tokens, the whole sequence re-run at each step. Error
terms are known only at the prompt's positions; at a generated position the MLP block's real
output stands in for reconstruction + error and the intervention's decoder changes are added to
it, so without an intervention the continuation is the model's own greedy continuation. Features
at generated positions are always recomputed (there is no original activation to hold), and
attention is free while generating (no patterns were recorded for new tokens), whatever
``freeze_attention`` says; it applies to the prompt's positions (the before/after top tokens).

Many intervention sets run at once in one batched forward pass (`intervene_batch`): batch element
b carries its own set of interventions.

The graph's prediction of an intervention's effects, beside the measured ones, is in
`cltrace.graph.predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from cltrace.errors import CltraceError
from cltrace.model.freeze import FreezeState, freeze
from cltrace.model.hooks import mlp_hooks, raw_logits
from cltrace.model.load import LoadedModel
from cltrace.replacement.intervention import MAX_VALUE, MODES, Intervention, Mode
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun
from cltrace.replacement.spec import SPEC_HELP, check_interventions, parse_intervention, parse_positions

# --------------------------------------------------------------------------------------- results


@dataclass
class TokenProb:
    token: int
    text: str
    probability: float
    logit: float


@dataclass
class InterventionResult:
    """What one set of interventions did to the output (last position of the prompt) and features."""

    interventions: list[Intervention]
    input_ids: torch.Tensor  # [pos]
    mode: str
    layers: tuple[int, int]
    freeze_attention: bool
    top_before: list[TokenProb]
    top_after: list[TokenProb]
    logits_before: torch.Tensor  # [vocab] the model's logits at the last position (after any soft-cap)
    logits_after: torch.Tensor  # [vocab]
    raw_logits_before: torch.Tensor  # [vocab] the unembedding's output (before any soft-cap)
    raw_logits_after: torch.Tensor  # [vocab]
    activations_before: torch.Tensor  # [pos, layer, F] (the original run's)
    activations_after: torch.Tensor  # [pos, layer, F] after the interventions (prompt positions)
    pre_activations_before: torch.Tensor  # [pos, layer, F] the original run's encoder pre-activations
    pre_activations_after: torch.Tensor  # [pos, layer, F] encoder pre-activations in the intervened run
    generated_before: list[int] = field(default_factory=list)
    generated_after: list[int] = field(default_factory=list)
    text_before: str | None = None
    text_after: str | None = None

    @property
    def logit_change(self) -> torch.Tensor:
        """[vocab] logits after − before at the last position."""
        return self.logits_after - self.logits_before

    def probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits_before.float().softmax(-1), self.logits_after.float().softmax(-1)

    def changed_features(self, k: int = 20, tol: float = 1e-6) -> list[tuple[int, int, int, float, float]]:
        """Up to `k` (layer, pos, feature, before, after) whose activation moved by more than `tol`, largest first."""
        delta = (self.activations_after.float() - self.activations_before.float()).abs()  # [pos, layer, F]
        pos, layer, feat = (delta > tol).nonzero(as_tuple=True)
        order = torch.argsort(delta[pos, layer, feat], descending=True)[:k]
        return [
            (int(layer[i]), int(pos[i]), int(feat[i]), float(self.activations_before[pos[i], layer[i], feat[i]]),
             float(self.activations_after[pos[i], layer[i], feat[i]]))
            for i in order
        ]

    def n_changed_features(self, tol: float = 1e-6) -> int:
        return int(((self.activations_after.float() - self.activations_before.float()).abs() > tol).sum())


# ----------------------------------------------------------------------------------- the run itself


class _Pass:
    """Hooks that run the replacement model with interventions on a batch of sequences [B, T]."""

    def __init__(
        self,
        rm: ReplacementModel,
        run: ReplacementRun,
        plans: Sequence[Sequence[Intervention]],
        mode: Mode,
        layers: tuple[int, int],
        keep: bool = True,
    ) -> None:
        self.rm, self.run, self.plans, self.mode, self.layers = rm, run, plans, mode, layers
        self.keep = keep  # keep every layer's activations and pre-activations (not needed while generating)
        self.tc = rm.transcoder
        self.P = run.n_pos

    def forward(self, ids: torch.Tensor, frozen: bool) -> torch.Tensor:
        """Raw logits [B, T, vocab] (the unembedding's output) of `ids` [B, T]; fills acts/pre per layer."""
        model = self.rm.model
        self.T = ids.shape[1]
        self.resid: dict[int, torch.Tensor] = {}
        self.deltas: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None] = []
        self.acts: list[torch.Tensor] = []
        self.pre: list[torch.Tensor] = []
        self._masks = self._build_masks(ids.shape[0], self.T, ids.device)
        # Free attention still runs through the freezing code, recording into a scratch state:
        # patterns and norms are recomputed, with exactly the arithmetic of the recorded run.
        state = self.run.freeze_state.replaying() if frozen else FreezeState("record")
        with (
            raw_logits(model) as captured,
            mlp_hooks(model, self._capture, self._compute_slot),
            freeze(model.model, model.adapter.norms(model.model), state),
        ):
            model.model(input_ids=ids, use_cache=False)
        return captured[0]

    def _build_masks(self, B: int, T: int, device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer: (set mask, set values, scale factors), each [B, T, F]."""
        F = self.tc.n_features
        masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        dtype = self.tc.W_enc.dtype
        for b, plan in enumerate(self.plans):
            for iv in plan:
                if iv.layer not in masks:
                    masks[iv.layer] = (
                        torch.zeros(B, T, F, dtype=torch.bool, device=device),
                        torch.zeros(B, T, F, dtype=dtype, device=device),
                        torch.ones(B, T, F, dtype=dtype, device=device),
                    )
                set_mask, set_value, scale = masks[iv.layer]
                covered = torch.tensor([iv.covers(p) for p in range(T)], device=device)
                if iv.value is not None:
                    set_mask[b, covered, iv.feature] = True
                    set_value[b, covered, iv.feature] = float(iv.value)
                else:
                    # a later set wins over an earlier scale; scales compose
                    scale[b, covered, iv.feature] *= float(iv.number)
        return masks

    def _capture(self, layer: int, resid_mid: torch.Tensor) -> None:
        self.resid[layer] = resid_mid  # [B, T, d]

    def _compute_slot(self, l: int, output: torch.Tensor) -> torch.Tensor:
        tc, run, P, T = self.tc, self.run, self.P, self.T
        x = self.resid[l]  # [B, T, d]
        xt = x.to(tc.W_enc.dtype)
        pre = tc.encode_layer_pre(l, xt)  # [B, T, F]
        computed = tc.activation.at_layer(pre, l)  # [B, T, F]
        n_p = min(P, T)
        orig = run.activations[..., :n_p, l, :].to(computed.dtype)  # [p, F], or [B, p, F] for a batch of runs
        # Where the residual stream is bitwise the prompt's, the features are the prompt's: take
        # them as recorded, so rounding in a differently shaped product cannot show as a change.
        same = (xt[:, :n_p] == run.resid_mid[..., :n_p, l, :].to(xt.dtype)).all(-1, keepdim=True)  # [B, p, 1]
        computed[:, :n_p] = torch.where(same, orig, computed[:, :n_p])
        current = computed.clone()
        lo, hi = self.layers
        if self.mode == "constrained" and lo <= l <= hi:
            current[:, :n_p] = orig
        final = current
        if l in self._masks:
            set_mask, set_value, scale = self._masks[l]
            final = torch.where(set_mask, set_value, current * scale)
        reference = computed.clone()  # what the slot's base output corresponds to
        reference[:, :n_p] = orig
        delta = final - reference  # [B, T, F]
        if self.keep:
            self.acts.append(final)
            self.pre.append(pre)
        active = (delta != 0).any(0).any(0).nonzero(as_tuple=True)[0]  # features with any change
        if active.numel():
            vecs = tc.decoder_vectors(l, active)  # [k, n_out, d]
            self.deltas.append((active, delta[..., active], vecs, tc.output_layers(l).start))
        else:
            self.deltas.append(None)
        base = output.clone()
        base[:, :n_p] = run.mlp_out[..., :n_p, l, :].to(output.dtype)
        change = torch.zeros_like(base, dtype=tc.W_enc.dtype)
        for entry in self.deltas:
            if entry is None:
                continue
            _, d_s, vecs, first = entry
            j = l - first
            if 0 <= j < vecs.shape[1]:
                change = change + d_s @ vecs[:, j].to(d_s.dtype)  # [B, T, d]
        if tc.W_skip is not None:
            moved = xt[:, :n_p] - run.resid_mid[..., :n_p, l, :].to(xt.dtype)  # [B, p, d]
            change[:, :n_p] = change[:, :n_p] + tc.skip_layer(l, moved)
        return base + change.to(base.dtype)


def _resolve_layers(layers: tuple[int, int] | None, n_layers: int) -> tuple[int, int]:
    if layers is None:
        return 0, n_layers - 1
    lo, hi = int(layers[0]), int(layers[1])
    if not (0 <= lo <= hi < n_layers):
        raise CltraceError(f"layer range {lo}-{hi} is not within 0..{n_layers - 1} (low-high)")
    return lo, hi


def _top(model, logits: torch.Tensor, k: int) -> list[TokenProb]:
    probs = logits.float().softmax(-1)
    p, t = probs.topk(min(k, probs.shape[-1]))
    return [TokenProb(int(i), model.decode_token(int(i)), float(v), float(logits[int(i)])) for v, i in zip(p, t)]


@torch.no_grad()
def intervene_batch(
    replacement: ReplacementModel,
    prompt: str | torch.Tensor,
    batch: Sequence[Sequence[Intervention]],
    mode: Mode = "iterative",
    layers: tuple[int, int] | None = None,
    freeze_attention: bool = False,
    generate: int = 0,
    top: int = 10,
    run: ReplacementRun | None = None,
) -> list[InterventionResult]:
    """Run many sets of interventions at once: one batched forward pass, batch element b = `batch[b]`.

    See the module docstring for the semantics. `layers` (lo, hi), inclusive, is the range whose
    features constrained mode holds (default: all layers). With `generate` > 0, one more batched
    pass per new token (greedy), an unintervened sequence riding along in the same batch for the
    "before". `run`: the prompt's ReplacementRun, to reuse one already computed (`prompt` is then
    ignored). Memory: every result keeps its [pos, layer, n_features] activations and
    pre-activations.
    """
    if mode not in MODES:
        raise CltraceError(f"intervention mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(generate, int) or generate < 0:
        raise CltraceError(f"generate must be an integer >= 0, got {generate!r}")
    if layers is not None and mode != "constrained":
        raise CltraceError("a layer range applies to constrained mode only: pass mode='constrained' or no layers")
    rm, model, tc = replacement, replacement.model, replacement.transcoder
    if run is None:
        run = rm.run(prompt)
    P = run.n_pos
    lo_hi = _resolve_layers(layers, tc.n_layers)
    plans = [list(plan) for plan in batch]
    if not plans:
        return []
    for plan in plans:
        check_interventions(plan, tc.n_layers, tc.n_features, P)
    if generate and P + generate > model.max_context:
        raise CltraceError(
            f"the prompt ({P} tokens) plus {generate} generated tokens exceeds the model's context of {model.max_context}"
        )
    ids = run.input_ids.to(model.device)
    runner = _Pass(rm, run, plans, mode, lo_hi)
    raw = runner.forward(ids[None].expand(len(plans), -1), frozen=freeze_attention)  # [B, P, vocab]
    acts = torch.stack(runner.acts, dim=2)[:, :P]  # [B, P, L, F]
    pre = torch.stack(runner.pre, dim=2)[:, :P]
    before = run.logits[-1].float()  # the model's own logits (after any soft-cap)
    raw_last = raw[:, -1].float()
    after = model.finalize_logits(raw_last)
    # raw (pre-soft-cap) logits of the original prompt, for demeaned-logit comparisons
    base_raw = _raw_logits_of_run(rm, run) if getattr(model.config, "final_logit_softcapping", None) else before

    gen_after, gen_before = _generate(rm, run, plans, mode, lo_hi, generate)

    results = []
    for b, plan in enumerate(plans):
        results.append(
            InterventionResult(
                interventions=plan,
                input_ids=run.input_ids,
                mode=mode,
                layers=lo_hi,
                freeze_attention=freeze_attention,
                top_before=_top(model, before, top),
                top_after=_top(model, after[b], top),
                logits_before=before,
                logits_after=after[b],
                raw_logits_before=base_raw,
                raw_logits_after=raw_last[b],
                activations_before=run.activations,
                activations_after=acts[b],
                pre_activations_before=run.pre_activations,
                pre_activations_after=pre[b],
                generated_before=list(gen_before),
                generated_after=list(gen_after[b]),
                text_before=_decode(model, gen_before) if generate else None,
                text_after=_decode(model, gen_after[b]) if generate else None,
            )
        )
    return results


def _decode(model: LoadedModel, ids: list[int]) -> str:
    """Token ids as text (each id in angle brackets for a model without a tokenizer)."""
    if model.tokenizer is None:
        return " ".join(f"<{i}>" for i in ids)
    return cast(str, model.tokenizer.decode(ids))  # one sequence: one str


def _generate(
    rm: ReplacementModel, run: ReplacementRun, plans: list[list[Intervention]], mode: Mode, lo_hi: tuple[int, int],
    generate: int,
) -> tuple[list[list[int]], list[int]]:
    """Greedy continuations of `generate` tokens: one per plan, and the unintervened one (ridden along
    as the batch's last element)."""
    if not generate:
        return [[] for _ in plans], []
    model = rm.model
    runner = _Pass(rm, run, [*plans, []], mode, lo_hi, keep=False)
    seq = run.input_ids.to(model.device)[None].expand(len(plans) + 1, -1).clone()  # [B + 1, T]
    for _ in range(generate):
        logits = model.finalize_logits(runner.forward(seq, frozen=False)[:, -1].float())
        nxt = logits.argmax(-1)  # [B + 1]
        seq = torch.cat([seq, nxt[:, None].to(seq.dtype)], dim=1)
    new = seq[:, run.n_pos:].tolist()
    return new[:-1], new[-1]


def _raw_logits_of_run(rm: ReplacementModel, run: ReplacementRun) -> torch.Tensor:
    """The unembedding's output [vocab] at the last position of the original prompt (before soft-capping)."""
    return rm.frozen(run).logits[0, -1].float()


@torch.no_grad()
def intervene_prompts(
    replacement: ReplacementModel,
    run: ReplacementRun,
    plans: Sequence[Sequence[Intervention]],
    mode: Mode = "iterative",
    freeze_attention: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each set of interventions plans[b] on its own prompt, row b of a batch of runs
    (`ReplacementModel.run_batch`), all in one batched pass: the model's logits at the last
    position before and after, each [B, vocab]. Same semantics as `intervene_batch`, without
    generation; many short prompts go far faster this way than one by one."""
    if mode not in MODES:
        raise CltraceError(f"intervention mode must be one of {', '.join(MODES)}, got {mode!r}")
    rm, tc = replacement, replacement.transcoder
    ids = run.input_ids.to(rm.model.device)
    if ids.dim() != 2 or len(plans) != ids.shape[0]:
        raise CltraceError(f"intervene_prompts needs a batched run and one plan per prompt: {len(plans)} plans, "
                           f"runs of shape {tuple(ids.shape)}")
    plans = [list(plan) for plan in plans]
    for plan in plans:
        check_interventions(plan, tc.n_layers, tc.n_features, run.n_pos)
    runner = _Pass(rm, run, plans, mode, (0, tc.n_layers - 1), keep=False)
    raw = runner.forward(ids, frozen=freeze_attention)  # [B, P, vocab]
    return run.logits[:, -1].float(), rm.model.finalize_logits(raw[:, -1].float())


def intervene(
    replacement: ReplacementModel,
    prompt: str | torch.Tensor,
    interventions: Sequence[Intervention],
    mode: Mode = "iterative",
    layers: tuple[int, int] | None = None,
    freeze_attention: bool = False,
    generate: int = 0,
    top: int = 10,
    run: ReplacementRun | None = None,
) -> InterventionResult:
    """Apply `interventions` together to the replacement model on `prompt`; see the module docstring."""
    return intervene_batch(
        replacement, prompt, [list(interventions)], mode=mode, layers=layers, freeze_attention=freeze_attention,
        generate=generate, top=top, run=run,
    )[0]


__all__ = [
    "MAX_VALUE",
    "MODES",
    "SPEC_HELP",
    "Intervention",
    "InterventionResult",
    "TokenProb",
    "check_interventions",
    "intervene",
    "intervene_batch",
    "intervene_prompts",
    "parse_intervention",
    "parse_positions",
]
