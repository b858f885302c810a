"""GPU benchmark: attribution beside circuit-tracer, the longest prompt, training and feature-page throughput.

On one device (`--device`, default auto: the first CUDA GPU, else the CPU):

(a) attribution side by side with circuit-tracer 0.5.0 on the same device: a model with Gemma 2 2B's
    configuration and random weights (no hub is reachable on the GPU machine) and a seeded random
    JumpReLU CLT 26 x 8,192 wide by default: the published one's 26 x 16,384 needs 53 GB of fp32
    decoders alone, which leaves no room for attribution in 80 GB (`--clt-features 16384` tries it;
    the width is stated in the JSON); thresholds set so that about 4.6 features per layer and token fire, at 100 and 1,024
    tokens: time, peak GPU memory and the edge comparison of benchmarks/attribution_vs_circuit_tracer.py;
(b) the longest prompt cltrace attributes on the device: lengths tried in turn until one runs out of
    memory or time (the random model's context is extended past Gemma 2's 8,192 for this, stated);
(c) CLT training throughput of the project's trainer (loss, backward, clipping, Adam, counters; bf16
    activations on the host, as from an activation store) at the default preset's size (SmolLM2-135M's
    30 x 576, 256 features, 256-token steps, bf16, dense decode) on the device, beside the same code
    on this machine's CPU;
(d) feature-page building throughput (`build_feature_store`) with the random model and CLT.

circuit-tracer pins transformers <= 4.57.3, so it runs in a Python of its own (`--ct-python`, e.g.
/tmp/ct-venv/bin/python as benchmarks/circuit_tracer_format.py creates it). A GPU machine has no
package index: install circuit-tracer there beforehand, or carry its wheels (`pip download
circuit-tracer==0.5.0 nnsight==0.6.1 "transformers<=4.57.3" -d wheels/` here, then `pip install
--no-index --find-links wheels/ circuit-tracer==0.5.0` there). Without it, part (a) runs cltrace only
and says why circuit-tracer was skipped.

    .venv/bin/python benchmarks/gpu.py [--device auto] [--ct-python PATH] [--clt-features 16384]
    .venv/bin/python benchmarks/gpu.py --tiny      # a tiny random Gemma 2 on the CPU in seconds (the test)

Writes benchmarks/results/gpu.json (gpu_tiny_<device>.json with --tiny) with the device named.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_common import LONG_TEXT, realistic_random_clt  # noqa: E402
from attribution_vs_circuit_tracer import compare_edges, tf457_copy  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

BOS = 2

# Runs in circuit-tracer's Python: knows nothing of cltrace.
CT_WORKER = r'''
import json, sys, time
import torch
from circuit_tracer import attribute
from circuit_tracer.replacement_model import ReplacementModel
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
model_dir, clt_dir, ids_json, out, device, cap = sys.argv[1:7]
dev = torch.device(device)
torch.set_grad_enabled(True)
clt = load_clt(clt_dir, device=dev, dtype=torch.float32, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(model_dir, clt, backend="nnsight", device=dev, dtype=torch.float32)
ids = torch.tensor(json.loads(ids_json))
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
t = time.perf_counter()
graph = attribute(ids, model, max_n_logits=10, desired_logit_prob=0.95, max_feature_nodes=int(cap))
attribute_s = time.perf_counter() - t
peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
torch.save({"adjacency": graph.adjacency_matrix, "selected": graph.selected_features, "active": graph.active_features,
            "tokens": graph.input_tokens, "logit_tokens": [t.vocab_idx for t in graph.logit_targets]}, out)
print(json.dumps({"attribute_s": attribute_s, "peak_gpu_gb": peak, "n_selected": int(len(graph.selected_features))}))
'''


@dataclass(frozen=True)
class Size:
    """What one run measures: the model, the CLT, the prompt lengths and the training shapes."""

    config: dict[str, Any]
    clt_features: int
    tokens: tuple[int, ...]
    long_tokens: tuple[int, ...]
    max_feature_nodes: int
    train: dict[str, int] = field(default_factory=dict)  # n_layers, d_model, n_features, batch_tokens, steps
    feature_tokens: int = 4096


FULL = Size(
    config=dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, max_position_embeddings=32768, sliding_window=4096,
                query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    clt_features=8192, tokens=(100, 1024), long_tokens=(2048, 4096, 8192, 12288, 16384), max_feature_nodes=7500,
    train=dict(n_layers=30, d_model=576, n_features=256, batch_tokens=256, steps=30), feature_tokens=65536,
)
TINY = Size(
    config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, sliding_window=32,
                query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    clt_features=128, tokens=(16, 48), long_tokens=(64, 128), max_feature_nodes=200,
    train=dict(n_layers=4, d_model=64, n_features=64, batch_tokens=128, steps=4), feature_tokens=1024,
)


def random_model(size: Size, work: Path, device: torch.device) -> Path:
    """A Gemma 2 of `size.config` with seeded random weights and a word-level tokenizer, saved to work/model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 2.6B-parameter CPU init takes minutes
        model = Gemma2ForCausalLM(Gemma2Config(**size.config, bos_token_id=BOS, pad_token_id=0, eos_token_id=1))
    out = work / "model"
    model.save_pretrained(out, max_shard_size="100GB")  # one file, as tf457_copy expects
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": BOS, **{f"t{i}": i for i in range(3, size.config["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def prompt(n_tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids [n_tokens], BOS first."""
    ids = torch.randint(3, vocab, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    ids[0] = BOS
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attribute_once(replacement: Any, ids: torch.Tensor, cap: int, out: Path | None) -> dict[str, Any]:
    """cltrace's attribution of `ids` in this process: time, graph size, peak GPU memory, or the error."""
    from cltrace.graph.attribution import attribute

    device = replacement.model.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    try:
        graph = attribute(replacement, ids, max_feature_nodes=cap, progress=False)
        _sync(device)
    except torch.cuda.OutOfMemoryError as exc:
        return {"n_tokens": int(ids.numel()), "ended": "out of memory", "error": str(exc).splitlines()[0]}
    seconds = time.perf_counter() - t
    if out is not None:
        graph.save(out)
    return {"n_tokens": int(ids.numel()), "ended": "ok", "attribute_s": round(seconds, 3), "n_nodes": graph.n_nodes,
            "n_edges": graph.n_edges,
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None}


def circuit_tracer(args: argparse.Namespace) -> tuple[str | None, str]:
    """(python, why): the Python that imports circuit-tracer, or None and why not."""
    if args.ct_python:
        if not Path(args.ct_python).is_file():
            return None, f"--ct-python {args.ct_python} does not exist"
        probe = subprocess.run([args.ct_python, "-c", "import circuit_tracer"], capture_output=True, text=True)
        if probe.returncode != 0:
            return None, f"circuit-tracer is not importable by {args.ct_python}: {probe.stderr.strip().splitlines()[-1:]}"
        return args.ct_python, "given"
    if importlib.util.find_spec("circuit_tracer") is not None:
        return sys.executable, "importable here"
    return None, ("circuit-tracer is not importable here: install circuit-tracer==0.5.0 in a Python of its own "
                  "(it pins transformers<=4.57.3; carry its wheels to a machine without a package index) "
                  "and pass --ct-python")


def side_by_side(replacement: Any, size: Size, work: Path, model_dir: Path, clt_dir: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Part (a): cltrace and, where it can run, circuit-tracer on the same prompts and device."""
    from cltrace.transcoder import save_transcoder

    python, why = circuit_tracer(args)
    figures: dict[str, Any] = {"circuit_tracer": why if python else f"skipped: {why}", "runs": {}}
    if python:
        ct_clt = save_transcoder(replacement.transcoder, work / "clt-ct", format="circuit-tracer")
        ct_model = tf457_copy(model_dir, work / "model-tf457")
    device = str(replacement.model.device)
    for n in size.tokens:
        ids = prompt(n, size.config["vocab_size"])
        run: dict[str, Any] = {"cltrace": attribute_once(replacement, ids, size.max_feature_nodes, work / f"cl-{n}.cltg")}
        if python:
            proc = subprocess.run([python, "-c", CT_WORKER, str(ct_model), str(ct_clt), json.dumps(ids.tolist()),
                                   str(work / f"ct-{n}.pt"), device, str(size.max_feature_nodes)],
                                  capture_output=True, text=True, timeout=args.ct_timeout)
            if proc.returncode == 0:
                run["circuit_tracer"] = json.loads(proc.stdout.strip().splitlines()[-1])
                run["edges"] = compare_edges(work / f"ct-{n}.pt", work / f"cl-{n}.cltg")
                run["time_ratio"] = round(run["cltrace"]["attribute_s"] / run["circuit_tracer"]["attribute_s"], 4)
            else:
                run["circuit_tracer"] = {"ended": f"failed (exit {proc.returncode})", "stderr_tail": proc.stderr[-2000:]}
        figures["runs"][f"{n}tok"] = run
        print(f"(a) {n} tokens: {json.dumps({k: v for k, v in run.items() if k != 'edges'})}", flush=True)
    return figures


def longest_prompt(replacement: Any, size: Size) -> dict[str, Any]:
    """Part (b): attribute ever longer prompts until one fails; the longest that ran."""
    tried, longest = [], 0
    for n in size.long_tokens:
        result = attribute_once(replacement, prompt(n, size.config["vocab_size"], seed=1), size.max_feature_nodes, None)
        tried.append(result)
        print(f"(b) {json.dumps(result)}", flush=True)
        if result["ended"] != "ok":
            break
        longest = n
    return {"longest_ok_tokens": longest, "tried": tried}


class _HostActivations:
    """An ActivationSource of one random buffer [tokens, layer, d_model] in bf16 on the host, yielded again
    and again: what training from an activation store reads, without the disk."""

    def __init__(self, n_layers: int, d_model: int, n_tokens: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.n_layers, self.d_model = n_layers, d_model
        self.x = torch.randn(n_tokens, n_layers, d_model, generator=g).to(torch.bfloat16)  # [tokens, layer, d_model]
        self.y = torch.randn(n_tokens, n_layers, d_model, generator=g).to(torch.bfloat16)

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "random", "n_layers": self.n_layers, "d_model": self.d_model}

    def buffers(self, start: dict[str, Any] | None) -> Any:
        i = start["i"] if start else 0
        while True:
            i += 1
            yield self.x, self.y, {"i": i}


def train_tokens_per_s(device: torch.device, shape: dict[str, int], work: Path) -> float:
    """Training tokens per second of the project's trainer (`cltrace.train.trainer.Trainer`: loss, backward,
    clipping, Adam, dead-feature counters, metrics) on `device`, at the default preset's settings, from bf16
    activations on the host (as from an activation store: on a GPU, pinned batches copied asynchronously)."""
    from cltrace.train.config import preset
    from cltrace.train.trainer import Trainer

    L, d, n, steps = shape["n_layers"], shape["d_model"], shape["batch_tokens"], shape["steps"]
    cfg = dataclasses.replace(preset("default"), n_features=shape["n_features"], batch_tokens=n,
                              total_tokens=n * (steps + 1000), checkpoint_every=10**6, log_every=max(1, steps // 2))
    data = _HostActivations(L, d, n * (steps + 4))
    warm = Trainer(cfg, data, work / f"warm-{device.type}", progress=False, stop_after=3, device=device)
    warm.run()  # kernels picked on the first steps
    timed = Trainer(cfg, data, work / f"timed-{device.type}", progress=False, stop_after=steps, device=device)
    _sync(device)
    t = time.perf_counter()
    timed.run()
    _sync(device)
    return n * steps / (time.perf_counter() - t)


def training(device: torch.device, size: Size, work: Path) -> dict[str, Any]:
    """Part (c): the default preset's training throughput on the device and on this machine's CPU."""
    on_device = train_tokens_per_s(device, size.train, work)
    cpu_shape = {**size.train, "steps": max(2, size.train["steps"] // 10)}
    on_cpu = on_device if device.type == "cpu" else train_tokens_per_s(torch.device("cpu"), cpu_shape, work)
    figures = {"shape": size.train, "dtype": "bfloat16", "decode": "dense", "device_tokens_per_s": round(on_device, 1),
               "cpu_tokens_per_s": round(on_cpu, 1), "device_over_cpu": round(on_device / on_cpu, 2)}
    print(f"(c) {json.dumps(figures)}", flush=True)
    return figures


def feature_pages(replacement: Any, size: Size, work: Path) -> dict[str, Any]:
    """Part (d): feature-store building tokens/s with the random model and CLT (bytes as token ids)."""
    from cltrace.features import build_feature_store

    text = work / "text.txt"
    text.write_text("\n".join(f"{LONG_TEXT} ({i})" for i in range(1 + 4 * size.feature_tokens // 500)))
    vocab = size.config["vocab_size"]
    _sync(replacement.model.device)
    t = time.perf_counter()
    build_feature_store(replacement.model, replacement.transcoder, str(text), n_tokens=size.feature_tokens,
                        out=work / "features.db", n_ctx=128, batch_size=8, progress=False, bos_id=BOS,
                        tokenize=lambda s: [3 + b % (vocab - 3) for b in s.encode()])
    seconds = time.perf_counter() - t
    figures = {"n_tokens": size.feature_tokens, "seconds": round(seconds, 2),
               "tokens_per_s": round(size.feature_tokens / seconds, 1)}
    print(f"(d) {json.dumps(figures)}", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Gemma 2 and CLT (seconds, any device)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--ct-python", default=None, help="a Python that imports circuit-tracer 0.5.0")
    parser.add_argument("--ct-timeout", type=float, default=600.0, help="seconds before a circuit-tracer run is stopped")
    parser.add_argument("--clt-features", type=int, default=None, help="CLT features per layer (default: 8,192; tiny 128)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--name", default=None, help="result file name (default: gpu, or gpu_tiny_<device>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result JSON (default: benchmarks/results)")
    args = parser.parse_args()
    from cltrace.device import resolve_device
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoder import save_transcoder

    device = resolve_device(args.device)
    size = TINY if args.tiny else FULL
    if args.clt_features:
        size = dataclasses.replace(size, clt_features=args.clt_features)
    work = args.work or Path(tempfile.mkdtemp(prefix="cltrace-gpu-"))
    t0 = time.perf_counter()
    try:
        loaded = load_model(str(random_model(size, work, device)), device=device)
        clt = realistic_random_clt(loaded, size.clt_features, ids=prompt(64, size.config["vocab_size"], seed=2).to(device))
        save_transcoder(clt, work / "clt-native")
        replacement = ReplacementModel(loaded, clt.to(device))
        figures: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({device})",
            "tiny": args.tiny, "model": {"family": "gemma2", "weights": "random, seeded", **size.config},
            "clt": f"seeded random {loaded.n_layers}x{size.clt_features} JumpReLU CLT, about 4.6 active per layer and token",
            "max_feature_nodes": size.max_feature_nodes,
        }
        figures["attribution"] = side_by_side(replacement, size, work, work / "model", work / "clt-native", args)
        figures["longest_prompt"] = longest_prompt(replacement, size)
        figures["training"] = training(device, size, work)
        figures["feature_pages"] = feature_pages(replacement, size, work)
        figures["total_s"] = round(time.perf_counter() - t0, 1)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    name = args.name or ("gpu" if not args.tiny else f"gpu_tiny_{device.type}")
    print(f"wrote {write_result(name, figures, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
