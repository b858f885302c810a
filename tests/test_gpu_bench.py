"""benchmarks/gpu.py runs end to end at its tiny size on the CPU, so that a GPU run is spent on figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu", "--results", str(tmp_path),
         "--name", "tiny"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["device"] == "cpu (cpu)" and result["tiny"] is True
    assert result["model"]["family"] == "gemma2" and result["model"]["num_hidden_layers"] == 4
    runs = result["attribution"]["runs"]
    assert set(runs) == {"16tok", "48tok"}
    for run in runs.values():
        assert run["cltrace"]["ended"] == "ok" and run["cltrace"]["n_edges"] > 0
    if importlib.util.find_spec("circuit_tracer") is None:
        assert result["attribution"]["circuit_tracer"].startswith("skipped: circuit-tracer is not importable")
    assert result["longest_prompt"]["longest_ok_tokens"] == 128
    assert result["training"]["device_tokens_per_s"] > 0 and result["training"]["device_over_cpu"] == 1.0
    assert result["feature_pages"]["tokens_per_s"] > 0 and result["feature_pages"]["n_tokens"] == 1024
