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

Predicted against actual: `predict_effects` reads an attribution graph's node table and COO edges
only, and predicts each target's change as Σ_s Δa_s · edge(s → t) / a_s (direct effects, linear);
`compare_with_graph` puts that beside the change measured by a constrained, frozen-attention
intervention over all layers, where the two agree exactly for an unpruned graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from cltrace.errors import CltraceError
from cltrace.model.freeze import FreezeState, freeze
from cltrace.notation import NAME, NotationError, is_feature, parse_feature, split_assignment
from cltrace.notation import parse_positions as positions_of
from cltrace.replacement.replacement_model import ReplacementModel, ReplacementRun

if TYPE_CHECKING:
    from cltrace.graph.graph import Graph
    from cltrace.replacement.supernodes import Supernode

Mode = Literal["iterative", "constrained"]
MODES = ("iterative", "constrained")
#: Largest |value| or |factor| a parsed intervention may have: far past any real activation, and
#: small enough that float32 activations and logits stay finite (1e308 overflowed float32).
MAX_VALUE = 1e6


@dataclass(frozen=True)
class Intervention:
    """Set (``value``) or scale (``factor``) one feature of one layer at some positions.

    Positions: ``start`` None means every position (prompt and generated); otherwise positions
    start..end inclusive, ``end`` None meaning open-ended (the rest of the prompt and every
    generated token).
    """

    layer: int
    feature: int
    value: float | None = None
    """Set the activation to this value (exactly one of value and factor)."""
    factor: float | None = None
    """Multiply the activation by this factor."""
    start: int | None = None
    end: int | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.factor is None):
            raise CltraceError("an intervention needs exactly one of value (set) or factor (scale)")
        number = self.value if self.value is not None else self.factor
        if not math.isfinite(float(number)):
            raise CltraceError(f"intervention on {self.layer}:{self.feature}: {number} is not a finite number")
        if self.start is None and self.end is not None:
            raise CltraceError("an intervention with an end position needs a start position")
        if self.start is not None and self.start < 0:
            raise CltraceError(f"position {self.start} is negative: positions count from 0")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise CltraceError(f"position range {self.start}-{self.end} is empty: write it low-high")

    @classmethod
    def at(
        cls,
        layer: int,
        feature: int,
        pos: int | tuple[int, int | None] | None = None,
        *,
        value: float | None = None,
        factor: float | None = None,
    ) -> Intervention:
        """An intervention at `pos`: an int, (a, b) inclusive, (a, None) open-ended, or None (everywhere)."""
        if pos is None:
            start, end = None, None
        elif isinstance(pos, tuple):
            start, end = pos
        else:
            start, end = int(pos), int(pos)
        return cls(int(layer), int(feature), value, factor, start, end)

    @property
    def mode(self) -> Literal["set", "scale"]:
        return "set" if self.value is not None else "scale"

    @property
    def open_ended(self) -> bool:
        """Whether it also covers generated tokens."""
        return self.end is None

    def covers(self, pos: int) -> bool:
        return (self.start is None or pos >= self.start) and (self.end is None or pos <= self.end)

    def apply(self, activation: float) -> float:
        """The new activation of a feature whose activation would be `activation`."""
        return float(self.value) if self.value is not None else activation * float(self.factor)

    def positions_text(self) -> str:
        if self.start is None:
            return ""
        if self.end is None:
            return f"@{self.start}-"
        return f"@{self.start}" if self.start == self.end else f"@{self.start}-{self.end}"

    def __str__(self) -> str:
        what = f"{self.value:g}" if self.value is not None else f"x{self.factor:g}"
        return f"{self.layer}:{self.feature}{self.positions_text()}={what}"


SPEC_HELP = "expected LAYER:FEATURE[@POS]=VALUE or LAYER:FEATURE[@POS]=xFACTOR (POS: 4, 2-5 or 2-), e.g. 5:123@4=0 or 5:123=x2"


