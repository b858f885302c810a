"""How well any token pattern of the labeller's language can describe a store's features on fresh text.

For every feature of the default CLT's store that has a measured output label (the circuit features
the pipeline steered), over the held-out text the labeller scores on (the odd contexts after the
store's own, `heldout_contexts` of them; it chooses on the even ones):

- **chosen on half, scored on the other half**: the candidate patterns of the feature's active tokens
  in a random half of the tokens, the best by balanced accuracy there (with the labeller's
  complexity penalty), scored on the other half;
- **ceiling**: the candidate pattern that scores best on all the tokens, scored on the same tokens
  (no pattern of the language does better on this text);
- **labeller**: the pattern the labeller chose from the store's training half (its stored label),
  scored on the same tokens.

Balanced accuracy here is (TPR + TNR) / 2 over all the text's tokens, active at `active_fraction` of
the feature's largest activation and inactive at 0, as the labeller's held-out pass counts them
(the labeller's reported score also counts the store's held-out half and nearby inactive tokens).

    .venv/bin/python benchmarks/label_ceiling.py [--contexts 128]

Writes benchmarks/results/label_ceiling.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

from cltrace.data.harvest import Harvester  # noqa: E402
from cltrace.data.sources import open_text_source  # noqa: E402
from cltrace.features import FeatureStore  # noqa: E402
from cltrace.features.heldout import heldout_stream  # noqa: E402
from cltrace.features.label_data import StoreText  # noqa: E402
from cltrace.features.labels import LabelConfig, read_evidence  # noqa: E402
from cltrace.features.patterns import (  # noqa: E402
    Sites,
    Vocab,
    candidate_patterns,
    complexity,
    context_sites,
    matches,
    pattern_from_json,
)
from cltrace.model import load_model  # noqa: E402
from cltrace.trace.run import feature_db_path  # noqa: E402
from cltrace.train.default import default_paths  # noqa: E402
from cltrace.transcoder import load_transcoder  # noqa: E402


def heldout_activations(store: Any, loaded: Any, tc: Any, keys: list[tuple[int, int]], n_contexts: int,
                        vocab: Vocab) -> tuple[Sites, np.ndarray]:
    """The held-out text's token sites [N] and the features' activations there [N, K]."""
    batches, _ = heldout_stream(store, loaded, open_text_source("default"), n_contexts, 8, part=1)
    harvester = Harvester(loaded, first_position=1)
    layers, features = torch.tensor([k[0] for k in keys]), torch.tensor([k[1] for k in keys])
    sites, acts = [], []
    with torch.no_grad():
        for ids in batches:
            B, T = ids.shape
            acts.append(tc.encode(harvester.harvest(ids).x).float()[:, layers, features].numpy())  # [B·(T-1), K]
            sites.append(context_sites(vocab, ids.numpy()).take(np.nonzero(np.arange(B * T) % T)[0]))  # BOS left out
    return Sites.concat(sites), np.concatenate(acts)


def balanced(pattern: Any, sites: Sites, on: np.ndarray, off: np.ndarray, vocab: Vocab) -> float:
    """(TPR + TNR) / 2 of `pattern` at `sites`, active `on` and inactive `off` [N]."""
    hit = matches(pattern, sites, vocab)
    return float((hit[on].mean() + 1.0 - hit[off].mean()) / 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=LabelConfig().heldout_contexts, help="held-out contexts")
    args = parser.parse_args()
    config = LabelConfig()
    loaded = load_model()
    tc = load_transcoder(default_paths()[0])
    with FeatureStore(feature_db_path(tc)) as store:
        vocab = StoreText(store).vocab
        keys = sorted((l, f) for l, f in store.conn.execute("SELECT layer, feature FROM features WHERE count > 0")
                      if "steer" in read_evidence(store, l, f)[1])
        if not keys:
            raise SystemExit("no feature of the store has a measured output label: run benchmarks/circuits.py first")
        max_act = {(l, f): m for l, f, m in store.conn.execute("SELECT layer, feature, max_act FROM features")}
        stored = {k: read_evidence(store, *k)[0].get("pattern") for k in keys}
        sites, acts = heldout_activations(store, loaded, tc, keys, args.contexts, vocab)
    half = np.random.default_rng(0).random(len(sites)) < 0.5  # [N] the selection half
    rows = []
    for j, key in enumerate(keys):
        a = acts[:, j]
        on, off = (a > 0) & (a >= config.active_fraction * max_act[key]), a <= 0
        if on[~half].sum() < config.min_positives or on[half].sum() < config.min_positives // 2:
            continue
        sel, test = sites.take(np.nonzero(half)[0]), sites.take(np.nonzero(~half)[0])
        chosen = max(candidate_patterns(sites.take(np.nonzero(on & half)[0]), vocab),
                     key=lambda p: balanced(p, sel, on[half], off[half], vocab) - config.complexity_penalty * complexity(p))
        ceiling = max(balanced(p, sites, on, off, vocab) for p in candidate_patterns(sites.take(np.nonzero(on)[0]), vocab))
        own = balanced(pattern_from_json(stored[key]), sites, on, off, vocab) if stored[key] else None
        rows.append({"feature": f"{key[0]}:{key[1]}", "active": int(on.sum()), "half": balanced(chosen, test, on[~half], off[~half], vocab),
                     "ceiling": ceiling, "labeller": own})
    figures: dict[str, Any] = {"contexts": args.contexts, "tokens": len(sites), "features": len(rows)}
    for name in ("labeller", "half", "ceiling"):
        values = np.array([r[name] for r in rows if r[name] is not None])
        figures[name] = {"mean": round(float(values.mean()), 4),
                         "quartiles": [round(float(np.quantile(values, q)), 4) for q in (0, 0.25, 0.5, 0.75, 1)]}
    figures["bar"] = 0.75
    for name, what in (("labeller", "the labeller's stored patterns"), ("half", "chosen on half the text, scored on the other"),
                       ("ceiling", "the best pattern on the whole text, scored there")):
        print(f"{what:52} mean {figures[name]['mean']:.3f}  quartiles {figures[name]['quartiles']}")
    print(f"wrote {write_result('label_ceiling', figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
