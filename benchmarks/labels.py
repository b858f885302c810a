"""Measured labels on the default model: input scores, steering pass rate, unclear counts, times,
and the steering test's chance level.

    .venv/bin/python benchmarks/labels.py [--db PATH -t TRANSCODER] [--features 200] [--contexts 128] [--null 60]

1. The store: `--db` (with its transcoder `-t`), else the default CLT's store (`cltrace trace`
   builds it), else a store of a random CLT of the default CLT's shape (30 x 256) built here over
   `--build-tokens` tokens, to time the labeller on that shape (its scores mean nothing then).
2. `label_inputs` on every feature of the store: the distribution of held-out balanced accuracies,
   how many are unclear, the seconds.
3. `measure_outputs` on `--features` random alive features: the steering pass rate, the z
   distribution, unclear counts (input, output, both), the seconds.
4. Matched chance level: the same features with each decoder row replaced by a random direction of
   the same norm (encoders, activations and sites unchanged), measured the same way: the z a
   feature's output label reaches against what its own sites and strength give any direction.
5. Chance level of the steering test: a random CLT (30 x 32, random decoders) over the default
   model, `--null` of its features measured the same way; the z a random direction's top tokens
   reach, against `LabelConfig.min_steer_z`. And the other side: a feature whose decoder says
   " Paris", steered the same way.

Prints the figures and writes benchmarks/results/labels.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"q{int(q * 100)}": round(float(np.quantile(arr, q)), 3) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} | {
        "mean": round(float(arr.mean()), 3), "min": round(float(arr.min()), 3), "max": round(float(arr.max()), 3)}


def _store(args: argparse.Namespace, loaded: Any, tmp: Path) -> tuple[Path, Any, str]:
    """(store path, transcoder, what it is)."""
    from cltrace.features import build_feature_store
    from cltrace.trace.run import feature_db_path
    from cltrace.train.default import default_paths
    from cltrace.transcoder import Transcoder, TranscoderConfig, load_transcoder

    # Labelling rewrites a store's measured labels: the benchmark works on a copy.
    if args.db is not None:
        return Path(shutil.copy(args.db, tmp / "given.db")), load_transcoder(args.transcoder), f"given store {args.db}"
    folder = default_paths()[0]
    if folder.is_dir():
        tc = load_transcoder(folder)
        if feature_db_path(tc).is_file():
            return Path(shutil.copy(feature_db_path(tc), tmp / "default.db")), tc, "the default CLT's store"
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 256, model_id=loaded.name), seed=0)
    path = tmp / "random.db"
    build_feature_store(loaded, tc, "default", args.build_tokens, path, n_ctx=128, batch_size=8, progress=True)
    return path, tc, f"no default CLT store yet: a random 30 x 256 CLT over {args.build_tokens} tokens (times only)"


def _outputs(store: Any, rm: Any, keys: list[tuple[int, int]], config: Any) -> dict[str, Any]:
    from cltrace.features.labeller import measure_outputs

    t = time.perf_counter()
    labels = measure_outputs(store, rm, keys, config, force=True, progress=True)
    seconds = time.perf_counter() - t
    z = [v.output_score for v in labels.values() if v.output_score is not None]
    return {
        "features": len(keys), "measured": len(z), "seconds": round(seconds, 1),
        "seconds_per_feature": round(seconds / max(len(keys), 1), 2),
        "steering_pass_rate": round(float(np.mean([s >= config.min_steer_z for s in z])), 3) if z else None,
        "z": _quantiles(z),
        "input_unclear": sum(v.input_unclear for v in labels.values()),
        "output_unclear": sum(v.output_unclear for v in labels.values()),
        "unclear": sum(v.unclear for v in labels.values()),
        "examples": {f"{l}:{f}": v.text() for (l, f), v in list(labels.items())[:12]},
        "by_feature": {k: v.output_score for k, v in labels.items() if v.output_score is not None},
    }


def _matched_null(store: Any, loaded: Any, tc: Any, keys: list[tuple[int, int]], config: Any,
                  real: dict[str, Any]) -> dict[str, Any]:
    """`keys` measured again with their decoder rows swapped for norm-matched random directions. The
    store's examples stay valid (the encoders are the same), so the labeller's measuring step runs on
    them directly; nothing is written to the store."""
    import torch

    from cltrace.features.labeller import _measure
    from cltrace.replacement import ReplacementModel

    null = copy.deepcopy(tc)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer, feature in keys:
            row = null.W_dec[layer][feature]  # [targets, d_model] (CLT) or [d_model]
            noise = torch.randn(row.shape, generator=gen, dtype=row.dtype)
            row.copy_(noise / noise.norm(dim=-1, keepdim=True) * row.norm(dim=-1, keepdim=True))
    t = time.perf_counter()
    rows = _measure(store, ReplacementModel(loaded, null), keys, config, progress=True)
    z = [r[3] for r in rows if r[3] is not None]
    by_band = {}
    for lo in range(0, tc.n_layers, 10):
        band = [r[3] for r in rows if r[3] is not None and lo <= r[0] < lo + 10]
        own = [v for (l, _), v in real["by_feature"].items() if lo <= l < lo + 10]
        by_band[f"L{lo}-{min(lo + 9, tc.n_layers - 1)}"] = {"features": len(own), "real_median": _median(own),
                                                               "matched_null_median": _median(band)}
    return {"features": len(z), "seconds": round(time.perf_counter() - t, 1), "z": _quantiles(z),
            "pass_rate": round(float(np.mean([v >= config.min_steer_z for v in z])), 3) if z else None,
            "by_layers": by_band}


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


def _null(loaded: Any, n: int, tmp: Path, config: Any) -> dict[str, Any]:
    from cltrace.features import FeatureStore, build_feature_store
    from cltrace.features.labeller import label_inputs
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoder import Transcoder, TranscoderConfig

    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 32, model_id=loaded.name), seed=1)
    path = tmp / "null.db"
    build_feature_store(loaded, tc, "default", 3000, path, n_ctx=64, batch_size=8, progress=True)
    with FeatureStore(path) as store:
        small = dataclasses.replace(config, heldout_contexts=16)
        label_inputs(store, loaded, tc, "default", small, progress=True)
        keys = [(l, f) for l in range(tc.n_layers) for f in range(tc.n_features)]
        keys = random.Random(1).sample(keys, min(n, len(keys)))
        out = _outputs(store, ReplacementModel(loaded, tc), keys, small)
    return {"random_decoders": out["measured"], "z": out["z"], "false_pass_rate": out["steering_pass_rate"]}


def _planted(loaded: Any, token: str = " Paris") -> dict[str, Any]:
    """The other side of the threshold: one feature of a random CLT given a decoder that says `token`
    (its unembedding row, the vocabulary's shared direction removed, divided by the final norm's
    weight), steered at a few contexts of the default corpus the way the test steers."""
    import torch

    from cltrace.data.sources import open_text_source
    from cltrace.features.steering import Job, Site, logit_changes
    from cltrace.features.views import final_norm_weight
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoder import Transcoder, TranscoderConfig

    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 8, model_id=loaded.name), seed=2)
    W = loaded.model.get_output_embeddings().weight.detach().float()  # [V, d]
    t = loaded.token_id(token)
    shared = W.mean(0) / W.mean(0).norm()
    direction = (W[t] - (W[t] @ shared) * shared) / final_norm_weight(loaded)
    layer = loaded.n_layers - 2
    with torch.no_grad():
        tc.W_dec[layer][0].zero_()
        tc.W_dec[layer][0, 1] = direction / direction.norm()
    texts = [doc for _, doc in zip(range(4), open_text_source("default"))]
    contexts = {i: loaded.encode(text[:400]).numpy() for i, text in enumerate(texts)}
    jobs = [Job(layer, 0, Site("store", i, min(40, len(c) - 1)), 10.0) for i, c in contexts.items()]
    rm = ReplacementModel(loaded, tc)
    z = logit_changes(rm, jobs, lambda site: contexts[site.ctx_id], 10, "iterative", False)
    return {"token": token, "z": [round(float(v[t]), 2) for v in z],
            "top_token": [loaded.decode_token(int(v.argmax())) for v in z]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=None, help="a feature store (default: the default CLT's)")
    parser.add_argument("-t", "--transcoder", type=Path, default=None, help="the store's transcoder (with --db)")
    parser.add_argument("--features", type=int, default=200, help="random features whose output labels are measured")
    parser.add_argument("--contexts", type=int, default=128, help="held-out contexts of the input labels' pass")
    parser.add_argument("--null", type=int, default=60, help="random-decoder features for the chance level (0: skip)")
    parser.add_argument("--no-matched", dest="matched", action="store_false",
                        help="skip re-measuring the features with norm-matched random decoder rows")
    parser.add_argument("--build-tokens", type=int, default=12_000, help="tokens of the random store built when there is none")
    parser.add_argument("--name", default="labels", help="write benchmarks/results/NAME.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from cltrace.features import FeatureStore
    from cltrace.features.database import read_meta
    from cltrace.features.labeller import label_inputs
    from cltrace.features.labels import LabelConfig
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel

    loaded = load_model()
    config = dataclasses.replace(LabelConfig(), heldout_contexts=args.contexts)
    figures: dict[str, Any] = {"config": dataclasses.asdict(config)}
    with tempfile.TemporaryDirectory() as tmp:
        path, tc, what = _store(args, loaded, Path(tmp))
        figures["store"] = what
        print(f"store: {what}")
        with FeatureStore(path) as store:
            figures["store_tokens"] = store.stats()["tokens"]
            summary = label_inputs(store, loaded, tc, "default", config, progress=True)
            info = read_meta(store.conn)["auto_labels"]
            summary["choose_seconds"], summary["heldout_tokens"] = info["choose_seconds"], info["heldout_tokens"]
            figures["inputs"] = summary
            print(f"input labels: {summary}")
            alive = [(l, f) for l, f, c in store.conn.execute("SELECT layer, feature, count FROM features") if c > 0]
            keys = random.Random(0).sample(alive, min(args.features, len(alive)))
            outputs = _outputs(store, ReplacementModel(loaded, tc), keys, config)
            figures["outputs"] = {k: v for k, v in outputs.items() if k != "by_feature"}
            print(f"output labels: {figures['outputs']}")
            if args.matched:
                figures["matched_null"] = _matched_null(store, loaded, tc, keys, config, outputs)
                print(f"the same features with random decoder rows of the same norms: {figures['matched_null']}")
        if args.null:
            figures["null"] = _null(loaded, args.null, Path(tmp), config)
            print(f"chance level (random decoders): {figures['null']}")
            figures["planted"] = _planted(loaded)
            print(f"a planted output feature: {figures['planted']}")
    print(f"wrote {write_result(args.name, figures)}")


if __name__ == "__main__":
    main()
