"""The offline labeller: measured input labels for every feature of a store at once, and output
labels (with their steering test) for the features asked for, cached in the store.

>>> summary = label_inputs("features.db", loaded, transcoder)          # every feature, once
>>> labels = measure_outputs(store, replacement, [(17, 164), (18, 94)])  # lazily, in batches
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cltrace.errors import CltraceError
from cltrace.features.heldout import SelectionPass, heldout_counts, heldout_scores, heldout_sites, selection_pass
from cltrace.features.label_data import (
    Half,
    StoreText,
    Window,
    iter_examples,
    next_token_lift,
    progress_bar,
    split_halves,
)
from cltrace.features.labels import (
    Describer,
    FeatureLabel,
    LabelConfig,
    labels_for,
    read_evidence,
    read_label_contexts,
    write_descriptions,
    write_input_labels,
    write_output_labels,
)
from cltrace.features.patterns import (
    Choice,
    Sites,
    balanced_accuracy,
    choose_pattern,
    describe,
    matches,
    pattern_to_json,
)
from cltrace.features.steering import (
    Job,
    Site,
    describe_site,
    logit_changes,
    name_tokens,
    top_tokens,
)
from cltrace.fields import check_bounds
from cltrace.fingerprint import transcoder_fingerprint

log = logging.getLogger(__name__)


def _tokens_text(ids: list[int], texts: list[str]) -> str:
    return "/".join(repr(texts[t].replace("\n", "⏎")) for t in ids)


def _check_config(config: LabelConfig) -> LabelConfig:
    problem = check_bounds(config)
    if problem:
        raise CltraceError(f"label settings: {problem}")
    return config


def _check_store(store: Any, tc: Any) -> None:
    if store.meta.get("status") != "complete":
        raise CltraceError(f"feature store '{store.path}' is not complete: finish it with `cltrace features build` first")
    if tc is not None and store.meta.get("fingerprint") != transcoder_fingerprint(tc):
        raise CltraceError(f"feature store '{store.path}' was built for another transcoder: label it with its own")


@dataclass
class _Chosen:
    """A feature's pattern chosen on its training half, and what it does on its held-out half."""

    choice: Choice | None
    data: list[dict[str, Any]]
    """The tokens that follow its training examples (see `next_token_lift`)."""
    train_positives: int
    train_contexts: int
    held_positives: int = 0
    held_hits: int = 0
    held_near: int = 0
    held_near_hits: int = 0


def _choose_all(store: Any, text: StoreText, config: LabelConfig, progress: bool,
                selection: SelectionPass) -> dict[tuple[int, int], _Chosen]:
    """Per alive feature: its pattern, chosen on its store examples' training half and the held-out
    text of `selection` (where it is active there, and that text's tokens as random ones), and the
    pattern's counts on the store's held-out half."""
    random_tokens = text.random_sites(config.random_tokens, config.seed)[1]
    base = np.bincount(random_tokens, minlength=text.vocab.size)
    random = selection.sites
    none = np.zeros(0, dtype=np.int64)
    cache: dict[Any, np.ndarray] = {}
    out = {}
    edges = list(store.meta["params"]["hist_edges"])
    bar = progress_bar(progress, store.n_layers * store.n_features, "choosing patterns", "feature")
    for ex in iter_examples(store):
        bar.update(1)
        if ex.count == 0 or not ex.windows:
            continue
        threshold = config.active_fraction * ex.max_act
        train, held = split_halves(ex, text, config.seed, threshold)
        if len(cache) > 50_000:
            cache.clear()
        density = ex.density * ex.share_above(threshold, edges)
        pos = Sites.concat([train.pos, random.take(selection.active.get((ex.layer, ex.feature), none))])
        choice = choose_pattern(pos, train.near, random, density, text.vocab, cache, config.complexity_penalty)
        got = _Chosen(choice, next_token_lift(train.windows, text, base), len(pos),
                      len({w.ctx_id for w in train.windows}))
        if choice is not None:
            got.held_positives, got.held_near = len(held.pos), len(held.near)
            got.held_hits = int(matches(choice.pattern, held.pos, text.vocab).sum())
            got.held_near_hits = int(matches(choice.pattern, held.near, text.vocab).sum())
        out[(ex.layer, ex.feature)] = got
    bar.close()
    return out


