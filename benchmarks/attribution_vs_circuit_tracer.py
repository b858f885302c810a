"""Attribution side by side with circuit-tracer 0.5.0: the same edges, in less time and memory.

Both tools run on the default model (SmolLM2-135M-Instruct) with the same CLT (cltrace's native
directory, exported to circuit-tracer's layout with `cltrace convert ... --to circuit-tracer`), the
same token ids (BOS first), the same targets (top logits to 95%, at most 10), the same cap on
feature nodes and the same batch size, each in a subprocess of its own whose peak RSS is read from
the kernel (wait4) and watched while it runs: a run past `--ct-timeout` seconds or `--max-rss-gb`
is stopped and recorded as a lower bound, not a figure.

Edges are compared node by node (circuit-tracer's node order: selected features in (layer, pos,
feature) order, error nodes layer-major, token embeddings, logits; mapped onto cltrace's by key):
on every edge whose magnitude is above 1e-3 of the largest, |ours − theirs| <= 1e-3 · |theirs|. Edges
from the error nodes at position 0 are compared apart: circuit-tracer zeroes the BOS position's error
vectors, cltrace keeps them as nodes with their real effect.

circuit-tracer pins transformers <= 4.57.3, so it runs from its own virtualenv (created with pip if
missing, see circuit_tracer_format.py) on a copy of the cached model folder converted for that
version (`rope_parameters` written back as `rope_theta`, `tokenizer_class` set).

    .venv/bin/python benchmarks/attribution_vs_circuit_tracer.py [--transcoder DIR|random]
        [--tokens 10 100] [--batch-size 32] [--max-feature-nodes 7500] [--ct-timeout 1200]
        [--reuse-ct] [--work /tmp/cltrace-attr-vs-ct]

Writes benchmarks/results/attribution_vs_circuit_tracer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_common import LONG_TEXT, realistic_random_clt, run_watched  # noqa: E402
from circuit_tracer_format import ensure_venv  # noqa: E402
from common import write_result  # noqa: E402

from cltrace.resources import available_memory_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHORT_PROMPT = "The National Digital Analytics Group (N"
REL_TOL, EDGE_FLOOR = 1e-3, 1e-3

# Runs inside the circuit-tracer virtualenv: knows nothing of cltrace.
CT_WORKER = r'''
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from circuit_tracer import attribute
from circuit_tracer.replacement_model import ReplacementModel
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
model_dir, clt_dir, ids_json, out, batch, cap = sys.argv[1:7]
torch.set_grad_enabled(True)
cpu = torch.device("cpu")
clt = load_clt(clt_dir, device=cpu, dtype=torch.float32, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(model_dir, clt, backend="nnsight", device=cpu, dtype=torch.float32)
load_s = time.perf_counter() - t0
ids = torch.tensor(json.loads(ids_json))
t = time.perf_counter()
graph = attribute(ids, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=int(batch), max_feature_nodes=int(cap))
attribute_s = time.perf_counter() - t
torch.save({
    "adjacency": graph.adjacency_matrix, "selected": graph.selected_features, "active": graph.active_features,
    "tokens": graph.input_tokens, "logit_tokens": [t.vocab_idx for t in graph.logit_targets],
}, out)
print(json.dumps({"load_s": load_s, "attribute_s": attribute_s, "n_active": int(graph.active_features.shape[0]),
                  "n_selected": int(len(graph.selected_features)),
                  "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

# Runs in this virtualenv.
CLTRACE_WORKER = r'''
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from cltrace.graph.attribution import attribute
from cltrace.model import load_model
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import load_transcoder
clt_dir, ids_json, out, batch, cap = sys.argv[1:6]
rm = ReplacementModel(load_model("default"), load_transcoder(clt_dir))
load_s = time.perf_counter() - t0
ids = torch.tensor(json.loads(ids_json))
t = time.perf_counter()
graph = attribute(rm, ids, max_feature_nodes=int(cap), batch_size=int(batch), progress=False)
attribute_s = time.perf_counter() - t
graph.save(out)
print(json.dumps({"load_s": load_s, "attribute_s": attribute_s, "n_active": graph.metadata["n_active_features"],
                  "n_nodes": graph.n_nodes, "n_edges": graph.n_edges, "timing": graph.metadata["timing"],
                  "row_bytes": graph.metadata.get("row_bytes"),
                  "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def available_gb() -> float:
    return (available_memory_bytes() or 0) / 2**30


def prepare_model_dir(work: Path) -> Path:
    """A copy of the cached default model that transformers 4.57 (circuit-tracer's pin) reads."""
    from cltrace.model import load_model

    loaded = load_model("default")  # makes sure the dequantised safetensors copy is cached
    src = Path(loaded.model.name_or_path)
    if not (src / "model.safetensors").is_file():
        from cltrace.cache import cache_dir

        src = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    return tf457_copy(src, work / "model-tf457")


def tf457_copy(src: Path, dst: Path) -> Path:
    """`dst`: a copy of the model folder `src` that transformers 4.57 reads (made once, then reused)."""
    if not (dst / "model.safetensors").is_file():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        config = json.loads((tmp / "config.json").read_text())
        rope = config.pop("rope_parameters", None) or {}
        config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok_path = tmp / "tokenizer_config.json"
        tok = json.loads(tok_path.read_text()) if tok_path.is_file() else {}
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_path.write_text(json.dumps(tok, indent=2))
        tmp.rename(dst)
    return dst


def prepare_clt(work: Path, transcoder: str) -> tuple[Path, Path, str]:
    """(native dir, circuit-tracer dir, description): the trained CLT given, or a seeded random one."""
    native = work / "clt-native"
    if transcoder == "random":
        shutil.rmtree(native, ignore_errors=True)
        from cltrace.model import load_model
        from cltrace.transcoder import save_transcoder

        save_transcoder(realistic_random_clt(load_model("default")), native)
        described = "seeded random 30x256 JumpReLU CLT (thresholds for about 4.6 active features per layer and token)"
    else:
        native = Path(transcoder)
        described = f"trained CLT at {transcoder}"
    exported = work / "clt-ct"
    shutil.rmtree(exported, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "cltrace", "convert", str(native), str(exported), "--to", "circuit-tracer"],
                   check=True)
    return native, exported, described