def _bad(spec: str, why: str) -> CltraceError:
    return CltraceError(f"malformed --set {spec!r}: {why}; {SPEC_HELP}")


def parse_positions(spec: str, text: str | None) -> tuple[int | None, int | None]:
    """(start, end) of the POS text of `spec`: "4" → (4, 4), "2-5" → (2, 5), "2-" → (2, None), None → (None, None)."""
    try:
        return positions_of(text)
    except NotationError as exc:
        raise _bad(spec, str(exc)) from None


def parse_intervention(spec: str, supernodes: Mapping[str, Supernode] | None = None) -> list[Intervention]:
    """Parse ``LAYER:FEATURE[@POS]=VALUE|xFACTOR`` (or ``SUPERNODE[@POS]=...``) into interventions.

    A supernode name expands to one intervention per member; a member's own position wins over
    ``@POS``, which applies to members given without one. One-line CltraceErrors for malformed specs.
    """
    try:
        target, pos_text, val_text = split_assignment(spec)
    except NotationError as exc:
        raise _bad(spec, str(exc)) from None
    if val_text.lower().startswith(("x", "*")):
        try:
            value, factor = None, float(val_text[1:])
        except ValueError:
            raise _bad(spec, f"factor {val_text[1:]!r} is not a number") from None
    else:
        try:
            value, factor = float(val_text), None
        except ValueError:
            raise _bad(spec, f"value {val_text!r} is not a number (write xF to multiply by F)") from None
    number = value if value is not None else factor
    if not math.isfinite(number):
        raise _bad(spec, f"{val_text!r} is not a finite number")
    if abs(number) > MAX_VALUE:
        raise _bad(spec, f"{val_text!r} is beyond ±{MAX_VALUE:g}")
    start, end = parse_positions(spec, pos_text)
    if is_feature(target):
        try:
            layer, feature = parse_feature(target)
        except NotationError as exc:
            raise _bad(spec, str(exc)) from None
        return [Intervention(layer, feature, value, factor, start, end)]
    if not NAME.match(target):
        raise _bad(spec, f"{target!r} is neither LAYER:FEATURE nor a supernode name")
    if not supernodes or target not in supernodes:
        known = ", ".join(sorted(supernodes)) if supernodes else "none loaded"
        raise CltraceError(
            f"--set {spec!r}: no supernode named {target!r} (known: {known}); define it in a supernodes file "
            "(--supernodes FILE) or write LAYER:FEATURE"
        )
    return supernodes[target].interventions(value=value, factor=factor, start=start, end=end)


def check_interventions(
    interventions: Sequence[Intervention], n_layers: int, n_features: int, n_prompt: int | None
) -> None:
    """One-line CltraceError for a layer or feature out of range or a position beyond the prompt.

    `n_prompt` None: the prompt's length is not known yet (the command line checks layers and
    features before loading the model); positions are then checked on the next call, with it.
    """
    for iv in interventions:
        if not 0 <= iv.layer < n_layers:
            raise CltraceError(
                f"intervention {iv}: layer {iv.layer} is out of range: the transcoder has layers 0..{n_layers - 1}"
            )
        if not 0 <= iv.feature < n_features:
            raise CltraceError(
                f"intervention {iv}: feature {iv.feature} is out of range: layer {iv.layer} has features 0..{n_features - 1}"
            )
        if n_prompt is None:
            continue
        if iv.start is not None and iv.start >= n_prompt:
            raise CltraceError(
                f"intervention {iv}: position {iv.start} is beyond the prompt ({n_prompt} tokens, positions 0..{n_prompt - 1})"
            )
        if iv.end is not None and iv.end >= n_prompt:
            raise CltraceError(
                f"intervention {iv}: position {iv.end} is beyond the prompt ({n_prompt} tokens, positions "
                f"0..{n_prompt - 1}); write {iv.start}- for a range that also covers generated tokens"
            )


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