def _input_row(key: tuple[int, int], chosen: _Chosen, counts: Any, text: StoreText, config: LabelConfig) -> tuple:
    """One auto_labels row (its output part not yet measured) from a feature's choice and held-out counts."""
    layer, feature = key
    sites = [[c, p, round(a, 4)] for c, p, a in heldout_sites(counts, layer, feature)]
    out_evidence = {"data": chosen.data}
    choice = chosen.choice
    if choice is None:
        return (layer, feature, "", None, {"sites": sites}, "", [], out_evidence)
    p_pass, hits, false_matches, negatives = heldout_scores(counts, layer, feature)
    positives = chosen.held_positives + p_pass
    score = tpr = fpr_random = fpr_near = None
    if positives >= config.min_positives and negatives > 0:
        tpr = (chosen.held_hits + hits) / positives
        fpr_random = false_matches / negatives
        fpr_near = chosen.held_near_hits / chosen.held_near if chosen.held_near else None
        score = round(balanced_accuracy(tpr, fpr_random, fpr_near), 4)
    evidence = {
        "pattern": pattern_to_json(choice.pattern),
        "train": {"score": round(choice.train_score, 4), "tpr": round(choice.tpr, 4),
                  "fpr_random": round(choice.fpr_random, 4), "fpr_near": _round(choice.fpr_near),
                  "positives": chosen.train_positives, "contexts": chosen.train_contexts},
        "heldout": {"positives": positives, "store_positives": chosen.held_positives, "pass_positives": p_pass,
                    "tpr": _round(tpr), "fpr_random": _round(fpr_random), "fpr_near": _round(fpr_near),
                    "pass_tokens": counts.tokens},
        "sites": sites,
    }
    return (layer, feature, describe(choice.pattern, text.vocab), score, evidence, "", [], out_evidence)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def label_inputs(
    store: Any, loaded: Any, tc: Any, source: Any = "default", config: LabelConfig | None = None,
    progress: bool = True, tokenize: Any = None, bos_id: int | None = None, autocast_bf16: bool = False,
) -> dict[str, Any]:
    """Measure the input label of every alive feature of `store` (a FeatureStore) and write them,
    replacing earlier measured labels (their output parts too). Returns a summary: features
    labelled, scored, unclear, the score distribution and the seconds spent."""
    from cltrace.data.sources import open_text_source

    config = _check_config(config or LabelConfig())
    _check_store(store, tc)
    start = time.monotonic()
    text = StoreText(store)
    thresholds = np.zeros((store.n_layers, store.n_features))
    for layer, feature, max_act in store.conn.execute("SELECT layer, feature, max_act FROM features"):
        thresholds[layer, feature] = config.active_fraction * max_act
    # Held-out text in two parts, by context: patterns are chosen on the even contexts too (the text
    # they will be judged on, not only the store's examples), and scored on the odd ones.
    text_source = open_text_source(source) if isinstance(source, str) else source
    run = {"batch_size": config.batch_size, "progress": progress, "tokenize": tokenize, "bos_id": bos_id,
           "autocast_bf16": autocast_bf16}
    selection = selection_pass(store, loaded, tc, text_source, text.vocab, thresholds, config.heldout_contexts, **run)
    chosen = _choose_all(store, text, config, progress, selection)
    t_choose = time.monotonic() - start
    patterns = {k: (c.choice.pattern if c.choice else None) for k, c in chosen.items()}
    counts = heldout_counts(store, loaded, tc, text_source, patterns, text.vocab, thresholds, config.heldout_contexts,
                            part=1, **run)
    rows = [_input_row(k, c, counts, text, config) for k, c in chosen.items()]
    seconds = time.monotonic() - start
    info = {"config": dataclasses.asdict(config), "heldout_contexts": int(counts.contexts.shape[0]),
            "selection_tokens": len(selection.sites),
            "heldout_tokens": counts.tokens, "heldout_start": counts.start, "seconds": round(seconds, 1),
            "choose_seconds": round(t_choose, 1), "created": time.time()}
    write_input_labels(store, rows, counts.contexts, info)
    return _summary(rows, config, seconds)


