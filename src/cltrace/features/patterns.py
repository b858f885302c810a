"""Token patterns that say where a feature fires, and how well a pattern predicts that it fires.

A pattern is a conjunction of one or two *atoms*. An atom tests one thing about a token position:

- the firing token itself (``cur``) or the token before it (``prev``): its exact id, one of a few
  ids, its normalised text (case and surrounding spaces dropped), or a token class (a capitalised
  word, a single capital letter, a number, an opening bracket, ...);
- the context (``ctx``): inside unclosed parentheses, inside quotes, near the start of the context.

Patterns are matched against :class:`Sites`, arrays of token positions (the token, the one before,
the context flags), all at once with numpy. Scores are balanced accuracies, (TPR + TNR) / 2, of
"the pattern matches" against "the feature is active".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

#: (name, phrase, test on a token's text) of every token class; a token may be in several.
CLASSES: tuple[tuple[str, str, Callable[[str], bool]], ...] = (
    ("capital_letter", "a single capital letter", lambda t: len(t.strip()) == 1 and t.strip().isupper()),
    ("all_caps", "an all-caps word", lambda t: len(t.strip()) >= 2 and t.strip().isalpha() and t.strip().isupper()),
    ("capitalised", "a capitalised word", lambda t: bool(re.fullmatch(r"\s?[A-Z][a-z]+", t))),
    ("capital_start", "a token starting with a capital letter", lambda t: t.strip()[:1].isupper()),
    ("lower_word", "a lowercase word start", lambda t: bool(re.fullmatch(r" [a-z]+", t))),
    ("continuation", "a word continuation (no leading space)", lambda t: t[:1].isalpha()),
    ("number", "a number", lambda t: t.strip().isdigit()),
    ("open_bracket", "an opening bracket", lambda t: bool(t.strip()) and t.strip()[-1] in "([{<"),
    ("close_bracket", "a closing bracket", lambda t: bool(t.strip()) and t.strip()[0] in ")]}>"),
    ("quote", "a quote mark", lambda t: bool(t.strip()) and all(c in "\"'`“”‘’" for c in t.strip())),
    ("sentence_end", "a full stop, '!' or '?'", lambda t: t.strip() in (".", "!", "?", "...")),
    ("comma", "a comma or semicolon", lambda t: t.strip() in (",", ";")),
    ("colon", "a colon", lambda t: t.strip() == ":"),
    ("dash", "a hyphen or dash", lambda t: bool(t.strip()) and all(c in "-–—" for c in t.strip())),
    ("newline", "a line break", lambda t: "\n" in t),
    ("punctuation", "punctuation", lambda t: bool(t.strip()) and all(not c.isalnum() and not c.isspace() for c in t.strip())),
    ("operator", "an operator symbol", lambda t: bool(t.strip()) and all(c in "=+*/\\|&%<>^~!" for c in t.strip())),
)
#: (name, phrase) of the context flags, bit i for entry i.
FLAGS: tuple[tuple[str, str], ...] = (
    ("in_parens", "inside parentheses"),
    ("in_quotes", "inside quotes"),
    ("early", "near the start of the context"),
)
#: Positions up to this one (0 is BOS) count as "near the start".
EARLY = 3
_QUOTES = '"“”'


def _norm(text: str) -> str:
    stripped = text.strip().lower()
    return stripped if stripped else text


class Vocab:
    """Per-token attributes of a vocabulary, each array with one extra last entry for "no token"."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.size = len(texts)
        groups: dict[str, int] = {}
        norm = [groups.setdefault(_norm(t), len(groups)) for t in texts]
        self.norm_id = np.array([*norm, -1], dtype=np.int64)  # [V + 1]
        self.norm_texts = list(groups)
        self.norm_sizes = np.bincount(self.norm_id[:-1], minlength=len(groups))  # tokens per normalised text
        bits = [sum(1 << i for i, (_, _, test) in enumerate(CLASSES) if test(t)) for t in texts]
        self.bits = np.array([*bits, 0], dtype=np.int64)  # [V + 1]
        self.opens = np.array([t.count("(") for t in texts] + [0], dtype=np.int64)
        self.closes = np.array([t.count(")") for t in texts] + [0], dtype=np.int64)
        self.quotes = np.array([sum(t.count(q) for q in _QUOTES) for t in texts] + [0], dtype=np.int64)