def _layer_activation(tc, pre: torch.Tensor, layer: int) -> torch.Tensor:
    """The activation function of `layer` applied to pre [..., F]."""
    threshold = getattr(tc.activation, "threshold", None)
    if threshold is not None and type(tc.activation).__name__ == "JumpReLU":
        return pre * (pre > threshold[layer].to(pre.dtype))
    full = pre.new_zeros(*pre.shape[:-1], tc.n_layers, pre.shape[-1])
    full[..., layer, :] = pre
    return tc.activation(full)[..., layer, :]


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
        self.skip = getattr(self.tc, "W_skip", None)

    def forward(self, ids: torch.Tensor, frozen: bool) -> torch.Tensor:
        """Raw logits [B, T, vocab] (the unembedding's output) of `ids` [B, T]; fills acts/pre per layer."""
        model = self.rm.model
        self.T = ids.shape[1]
        self.resid: dict[int, torch.Tensor] = {}
        self.deltas: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None] = []
        self.acts: list[torch.Tensor] = []
        self.pre: list[torch.Tensor] = []
        self._masks = self._build_masks(ids.shape[0], self.T, ids.device)
        layers = model.adapter.decoder_layers(model.model)
        handles = []
        captured: list[torch.Tensor] = []
        try:
            for index, layer in enumerate(layers):
                handles.append(model.adapter.mlp_input_module(layer).register_forward_pre_hook(self._capture(index)))
                handles.append(model.adapter.mlp_output_module(layer).register_forward_hook(self._slot(index)))
            unembed = model.model.get_output_embeddings()
            handles.append(unembed.register_forward_hook(lambda _m, _i, out: captured.append(out)))
            # Free attention still runs through the freezing code, recording into a scratch state:
            # patterns and norms are recomputed, with exactly the arithmetic of the recorded run.
            state = self.run.freeze_state.replaying() if frozen else FreezeState("record")
            with freeze(model.model, model.adapter.norms(model.model), state):
                model.model(input_ids=ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return captured[0]

    def _build_masks(self, B: int, T: int, device: torch.device) -> dict[int, tuple[torch.Tensor, ...]]:
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
                    scale[b, covered, iv.feature] *= float(iv.factor)
        return masks

    def _capture(self, layer: int):
        def hook(_module, args):
            self.resid[layer] = args[0]

        return hook

    def _slot(self, layer: int):
        def hook(_module, _args, output: torch.Tensor) -> torch.Tensor:
            return self._compute_slot(layer, output)

        return hook

    def _compute_slot(self, l: int, output: torch.Tensor) -> torch.Tensor:
        tc, run, P, T = self.tc, self.run, self.P, self.T
        x = self.resid[l]  # [B, T, d]
        xt = x.to(tc.W_enc.dtype)
        pre = xt @ tc.W_enc[l].T + tc.b_enc[l]  # [B, T, F]
        computed = _layer_activation(tc, pre, l)  # [B, T, F]
        n_p = min(P, T)
        orig = run.activations[:n_p, l].to(computed.dtype)  # [p, F]
        # Where the residual stream is bitwise the prompt's, the features are the prompt's: take
        # them as recorded, so rounding in a differently shaped product cannot show as a change.
        same = (xt[:, :n_p] == run.resid_mid[:n_p, l].to(xt.dtype)).all(-1, keepdim=True)  # [B, p, 1]
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
        base[:, :n_p] = run.mlp_out[:n_p, l].to(output.dtype)
        change = torch.zeros_like(base, dtype=tc.W_enc.dtype)
        for s, entry in enumerate(self.deltas):
            if entry is None:
                continue
            _, d_s, vecs, first = entry
            j = l - first
            if 0 <= j < vecs.shape[1]:
                change = change + d_s @ vecs[:, j].to(d_s.dtype)  # [B, T, d]
        if self.skip is not None:
            moved = xt[:, :n_p] - run.resid_mid[:n_p, l].to(xt.dtype)  # [B, p, d]
            change[:, :n_p] = change[:, :n_p] + moved @ self.skip[l].to(xt.dtype)
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

    gen_before: list[int] = []
    gen_after: list[list[int]] = [[] for _ in plans]
    if generate:
        gen_runner = _Pass(rm, run, [*plans, []], mode, lo_hi, keep=False)
        seq = ids[None].expand(len(plans) + 1, -1).clone()
        for _ in range(generate):
            logits = model.finalize_logits(gen_runner.forward(seq, frozen=False)[:, -1].float())
            nxt = logits.argmax(-1)  # [B + 1]
            seq = torch.cat([seq, nxt[:, None].to(seq.dtype)], dim=1)
        new = seq[:, P:].tolist()
        gen_after, gen_before = new[:-1], new[-1]

    decode = (lambda t: model.tokenizer.decode(t)) if model.tokenizer is not None else (lambda t: " ".join(f"<{i}>" for i in t))
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
                text_before=decode(gen_before) if generate else None,
                text_after=decode(gen_after[b]) if generate else None,
            )
        )
    return results


