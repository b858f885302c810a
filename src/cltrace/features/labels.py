"""Labels from measured evidence: what makes a feature fire (input) and what it says (output), each
with a score that can fail, kept in the feature store beside the labels people write.

- Input label: the token pattern (see `cltrace.features.patterns`) that best predicts where the
  feature is active in the training half of its store examples and in the even contexts of
  held-out text (the text it will be judged on, where its activations are spread as in use, not as
  in examples picked by strength); scored by a detection test on contexts it did not come from:
  balanced accuracy (TPR + TNR) / 2 of "the pattern matches" against "the feature is active" (at
  least ``LabelConfig.active_fraction`` of its largest activation; inactive: 0), over the store's
  held-out half of examples and the odd contexts of the held-out text (TNR: the mean of random
  tokens' and nearby inactive tokens'). Fewer than
  ``LabelConfig.min_positives`` held-out active tokens: no score.
- Output label: the tokens whose logits the feature's direct effect raises most at its training
  examples; scored by steering at held-out sites (see `cltrace.features.steering`).

A label scoring under its threshold (``LabelConfig``) is *unclear*: shown marked, not as
confident text. A person's label always wins. Features never measured fall back to the store's
token-list ``auto_label``, marked unclear. The labeller itself is `cltrace.features.labeller`.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from cltrace.errors import CltraceError, first_line
from cltrace.features.database import (
    AUTO_LABELS_TABLE,
    LABEL_CONTEXTS_TABLE,
    has_table,
    reseal,
    transaction,
    write_meta,
)


@dataclass(frozen=True)
class LabelConfig:
    """How measured labels are made and judged (every default in one place)."""

    heldout_contexts: int = dataclasses.field(default=128, metadata={"min": 1})
    """Contexts of held-out text the model and transcoder run over, for every feature at once: as many
    again to choose patterns on (the even contexts of the stream; these are the odd ones)."""

    batch_size: int = dataclasses.field(default=8, metadata={"min": 1})
    """Contexts per batch of the held-out pass."""

    random_tokens: int = dataclasses.field(default=20_000, metadata={"min": 100})
    """Tokens of the store's contexts whose frequencies are the base rate against which the tokens
    that follow a feature's examples are judged (patterns take random text from the held-out pass)."""

    active_fraction: float = dataclasses.field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    """A token counts as active where the feature's activation is at least this fraction of its
    largest activation in the store, as inactive where it is 0; weaker activations count neither
    way (a label says where a feature fires, not where it barely passes its threshold)."""

    min_positives: int = dataclasses.field(default=10, metadata={"min": 1})
    """Held-out active tokens a feature needs for its input label to be scored at all."""

    min_input_score: float = dataclasses.field(default=0.7, metadata={"min": 0.0, "max": 1.0})
    """Balanced accuracy under which an input label is unclear."""

    complexity_penalty: float = 0.002
    """What each extra part of a pattern (a second atom, another token) must gain in training score."""

    steer_factor: float = dataclasses.field(default=2.0, metadata={"min": 0.0})
    """Steering and direct effects set the feature to this multiple of its largest activation."""

    steer_window: int = dataclasses.field(default=10, metadata={"min": 1})
    """Tokens of context before each steering site."""

    select_sites: int = dataclasses.field(default=1, metadata={"min": 1})
    """Training examples whose direct effects name the output tokens."""

    test_sites: int = dataclasses.field(default=2, metadata={"min": 1})
    """Held-out sites the output label is steered at."""

    min_steer_z: float = 6.0
    """Standard deviations above the vocabulary's average logit change that the named tokens must
    rise by, averaged over the test sites, for the output label to pass its steering test. Set
    above what chance gives: the top tokens of random decoder directions, chosen and steered the
    same way on the default model, reach a z of 4 about half the time and 5 one time in fifteen,
    since a few tokens' logits swing with almost any push (benchmarks/labels.py measures it)."""

    output_tokens: int = dataclasses.field(default=3, metadata={"min": 1})
    """At most this many tokens named by an output label."""

    seed: int = 0
    """Salt of the split of contexts into the training and held-out halves."""


@dataclass
class FeatureLabel:
    """A feature's label: a person's, or the measured one with its scores (None: not measured)."""

    layer: int
    feature: int
    input_label: str
    """What makes it fire (a person's label goes here whole)."""
    input_score: float | None
    """Held-out balanced accuracy of the input label."""
    output_label: str
    """What it says, e.g. "'DA'/'DC'"."""
    output_score: float | None
    """Steering z of the named tokens (see `cltrace.features.steering`)."""
    output_tokens: list[str]
    unclear: bool
    """Neither part is confident."""
    source: Literal["auto", "user"]
    input_unclear: bool = True
    output_unclear: bool = True
    measured: bool = True
    """False for a feature never measured: its label is the store's token-list one, shown as before."""

    def text(self) -> str:
        """Short display text: "' (' → says 'DA'"; an unclear part ends in "?", and a label with no
        confident part starts with "unclear: ". A person's label and an unmeasured token-list label
        read as they are written."""
        if self.source == "user" or not self.measured:
            return self.input_label
        text = (self.input_label or "?") + ("?" if self.input_unclear and self.input_label else "")
        if self.output_label:
            text += f" → says {self.output_label}" + ("?" if self.output_unclear else "")
        return f"unclear: {text}" if self.unclear else text

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "text": self.text()}


