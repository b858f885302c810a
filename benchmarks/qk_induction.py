"""Induction heads on the default model: which heads at the second "Harry" attend to the first
"Potter", and what the QK attribution of the strongest one shows.

The transcoder is attribution_long.py's seeded random CLT (its features carry no meaning, so the
pairs are read by node kind and layer: embeddings, attention-block outputs, error nodes). For the
strongest head the key-side attention outputs are followed one step back: which heads of that
layer, at the first "Potter", attend to the first "Harry" (previous-token heads). Writes
benchmarks/results/qk_induction.json.

    .venv/bin/python benchmarks/qk_induction.py
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_long import realistic_random_clt  # noqa: E402
from common import write_result  # noqa: E402

PROMPT = (
    "Mr and Mrs Dursley, of number four, Privet Drive, were proud to say that they were perfectly normal. "
    "Their nephew Harry Potter lived in the cupboard under the stairs. Nobody in the house liked him, "
    "and every morning the boy woke up early and cooked breakfast. One summer morning, Harry"
)


def _group(nodes, index: int) -> str:  # noqa: ANN001
    kind, layer = nodes.kind[index], int(nodes.layer[index])
    return kind if layer < 0 else f"{kind} L{layer}"


def _grouped(result, key) -> list[tuple[str, str, float]]:  # noqa: ANN001
    """The key position's pairs summed by (query group, key group), largest |sum| first."""
    sums: dict[tuple[str, str], float] = defaultdict(float)
    pairs = key.pairs
    q_groups = [_group(result.query_nodes, i) for i in range(pairs.shape[0])]
    k_groups = [_group(key.key_nodes, j) for j in range(pairs.shape[1])]
    for i, qg in enumerate(q_groups):
        row = pairs[i]
        for j, kg in enumerate(k_groups):
            sums[qg, kg] += float(row[j])
    return sorted(((q, k, v) for (q, k), v in sums.items()), key=lambda x: -abs(x[2]))


def _sides(grouped: list[tuple[str, str, float]]) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The pair sums totalled per key group and per query group, largest |total| first (top 10)."""
    by_key: dict[str, float] = defaultdict(float)
    by_query: dict[str, float] = defaultdict(float)
    for qg, kg, v in grouped:
        by_key[kg] += v
        by_query[qg] += v
    return tuple(sorted(d.items(), key=lambda x: -abs(x[1]))[:10] for d in (by_key, by_query))


def main() -> int:
    from cltrace.graph.qk import qk_attribution
    from cltrace.graph.qk_sites import AttentionSites
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel

    model = load_model()
    rm = ReplacementModel(model, realistic_random_clt(model))
    ids = model.encode(PROMPT)
    tokens = [model.decode_token(t) for t in ids.tolist()]
    harry = [i for i, t in enumerate(tokens) if t.strip() == "Harry"]
    potter = [i for i, t in enumerate(tokens) if t.strip() == "Potter"]
    q, first_harry, first_potter = harry[-1], harry[0], potter[0]
    assert q == len(tokens) - 1 and first_potter == first_harry + 1, tokens
    run = rm.run(ids)
    sites = AttentionSites(rm, run)
    weights = torch.stack([
        run.freeze_state.patterns[sites.attention(layer)][0, :, q, first_potter].float()
        for layer in range(model.n_layers)
    ])  # [layer, head]
    order = weights.flatten().argsort(descending=True)[:10].tolist()
    heads = [(i // sites.n_heads, i % sites.n_heads, float(weights.flatten()[i])) for i in order]
    layer, head, _ = heads[0]
    result = qk_attribution(rm, run, layer, head, q, key_positions=[first_potter], sites=sites)
    key = result.keys[0]
    mean_score = float(result.scores[1:].mean())
    grouped = _grouped(result, key)
    key_groups, query_groups = _sides(grouped)
    others = []
    for lay, h, w in heads[1:3]:
        other = qk_attribution(rm, run, lay, h, q, key_positions=[first_potter], sites=sites)
        k_side, q_side = _sides(_grouped(other, other.keys[0]))
        others.append({"layer": lay, "head": h, "weight": w, "score": other.keys[0].score,
                       "key_side_by_group": k_side[:5], "query_side_by_group": q_side[:5]})
    # Previous-token heads: in the layers whose attention outputs at "Potter" matter most, who
    # attends from the first "Potter" to the first "Harry"?
    prev = {}
    for kg, _ in key_groups[:5]:
        if kg.startswith("attention L"):
            j = int(kg.split("L")[1])
            w = run.freeze_state.patterns[sites.attention(j)][0, :, first_potter, first_harry].float()
            prev[kg] = [round(float(x), 3) for x in w]
    figures = {
        "prompt": PROMPT, "query_pos": q, "key_pos": first_potter, "first_harry": first_harry,
        "top_heads": [{"layer": lay, "head": h, "weight_to_potter": w} for lay, h, w in heads],
        "strongest": {
            "layer": layer, "head": head, "score_to_potter": key.score, "mean_score_other_keys": mean_score,
            "weight": key.weight, "top_pairs": result.top_pairs(key, 15),
            "pairs_by_group": [{"query": a, "key": b, "value": v} for a, b, v in grouped[:15]],
            "key_side_by_group": key_groups, "query_side_by_group": query_groups,
            "prev_token_weights_at_potter": prev,
        },
        "next_heads": others,
    }
    path = write_result("qk_induction", figures)
    print(f"heads attending from {tokens[q]!r}@{q} to {tokens[first_potter]!r}@{first_potter}:")
    for lay, h, w in heads[:6]:
        print(f"  L{lay} H{h}: {w:.3f}")
    print(f"L{layer} H{head}: score to Potter {key.score:+.2f} (mean over other keys {mean_score:+.2f})")
    for a, b, v in grouped[:10]:
        print(f"  {v:+8.3f}  {a:<16} × {b}")
    print(f"  key side: {key_groups[:6]}")
    print(f"  query side: {query_groups[:6]}")
    for other in others:
        print(f"L{other['layer']} H{other['head']}: key side {other['key_side_by_group'][:3]}, "
              f"query side {other['query_side_by_group'][:3]}")
    for kg, w in prev.items():
        print(f"  {kg} at Potter → first Harry, per head: {w}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
