"""Check cltrace's circuit-tracer format against circuit-tracer 0.5.0 itself, both directions.

1. Build small random transcoders with cltrace (CLT JumpReLU and ReLU, PLT set with and without
   skip), save them in cltrace's native format and convert each with the command
   `cltrace convert NATIVE EXPORT --to circuit-tracer`.
2. In a separate virtualenv holding circuit-tracer 0.5.0 (created on first use, reused after),
   load each with circuit-tracer's own loaders (`load_clt`, `load_transcoder_set`), dump its
   state dict, run its encoder and sparse reconstruction on a fixed input, and save it back with
   circuit-tracer's own `to_safetensors`.
3. Back here: every tensor circuit-tracer loaded must equal cltrace's (with circuit-tracer's names
   and orientations), its activations and reconstructions must match cltrace's forward pass, and
   cltrace must load circuit-tracer's own files back to the identical transcoder.

Prints one PASS/FAIL line and writes benchmarks/results/circuit_tracer_format.json.

    .venv/bin/python benchmarks/circuit_tracer_format.py [--venv /tmp/ct-venv] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cltrace.transcoder import Transcoder, TranscoderConfig, load_transcoder, save_transcoder

RESULTS = Path(__file__).resolve().parent / "results" / "circuit_tracer_format.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

PIP_PACKAGES = [
    "torch==2.13.0",
    "circuit-tracer==0.5.0",
    "nnsight==0.6.1",
    "transformer-lens<3",
    "transformers<=4.57.3",
    "accelerate",
]
N_LAYERS, D_MODEL, N_FEATURES, N_POS = 4, 16, 48, 7
CASES = {
    "clt-jumprelu": dict(kind="clt", activation="jumprelu", skip=False),
    "clt-relu": dict(kind="clt", activation="relu", skip=False),
    "plt-jumprelu-skip": dict(kind="plt", activation="jumprelu", skip=True),
    "plt-relu": dict(kind="plt", activation="relu", skip=False),
}

# Runs inside the circuit-tracer virtualenv; knows nothing of cltrace.
CT_SNIPPET = r'''
import json, sys
from pathlib import Path
import torch
from importlib.metadata import version
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

work = Path(sys.argv[1])
cpu = torch.device("cpu")
for case, kind in json.loads(sys.argv[2]).items():
    d = work / case
    x = load_file(d / "reference.safetensors")["x"].transpose(0, 1).contiguous()  # [L, pos, d]
    if kind == "clt":
        tc = load_clt(str(d / "export"), device=cpu, dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    else:
        n = len(list((d / "export").glob("layer_*.safetensors")))
        paths = {i: str(d / "export" / f"layer_{i}.safetensors") for i in range(n)}
        tc = load_transcoder_set(paths, scan="cltrace-check", feature_input_hook="hook_resid_mid",
                                 feature_output_hook="hook_mlp_out", device=cpu, dtype=torch.float32,
                                 lazy_encoder=False, lazy_decoder=False)
    state = {k: v.detach().contiguous().clone() for k, v in tc.state_dict().items()}
    save_file(state, str(d / "ct_state.safetensors"))
    with torch.no_grad():
        parts = tc.compute_attribution_components(x, zero_positions=slice(0, 0))
    save_file({"acts": parts["activation_matrix"].to_dense().contiguous(),
               "recon": parts["reconstruction"].contiguous()}, str(d / "ct_outputs.safetensors"))
    tc.to_safetensors(str(d / "ct_written"))
print(json.dumps({"circuit_tracer": version("circuit-tracer"), "torch": torch.__version__}))
'''


def build(kind: str, activation: str, skip: bool, seed: int) -> Transcoder:
    """A random transcoder whose biases, thresholds and skip are nonzero, so a swap would show."""
    config = TranscoderConfig(
        kind=kind,
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        n_features=N_FEATURES,
        activation=activation,
        skip=skip,
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    tc = Transcoder.random(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in tc.named_parameters():
            if name in ("b_enc", "b_dec", "W_skip"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name == "activation.threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
    return tc


def expected_ct_state(tc: Transcoder) -> dict[str, torch.Tensor]:
    """cltrace's tensors under circuit-tracer's module names and orientations."""
    threshold = getattr(tc.activation, "threshold", None)
    if tc.config.kind == "clt":
        state = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        state |= {f"W_dec.{i}": w for i, w in enumerate(tc.W_dec)}
        if threshold is not None:
            state["activation_function.threshold"] = threshold[:, None, :]  # [L, 1, F]
        return {k: v.detach() for k, v in state.items()}
    state = {}
    for i in range(tc.config.n_layers):
        prefix = f"transcoders.{i}."
        state |= {prefix + "W_enc": tc.W_enc[i], prefix + "W_dec": tc.W_dec[i]}
        state |= {prefix + "b_enc": tc.b_enc[i], prefix + "b_dec": tc.b_dec[i]}
        if threshold is not None:
            state[prefix + "activation_function.threshold"] = threshold[i]
        if tc.W_skip is not None:
            state[prefix + "W_skip"] = tc.W_skip[i].T  # circuit-tracer applies x @ W_skip.T
    return {k: v.detach() for k, v in state.items()}


def ensure_venv(venv: Path) -> Path:
    """The virtualenv's python, installing circuit-tracer 0.5.0 into it unless it is already there."""
    python = venv / "bin" / "python"
    probe = "from importlib.metadata import version; assert version('circuit-tracer') == '0.5.0'; import circuit_tracer"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        print(f"reusing {venv}", flush=True)
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing circuit-tracer 0.5.0 into {venv} (several minutes)", flush=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *PIP_PACKAGES], check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/ct-venv"), help="circuit-tracer virtualenv")
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep the transcoders (default: temp)")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return check(args.workdir, args.venv)
    with tempfile.TemporaryDirectory(prefix="cltrace-ct-check-") as work:
        return check(Path(work), args.venv)


