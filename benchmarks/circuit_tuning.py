"""How the circuit's grouping settings were chosen: on tuning prompts that the circuit benchmark never
sees (benchmarks/prompts/circuits_tuning.jsonl), each setting's circuits with the default CLT and
their validation, side by side.

For each setting (the node threshold of the pruning whose features are grouped, the grouping's
similarity threshold and layer gap, the circuit's core share) and over all tuning prompts: the
share of circuits needing at most 12 supernodes, the median number needed, the mean number of
up-pushing features ablated, the mean relative drop of the target's probability when they are
ablated, the same for as many activation-matched random features, their ratio, and Pearson r of
predicted against actual changes over every supernode ablation.

    .venv/bin/python benchmarks/circuit_tuning.py [--cache DIR]   # DIR keeps the graphs between runs

Writes benchmarks/results/circuit_tuning.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from circuits import load_prompts, mean, real_replacement, target_of  # noqa: E402
from common import write_result  # noqa: E402

from cltrace.graph.attribution import attribute  # noqa: E402
from cltrace.graph.circuit import build_circuit  # noqa: E402
from cltrace.graph.config import AttributionConfig  # noqa: E402
from cltrace.graph.graph import Graph  # noqa: E402
from cltrace.graph.grouping import group_features  # noqa: E402
from cltrace.graph.prune import prune  # noqa: E402
from cltrace.graph.validate import pearson, validate_circuit  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "prompts" / "circuits_tuning.jsonl"
#: (node threshold, similarity threshold, max layer gap, core share): the settings compared.
SETTINGS = [(0.8, 0.5, 3, 1.0), (0.8, 0.3, 5, 1.0), (0.8, 0.3, 5, 0.8), (0.6, 0.5, 3, 1.0), (0.6, 0.3, 5, 1.0),
            (0.6, 0.5, 3, 0.8), (0.6, 0.3, 5, 0.8)]


def graph_of(rm: Any, item: dict[str, Any], cache: Path | None, index: int) -> Graph:
    """The prompt's attribution graph (read from `cache` where it was kept)."""
    path = cache / f"tuning_{index:02d}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        return Graph.load(path)
    graph = attribute(rm, item["prompt"], targets=[target_of(item)], config=AttributionConfig(progress=False))
    if path is not None:
        graph.save(path)
    return graph


def one(rm: Any, graph: Graph, setting: tuple[float, float, int, float]) -> dict[str, Any]:
    """The circuit of one setting on one graph, validated."""
    node, threshold, gap, core = setting
    candidates, _ = prune(graph, node_threshold=node)
    circuit = build_circuit(graph, group_features(candidates, threshold=threshold, max_layer_gap=gap), core_share=core)
    v = validate_circuit(rm, graph, circuit)
    return {"n_needed": circuit.n_needed, "n_up_features": v["circuit_ablation"]["n_features"],
            "drop": v["circuit_ablation"]["relative_drop"], "random": v["random_ablation"]["relative_drop_mean"],
            "pairs": [(sn.validation["ablate"]["predicted"], sn.validation["ablate"]["actual"])
                      for sn in circuit.supernodes if sn.validation]}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    drop, rnd = mean([r["drop"] for r in rows]), mean([r["random"] for r in rows])
    pairs = [p for r in rows for p in r["pairs"]]
    return {
        "within_12": mean([float(r["n_needed"] <= 12) for r in rows]),
        "median_n_needed": statistics.median(r["n_needed"] for r in rows),
        "mean_up_features": mean([r["n_up_features"] for r in rows]), "relative_drop": drop, "random_relative_drop": rnd,
        "ratio_to_random": drop / rnd if drop is not None and rnd and rnd > 0 else None,
        "pearson_r": pearson([a for a, _ in pairs], [b for _, b in pairs]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="a folder keeping the tuning graphs between runs")
    args = parser.parse_args()
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    items = load_prompts(PROMPTS)
    rm, described = real_replacement("default")
    rows: dict[tuple, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    for i, item in enumerate(items):
        graph = graph_of(rm, item, args.cache, i)
        for s in SETTINGS:
            rows[s].append(one(rm, graph, s))
        print(f"{i + 1}/{len(items)} {item['prompt'][:40]!r}", file=sys.stderr, flush=True)
    results = []
    for s, r in rows.items():
        results.append({"node_threshold": s[0], "threshold": s[1], "max_layer_gap": s[2], "core_share": s[3], **summary(r)})
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in results[-1].items()}
        print(shown)
    path = write_result("circuit_tuning", {"transcoder": described, "prompts_file": PROMPTS.name, "n_prompts": len(items),
                                           "settings": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