def prompt_ids(n_tokens: int) -> list[int]:
    """Token ids with BOS first: the acronym prompt for about 10 tokens, else a longer text cut to n_tokens."""
    from cltrace.model import load_model

    model = load_model("default")
    ids = model.encode(SHORT_PROMPT).tolist()
    if len(ids) != n_tokens:
        ids = model.encode(" ".join([LONG_TEXT] * (1 + n_tokens // 80))).tolist()[:n_tokens]
    return ids


def compare_edges(ct_file: Path, graph_file: Path) -> dict:
    """circuit-tracer's dense adjacency against cltrace's COO edges, node by node."""
    from cltrace.graph.graph import Graph, NodeKind

    ct = torch.load(ct_file, weights_only=False)
    graph = Graph.load(graph_file)
    nodes, n_layers = graph.nodes, graph.metadata["n_layers"]
    n_pos = len(graph.metadata["input_ids"])
    assert [int(t) for t in ct["tokens"]] == graph.metadata["input_ids"], "the two tools saw different tokens"
    ours: dict[tuple, int] = {}
    for i, (k, layer, pos, feat, tok) in enumerate(zip(nodes.kind.tolist(), nodes.layer.tolist(), nodes.pos.tolist(),
                                                        nodes.feature.tolist(), nodes.token.tolist())):
        key = {NodeKind.FEATURE: ("f", layer, pos, feat), NodeKind.ERROR: ("e", layer, pos),
               NodeKind.EMBEDDING: ("t", pos), NodeKind.LOGIT: ("l", tok)}[NodeKind(k)]
        ours[key] = i
    active = ct["active"]  # [n_active, 3] (layer, pos, feature)
    theirs = [("f", *map(int, active[i].tolist())) for i in ct["selected"].tolist()]
    theirs += [("e", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    theirs += [("t", pos) for pos in range(n_pos)] + [("l", int(t)) for t in ct["logit_tokens"]]
    adj = ct["adjacency"]
    assert adj.shape[0] == len(theirs), (adj.shape, len(theirs))
    their_idx = torch.tensor([i for i, key in enumerate(theirs) if key in ours])
    our_idx = torch.tensor([ours[theirs[i]] for i in their_idx.tolist()])
    # Both graphs restricted to their common nodes, as dense matrices (small: at most ~10k nodes).
    a = adj[their_idx][:, their_idx].double()
    b = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.float64)
    b[graph.edge_target, graph.edge_source] = graph.edge_weight.double()
    b = b[our_idx][:, our_idx]
    # circuit-tracer zeroes the error vectors at position 0 (BOS), so its edges from those error nodes
    # are 0; cltrace keeps them (their real effect). Those columns are compared apart.
    bos_error = torch.tensor([theirs[i][0] == "e" and theirs[i][2] == 0 for i in their_idx.tolist()])
    bos_a, bos_b = a[:, bos_error], b[:, bos_error]
    a, b = a[:, ~bos_error], b[:, ~bos_error]
    scale = max(float(a.abs().max()), float(b.abs().max()))
    big = (a.abs() > EDGE_FLOOR * scale) | (b.abs() > EDGE_FLOOR * scale)
    rel = (b[big] - a[big]).abs() / a[big].abs().clamp(min=1e-30)
    n_feat_ct = int(ct["selected"].numel())
    n_feat_ours = int((nodes.kind == NodeKind.FEATURE).sum())
    common_feat = sum(1 for key in theirs[:n_feat_ct] if key in ours)
    return {
        "nodes_circuit_tracer": len(theirs), "nodes_cltrace": graph.n_nodes, "nodes_in_common": int(their_idx.numel()),
        "feature_nodes_circuit_tracer": n_feat_ct, "feature_nodes_cltrace": n_feat_ours,
        "feature_nodes_in_common": common_feat,
        "edges_compared": int(big.sum()), "largest_edge": scale,
        "max_rel_diff": float(rel.max()) if rel.numel() else 0.0,
        "n_over_tolerance": int((rel > REL_TOL).sum()),
        "max_abs_diff_all_common_edges": float((a - b).abs().max()),
        "same_edges": bool(rel.numel() > 0 and (rel <= REL_TOL).all()),
        "bos_error_edges": {"circuit_tracer_max_abs": float(bos_a.abs().max()), "cltrace_max_abs": float(bos_b.abs().max()),
                            "cltrace_nonzero": int((bos_b != 0).sum())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_clt = "/tmp/bench_clt" if Path("/tmp/bench_clt/config.json").is_file() else "random"
    parser.add_argument("--transcoder", default=default_clt, help="a native CLT directory, or 'random'")
    parser.add_argument("--tokens", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-feature-nodes", type=int, default=7500)
    parser.add_argument("--ct-timeout", type=float, default=1200.0, help="seconds before circuit-tracer is stopped")
    parser.add_argument("--max-rss-gb", type=float, default=None, help="stop a run past this RSS (default: 80%% of available)")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/ct-venv"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cltrace-attr-vs-ct"))
    parser.add_argument("--reuse-ct", action="store_true", help="reuse circuit-tracer results already in --work")
    parser.add_argument("--ct-only", action="store_true", help="run circuit-tracer only (to be reused with --reuse-ct)")
    parser.add_argument("--name", default="attribution_vs_circuit_tracer", help="result file name")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    max_rss = args.max_rss_gb or round(0.8 * available_gb(), 1)
    print(f"available memory {available_gb():.1f} GB; runs stopped above {max_rss} GB", flush=True)
    python = ensure_venv(args.venv)
    model_dir = prepare_model_dir(args.work)
    native, exported, described = prepare_clt(args.work, args.transcoder)
    figures: dict = {"transcoder": described, "batch_size": args.batch_size, "max_feature_nodes": args.max_feature_nodes,
                     "ct_timeout_s": args.ct_timeout, "max_rss_gb": max_rss, "runs": {}}
    for n_tokens in args.tokens:
        ids = prompt_ids(n_tokens)
        tag = f"{n_tokens}tok"
        ct_out, ct_json = args.work / f"ct-{tag}.pt", args.work / f"ct-{tag}.json"
        load_before = os.getloadavg()[0]
        if args.reuse_ct and ct_json.is_file():
            ct = json.loads(ct_json.read_text())
            print(f"[{tag}] reusing circuit-tracer result {ct_json}", flush=True)
        else:
            print(f"[{tag}] circuit-tracer on {len(ids)} tokens ...", flush=True)
            ct = run_watched([str(python), "-c", CT_WORKER, str(model_dir), str(exported), json.dumps(ids), str(ct_out),
                              str(args.batch_size), str(args.max_feature_nodes)], args.ct_timeout, max_rss)
            ct["loadavg_1min_before"] = load_before
            ct_json.write_text(json.dumps(ct, indent=2))
        print(f"[{tag}] circuit-tracer: {json.dumps({k: v for k, v in ct.items() if k != 'stderr_tail'})}", flush=True)
        if args.ct_only:
            continue
        print(f"[{tag}] cltrace on {len(ids)} tokens ...", flush=True)
        ours_out = args.work / f"cltrace-{tag}.cltg"
        load_before = os.getloadavg()[0]
        ours = run_watched([sys.executable, "-c", CLTRACE_WORKER, str(native), json.dumps(ids), str(ours_out),
                            str(args.batch_size), str(args.max_feature_nodes)], args.ct_timeout, max_rss)
        ours["loadavg_1min_before"] = load_before
        print(f"[{tag}] cltrace: {json.dumps({k: v for k, v in ours.items() if k != 'stderr_tail'})}", flush=True)
        run: dict = {"n_tokens": len(ids), "circuit_tracer": ct, "cltrace": ours}
        if ct["ended"] == "ok" and ours["ended"] == "ok":
            run["edges"] = compare_edges(ct_out, ours_out)
            run["time_ratio"] = round(ours["attribute_s"] / ct["attribute_s"], 4)
            run["process_time_ratio"] = round(ours["process_wall_s"] / ct["process_wall_s"], 4)
            run["memory_ratio"] = round(ours["peak_rss_gb"] / ct["peak_rss_gb"], 4)
        elif ours["ended"] == "ok":
            # circuit-tracer was stopped: its time and memory are lower bounds, so the ratios are upper bounds.
            run["time_ratio_at_most"] = round(ours["attribute_s"] / ct["process_wall_s"], 4)
            run["memory_ratio_at_most"] = round(ours["peak_rss_gb"] / ct["peak_rss_gb"], 4)
        run["meets_targets"] = bool(
            run.get("edges", {}).get("same_edges", False) and run.get("time_ratio", 1) <= 0.25
            and run.get("memory_ratio", 1) <= 0.5
        ) if "edges" in run else None
        print(f"[{tag}] {json.dumps({k: v for k, v in run.items() if k not in ('circuit_tracer', 'cltrace')})}", flush=True)
        figures["runs"][tag] = run
    if not args.ct_only:
        print(f"wrote {write_result(args.name, figures)}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