def _raw_logits_of_run(rm: ReplacementModel, run: ReplacementRun) -> torch.Tensor:
    """The unembedding's output [vocab] at the last position of the original prompt (before soft-capping)."""
    return rm.frozen(run).logits[0, -1].float()


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


# ------------------------------------------------------------------------- predicted against actual


@dataclass
class Prediction:
    """The graph's linear prediction of an intervention's direct effects."""

    source_change: dict[int, float]
    """Graph node index → Δ activation of each intervened feature node."""
    change: dict[int, float]
    """Graph node index → predicted change of its target value (a feature's pre-activation, a logit
    node's demeaned logit), for every node with an edge from an intervened node."""
    missing: list[str]
    """Intervened (layer, feature, pos) that change but are not nodes of the graph (inactive, at
    the BOS position or pruned): their effect is not in the prediction."""


def predict_effects(graph: Graph, interventions: Sequence[Intervention]) -> Prediction:
    """Predict each target's change from the graph's edges: Σ_s Δa_s · edge(s → t) / a_s.

    Uses only the graph's node table and COO edges (and, to count positions, the number of
    embedding nodes or the largest position), so it works whatever built the graph. Exact for a
    constrained intervention over all layers with frozen attention on an unpruned graph.
    """
    from cltrace.graph.graph import NodeKind

    nodes = graph.nodes
    is_feat = nodes.kind == int(NodeKind.FEATURE)
    idx = is_feat.nonzero(as_tuple=True)[0].tolist()
    key = {
        (int(nodes.layer[i]), int(nodes.feature[i]), int(nodes.pos[i])): i for i in idx
    }
    n_pos = int(nodes.pos.max()) + 1 if graph.n_nodes else 0
    if isinstance(graph.metadata.get("input_ids"), list):
        n_pos = len(graph.metadata["input_ids"])
    source_change: dict[int, float] = {}
    missing: list[str] = []
    for iv in interventions:
        positions = range(n_pos) if iv.start is None else range(iv.start, n_pos if iv.end is None else min(iv.end + 1, n_pos))
        for p in positions:
            node = key.get((iv.layer, iv.feature, p))
            if node is None:
                if iv.value is not None and iv.value != 0:
                    missing.append(f"{iv.layer}_{iv.feature}_{p}")
                continue
            a = float(nodes.activation[node])
            current = a + source_change.get(node, 0.0)
            source_change[node] = iv.apply(current) - a
    change: dict[int, float] = {}
    if source_change:
        src = torch.tensor(list(source_change), dtype=torch.long)
        ratio = torch.zeros(graph.n_nodes, dtype=torch.float64)
        ratio[src] = torch.tensor(
            [source_change[int(s)] / float(nodes.activation[int(s)]) if float(nodes.activation[int(s)]) != 0 else 0.0 for s in src],
            dtype=torch.float64,
        )
        hit = ratio[graph.edge_source] != 0
        contrib = graph.edge_weight[hit].double() * ratio[graph.edge_source[hit]]
        total = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, graph.edge_target[hit], contrib)
        touched = torch.zeros(graph.n_nodes, dtype=torch.bool)
        touched[graph.edge_target[hit]] = True
        change = {int(i): float(total[i]) for i in touched.nonzero(as_tuple=True)[0]}
    return Prediction(source_change, change, missing)


