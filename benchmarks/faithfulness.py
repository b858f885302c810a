"""Faithfulness of attribution graphs: do the features a graph ranks most influential matter most?

On the default model with the default CLT, for each prompt (short, each with a confident next token):

1. the attribution graph of the top logit alone (the prompt's most probable next token), with a
   modest cap on feature nodes (``--max-feature-nodes``, 500 by default) to keep it fast;
2. the graph's feature nodes ranked by their influence on that logit (`cltrace.graph.prune.node_influence`:
   the sum over paths of the row-normalised |edge| products, as pruning uses it);
3. interventions, all set to 0 (ablation) at the feature's own position, all in one batched pass
   of `intervene_batch` in **iterative mode with attention free** (downstream features recomputed,
   attention recomputed: the replacement model as close to the real model as it runs; error terms
   held at their values on the prompt, so with no intervention it reproduces the model exactly):

   * ``top10``: the 10 most influential feature nodes together;
   * ``random_graph`` (``--draws`` draws): 10 other feature nodes of the graph, each matched to one
     of the top 10 by activation: for each top feature in turn, one of the 3 unused nodes of nearest
     activation, picked at random (seeded). The graph's nodes are the active features attribution
     judged most influential, so this is a harder control than random active features;
   * ``random_active`` (``--draws`` draws): the same matching over every active feature of the
     prompt outside the top 10 (BOS position excluded), graph node or not (no prediction: most
     are not nodes);
   * ``single``: each top-10 node alone;

4. measured: the top token's probability and logit before and after, and its demeaned logit (logit −
   mean logit, the graph's logit target); predicted: the graph's linear prediction of the change of
   that demeaned logit, from its edges: ``direct`` is `predict_effects` (Σ_s Δa_s · edge(s → logit) / a_s),
   ``propagated`` also carries each change through the graph's feature-to-feature edges (an active
   downstream feature's activation moves as its pre-activation does, JumpReLU's slope 1 above the
   threshold), which is what iterative mode does to first order.

As a check of the machinery, the same interventions also run **constrained over all layers with
attention frozen**, where the direct prediction is exact (their correlation should be 1).

    .venv/bin/python benchmarks/faithfulness.py [--max-feature-nodes 500] [--prompts N] [--draws 3]
        [--seed 0] [--save-graphs DIR]

Prints a row per prompt and the summary; writes benchmarks/results/faithfulness.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

#: Short prompts with a confident next token (the model's top probability, SmolLM2-135M-Instruct,
#: in the comment): acronyms, capitals and places, completions, sequences, opposites, idioms.
PROMPTS = [
    "The National Digital Analytics Group (N",  # 'DA' 0.71
    "The British Broadcasting Corporation (B",  # 'BC' 0.96
    "The Federal Bureau of Investigation (F",  # 'BI' 0.62
    "The Eiffel Tower is in the city of",  # ' Paris' 0.43
    "The capital of France is",  # ' Paris' 0.75
    "The capital of Japan is",  # ' Tokyo' 0.67
    "The capital of Germany is",  # ' Berlin' 0.91
    "The Colosseum is in the city of",  # ' Rome' 0.48
    "The Statue of Liberty is in New",  # ' York' 0.94
    "The Amazon River is in South",  # ' America' 0.74
    "The first president of the United States was George",  # ' Washington' 0.82
    "Water freezes at zero degrees",  # ' Celsius' 0.71
    "The chemical symbol for gold is",  # ' Au' 0.35
    "Shakespeare wrote Romeo and",  # ' Juliet' 0.61
    "Harry Potter and the Philosopher's",  # ' Stone' 0.41
    "Monday, Tuesday, Wednesday, Thursday,",  # ' Friday' 0.72
    "A, B, C, D,",  # ' E' 0.67
    "one, two, three, four,",  # ' five' 0.41
    "The opposite of hot is",  # ' cold' 0.26
    "Good morning, how are",  # ' you' 0.64
    "Once upon a",  # ' time' 0.29
]

K = 10  # features ablated together
NEAREST = 3  # a random control feature is one of the 3 unused candidates of nearest activation


@dataclass
class Candidates:
    """Features that can be ablated: their (layer, feature, pos) and activation."""

    layer: torch.Tensor  # [n] int
    feature: torch.Tensor  # [n] int
    pos: torch.Tensor  # [n] int
    activation: torch.Tensor  # [n] float

    def key(self, i: int) -> tuple[int, int, int]:
        return int(self.layer[i]), int(self.feature[i]), int(self.pos[i])


def matched_random(targets: torch.Tensor, pool: Candidates, exclude: set[tuple[int, int, int]],
                   generator: torch.Generator) -> list[int]:
    """For each activation in `targets` [K], in turn, an unused pool index (not in `exclude`) picked at
    random among the NEAREST of closest activation."""
    free = torch.tensor([pool.key(i) not in exclude for i in range(len(pool.activation))])  # [n] bool
    chosen = []
    for a in targets.tolist():
        gap = (pool.activation.double() - a).abs()
        gap[~free] = math.inf
        near = torch.topk(gap, min(NEAREST, int(free.sum())), largest=False).indices
        pick = int(near[torch.randint(len(near), (1,), generator=generator)])
        free[pick] = False
        chosen.append(pick)
    return chosen


def propagated_logit_change(graph, source_change: dict[int, float], logit_node: int, n_layers: int) -> float:
    """The graph's linear prediction of the change of `logit_node`'s value when the feature nodes in
    `source_change` (node → Δ activation) move, carried through every path of the graph: each
    other feature node's activation changes as its pre-activation does (Σ_s edge(s → t) · Δa_s / a_s),
    error and embedding nodes are constant. Edges go from lower to higher layers, so n_layers + 1
    sweeps reach every path."""
    from cltrace.graph.graph import NodeKind

    nodes = graph.nodes
    act = nodes.activation.double()  # [node]
    free = (nodes.kind == int(NodeKind.FEATURE)) & (act != 0)  # [node] features that follow their inputs
    clamped = torch.zeros(graph.n_nodes, dtype=torch.bool)
    delta = torch.zeros(graph.n_nodes, dtype=torch.float64)  # [node] Δ activation
    for node, change in source_change.items():
        clamped[node], delta[node] = True, change
    free &= ~clamped
    src, tgt, w = graph.edge_source, graph.edge_target, graph.edge_weight.double()
    safe = torch.where(act != 0, act, torch.ones_like(act))
    total = torch.zeros(graph.n_nodes, dtype=torch.float64)
    for _ in range(n_layers + 1):
        ratio = torch.where(act != 0, delta / safe, torch.zeros_like(delta))  # [node] Δa / a
        total = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, tgt, w * ratio[src])  # [node] Δ input
        new = torch.where(free, total, delta)
        if torch.equal(new, delta):
            break
        delta = new
    return float(total[logit_node])


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation of two equal-length lists (None for fewer than 3 points or no spread)."""
    if len(x) < 3:
        return None
    t = torch.tensor([x, y], dtype=torch.float64)
    if bool((t.std(dim=1) == 0).any()):
        return None
    return float(torch.corrcoef(t)[0, 1])


