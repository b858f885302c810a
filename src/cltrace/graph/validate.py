"""Checking a circuit by intervening: does removing what it names change the answer as it claims?

For each supernode of a circuit, its members are set to 0 at their positions (ablated):

* **predicted**: the change in the *replacement model* (attention patterns and norm denominators
  frozen at the prompt's, error terms held, downstream features recomputed: iterative mode with
  frozen attention), the model the graph describes;
* **actual**: the change in the model as it runs (attention recomputed, downstream features
  recomputed, error terms held so that with no intervention it is the model exactly).

Both as the change of the target's probability (of its first token) and of the target's value
(its logit minus the mean logit, or the logit difference); beside them the graph's own linear
prediction, minus the supernode's effect. A supernode whose label names tokens it says is also
steered (members multiplied by `steer_factor`): it passes when the named tokens' logits, minus the
mean logit, go up.

The circuit's supernodes that push the target up, the part that the circuit says carries it, are
ablated together and compared with ablating as many random active features (position 0 left out),
each matched to one of their members by activation: one of the 3 unused features of nearest
activation, picked at random (`n_random` seeded draws). The whole circuit, the supernodes that push
the target down included, is ablated too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cltrace.errors import CltraceError
from cltrace.graph.circuit import Circuit
from cltrace.graph.config import ValidationConfig
from cltrace.graph.graph import Graph
from cltrace.replacement import ReplacementModel
from cltrace.replacement.intervention import Intervention
from cltrace.replacement.interventions import InterventionResult, intervene_batch
from cltrace.replacement.replacement_model import ReplacementRun

NEAREST = 3  # a random feature is one of the 3 unused active features of nearest activation
BATCH = 16  # intervention sets per batched pass

_DEFAULTS = ValidationConfig()


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equal-length sequences (None for fewer than 3 points or no spread)."""
    if len(x) != len(y):
        raise CltraceError(f"pearson needs sequences of one length, got {len(x)} and {len(y)}")
    if len(x) < 3:
        return None
    t = torch.tensor([list(x), list(y)], dtype=torch.float64)
    if bool((t.std(dim=1) == 0).any()):
        return None
    return float(torch.corrcoef(t)[0, 1])


def ablation(members: Sequence[tuple[int, int, int]]) -> list[Intervention]:
    """Set each (layer, feature, pos) to 0 at its position."""
    return [Intervention.at(l, f, p, value=0.0) for l, f, p in members]


def matched_random(run: ReplacementRun, members: Sequence[tuple[int, int, int]], generator: torch.Generator,
                   exclude: Sequence[tuple[int, int, int]] = ()) -> list[tuple[int, int, int]]:
    """For each member in turn (by its activation), an unused active feature outside `members`,
    `exclude` and position 0, picked at random among the NEAREST of closest activation."""
    pos, layer, feat = (run.activations[1:] != 0).nonzero(as_tuple=True)  # [n] each
    pos = pos + 1
    pool_act = run.activations[pos, layer, feat].double()  # [n]
    keys = list(zip(layer.tolist(), feat.tolist(), pos.tolist()))
    taken = set(members) | set(exclude)
    free = torch.tensor([k not in taken for k in keys], dtype=torch.bool)
    chosen = []
    for l, f, p in members:
        if not bool(free.any()):
            break
        gap = (pool_act - float(run.activations[p, l, f])).abs()
        gap[~free] = math.inf
        near = torch.topk(gap, min(NEAREST, int(free.sum())), largest=False).indices
        pick = int(near[torch.randint(len(near), (1,), generator=generator)])
        free[pick] = False
        chosen.append(keys[pick])
    return chosen


def _value(logits: torch.Tensor, tokens: Sequence[int], coefs: Sequence[float]) -> float:
    """Σ c · (logit − mean logit) from raw logits [vocab]."""
    logits = logits.double()
    mean = logits.mean()
    return float(sum(c * (logits[t] - mean) for t, c in zip(tokens, coefs)))


def _measure(res: InterventionResult, tokens: Sequence[int], coefs: Sequence[float]) -> dict[str, float]:
    p_before, p_after = (float(p[tokens[0]]) for p in res.probabilities())
    return {"p_before": p_before, "p_after": p_after,
            "value_change": _value(res.raw_logits_after, tokens, coefs) - _value(res.raw_logits_before, tokens, coefs)}


def _run_all(replacement: ReplacementModel, run: ReplacementRun, plans: list[list[Intervention]],
             frozen: bool) -> list[InterventionResult]:
    out: list[InterventionResult] = []
    for c in range(0, len(plans), BATCH):
        out += intervene_batch(replacement, run.input_ids, plans[c : c + BATCH], mode="iterative",
                               freeze_attention=frozen, run=run, top=1)
    return out