@dataclass
class Sites:
    """Token positions to match patterns against: the token, the token before it and context flags."""

    cur: np.ndarray  # [N] token ids
    prev: np.ndarray  # [N] token ids, vocab.size where there is none
    flags: np.ndarray  # [N] bitmask over FLAGS

    def __len__(self) -> int:
        return len(self.cur)

    def take(self, index: np.ndarray) -> Sites:
        return Sites(self.cur[index], self.prev[index], self.flags[index])

    @staticmethod
    def concat(parts: Sequence[Sites]) -> Sites:
        if not parts:
            return Sites(*(np.zeros(0, dtype=np.int64) for _ in range(3)))
        return Sites(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("cur", "prev", "flags")))


def context_sites(vocab: Vocab, tokens: np.ndarray) -> Sites:
    """The sites of every position of contexts tokens [C, T] (BOS at column 0), flattened to [C * T]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    C, T = tokens.shape
    prev = np.concatenate([np.full((C, 1), vocab.size), tokens[:, :-1]], axis=1)  # [C, T]
    depth = np.cumsum(vocab.opens[tokens] - vocab.closes[tokens], axis=1) - (vocab.opens[tokens] - vocab.closes[tokens])
    quotes = np.cumsum(vocab.quotes[tokens], axis=1) - vocab.quotes[tokens]  # quote marks before each position
    early = np.broadcast_to(np.arange(T) <= EARLY, (C, T))
    flags = (depth > 0).astype(np.int64) | ((quotes % 2 == 1).astype(np.int64) << 1) | (early.astype(np.int64) << 2)
    return Sites(tokens.reshape(-1), prev.reshape(-1), flags.reshape(-1))


# -- atoms and patterns ----------------------------------------------------------------------------

#: ("cur" | "prev" | "ctx", "id" | "ids" | "norm" | "class" | "flag", value)
Atom = tuple[str, str, object]
#: One or two atoms, all of which must hold.
Pattern = tuple[Atom, ...]


def atom_matches(atom: Atom, sites: Sites, vocab: Vocab) -> np.ndarray:
    """[N] bool: where `atom` holds."""
    slot, kind, value = atom
    if slot == "ctx":
        return (sites.flags & (1 << _flag_index(str(value)))) != 0
    tok = sites.cur if slot == "cur" else sites.prev
    if kind == "id":
        return tok == int(value)  # type: ignore[call-overload]
    if kind == "ids":
        return np.isin(tok, np.asarray(value, dtype=np.int64))
    if kind == "norm":
        return vocab.norm_id[tok] == int(value)  # type: ignore[call-overload]
    if kind == "class":
        return (vocab.bits[tok] & (1 << _class_index(str(value)))) != 0
    raise ValueError(f"unknown atom {atom!r}")


def matches(pattern: Pattern, sites: Sites, vocab: Vocab, cache: dict[Atom, np.ndarray] | None = None) -> np.ndarray:
    """[N] bool: where every atom of `pattern` holds (atoms looked up in / added to `cache`)."""
    out = np.ones(len(sites), dtype=bool)
    for atom in pattern:
        key = _key(atom)
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            hit = atom_matches(atom, sites, vocab)
            if cache is not None:
                cache[key] = hit
        out &= hit
    return out


def _key(atom: Atom) -> Atom:
    slot, kind, value = atom
    return (slot, kind, tuple(value) if isinstance(value, list) else value)


def _class_index(name: str) -> int:
    return next(i for i, (n, _, _) in enumerate(CLASSES) if n == name)


def _flag_index(name: str) -> int:
    return next(i for i, (n, _) in enumerate(FLAGS) if n == name)


def _token(text: str) -> str:
    return repr(text.replace("\n", "⏎").replace("\t", "⇥"))


def describe_atom(atom: Atom, vocab: Vocab) -> str:
    """An atom in words, e.g. "' ('", "'paris' (any case)", "a single capital letter"."""
    slot, kind, value = atom
    if slot == "ctx":
        return FLAGS[_flag_index(str(value))][1]
    if kind == "id":
        return _token(vocab.texts[int(value)])  # type: ignore[call-overload]
    if kind == "ids":
        return "/".join(_token(vocab.texts[int(v)]) for v in cast("Sequence[int]", value))
    if kind == "norm":
        return f"{_token(vocab.norm_texts[int(value)])} (any case or spacing)"  # type: ignore[call-overload]
    return CLASSES[_class_index(str(value))][1]


def describe(pattern: Pattern, vocab: Vocab) -> str:
    """A pattern in words: "a single capital letter after ' ('", "' Paris'/' France'", ..."""
    cur = [a for a in pattern if a[0] == "cur"]
    prev = [a for a in pattern if a[0] == "prev"]
    ctx = [a for a in pattern if a[0] == "ctx"]
    text = describe_atom(cur[0], vocab) if cur else "any token"
    if prev:
        text = (f"{text} after " if cur else "the token after ") + describe_atom(prev[0], vocab)
    if ctx:
        text += " " + describe_atom(ctx[0], vocab)
    return text


def pattern_to_json(pattern: Pattern) -> list[list[object]]:
    return [[slot, kind, list(value) if isinstance(value, tuple) else value] for slot, kind, value in pattern]


def pattern_from_json(data: list[list[object]]) -> Pattern:
    return tuple(_key((str(s), str(k), v)) for s, k, v in data)


# -- candidates and scores -------------------------------------------------------------------------


def _top(counter: Counter, n: int, total: int, least: float) -> list:
    return [k for k, c in counter.most_common(n) if c >= least * total]


def _class_counts(bits: np.ndarray) -> Counter:
    return Counter({name: int(((bits >> i) & 1).sum()) for i, (name, _, _) in enumerate(CLASSES)})


def candidate_atoms(pos: Sites, vocab: Vocab) -> dict[str, list[Atom]]:
    """The atoms common among positives `pos`, by kind: "cur", "prev", "ctx", and id sets "sets"."""
    n = len(pos)
    cur_ids = Counter(pos.cur.tolist())
    prev_ids = Counter(p for p in pos.prev.tolist() if p < vocab.size)
    norms = Counter(vocab.norm_id[pos.cur].tolist())
    prev_norms = Counter(v for v in vocab.norm_id[pos.prev].tolist() if v >= 0)
    cur: list[Atom] = [("cur", "id", t) for t in _top(cur_ids, 4, n, 0.05)]
    cur += [("cur", "norm", v) for v in _top(norms, 3, n, 0.1) if vocab.norm_sizes[v] > 1]
    cur += [("cur", "class", c) for c in _top(_class_counts(vocab.bits[pos.cur]), 4, n, 0.2)]
    prev: list[Atom] = [("prev", "id", t) for t in _top(prev_ids, 3, n, 0.1)]
    prev += [("prev", "norm", v) for v in _top(prev_norms, 2, n, 0.15) if vocab.norm_sizes[v] > 1]
    prev += [("prev", "class", c) for c in _top(_class_counts(vocab.bits[pos.prev]), 3, n, 0.25)]
    ctx: list[Atom] = [
        ("ctx", "flag", name) for i, (name, _) in enumerate(FLAGS) if ((pos.flags >> i) & 1).sum() >= 0.3 * n
    ]
    ranked = [t for t, _ in cur_ids.most_common(5)]
    sets: list[Atom] = [("cur", "ids", tuple(sorted(ranked[:k]))) for k in (2, 3, 5) if len(ranked) >= k]
    return {"cur": cur, "prev": prev, "ctx": ctx, "sets": sets}


def candidate_patterns(pos: Sites, vocab: Vocab) -> list[Pattern]:
    """Patterns worth trying for positives `pos`: single atoms, id sets, and pairs (the token before
    and the token; the token and its context)."""
    atoms = candidate_atoms(pos, vocab)
    out: list[Pattern] = [(a,) for a in atoms["cur"] + atoms["sets"] + atoms["prev"] + atoms["ctx"]]
    out += [(c, p) for c in atoms["cur"] for p in atoms["prev"]]
    out += [(c, x) for c in atoms["cur"] for x in atoms["ctx"]]
    out += [(p, x) for p in atoms["prev"] for x in atoms["ctx"]]
    return list(dict.fromkeys(out))


def complexity(pattern: Pattern) -> int:
    """Extra parts beyond one atom: a pattern must beat a simpler one by a margin to be chosen."""
    extra = len(pattern) - 1
    for _, kind, value in pattern:
        if kind == "ids":
            extra += len(value) - 1  # type: ignore[arg-type]
    return extra


def balanced_accuracy(tpr: float, fpr_random: float, fpr_near: float | None) -> float:
    """(TPR + TNR) / 2, TNR the mean of the random tokens' and (where there are any) the nearby
    inactive tokens' true negative rates."""
    tnr = 1.0 - fpr_random if fpr_near is None else 1.0 - (fpr_random + fpr_near) / 2
    return (tpr + tnr) / 2