class Describer(Protocol):
    """An optional labeller (e.g. a language model) that words a feature's measured evidence; the
    default labeller needs none. Its text is shown beside the measured label, never scored as it."""

    def __call__(self, evidence: dict[str, Any]) -> str | None: ...


def _score(value: Any) -> float | None:
    return None if value is None else float(value)


def from_row(layer: int, feature: int, row: tuple, config: LabelConfig) -> FeatureLabel:
    """The FeatureLabel of an auto_labels row (input_label, input_score, output_label, output_score, output_tokens)."""
    input_label, input_score, output_label, output_score, tokens = row
    in_score, out_score = _score(input_score), _score(output_score)
    in_unclear = in_score is None or in_score < config.min_input_score
    out_unclear = out_score is None or out_score < config.min_steer_z
    return FeatureLabel(layer, feature, str(input_label), in_score, str(output_label), out_score, list(json.loads(tokens)),
                        in_unclear and out_unclear, "auto", in_unclear, out_unclear)


#: One row per feature: (layer, feature, a person's label, the measured label's parts, the token-list
#: label), from the table of measured labels or, in a store made before it, from an empty stand-in.
_LABEL_ROWS = (
    "SELECT f.layer, f.feature, l.label, a.input_label, a.input_score, a.output_label, a.output_score, "
    "a.output_tokens, f.auto_label FROM features f LEFT JOIN labels l ON l.layer=f.layer AND l.feature=f.feature "
    "LEFT JOIN {measured} a ON a.layer=f.layer AND a.feature=f.feature"
)
_NO_MEASURED = (
    "(SELECT NULL AS layer, NULL AS feature, NULL AS input_label, NULL AS input_score, NULL AS output_label, "
    "NULL AS output_score, NULL AS output_tokens WHERE 0)"
)


def _label(row: tuple, config: LabelConfig) -> FeatureLabel:
    layer, feature, user, input_label, input_score, output_label, output_score, tokens, auto = row
    layer, feature = int(layer), int(feature)
    if user is not None:
        return FeatureLabel(layer, feature, user, None, "", None, [], False, "user", False, False)
    if input_label or output_label:
        return from_row(layer, feature, (input_label, input_score, output_label, output_score, tokens), config)
    return FeatureLabel(layer, feature, auto, None, "", None, [], True, "auto", measured=False)


def label_rows(store: Any, where: str, params: tuple, config: LabelConfig | None = None) -> list[FeatureLabel]:
    """The labels of the features matching SQL `where` (over f: features, l: labels, a: auto_labels;
    a person's label, else the measured one, else the token-list one), in the order it gives."""
    config = config or LabelConfig()
    measured = "auto_labels" if has_table(store.conn, "auto_labels") else _NO_MEASURED
    sql = _LABEL_ROWS.format(measured=measured) + " " + where
    return [_label(row, config) for row in store.conn.execute(sql, params)]


def labels_for(store: Any, keys: Iterable[tuple[int, int]], config: LabelConfig | None = None) -> dict[tuple[int, int], FeatureLabel]:
    """The label of each feature of `keys` the store has: a person's where there is one, else the
    measured one, else the token-list automatic label (unclear, and shown as it always was)."""
    out: dict[tuple[int, int], FeatureLabel] = {}
    for layer, feature in dict.fromkeys((int(l), int(f)) for l, f in keys):
        for label in label_rows(store, "WHERE f.layer=? AND f.feature=?", (layer, feature), config):
            out[(layer, feature)] = label
    return out


def measured_page(store: Any, layer: int, feature: int, config: LabelConfig | None = None) -> dict[str, Any] | None:
    """The measured label of one feature with its evidence (for its page), or None."""
    conn = store.conn
    if not has_table(conn, "auto_labels"):
        return None
    row = conn.execute(
        "SELECT input_label, input_score, output_label, output_score, output_tokens, input_evidence, output_evidence "
        "FROM auto_labels WHERE layer=? AND feature=?", (layer, feature),
    ).fetchone()
    if row is None:
        return None
    label = from_row(layer, feature, row[:5], config or LabelConfig())
    return {**label.to_dict(), "input_evidence": json.loads(row[5]), "output_evidence": json.loads(row[6])}


