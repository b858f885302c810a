"""Output labels: what a feature says, measured, and the steering test that scores it.

For each feature:

1. *Selection* (the label). At its strongest examples of the store's training half, the feature is
   set to ``steer_factor`` × its largest activation in the replacement model with every other
   feature held and attention frozen (constrained mode over all layers): the change of the logits
   at that position is the feature's direct effect, exactly what the attribution graph's
   feature → logit edges carry. Each site's change is standardised over the vocabulary,
   z = (Δ − mean Δ) / std Δ, and averaged over sites; the label names the tokens of highest z.
2. *Test* (the score). At held-out places where the feature fires (the held-out pass's contexts,
   else the store's held-out half), the feature is set the same way in the replacement model with
   every downstream feature recomputed and attention free (iterative mode): the real effect. The
   score is the named tokens' mean z of that change, averaged over the sites. It passes at
   ``LabelConfig.min_steer_z``: the named tokens must rise that many standard deviations above
   the vocabulary's average change.

Each site's prompt is BOS and the ``steer_window`` tokens before the site, then the site's token
(the site is the last position). Prompts of one length run together, in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cltrace.features.label_data import progress_bar
from cltrace.replacement.intervention import Mode
from cltrace.replacement.interventions import Intervention, intervene_prompts


@dataclass(frozen=True)
class Site:
    """A place to intervene: a context of the store ("store") or of the held-out pass ("heldout")."""

    where: str
    ctx_id: int
    pos: int


@dataclass
class Job:
    """One feature set at one site."""

    layer: int
    feature: int
    site: Site
    value: float
    """The activation set: steer_factor × the feature's largest activation (at least its own there)."""


def site_prompt(tokens: np.ndarray, pos: int, window: int) -> torch.Tensor:
    """[BOS, the `window` tokens before `pos`, the token at `pos`] of a context tokens [T] (BOS first)."""
    lo = max(1, pos - window)
    return torch.tensor([int(tokens[0]), *[int(t) for t in tokens[lo : pos + 1]]], dtype=torch.long)


def standardised(delta: torch.Tensor) -> torch.Tensor:
    """(Δ − mean) / std over the vocabulary [V] (zeros where Δ is flat)."""
    delta = delta.double()
    std = delta.std()
    z = (delta - delta.mean()) / std if float(std) > 0 else torch.zeros_like(delta)
    return z.float()


@torch.no_grad()
def logit_changes(replacement: Any, jobs: Sequence[Job], tokens_of: Any, window: int, mode: Mode,
                  freeze_attention: bool, progress: bool = False, batch: int = 32) -> list[torch.Tensor]:
    """The standardised change z [V] of the last position's logits for each job: prompts of one
    length run `batch` at a time, one batched run and one batched intervention pass each
    (`ReplacementModel.run_batch`, `intervene_prompts`). `tokens_of(site)` gives a site's context [T]."""
    prompts = [site_prompt(tokens_of(job.site), job.site.pos, window) for job in jobs]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    out: list[torch.Tensor] = [torch.zeros(0)] * len(jobs)
    bar = progress_bar(progress, len(jobs), "steering" if mode == "iterative" else "direct effects", "site")
    for idx in by_length.values():
        for start in range(0, len(idx), batch):
            chunk = idx[start : start + batch]
            run = replacement.run_batch(torch.stack([prompts[i] for i in chunk]))
            plans = []
            for row, i in enumerate(chunk):
                job = jobs[i]
                own = float(run.activations[row, -1, job.layer, job.feature])
                plans.append([Intervention.at(job.layer, job.feature, run.n_pos - 1, value=max(job.value, 1.01 * own))])
            before, after = intervene_prompts(replacement, run, plans, mode=mode, freeze_attention=freeze_attention)
            for row, i in enumerate(chunk):
                out[i] = standardised((after[row] - before[row]).cpu())
            bar.update(len(chunk))
    bar.close()
    return out


def name_tokens(z_mean: torch.Tensor, n: int, share: float = 0.7) -> list[int]:
    """The token of highest mean z and up to n − 1 more within `share` of it."""
    top = z_mean.topk(min(n, z_mean.numel()))
    best = float(top.values[0])
    return [int(t) for v, t in zip(top.values.tolist(), top.indices.tolist()) if v >= share * best or t == top.indices[0]]


def describe_site(tokens: np.ndarray, pos: int, window: int, texts: Sequence[str]) -> str:
    """The site's prompt as one line, its last token in «»."""
    lo = max(1, pos - window)
    parts = [texts[int(t)] for t in tokens[lo:pos]] + [f"«{texts[int(tokens[pos])]}»"]
    return "".join(parts).replace("\n", "⏎")


def top_tokens(z: torch.Tensor, texts: Sequence[str], n: int = 5) -> list[dict[str, Any]]:
    top = z.topk(min(n, z.numel()))
    return [{"token": int(t), "text": texts[int(t)], "z": round(float(v), 2)}
            for v, t in zip(top.values.tolist(), top.indices.tolist())]


__all__ = ["Job", "Site", "describe_site", "logit_changes", "name_tokens", "site_prompt",
           "standardised", "top_tokens"]