def _summary(rows: list[tuple], config: LabelConfig, seconds: float) -> dict[str, Any]:
    scores = np.array([r[3] for r in rows if r[3] is not None], dtype=np.float64)
    return {
        "features": len(rows),
        "scored": int(scores.size),
        "unscored": len(rows) - int(scores.size),
        "confident": int((scores >= config.min_input_score).sum()),
        "unclear": len(rows) - int((scores >= config.min_input_score).sum()),
        "mean_score": float(scores.mean()) if scores.size else None,
        "quantiles": {q: float(np.quantile(scores, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if scores.size else {},
        "seconds": round(seconds, 1),
    }


# -- output labels ---------------------------------------------------------------------------------


def _top_sites(windows: list[Window], n_max: int) -> list[Site]:
    best = sorted((w for w in windows if w.kind == "top"), key=lambda w: -w.act)
    sites = list(dict.fromkeys(Site("store", w.ctx_id, w.pos) for w in best))
    return sites[:n_max]


def measure_outputs(
    store: Any, replacement: Any, keys: Iterable[tuple[int, int]], config: LabelConfig | None = None,
    force: bool = False, progress: bool = True,
) -> dict[tuple[int, int], FeatureLabel]:
    """Measure and cache the output label of each feature of `keys` (those already measured are kept
    unless `force`); returns `labels_for(keys)`. One batch of direct-effect runs and one of steering
    runs for all of them (see `cltrace.features.steering`)."""
    config = _check_config(config or LabelConfig())
    keys = list(dict.fromkeys((int(l), int(f)) for l, f in keys))
    _check_store(store, replacement.transcoder)
    for key in keys:
        store._check_feature(*key)
    todo = [k for k in keys if force or "steer" not in read_evidence(store, *k)[1]]
    if todo:
        rows = _measure(store, replacement, todo, config, progress)
        write_output_labels(store, rows)
    return labels_for(store, keys, config)


def _measure(store: Any, replacement: Any, keys: list[tuple[int, int]], config: LabelConfig, progress: bool) -> list[tuple]:
    text = StoreText(store)
    heldout = read_label_contexts(store)
    examples = {(ex.layer, ex.feature): ex for ex in iter_examples(store, keys) if ex.count > 0 and ex.windows}
    select: dict[tuple[int, int], list[Site]] = {}
    test: dict[tuple[int, int], list[Site]] = {}
    halves: dict[tuple[int, int], tuple[Half, Half]] = {}
    for key, ex in examples.items():
        halves[key] = split_halves(ex, text, config.seed, config.active_fraction * ex.max_act)
        select[key] = _top_sites(halves[key][0].windows, config.select_sites)
        fresh = [Site("heldout", c, p) for c, p, _ in read_evidence(store, *key)[0].get("sites", []) if c in heldout]
        test[key] = (fresh + _top_sites(halves[key][1].windows, config.test_sites))[: config.test_sites]

    def tokens_of(site: Site) -> np.ndarray:
        return heldout[site.ctx_id] if site.where == "heldout" else text.contexts[site.ctx_id]

    def jobs(sites: dict[tuple[int, int], list[Site]]) -> list[Job]:
        return [Job(l, f, s, config.steer_factor * examples[(l, f)].max_act) for (l, f), ss in sites.items() for s in ss]

    sel_jobs = jobs(select)
    sel_z = logit_changes(replacement, sel_jobs, tokens_of, config.steer_window, "constrained", True, progress)
    by_feature: dict[tuple[int, int], list[torch.Tensor]] = {}
    for j, z in zip(sel_jobs, sel_z):
        by_feature.setdefault((j.layer, j.feature), []).append(z)
    effect = {key: torch.stack(zs).mean(0) for key, zs in by_feature.items()}
    named = {key: name_tokens(z, config.output_tokens) for key, z in effect.items()}
    test_jobs = [j for j in jobs(test) if (j.layer, j.feature) in named]
    test_z = logit_changes(replacement, test_jobs, tokens_of, config.steer_window, "iterative", False, progress)
    steered: dict[tuple[int, int], list[tuple[Site, torch.Tensor]]] = {}
    for j, z in zip(test_jobs, test_z):
        steered.setdefault((j.layer, j.feature), []).append((j.site, z))
    base = np.bincount(text.random_sites(config.random_tokens, config.seed)[1], minlength=text.vocab.size)
    rows = []
    for key in examples:
        if key not in named:
            continue
        runs = steered.get(key, [])
        data = next_token_lift(halves[key][0].windows, text, base)
        rows.append(_output_row(key, named[key], effect[key], runs, data, text, tokens_of, config))
    return rows


def _output_row(key: tuple[int, int], named: list[int], effect: torch.Tensor, runs: list[tuple[Site, torch.Tensor]],
                data: list[dict[str, Any]], text: StoreText, tokens_of: Any, config: LabelConfig) -> tuple:
    texts = text.vocab.texts
    steer = []
    for site, z in runs:
        steer.append({
            "where": site.where, "ctx": site.ctx_id, "pos": site.pos,
            "context": describe_site(tokens_of(site), site.pos, config.steer_window, texts),
            "z": round(float(z[named].mean()), 3), "raised": top_tokens(z, texts),
        })
    score = round(float(np.mean([s["z"] for s in steer])), 3) if steer else None
    evidence = {"effect": top_tokens(effect, texts, 8), "data": data, "steer": steer,
                "factor": config.steer_factor, "window": config.steer_window}
    return (*key, _tokens_text(named, texts), score, [texts[t] for t in named], evidence)


def describe_features(store: Any, describer: Describer, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """Ask an optional `describer` (e.g. a language model) to word each feature's page, measured
    evidence included; its text is kept in the measured label's evidence as "description" and shown
    on the page, never scored as the label. Returns the descriptions given."""
    out = {}
    for layer, feature in dict.fromkeys((int(l), int(f)) for l, f in keys):
        text = describer(store.page(layer, feature).to_dict())
        if text:
            out[(layer, feature)] = str(text)
    write_descriptions(store, out)
    return out


__all__ = ["describe_features", "label_inputs", "measure_outputs"]