def _token_ids(replacement: ReplacementModel, texts: Sequence[str]) -> list[int]:
    """The single-token ids of `texts` (texts that are not one token are left out)."""
    tok = replacement.model.tokenizer
    if tok is None:
        return []
    ids = []
    for text in texts:
        enc = tok(text, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and int(enc[0]) not in ids:
            ids.append(int(enc[0]))
    return ids


def validate_circuit(
    replacement: ReplacementModel,
    graph: Graph,
    circuit: Circuit,
    *,
    n_random: int = _DEFAULTS.n_random,
    seed: int = _DEFAULTS.seed,
    steer_factor: float = _DEFAULTS.steer_factor,
) -> dict[str, Any]:
    """Ablate (and steer) each supernode of `circuit`, and the circuit against random features (see the
    module docstring); fills each supernode's ``validation`` and the circuit's, and returns the latter."""
    ids = graph.metadata.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise CltraceError("the graph's metadata has no input_ids: validate a graph made by `cltrace attribute` or `trace`")
    if n_random < 1:
        raise CltraceError(f"n_random must be at least 1, got {n_random}")
    run = replacement.run(torch.tensor(ids, dtype=torch.long))
    tokens, coefs = [int(t) for t in circuit.target["tokens"]], [float(c) for c in circuit.target["coefs"]]
    up = [m for sn in circuit.supernodes if sn.effect > 0 for m in sn.members]
    members = [m for sn in circuit.supernodes for m in sn.members]
    generator = torch.Generator().manual_seed(int(seed))
    random_sets = [matched_random(run, up, generator, exclude=members) for _ in range(n_random)]
    ablations = [ablation(sn.members) for sn in circuit.supernodes] + [ablation(up), ablation(members)]
    steered = [(sn, _token_ids(replacement, sn.output_tokens)) for sn in circuit.supernodes]
    steered = [(sn, t) for sn, t in steered if t]
    steers = [[Intervention.at(l, f, p, factor=steer_factor) for l, f, p in sn.members] for sn, _ in steered]
    actual = _run_all(replacement, run, ablations + [ablation(r) for r in random_sets] + steers, frozen=False)
    predicted = _run_all(replacement, run, ablations, frozen=True)
    k = len(circuit.supernodes)
    measured = [_measure(r, tokens, coefs) for r in actual]
    expected = [_measure(r, tokens, coefs) for r in predicted]
    for i, sn in enumerate(circuit.supernodes):
        act, pred = measured[i], expected[i]
        sn.validation = {"ablate": {
            "predicted": pred["p_after"] - pred["p_before"], "actual": act["p_after"] - act["p_before"],
            "p_before": act["p_before"], "p_after": act["p_after"], "p_predicted": pred["p_after"],
            "value_predicted": pred["value_change"], "value_actual": act["value_change"], "value_graph": -sn.effect,
        }, "steer": None}
    for (sn, token_ids), res in zip(steered, actual[k + 2 + n_random :]):
        assert sn.validation is not None  # set by the ablation loop above
        change = [_value(res.raw_logits_after, [t], [1.0]) - _value(res.raw_logits_before, [t], [1.0]) for t in token_ids]
        mean_change = sum(change) / len(change)
        sn.validation["steer"] = {"tokens": [replacement.model.decode_token(t) for t in token_ids],
                                  "factor": steer_factor, "logit_change": mean_change, "passed": mean_change > 0}
    circuit.validation = _summary(circuit, measured[k : k + 2], expected[k : k + 2], measured[k + 2 : k + 2 + n_random],
                                  len(up), n_random, seed)
    return circuit.validation


def _relative_drop(m: dict[str, float]) -> float:
    return (m["p_before"] - m["p_after"]) / m["p_before"] if m["p_before"] > 0 else 0.0


def _ablated(m: dict[str, float], pred: dict[str, float], n_features: int) -> dict[str, Any]:
    return {"p_before": m["p_before"], "p_after": m["p_after"], "relative_drop": _relative_drop(m),
            "p_predicted": pred["p_after"], "value_actual": m["value_change"], "value_predicted": pred["value_change"],
            "n_features": n_features}


def _summary(circuit: Circuit, parts: list[dict[str, float]], parts_pred: list[dict[str, float]],
             randoms: list[dict[str, float]], n_up: int, n_random: int, seed: int) -> dict[str, Any]:
    """The circuit's validation: its up-pushing part and the whole ablated, the random controls."""
    drop = _relative_drop(parts[0])
    random_drops = [_relative_drop(r) for r in randoms]
    random_mean = sum(random_drops) / len(random_drops) if random_drops else 0.0
    abl = [sn.validation["ablate"] for sn in circuit.supernodes if sn.validation]
    return {
        "circuit_ablation": {**_ablated(parts[0], parts_pred[0], n_up),
                             "supernodes": [sn.id for sn in circuit.supernodes if sn.effect > 0]},
        "whole_circuit_ablation": _ablated(parts[1], parts_pred[1], sum(len(sn.members) for sn in circuit.supernodes)),
        "random_ablation": {"n_features": n_up, "draws": n_random, "seed": seed, "relative_drop_mean": random_mean,
                            "relative_drops": random_drops, "p_after": [r["p_after"] for r in randoms]},
        "ratio": drop / random_mean if random_mean > 0 else None,
        "pearson_r": pearson([a["predicted"] for a in abl], [a["actual"] for a in abl]),
        "pearson_r_graph": pearson([a["value_graph"] for a in abl], [a["value_actual"] for a in abl]),
        "steer_passed": [sn.validation["steer"]["passed"] for sn in circuit.supernodes
                         if sn.validation and sn.validation.get("steer")],
    }


__all__ = ["ablation", "matched_random", "pearson", "validate_circuit"]
