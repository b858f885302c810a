"""Which output logits an attribution graph explains.

A logit target is a fixed linear function of the last position's logits (before any final
soft-capping): Σ_k c_k · (logit_k − mean logit). For a single token that is its logit minus the
vocabulary mean (the unembedding row minus the mean row, as in the paper); for a logit difference
between two tokens (c = +1, −1) the mean cancels and it is logit_a − logit_b.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cltrace.errors import CltraceError

if TYPE_CHECKING:
    from cltrace.model.load import LoadedModel


@dataclass(frozen=True)
class LogitDifference:
    """Ask for the target logit(positive) − logit(negative); each side a token id or a one-token string."""

    positive: int | str
    negative: int | str


TargetSpec = int | str | LogitDifference


@dataclass(frozen=True)
class LogitTarget:
    """One logit node: the quantity Σ_k coefs[k] · (logit[tokens[k]] − mean logit) at the last position."""

    tokens: tuple[int, ...]
    """The token ids involved; the first is the node's token."""

    coefs: tuple[float, ...]
    """One coefficient per token: (1.0,) for a plain logit, (1.0, -1.0) for a difference."""

    label: str
    """How to show it: the token's text, or "a − b" for a difference."""

    probability: float
    """The model's probability of the first token (weights the node in influence and pruning)."""

    @property
    def token(self) -> int:
        return self.tokens[0]

    def seed(self, vocab_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The gradient of the quantity with respect to the logits [vocab]: Σ c_k (onehot_k − 1/V)."""
        g = torch.full((vocab_size,), -sum(self.coefs) / vocab_size, dtype=torch.float64)
        for token, coef in zip(self.tokens, self.coefs):
            g[token] += coef
        return g.to(dtype=dtype, device=device)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """The quantity from logits [..., vocab] (pre-softcap): Σ c_k (logit_k − mean)."""
        mean = logits.mean(-1)
        return sum((c * (logits[..., t] - mean) for t, c in zip(self.tokens, self.coefs)), torch.zeros_like(mean))

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "coefs": list(self.coefs), "label": self.label, "probability": self.probability}


def select_targets(
    logits_last: torch.Tensor,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    *,
    model: LoadedModel | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
) -> list[LogitTarget]:
    """The logit targets for a prompt whose last-position logits are `logits_last` [vocab].

    `logits_last` are the model's final logits (after any soft-capping): they give the
    probabilities. With `targets` None: the most probable tokens until their cumulative probability
    reaches `desired_logit_prob`, at most `max_n_logits`. Otherwise a token id, a one-token string
    (`model` needed to tokenize it), a `LogitDifference`, or a sequence of those.
    """
    if logits_last.dim() != 1:
        raise CltraceError(f"select_targets needs the last position's logits [vocab], got shape {tuple(logits_last.shape)}")
    probs = torch.softmax(logits_last.detach().double(), dim=-1)
    vocab = probs.shape[0]

    def label(token: int) -> str:
        if model is not None and model.tokenizer is not None:
            return model.decode_token(token)
        return f"<{token}>"

    if targets is None:
        if max_n_logits < 1:
            raise CltraceError(f"max_n_logits must be at least 1, got {max_n_logits}")
        if not 0 < desired_logit_prob <= 1:
            raise CltraceError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
        top_p, top_ids = probs.topk(min(max_n_logits, vocab))
        cumulative = top_p.cumsum(0)
        n = int(torch.searchsorted(cumulative, torch.tensor(desired_logit_prob, dtype=cumulative.dtype))) + 1
        n = min(n, top_ids.shape[0])
        return [LogitTarget((int(t),), (1.0,), label(int(t)), float(p)) for t, p in zip(top_ids[:n], top_p[:n])]

    if isinstance(targets, (int, str, LogitDifference)):
        targets = [targets]
    if len(targets) == 0:
        raise CltraceError("the target list is empty: give at least one token, or none to pick the top logits")

    def token_of(spec: int | str) -> int:
        if isinstance(spec, bool):
            raise CltraceError(f"target {spec!r} is not a token id or a string")
        if isinstance(spec, int) or (isinstance(spec, torch.Tensor) and spec.numel() == 1):
            token = int(spec)
            if not 0 <= token < vocab:
                raise CltraceError(f"target token id {token} is out of range for a vocabulary of {vocab}")
            return token
        if isinstance(spec, str):
            if model is None or model.tokenizer is None:
                raise CltraceError(f"target {spec!r} is text but the model has no tokenizer: give token ids")
            ids = model.tokenizer(spec, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise CltraceError(f"target {spec!r} is {len(ids)} tokens for this model, not one: pick a single-token target")
            return int(ids[0])
        raise CltraceError(f"target {spec!r} is not a token id, a string or a LogitDifference")

    chosen: list[LogitTarget] = []
    seen: set[tuple[int, ...]] = set()
    for spec in targets:
        if isinstance(spec, LogitDifference):
            a, b = token_of(spec.positive), token_of(spec.negative)
            if a == b:
                raise CltraceError(f"logit difference {spec.positive!r} − {spec.negative!r} compares a token with itself")
            target = LogitTarget((a, b), (1.0, -1.0), f"{label(a)} − {label(b)}", float(probs[a]))
        else:
            t = token_of(spec)
            target = LogitTarget((t,), (1.0,), label(t), float(probs[t]))
        if target.tokens not in seen:  # the same target twice would be the same node twice
            seen.add(target.tokens)
            chosen.append(target)
    return chosen
