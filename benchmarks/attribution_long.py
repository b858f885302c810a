"""Attribution of a long prompt (1,024 tokens by default) on the default model: time and peak memory.

The graph is built in a subprocess of its own with the default cap (7,500 feature nodes), and its
peak RSS is the kernel's high-water mark (wait4). Before it, the estimate that `cltrace attribute --dry-run`
prints is recorded beside what was then measured.

    .venv/bin/python benchmarks/attribution_long.py [--tokens 1024] [--transcoder DIR|random]
        [--batch-size 32] [--max-feature-nodes 7500]

The default transcoder is a seeded random 30 x 256 JumpReLU CLT whose thresholds make about 4.6
features per layer and token fire (139 per token, as in a trained 30 x 512 CLT). Writes benchmarks/results/attribution_long.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_common import LONG_TEXT, realistic_random_clt, run_watched  # noqa: E402
from common import write_result  # noqa: E402

WORKER = r'''
import json, resource, sys, time
import torch
from cltrace.graph.attribution import attribute
from cltrace.model import load_model
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import load_transcoder
clt_dir, ids_json, out, batch, cap = sys.argv[1:6]
rm = ReplacementModel(load_model("default"), load_transcoder(clt_dir))
ids = torch.tensor(json.loads(ids_json))
t = time.perf_counter()
graph = attribute(rm, ids, max_feature_nodes=int(cap), batch_size=int(batch), progress=True)
attribute_s = time.perf_counter() - t
graph.save(out)
print(json.dumps({"attribute_s": attribute_s, "n_active": graph.metadata["n_active_features"],
                  "n_nodes": graph.n_nodes, "n_edges": graph.n_edges, "timing": graph.metadata["timing"],
                  "row_bytes": graph.metadata.get("row_bytes"),
                  "settings": graph.metadata["settings"]}))
'''


def main() -> int:
    from cltrace.model import load_model
    from cltrace.transcoder import save_transcoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--transcoder", default="random", help="a native CLT directory, or 'random'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-feature-nodes", type=int, default=7500)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--max-rss-gb", type=float, default=24.0)
    parser.add_argument("--name", default="attribution_long")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cltrace-long-"))
    model = load_model("default")
    clt = args.transcoder
    if clt == "random":
        clt = str(work / "clt")
        save_transcoder(realistic_random_clt(model), clt)
    ids = model.encode(" ".join([LONG_TEXT] * (1 + args.tokens // 80))).tolist()[: args.tokens]
    from cltrace.graph.attribution import AttributionConfig, estimate_attribution
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoder import load_transcoder

    config = AttributionConfig(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    estimate = estimate_attribution(ReplacementModel(model, load_transcoder(clt)), torch.tensor(ids), config=config)
    print(f"estimate (as --dry-run prints it): {estimate.summary()}", flush=True)
    del model
    result = run_watched([sys.executable, "-c", WORKER, clt, json.dumps(ids), str(work / "g.cltg"),
                          str(args.batch_size), str(args.max_feature_nodes)], args.timeout, args.max_rss_gb)
    print(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}, indent=2), flush=True)
    if result["ended"] != "ok":
        print(result.get("stderr_tail", ""))
    figures = {
        "n_tokens": len(ids), "transcoder": "seeded random 30x256 JumpReLU CLT" if args.transcoder == "random" else clt,
        "batch_size": args.batch_size, "max_feature_nodes": args.max_feature_nodes,
        "estimate": {"summary": estimate.summary(), "peak_gb": round(estimate.peak_bytes / 2**30, 2),
                     "seconds": round(estimate.seconds, 1), "batch_size": estimate.batch_size,
                     "row_gb": round(estimate.row_bytes / 2**30, 2), "recompute_rows": estimate.recompute_rows},
        "run": result,
        "within_24gb": result["ended"] == "ok" and result["peak_rss_gb"] <= 24.0,
    }
    path = write_result(args.name, figures)
    print(f"wrote {path}")
    return 0 if figures["within_24gb"] else 1


if __name__ == "__main__":
    sys.exit(main())