@dataclass
class EffectRow:
    node: int
    node_id: str
    kind: str  # "logit" | "feature"
    label: str
    predicted: float
    actual: float


def compare_with_graph(
    replacement: ReplacementModel,
    graph: Graph,
    interventions: Sequence[Intervention],
    prompt: str | torch.Tensor | None = None,
) -> tuple[list[EffectRow], InterventionResult, Prediction]:
    """The graph's predicted change of each logit node and downstream feature node beside the
    measured change from a constrained (all layers), frozen-attention intervention.

    Logit nodes: the change of the demeaned logit (logit − mean logit; for a logit-difference
    target, as in its metadata). Feature nodes: the change of the pre-activation. Rows sorted by
    |predicted|, logit nodes first.
    """
    from cltrace.graph.graph import NodeKind

    if prompt is None:
        ids = graph.metadata.get("input_ids")
        if not isinstance(ids, list):
            raise CltraceError("the graph's metadata has no input_ids: pass the prompt")
        prompt = torch.tensor(ids, dtype=torch.long)
    prediction = predict_effects(graph, interventions)
    result = intervene(replacement, prompt, interventions, mode="constrained", freeze_attention=True)
    nodes = graph.nodes
    targets = graph.metadata.get("targets")
    logit_nodes = (nodes.kind == int(NodeKind.LOGIT)).nonzero(as_tuple=True)[0].tolist()
    before, after = result.raw_logits_before.double(), result.raw_logits_after.double()
    rows: list[EffectRow] = []
    ids_text = graph.node_ids()
    for k, i in enumerate(logit_nodes):
        if isinstance(targets, list) and k < len(targets) and isinstance(targets[k], dict):
            tokens, coefs = targets[k]["tokens"], targets[k]["coefs"]
            label = str(targets[k].get("label", tokens[0]))
        else:
            tokens, coefs = [int(nodes.token[i])], [1.0]
            label = replacement.model.decode_token(tokens[0])

        def value(logits: torch.Tensor, tokens: list = tokens, coefs: list = coefs) -> float:
            mean = logits.mean()
            return float(sum(c * (logits[t] - mean) for t, c in zip(tokens, coefs)))

        rows.append(EffectRow(i, ids_text[i], "logit", label, prediction.change.get(i, 0.0), value(after) - value(before)))
    feature_rows = []
    for i, predicted in prediction.change.items():
        if int(nodes.kind[i]) != int(NodeKind.FEATURE):
            continue
        layer, pos, feat = int(nodes.layer[i]), int(nodes.pos[i]), int(nodes.feature[i])
        actual = float(result.pre_activations_after[pos, layer, feat]) - float(result.pre_activations_before[pos, layer, feat])
        feature_rows.append(EffectRow(i, ids_text[i], "feature", ids_text[i], predicted, actual))
    rows.sort(key=lambda r: -abs(r.predicted))
    feature_rows.sort(key=lambda r: -abs(r.predicted))
    return rows + feature_rows, result, prediction


__all__ = [
    "MODES",
    "EffectRow",
    "Intervention",
    "InterventionResult",
    "Prediction",
    "TokenProb",
    "check_interventions",
    "compare_with_graph",
    "intervene",
    "intervene_batch",
    "parse_intervention",
    "parse_positions",
    "predict_effects",
]
