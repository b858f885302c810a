"""A feature's page as values: its scores, its example contexts, and the labellers that name it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class TokenScore:
    """A token and a score (a logit effect, an encoder product or a mean activation)."""

    token: int
    text: str
    score: float


@dataclass
class Example:
    """One context where the feature fired: the tokens of a window around `pos` and their activations."""

    ctx_id: int
    pos: int
    """Position of the marked token in its context (0 is BOS)."""
    act: float
    """The feature's activation at `pos`."""
    tokens: list[int]
    texts: list[str]
    acts: list[float]
    """Activations of the window's tokens (0 where inactive)."""
    mark: int
    """Index in `tokens` of the marked token."""
    band: int | None = None
    """The quantile band of a sampled example (0 the lowest), None for a top example."""

    def render(self, left: str = "«", right: str = "»") -> str:
        """The window as one line of text with the marked token between `left` and `right`."""
        parts = [
            f"{left}{t}{right}" if i == self.mark else t for i, t in enumerate(_printable(x) for x in self.texts)
        ]
        return "".join(parts)


@dataclass
class FeaturePage:
    """What the store knows about one feature."""

    layer: int
    feature: int
    label: str | None
    """The label a person gave, if any."""
    auto_label: str
    count: int
    """Tokens where the feature was active."""
    density: float
    """count / tokens analysed."""
    max_act: float
    mean_act: float
    """Mean activation over the tokens where it was active."""
    hist_edges: list[float]
    """Edges of the histogram's bins; bin 0 holds activations below edges[0], the last those above edges[-1]."""
    hist_counts: list[int]
    promoted: list[TokenScore]
    """Tokens whose logits its decoder raises most (decoder · final norm weight · unembedding)."""
    suppressed: list[TokenScore]
    """Tokens whose logits its decoder lowers most."""
    inputs: list[TokenScore]
    """Input tokens that drive it most (encoder · token embedding)."""
    top: list[Example]
    """The contexts of its highest activations, highest first."""
    samples: list[Example] = field(default_factory=list)
    """Contexts sampled uniformly from its activations, ordered by quantile band, lowest first."""
    tokens_analysed: int = 0
    measured: dict[str, Any] | None = None
    """The measured label (see `cltrace.features.labels`): its parts, scores, display text and
    evidence; None where the feature was never measured."""

    @property
    def name(self) -> str:
        return f"{self.layer}:{self.feature}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (for the web UI and scripts)."""
        return {**dataclasses.asdict(self), "name": self.name, "display_label": self.display_label}

    @property
    def display_label(self) -> str:
        """A person's label, else the measured one's text, else the token-list automatic label."""
        if self.label:
            return self.label
        measured = self.measured
        if measured and (measured.get("input_label") or measured.get("output_label")):
            return str(measured["text"])
        return self.auto_label


class Labeller(Protocol):
    """Makes an automatic label from a page (its `label` and `auto_label` are not yet set)."""

    def __call__(self, page: FeaturePage) -> str: ...


def _printable(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")


def _short(text: str) -> str:
    return repr(_printable(text).strip() or _printable(text))


class TokenLabeller:
    """The default labeller, needing no language model: the tokens it fires on and the tokens it says.

    E.g. ``"on ' Paris'/' France' → say ' French'/' Paris'"``.
    """

    def __init__(self, n_fire: int = 2, n_say: int = 3) -> None:
        self.n_fire = n_fire
        self.n_say = n_say

    def __call__(self, page: FeaturePage) -> str:
        if page.count == 0:
            return "dead"
        freq: dict[str, int] = {}
        for ex in page.top:
            text = ex.texts[ex.mark]
            freq[text] = freq.get(text, 0) + 1
        fire = sorted(freq, key=lambda t: -freq[t])[: self.n_fire]
        say = [s.text for s in page.promoted[: self.n_say]]
        left = "on " + "/".join(_short(t) for t in fire) if fire else "fires"
        right = " → say " + "/".join(_short(t) for t in say) if say else ""
        return left + right


__all__ = ["Example", "FeaturePage", "Labeller", "TokenLabeller", "TokenScore"]