@dataclass
class Choice:
    """The pattern chosen for one feature and its score on the examples it came from."""

    pattern: Pattern
    train_score: float
    tpr: float
    fpr_random: float
    fpr_near: float | None


def choose_pattern(
    pos: Sites, near: Sites, random: Sites, density: float, vocab: Vocab,
    random_cache: dict[Atom, np.ndarray] | None = None, penalty: float = 0.002, precision_weight: float = 0.01,
) -> Choice | None:
    """The candidate pattern with the best balanced accuracy on training positives `pos`, inactive
    tokens `near` (beside them in the same windows) and `random` tokens whose activations are not
    known: their false positive rate is estimated from the feature's `density`,
    FPR = (P(match) − density · TPR) / (1 − density).

    Each extra part of a pattern costs `penalty`; `precision_weight` × the estimated precision
    (density · TPR / P(match)) decides between nearly equal ones: balanced accuracy hardly sees
    false positives among the many random tokens of a sparse feature, so "the token after '('" and
    "a capital letter after '('" score alike where the second is the true, far more precise one."""
    if len(pos) == 0:
        return None
    best: Choice | None = None
    best_value = -1.0
    pos_cache: dict[Atom, np.ndarray] = {}
    near_cache: dict[Atom, np.ndarray] = {}
    d = min(max(density, 0.0), 0.99)
    for pattern in candidate_patterns(pos, vocab):
        tpr = float(matches(pattern, pos, vocab, pos_cache).mean())
        rate = float(matches(pattern, random, vocab, random_cache).mean()) if len(random) else 0.0
        fpr_random = min(max((rate - d * tpr) / (1 - d), 0.0), 1.0)
        fpr_near = float(matches(pattern, near, vocab, near_cache).mean()) if len(near) else None
        score = balanced_accuracy(tpr, fpr_random, fpr_near)
        precision = min(d * tpr / rate, 1.0) if rate > 0 else 1.0
        value = score - penalty * complexity(pattern) + precision_weight * precision
        if value > best_value:
            best, best_value = Choice(pattern, score, tpr, fpr_random, fpr_near), value
    return best


__all__ = [
    "CLASSES", "FLAGS", "Atom", "Choice", "Pattern", "Sites", "Vocab", "atom_matches", "balanced_accuracy",
    "candidate_patterns", "choose_pattern", "context_sites", "describe", "matches", "pattern_from_json",
    "pattern_to_json",
]
