"""The graph explorer on a large graph: time to first paint and frame times while panning.

    .venv/bin/python benchmarks/graph_explorer.py [--nodes 5000] [--edges 100000] [--frames 240]

A synthetic graph (random DAG: 20 layers x 20 positions, error nodes, token embeddings, 10 logits,
edges from lower to higher layers with random signed weights) is saved in a temporary folder and
served by `cltrace serve`'s app on a free local port; Debian's headless Chromium (Playwright) opens
it unpruned (the pruning slider at 1) with every edge drawn (the edge slider at "all"; by default the
explorer draws the 300 strongest). Figures:

* time to first paint: from navigation start to the graph's first frame on the canvas (the page's
  ``graph-first-paint`` mark), cold (the server reads the file) and warm; target at most 2 s;
* frame times while panning: the page pans by a few pixels on every animation frame, to and fro
  within the cached bitmap, then (``pan_long``) 12 px a frame one way, past its edge; the draw
  time of each frame (JS) and the interval between frames: median, 95th percentile and maximum
  (the interval is what a person sees: 16.7 ms is 60 frames a second).

Prints the figures and writes benchmarks/results/graph_explorer.json. Needs the built front end
(`make setup`) and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

PAN_JS = """async ([frames, long]) => {
  const v = window.explorer.view;
  v.frameTimes.length = 0;
  const intervals = [];
  let last = performance.now();
  for (let i = 0; i < frames; i++) {
    // to and fro, as a hand drags: 30 frames right, 30 left, a little up and down; or (long) one
    // way only, past the edge of the cached bitmap, which then is redrawn
    if (long) v.panBy(-12, 0);
    else v.panBy(i % 60 < 30 ? 9 : -9, i % 2 ? 3 : -3);
    await new Promise((r) => requestAnimationFrame(r));
    const now = performance.now();
    intervals.push(now - last);
    last = now;
  }
  return { intervals, draws: v.frameTimes.slice() };
}"""

def synthetic_graph(n_nodes: int, n_edges: int, n_layers: int = 20, n_pos: int = 20, n_logits: int = 10, seed: int = 0):
    """A random attribution-graph-shaped DAG with exactly `n_nodes` nodes and `n_edges` distinct edges."""
    import torch

    from cltrace.graph.graph import Graph, NodeKind, NodeTable

    g = torch.Generator().manual_seed(seed)
    n_err, n_emb = n_layers * n_pos, n_pos
    n_feat = n_nodes - n_err - n_emb - n_logits
    f_layer = torch.randint(0, n_layers, (n_feat,), generator=g)
    f_pos = torch.randint(1, n_pos, (n_feat,), generator=g)
    kind = torch.cat([torch.full((n_feat,), int(NodeKind.FEATURE)), torch.full((n_err,), int(NodeKind.ERROR)),
                      torch.full((n_emb,), int(NodeKind.EMBEDDING)), torch.full((n_logits,), int(NodeKind.LOGIT))])
    layer = torch.cat([f_layer, torch.arange(n_layers).repeat_interleave(n_pos), torch.full((n_emb,), -1),
                       torch.full((n_logits,), n_layers)])
    pos = torch.cat([f_pos, torch.arange(n_pos).repeat(n_layers), torch.arange(n_pos), torch.full((n_logits,), n_pos - 1)])
    feature = torch.cat([torch.randint(0, 4096, (n_feat,), generator=g), torch.full((n_err + n_emb + n_logits,), -1)])
    token = torch.cat([torch.full((n_feat + n_err,), -1), torch.randint(0, 1000, (n_emb + n_logits,), generator=g)])
    activation = torch.cat([torch.rand(n_feat, generator=g) * 10, torch.zeros(n_err + n_emb + n_logits)])
    probs = torch.softmax(torch.randn(n_logits, generator=g), 0)
    probability = torch.cat([torch.zeros(n_nodes - n_logits), probs])
    nodes = NodeTable.from_columns(kind, layer, pos, feature, token, activation, probability)
    # edges go from a lower "rank" (layer; embeddings lowest, logits highest) to a higher one
    rank = layer.clone().float()
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_edges:
        s = torch.randint(0, n_nodes, (n_edges,), generator=g)
        t = torch.randint(0, n_nodes, (n_edges,), generator=g)
        ok = rank[s] < rank[t]
        for a, b in zip(s[ok].tolist(), t[ok].tolist()):
            pairs.add((a, b))
            if len(pairs) == n_edges:
                break
    src, tgt = zip(*sorted(pairs))
    weight = torch.randn(n_edges, generator=g) * torch.rand(n_edges, generator=g) ** 3
    tokens = [f"tok{i}" for i in range(n_pos)]
    md = {"prompt": " ".join(tokens), "tokens": tokens, "model": "synthetic", "n_layers": n_layers,
          "input_ids": list(range(n_pos)), "targets": [{"label": f"out{i}", "probability": float(p)} for i, p in enumerate(probs)]}
    return Graph(nodes, torch.tensor(tgt), torch.tensor(src), weight.float(), md)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "max_ms": round(ordered[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--edges", type=int, default=100_000)
    parser.add_argument("--frames", type=int, default=240, help="animation frames of panning to time")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from cltrace.serve.app import BUILD_HINT, assets_built, create_app, start_in_thread

    if not assets_built():
        sys.exit(BUILD_HINT)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as tmp:
        graph = synthetic_graph(args.nodes, args.edges)
        graph.save(Path(tmp) / "synthetic.safetensors")
        server, base = start_in_thread(create_app(tmp))
        url = f"{base}?graph=synthetic.safetensors&threshold=1&edges=all"  # every edge drawn: the worst case
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            paints = []
            for _ in range(3):  # cold (the server reads the graph), then warm
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(url)
                page.wait_for_function("window.explorer && window.explorer.view.firstPaint", timeout=60_000)
                paints.append(page.evaluate("performance.getEntriesByName('graph-first-paint')[0].startTime"))
                shown = page.evaluate("[window.explorer.view.nodes.length, window.explorer.view.edges.weight.length]")
                if len(paints) < 3:
                    page.close()
            assert shown == [args.nodes, args.edges], shown
            result = page.evaluate(PAN_JS, [args.frames, False])
            long_pan = page.evaluate(PAN_JS, [args.frames, True])
            version = browser.version
            browser.close()
        server.should_exit = True

    figures = {
        "nodes": args.nodes, "edges": args.edges, "viewport": [args.width, args.height], "chromium": version,
        "first_paint_cold_ms": round(paints[0], 1), "first_paint_warm_ms": round(min(paints[1:]), 1),
        "first_paint_target_ms": 2000,
        "pan_frames": args.frames, "pan_draw": summary(result["draws"]), "pan_frame_interval": summary(result["intervals"][1:]),
        "pan_long_draw": summary(long_pan["draws"]), "pan_long_frame_interval": summary(long_pan["intervals"][1:]),
    }
    print(f"graph of {args.nodes:,} nodes and {args.edges:,} edges in headless Chromium {version}")
    print(f"time to first paint: {figures['first_paint_cold_ms']:.0f} ms cold, {figures['first_paint_warm_ms']:.0f} ms warm "
          f"(target <= 2000 ms)")
    for key in ("pan_draw", "pan_frame_interval", "pan_long_draw", "pan_long_frame_interval"):
        s = figures[key]
        print(f"{key.replace('_', ' ')}: median {s['median_ms']} ms, p95 {s['p95_ms']} ms, max {s['max_ms']} ms")
    print(f"wrote {write_result('graph_explorer', figures)}")


if __name__ == "__main__":
    main()