def check(work: Path, venv: Path) -> int:
    """Run the whole check with files under `work`; 0 when it passes."""
    start = time.time()

    transcoders: dict[str, Transcoder] = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_POS, N_LAYERS, D_MODEL, generator=g) * 2  # [pos, L, d]
    for seed, (case, spec) in enumerate(CASES.items()):
        tc = transcoders[case] = build(**spec, seed=seed)
        save_transcoder(tc, work / case / "native", overwrite=True)
        # Through the command line, as a user would.
        subprocess.run(
            [sys.executable, "-m", "cltrace", "convert", str(work / case / "native"), str(work / case / "export"),
             "--to", "circuit-tracer", "--force"],
            check=True, stdout=subprocess.DEVNULL,
        )
        save_file({"x": x}, str(work / case / "reference.safetensors"))

    python = ensure_venv(venv)
    kinds = {case: spec["kind"] for case, spec in CASES.items()}
    ran = subprocess.run([python, "-c", CT_SNIPPET, str(work), json.dumps(kinds)], capture_output=True, text=True)
    if ran.returncode != 0:
        print(ran.stderr[-4000:], file=sys.stderr)
        print("FAIL circuit-tracer could not load cltrace's export (see above)")
        return 1
    versions = json.loads(ran.stdout.strip().splitlines()[-1])

    cases, ok = [], True
    for case, tc in transcoders.items():
        problems: list[str] = []
        expected = expected_ct_state(tc)
        loaded = load_file(work / case / "ct_state.safetensors")
        if loaded.keys() != expected.keys():
            problems.append(f"tensor names differ: {sorted(loaded.keys() ^ expected.keys())}")
        unequal = [k for k in expected.keys() & loaded.keys() if not torch.equal(loaded[k], expected[k])]
        problems += [f"{k} differs" for k in sorted(unequal)]

        with torch.no_grad():
            acts, recon = tc(x)  # [pos, L, F], [pos, L, d]
        outputs = load_file(work / case / "ct_outputs.safetensors")
        acts_diff = max_diff(outputs["acts"].transpose(0, 1), acts)
        recon_diff = max_diff(outputs["recon"].transpose(0, 1), recon)
        if acts_diff > 1e-5 or recon_diff > 1e-5:
            problems.append(f"outputs differ: activations by {acts_diff:.2e}, reconstruction by {recon_diff:.2e}")

        # The other direction: circuit-tracer's own writer, read by cltrace.
        back = load_transcoder(work / case / "ct_written")
        ours, theirs = tc.state_dict(), back.state_dict()
        reloaded = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        if not reloaded:
            problems.append("cltrace did not read circuit-tracer's own files back to the same tensors")

        ok &= not problems
        cases.append({
            "case": case,
            **CASES[case],
            "tensors_compared": len(expected),
            "active_features": int((acts != 0).sum()),
            "max_abs_diff_activations": acts_diff,
            "max_abs_diff_reconstruction": recon_diff,
            "circuit_tracer_files_reloaded_identically": reloaded,
            "problems": problems,
        })
        print(f"{case}: {'ok' if not problems else '; '.join(problems)}", flush=True)

    result = {
        "check": "circuit-tracer format compatibility",
        "result": "PASS" if ok else "FAIL",
        "circuit_tracer_version": versions["circuit_tracer"],
        "circuit_tracer_venv_torch": versions["torch"],
        "shape": {"n_layers": N_LAYERS, "d_model": D_MODEL, "n_features": N_FEATURES, "n_positions": N_POS},
        "cases": cases,
        "seconds": round(time.time() - start, 1),
    }
    write_result("circuit_tracer_format", result)
    n_tensors = sum(c["tensors_compared"] for c in cases)
    print(
        f"{result['result']} circuit-tracer {versions['circuit_tracer']} loads cltrace's export of "
        f"{len(cases)} transcoders ({n_tensors} tensors equal, outputs match) and cltrace reads its files back"
        if ok
        else f"FAIL circuit-tracer format check: see {RESULTS}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