def measure(result, token: int) -> dict[str, float]:
    """The top token's probability, logit and demeaned logit, before and after, from one InterventionResult."""
    p_before, p_after = (p[token].item() for p in result.probabilities())
    before, after = result.raw_logits_before.double(), result.raw_logits_after.double()
    return {
        "prob_before": p_before,
        "prob_after": p_after,
        "prob_drop": p_before - p_after,
        "logit_change": float(result.logits_after[token] - result.logits_before[token]),
        "demeaned_logit_change": float((after[token] - after.mean()) - (before[token] - before.mean())),
    }


def run_prompt(rm, prompt: str, args: argparse.Namespace, index: int) -> dict:
    """Everything measured on one prompt (see the module docstring)."""
    from cltrace.graph.attribution import attribute
    from cltrace.graph.graph import NodeKind
    from cltrace.graph.predict import predict_effects
    from cltrace.graph.prune import node_influence
    from cltrace.replacement.interventions import Intervention, intervene_batch

    model = rm.model
    t0 = time.perf_counter()
    run = rm.run(prompt)
    top = int(run.logits[-1].argmax())
    graph = attribute(rm, run.input_ids, targets=[top], max_feature_nodes=args.max_feature_nodes,
                      batch_size=args.batch_size, progress=False)
    attribute_s = time.perf_counter() - t0
    if args.save_graphs:
        graph.save(Path(args.save_graphs) / f"prompt{index:02d}.pt")
    nodes = graph.nodes
    is_feat = nodes.kind == int(NodeKind.FEATURE)
    logit_node = int((nodes.kind == int(NodeKind.LOGIT)).nonzero()[0, 0])
    feat_idx = is_feat.nonzero(as_tuple=True)[0]  # [n_feat] graph node indices
    influence = node_influence(graph)[feat_idx]  # [n_feat]
    order = feat_idx[torch.argsort(influence, descending=True, stable=True)]
    top_nodes = order[:K].tolist()
    in_graph = Candidates(nodes.layer[feat_idx], nodes.feature[feat_idx], nodes.pos[feat_idx], nodes.activation[feat_idx])
    node_of = {in_graph.key(i): int(n) for i, n in enumerate(feat_idx.tolist())}
    top_keys = {(int(nodes.layer[n]), int(nodes.feature[n]), int(nodes.pos[n])) for n in top_nodes}
    top_acts = nodes.activation[top_nodes]  # [K]
    pos, layer, feat = (run.activations[1:] != 0).nonzero(as_tuple=True)  # every active feature but BOS's
    active = Candidates(layer, feat, pos + 1, run.activations[1:][pos, layer, feat].float())

    generator = torch.Generator().manual_seed(args.seed * 1000 + index)

    def ablation(pool: Candidates, picks: list[int]) -> list[Intervention]:
        return [Intervention.at(layer, feature, pos, value=0.0) for layer, feature, pos in map(pool.key, picks)]

    sets: dict[str, list[Intervention]] = {
        "top10": [Intervention.at(int(nodes.layer[n]), int(nodes.feature[n]), int(nodes.pos[n]), value=0.0) for n in top_nodes]
    }
    for d in range(args.draws):
        sets[f"random_graph{d}"] = ablation(in_graph, matched_random(top_acts, in_graph, top_keys, generator))
    for d in range(args.draws):
        sets[f"random_active{d}"] = ablation(active, matched_random(top_acts, active, top_keys, generator))
    for i, _node in enumerate(top_nodes):
        sets[f"single{i}"] = sets["top10"][i : i + 1]

    t1 = time.perf_counter()
    names = list(sets)
    actual = intervene_batch(rm, run.input_ids, [sets[n] for n in names], mode="iterative", freeze_attention=False, run=run, top=1)
    exact = intervene_batch(rm, run.input_ids, [sets[n] for n in names], mode="constrained", freeze_attention=True, run=run, top=1)
    intervene_s = time.perf_counter() - t1

    rows = {}
    for name, res, chk in zip(names, actual, exact):
        row = measure(res, top)
        row["constrained_frozen_demeaned_logit_change"] = measure(chk, top)["demeaned_logit_change"]
        ivs = sets[name]
        row["features"] = [str(iv) for iv in ivs]
        row["activations"] = [float(run.activations[iv.start, iv.layer, iv.feature]) for iv in ivs]
        if all((iv.layer, iv.feature, iv.start) in node_of for iv in ivs):
            prediction = predict_effects(graph, ivs)
            row["predicted_direct"] = prediction.change.get(logit_node, 0.0)
            row["predicted_propagated"] = propagated_logit_change(graph, prediction.source_change, logit_node, rm.transcoder.n_layers)
        rows[name] = row
    p0 = float(run.logits[-1].float().softmax(-1)[top])
    return {
        "prompt": prompt,
        "n_tokens": run.n_pos,
        "top_token": model.decode_token(top),
        "top_probability": p0,
        "n_active_features": int(graph.metadata["n_active_features"]),
        "n_feature_nodes": int(is_feat.sum()),
        "top10_influence_share": float(influence.sort(descending=True).values[:K].sum() / influence.sum()),
        "attribute_s": attribute_s,
        "intervene_s": intervene_s,
        "interventions": rows,
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(results: list[dict], draws: int) -> dict:
    """The summary figures over all prompts."""
    def draws_mean(r: dict, kind: str, key: str) -> float:
        return mean([r["interventions"][f"{kind}{d}"][key] for d in range(draws)])

    top_drop = [r["interventions"]["top10"]["prob_drop"] for r in results]
    graph_drop = [draws_mean(r, "random_graph", "prob_drop") for r in results]
    active_drop = [draws_mean(r, "random_active", "prob_drop") for r in results]
    top_dlogit = [r["interventions"]["top10"]["logit_change"] for r in results]
    graph_dlogit = [draws_mean(r, "random_graph", "logit_change") for r in results]
    active_dlogit = [draws_mean(r, "random_active", "logit_change") for r in results]

    def pairs(which: str, predicted: str, actual: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in results:
            for name, row in r["interventions"].items():
                if predicted in row and (which == "all" or name.startswith(which)):
                    xs.append(row[predicted])
                    ys.append(row[actual])
        return xs, ys

    correlations = {}
    for which in ("all", "single"):
        for predicted in ("predicted_direct", "predicted_propagated"):
            for actual in ("demeaned_logit_change", "logit_change", "constrained_frozen_demeaned_logit_change"):
                xs, ys = pairs(which, predicted, actual)
                correlations[f"{which}:{predicted}~{actual}"] = {"n": len(xs), "pearson": pearson(xs, ys)}
    return {
        "n_prompts": len(results),
        "mean_prob_drop_top10": mean(top_drop),
        "mean_prob_drop_random_graph": mean(graph_drop),
        "mean_prob_drop_random_active": mean(active_drop),
        "mean_logit_change_top10": mean(top_dlogit),
        "mean_logit_change_random_graph": mean(graph_dlogit),
        "mean_logit_change_random_active": mean(active_dlogit),
        "prompts_top10_drop_exceeds_random_graph": sum(t > g for t, g in zip(top_drop, graph_drop)),
        "prompts_top10_drop_exceeds_random_active": sum(t > a for t, a in zip(top_drop, active_drop)),
        "top10_lowers_more_than_random": mean(top_drop) > max(mean(graph_drop), mean(active_drop)),
        "correlations": correlations,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-feature-nodes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="only the first N prompts")
    parser.add_argument("--draws", type=int, default=3, help="random control draws per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-graphs", default=None, help="a folder to keep each prompt's graph in (promptNN.pt)")
    parser.add_argument("--no-write", action="store_true", help="print only (no JSON)")
    args = parser.parse_args()

    from cltrace.model.load import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    if args.save_graphs:
        Path(args.save_graphs).mkdir(parents=True, exist_ok=True)
    transcoder_dir = resolve_transcoder("default")
    rm = ReplacementModel(load_model("default"), load_transcoder(transcoder_dir))
    t0 = time.perf_counter()
    results = []
    print(f"{'prompt':<44} {'top':>11} {'p':>5} | {'p top10':>7} {'p rnd-g':>7} {'p rnd-a':>7} | "
          f"{'Δ demeaned logit, top10: actual direct propag.':>44} | {'rnd-g actual':>12}", flush=True)
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        r = run_prompt(rm, prompt, args, i)
        results.append(r)
        iv = r["interventions"]
        top10 = iv["top10"]
        rg = mean([iv[f"random_graph{d}"]["prob_after"] for d in range(args.draws)])
        ra = mean([iv[f"random_active{d}"]["prob_after"] for d in range(args.draws)])
        rg_logit = mean([iv[f"random_graph{d}"]["demeaned_logit_change"] for d in range(args.draws)])
        print(
            f"{prompt[:44]:<44} {r['top_token']!r:>11} {r['top_probability']:5.2f} | {top10['prob_after']:7.3f} {rg:7.3f} {ra:7.3f} | "
            f"{top10['demeaned_logit_change']:+26.2f} {top10['predicted_direct']:+8.2f} {top10['predicted_propagated']:+8.2f} | "
            f"{rg_logit:+12.2f}   ({r['attribute_s']:.0f} s)",
            flush=True,
        )
    summary = summarize(results, args.draws)
    print(f"\nmean probability drop of the top token over {summary['n_prompts']} prompts:")
    print(f"  top-10 influential ablated:          {summary['mean_prob_drop_top10']:.4f}")
    print(f"  10 random graph nodes (matched):     {summary['mean_prob_drop_random_graph']:.4f}"
          f"   (top-10 drops more on {summary['prompts_top10_drop_exceeds_random_graph']}/{summary['n_prompts']} prompts)")
    print(f"  10 random active features (matched): {summary['mean_prob_drop_random_active']:.4f}"
          f"   (top-10 drops more on {summary['prompts_top10_drop_exceeds_random_active']}/{summary['n_prompts']} prompts)")
    print("Pearson correlation, predicted vs actual change of the top token's logit:")
    for name, c in summary["correlations"].items():
        value = "n/a" if c["pearson"] is None else f"{c['pearson']:+.3f}"
        print(f"  {name:<75} n={c['n']:<4} r={value}")
    if not args.no_write:
        path = write_result("faithfulness", {
            "model": rm.model.name,
            "transcoder": str(transcoder_dir),
            "settings": {
                "max_feature_nodes": args.max_feature_nodes,
                "batch_size": args.batch_size,
                "graph_targets": "the top logit only",
                "ranking": "cltrace.graph.prune.node_influence on the top logit (unsigned, all paths)",
                "ablation": "set to 0 at the feature's own position",
                "actual_mode": "iterative, attention free (intervene_batch)",
                "check_mode": "constrained over all layers, attention frozen",
                "k": K,
                "random_control": f"each top feature matched with one of the {NEAREST} unused candidates of nearest activation, at random",
                "draws": args.draws,
                "seed": args.seed,
                "torch_threads": torch.get_num_threads(),
            },
            "total_s": time.perf_counter() - t0,
            "summary": summary,
            "prompts": results,
        })
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
