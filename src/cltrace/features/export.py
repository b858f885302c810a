"""Export feature pages as the per-feature JSON files circuit-tracer's (and Neuronpedia's) front end reads.

The front end fetches ``features/{scan}/{feature}.json`` where ``feature`` is the node's feature
number in the graph JSON: the Cantor pairing of (layer, feature index), as
:mod:`cltrace.graph.export` writes it. Each file holds: ``transcoder_id``, ``index``,
``examples_quantiles`` (``quantile_name`` and ``examples``, each with ``tokens``,
``tokens_acts_list``, ``train_token_ind`` (the marked token) and ``is_repeated_datapoint``),
``top_logits``, ``bottom_logits``, ``act_min``, ``act_max``, ``quantile_values``, ``histogram``
and ``activation_frequency``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cltrace.errors import CltraceError
from cltrace.features.store import Example, FeaturePage, FeatureStore
from cltrace.graph.export import cantor_pairing


def _examples(examples: list[Example]) -> list[dict[str, Any]]:
    seen: set[tuple[int, int]] = set()
    out = []
    for ex in examples:
        key = (ex.ctx_id, ex.pos)
        out.append({
            "tokens": ex.texts,
            "tokens_acts_list": [round(a, 4) for a in ex.acts],
            "train_token_ind": ex.mark,
            "is_repeated_datapoint": key in seen,
        })
        seen.add(key)
    return out


def feature_json(page: FeaturePage, transcoder_id: str) -> dict[str, Any]:
    """One feature's page in circuit-tracer's feature-file layout."""
    quantiles = [{"quantile_name": "Top activations", "examples": _examples(page.top)}]
    bands = sorted({e.band for e in page.samples if e.band is not None}, reverse=True)
    quantile_values = []
    for band in bands:
        chosen = [e for e in page.samples if e.band == band]
        chosen.sort(key=lambda e: -e.act)
        quantiles.append({"quantile_name": f"Quantile band {band + 1} of {len(bands)}", "examples": _examples(chosen)})
        quantile_values.append(min(e.act for e in chosen))
    acts = [e.act for e in page.top + page.samples]
    return {
        "transcoder_id": transcoder_id,
        "index": cantor_pairing(page.layer, page.feature),
        "layer": page.layer,
        "feature": page.feature,
        "label": page.display_label,
        "examples_quantiles": quantiles,
        "top_logits": [s.text for s in page.promoted],
        "bottom_logits": [s.text for s in page.suppressed],
        "act_min": min(acts) if acts else 0.0,
        "act_max": page.max_act,
        "quantile_values": quantile_values,
        "histogram": page.hist_counts,
        "activation_frequency": page.density,
    }


def export_feature_files(
    db: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    scan: str | None = None,
    features: Iterable[tuple[int, int]] | None = None,
) -> Path:
    """Write ``{out_dir}/features/{scan}/{cantor(layer, feature)}.json`` for every feature of the
    store `db` (or only `features`); `scan` defaults to the transcoder's model id or the model name.
    Returns the folder written."""
    with FeatureStore(db) as store:
        cfg = store.meta["transcoder"]
        scan = scan or cfg.get("model_id") or store.meta.get("model") or "cltrace"
        if "/" in scan or "\\" in scan or scan in ("", ".", ".."):
            scan = scan.replace("/", "-").replace("\\", "-").strip(".") or "cltrace"
        folder = Path(out_dir) / "features" / scan
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # OUT_DIR (or a folder on its way) is a file, unwritable, ...
            raise CltraceError(f"cannot make the folder '{folder}' ({exc.strerror}): pick another OUT_DIR") from None
        transcoder_id = f"{scan}/{cfg['kind']}-{store.meta.get('fingerprint', '')[:12]}"
        wanted = (
            list(features)
            if features is not None
            else [(l, f) for l in range(store.n_layers) for f in range(store.n_features)]
        )
        if not wanted:
            raise CltraceError("no features to export")
        for layer, feature in wanted:
            data = feature_json(store.page(layer, feature), transcoder_id)
            path = folder / f"{data['index']}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
    return folder


__all__ = ["export_feature_files", "feature_json"]
