"""The one place `cltrace trace` reads feature labels from: a feature store's measured labels
(`FeatureStore.labels_for`, with their scores) where the store has them, else its page labels
(a person's label, else the automatic token label, and the tokens the decoder promotes).

Grouping takes `Labels.text` (a name, None where unknown or unclear) and the circuit takes
`Labels.info` (the fields of a circuit supernode's labels); graph/ never imports features/.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from cltrace.errors import CltraceError
from cltrace.features.labeller import measure_outputs

log = logging.getLogger(__name__)

Key = tuple[int, int]


def _from_feature_label(label: Any) -> dict[str, Any]:
    """The circuit's label fields from a `FeatureLabel` (features/labels.py)."""
    return {
        "text": label.text(), "input_label": label.input_label, "output_label": label.output_label,
        "input_score": label.input_score, "output_score": label.output_score,
        "output_tokens": list(label.output_tokens), "unclear": bool(label.unclear),
    }


def _from_page(page: Any, n_tokens: int = 2) -> dict[str, Any]:
    """The circuit's label fields from a `FeaturePage` (no scores: these labels are not measured)."""
    return {
        "text": page.display_label, "input_label": "", "output_label": "", "input_score": None, "output_score": None,
        "output_tokens": [t.text for t in page.promoted[:n_tokens]], "unclear": page.count == 0,
    }


class Labels:
    """Feature labels from an open `FeatureStore` (or none), read once per feature and kept."""

    def __init__(self, store: Any = None) -> None:
        self.store = store
        self.cache: dict[Key, dict[str, Any] | None] = {}
        self.measured = store is not None and hasattr(store, "labels_for")

    def load(self, keys: Iterable[Key]) -> None:
        """Read the labels of `keys` (layer, feature) together, where not read yet."""
        missing = sorted({(int(l), int(f)) for l, f in keys} - set(self.cache))
        if not missing:
            return
        if self.store is None:
            self.cache.update(dict.fromkeys(missing))
        elif self.measured:
            found = self.store.labels_for(missing)
            self.cache.update({k: _from_feature_label(found[k]) if k in found else None for k in missing})
        else:
            self.cache.update({k: _from_page(self.store.page(*k)) for k in missing})

    def measure_outputs(self, replacement: Any, keys: Iterable[Key], progress: bool = False) -> int:
        """Measure by steering, and keep in the store, the output labels of `keys` that it has not
        measured yet (a store of measured labels only); how many were asked for. A store that
        cannot be written is left as it is, with a warning."""
        keys = sorted({(int(l), int(f)) for l, f in keys})
        if not self.measured or not keys:
            return 0
        try:
            measure_outputs(self.store, replacement, keys, progress=progress)
        except CltraceError as exc:
            log.warning("output labels not measured: %s", exc)
            return 0
        for key in keys:
            self.cache.pop(key, None)
        return len(keys)

    def info(self, layer: int, feature: int) -> dict[str, Any] | None:
        """The label fields of a feature (text, input_label, output_label, scores, output_tokens,
        unclear), or None where the store has none."""
        self.load([(layer, feature)])
        return self.cache[(int(layer), int(feature))]

    def text(self, layer: int, feature: int) -> str | None:
        """A feature's label as text, None where there is none or it is unclear."""
        info = self.info(layer, feature)
        if not info or info.get("unclear"):
            return None
        return str(info.get("text") or "") or None


__all__ = ["Labels"]
