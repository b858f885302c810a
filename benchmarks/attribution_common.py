"""What the attribution benchmarks share: the long prompt, a realistic random CLT, and a watched subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ACTIVE_PER_LAYER = 4.6
CALIBRATION_TEXT = (
    "The National Digital Analytics Group (NDAG) is an organisation that collects, cleans and publishes "
    "statistics about how people use public websites, and it compares each year with the last. "
)

LONG_TEXT = (
    "The National Digital Analytics Group (NDAG) is an organisation that collects, cleans and publishes "
    "statistics about how people use public websites. Its annual report describes the number of visits, "
    "the devices people used and the pages they read most often, and it compares each year with the last. "
    "In 2023 the group added a section on accessibility, after many readers asked how well the sites work "
    "with screen readers and keyboard navigation. The report is free to download, and the raw tables are "
    "published under an open licence so that anyone can check the figures."
)


def realistic_random_clt(model, n_features: int = 256, seed: int = 0, ids: torch.Tensor | None = None):
    """A seeded random JumpReLU CLT for `model` whose per-layer thresholds make about
    ACTIVE_PER_LAYER features fire per layer and token on English text (or on the token ids [pos] `ids`)."""
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoder import Transcoder, TranscoderConfig

    cfg = TranscoderConfig(kind="clt", n_layers=model.n_layers, d_model=model.d_model, n_features=n_features,
                           activation="jumprelu", model_id="default")
    tc = Transcoder.random(cfg, seed=seed, device=model.device)
    with torch.no_grad():
        run = ReplacementModel(model, tc).run(model.encode(CALIBRATION_TEXT * 4) if ids is None else ids)
        pre = run.pre_activations[1:].permute(1, 0, 2).reshape(model.n_layers, -1)  # [layer, pos * F]
        q = torch.quantile(pre.float(), 1 - ACTIVE_PER_LAYER / n_features, dim=1)  # [layer]
        tc.activation.threshold.copy_(q.clamp(min=1e-3)[:, None].expand_as(tc.activation.threshold))
    return tc


def run_watched(cmd: list[str], timeout_s: float, max_rss_gb: float, env: dict | None = None) -> dict:
    """Run `cmd`, polling its RSS; stop it past the time or memory limit. Returns wall time, peak RSS
    (from wait4, the kernel's high-water mark), its last stdout line as JSON, and how it ended."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        # Output goes to files, not pipes: a full pipe would stall the child.
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, text=True, env=env)
        limit_kb, ended, polled_kb = max_rss_gb * 2**20, "ok", 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps it with its rusage once it has ended
            if pid:
                break
            try:
                rss = next(int(x.split()[1]) for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                           if x.startswith("VmRSS:"))
                polled_kb = max(polled_kb, rss)
            except (OSError, StopIteration):
                rss = 0
            if time.perf_counter() - t0 > timeout_s or rss > limit_kb:
                ended = "timeout" if rss <= limit_kb else "memory limit"
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.25)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    wall = time.perf_counter() - t0
    result = {"ended": ended, "returncode": proc.returncode, "process_wall_s": round(wall, 2),
              "peak_rss_gb": round(max(usage.ru_maxrss, polled_kb) / 2**20, 3)}
    if ended == "ok" and proc.returncode == 0:
        result |= json.loads(out.strip().splitlines()[-1])
    else:
        result["stderr_tail"] = err[-2000:]
        if ended == "ok":
            ended = result["ended"] = f"failed (exit {proc.returncode})"
    return result