# -- writing ---------------------------------------------------------------------------------------


def _write_failed(store: Any, exc: Exception) -> CltraceError:
    return CltraceError(f"could not write measured labels into feature store '{store.path}' ({first_line(exc)}): "
                        "check that it is writable and not damaged")


def write_input_labels(store: Any, rows: list[tuple], contexts: np.ndarray, info: dict[str, Any]) -> None:
    """Replace every measured label with `rows` (layer, feature, input_label, input_score, input
    evidence, output_label, output_tokens, output evidence; outputs not yet steered) and the held-out
    contexts, in one transaction, keeping a sealed store's seal current."""
    now = time.time()
    conn = store.conn
    try:
        with transaction(conn):
            conn.execute(AUTO_LABELS_TABLE)
            conn.execute(LABEL_CONTEXTS_TABLE)
            conn.execute("DELETE FROM auto_labels")
            conn.execute("DELETE FROM label_contexts")
            conn.executemany(
                "INSERT INTO auto_labels VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                [(l, f, il, s, json.dumps(ie), ol, json.dumps(ot), json.dumps(oe), now) for l, f, il, s, ie, ol, ot, oe in rows],
            )
            conn.executemany("INSERT INTO label_contexts VALUES (?, ?)",
                             [(i, np.asarray(c, dtype="<i4").tobytes()) for i, c in enumerate(contexts)])
            write_meta(conn, {"auto_labels": info})
            reseal(conn, ("auto_labels", "label_contexts"))
    except sqlite3.Error as exc:
        raise _write_failed(store, exc) from None


def write_output_labels(store: Any, rows: list[tuple]) -> None:
    """Set the output part (layer, feature, output_label, output_score, output_tokens, evidence) of
    measured labels, adding a row with no input label where a feature has none."""
    now = time.time()
    conn = store.conn
    try:
        with transaction(conn):
            conn.execute(AUTO_LABELS_TABLE)
            for l, f, label, score, tokens, evidence in rows:
                conn.execute(
                    "INSERT INTO auto_labels VALUES (?, ?, '', NULL, '{}', ?, ?, ?, ?, ?) ON CONFLICT (layer, feature) DO "
                    "UPDATE SET output_label=excluded.output_label, output_score=excluded.output_score, "
                    "output_tokens=excluded.output_tokens, output_evidence=excluded.output_evidence, updated=excluded.updated",
                    (l, f, label, score, json.dumps(tokens), json.dumps(evidence), now),
                )
            reseal(conn, ("auto_labels",))
    except sqlite3.Error as exc:
        raise _write_failed(store, exc) from None


def write_descriptions(store: Any, descriptions: dict[tuple[int, int], str]) -> None:
    """Keep each text of `descriptions` as "description" in its feature's measured input evidence
    (a feature not yet measured gets a row with only that)."""
    conn = store.conn
    try:
        with transaction(conn):
            conn.execute(AUTO_LABELS_TABLE)
            for (l, f), text in descriptions.items():
                row = conn.execute("SELECT input_evidence FROM auto_labels WHERE layer=? AND feature=?", (l, f)).fetchone()
                evidence = {**(json.loads(row[0]) if row else {}), "description": text}
                conn.execute(
                    "INSERT INTO auto_labels VALUES (?, ?, '', NULL, ?, '', NULL, '[]', '{}', ?) ON CONFLICT (layer, feature) "
                    "DO UPDATE SET input_evidence=excluded.input_evidence", (l, f, json.dumps(evidence), time.time()),
                )
            reseal(conn, ("auto_labels",))
    except sqlite3.Error as exc:
        raise _write_failed(store, exc) from None


def read_label_contexts(store: Any) -> dict[int, np.ndarray]:
    """The held-out contexts the labels were scored on, by index."""
    if not has_table(store.conn, "label_contexts"):
        return {}
    rows = store.conn.execute("SELECT ctx_id, tokens FROM label_contexts")
    return {int(i): np.frombuffer(b, dtype="<i4").astype(np.int64) for i, b in rows}


def read_evidence(store: Any, layer: int, feature: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(input evidence, output evidence) of a measured label ({} where there is none)."""
    if not has_table(store.conn, "auto_labels"):
        return {}, {}
    row = store.conn.execute("SELECT input_evidence, output_evidence FROM auto_labels WHERE layer=? AND feature=?",
                             (layer, feature)).fetchone()
    return (json.loads(row[0]), json.loads(row[1])) if row else ({}, {})


__all__ = ["Describer", "FeatureLabel", "LabelConfig", "label_rows", "labels_for", "measured_page", "read_evidence",
           "read_label_contexts", "write_descriptions", "write_input_labels", "write_output_labels"]
