"""What every benchmark shares: a description of the machine and an atomic JSON result writer."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def best_of(fn: Callable[[], Any], repeats: int, warmup: bool = False) -> float:
    """The fastest of `repeats` timed calls of `fn` in seconds (the least disturbed on a shared machine),
    after one untimed call where `warmup`."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def save_figure(fig: Any, name: str, dpi: int = 120) -> Path:
    """Save a matplotlib figure as benchmarks/results/NAME.png (laid out tightly) and return its path."""
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    return path


def write_result(name: str, figures: dict[str, Any], directory: Path = RESULTS) -> Path:
    """Write benchmarks/results/NAME.json, or DIRECTORY/NAME.json (with the machine and date), via a temp file and rename."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **figures}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path
