"""A training run's folder: the files it holds, which run it belongs to, and what killed writes left in it.

A run folder holds

    config.json      the TrainConfig (a folder holds one run: another config is refused)
    checkpoint/      the checkpoint (see `cltrace.train.checkpoint`)
    metrics.jsonl    one JSON line per `log_every` steps
    curves.png       the training curves, drawn at the end
    transcoder/      the trained transcoder, normalisation folded in (works on raw activations)
    eval.json        the final evaluation on held-out text (written by `train_transcoder`)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from cltrace.atomic import atomic_write_text
from cltrace.errors import CltraceError
from cltrace.resources import available_device_memory_bytes, available_memory_bytes
from cltrace.train.checkpoint import COMMON_FILE, MANIFEST_FILE, has_checkpoint
from cltrace.train.config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TRANSCODER_DIR = "transcoder"
EVAL_FILE = "eval.json"

#: Files a run writes through `cltrace.atomic` (a kill mid-write leaves `.NAME.XXXX.tmp` beside them).
_ATOMIC_FILES = (CONFIG_FILE, METRICS_FILE, CURVES_FILE, EVAL_FILE, STATE_FILE, MANIFEST_FILE, COMMON_FILE)


def is_debris(path: Path) -> bool:
    """Whether `path` in a run folder (or its checkpoint folder) is what a killed write left behind:
    a temporary file of one of the run's own files, or a transcoder directory being swapped in."""
    name = path.name
    if name.startswith((f".{TRANSCODER_DIR}.tmp-", f".{TRANSCODER_DIR}.old-")):
        return True
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in _ATOMIC_FILES)


def remove_debris(out: Path) -> None:
    """Delete what killed writes left in the run folder `out` and its checkpoint folder.

    Called only once `out` is known to be this run's folder, when the run starts or resumes: the
    files are never read, but each one can be as large as a checkpoint or a transcoder.
    """
    for folder in (out, out / CHECKPOINT_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if is_debris(path):
                log.info("removing %s (left by an interrupted run)", path)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def prepare_run_dir(out: Path, config: TrainConfig, resume: bool) -> bool:
    """Check `out` may hold this run; write config.json. Returns whether a checkpoint exists to resume.

    Refused: a file; a non-empty folder that is not a run folder; a run folder of another config
    (whatever `resume` says); this run's folder without `resume` (nothing is overwritten). A run
    folder that never reached its first checkpoint is reused as if new. A folder accepted loses the
    temporary files of writes a kill interrupted (`remove_debris`); one holding nothing else (a run
    killed while writing its first config.json) counts as empty.
    """
    if out.exists() and not out.is_dir():
        raise CltraceError(f"output '{out}' is a file; give a folder for the run")
    cfg_file = out / CONFIG_FILE
    if out.is_dir() and not cfg_file.exists() and all(is_debris(p) for p in out.iterdir()):
        remove_debris(out)  # a run killed while writing its config.json left only a temporary file
    if out.is_dir() and any(out.iterdir()):
        if not cfg_file.is_file():
            raise CltraceError(
                f"output folder '{out}' is not empty and holds no training run; choose a new or empty folder"
            )
        try:
            existing = TrainConfig.load(cfg_file)
        except CltraceError as exc:
            raise CltraceError(f"output folder '{out}' holds a run whose config cannot be read ({exc}); choose another folder") from None
        started = has_checkpoint(out / CHECKPOINT_DIR) or (out / TRANSCODER_DIR).exists()
        if not started:
            # A run that failed before its first checkpoint (e.g. an empty text source) holds nothing
            # worth keeping: start it afresh with the new config.
            remove_debris(out)
            atomic_write_text(cfg_file, config.to_json())
            metrics = out / METRICS_FILE
            if metrics.is_file():
                metrics.unlink()
            return False
        if existing != config:
            diff = [
                f"{k}={getattr(existing, k)!r}->{getattr(config, k)!r}"
                for k in config.to_dict()
                if getattr(existing, k) != getattr(config, k)
            ]
            raise CltraceError(
                f"output folder '{out}' holds another run (different config: {', '.join(diff[:4])}); "
                "choose a new folder, or resume that run with its own config"
            )
        if not resume:
            raise CltraceError(
                f"output folder '{out}' already holds this run; pass --resume to continue it, or choose a new folder"
            )
        remove_debris(out)
        return has_checkpoint(out / CHECKPOINT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_file, config.to_json())
    return False


def training_memory_bytes(config: TrainConfig, n_layers: int, d_model: int) -> int:
    """A lower bound on training's memory, the model aside: the transcoder's weights, gradients and
    Adam's two moments (four fp32 copies), the shuffle buffer of inputs and targets, one step's
    pre-activations, activations and reconstructions."""
    L, F, d = n_layers, config.n_features, d_model
    decoder = F * d * L * (L + 1) // 2 if config.kind == "clt" else F * d * L + (L * d * d if config.skip else 0)
    params = L * F * d + decoder + 3 * L * F + L * d
    harvest_bytes = 2 if config.harvest_dtype in ("bfloat16", "float16") else 4
    buffer = config.shuffle_contexts * config.n_ctx * L * d * 2 * harvest_bytes  # [tokens, layer, d] x and y
    step = config.batch_tokens * L * (3 * F + 4 * d) * 4
    return 16 * params + buffer + step


def refuse_if_too_big(config: TrainConfig, n_layers: int, d_model: int, device: torch.device | None = None) -> None:
    """Refuse, before anything is written, a config whose training would not fit in the memory available
    where it trains: a CUDA GPU's (free, plus what this process already holds there), else the host's."""
    need = training_memory_bytes(config, n_layers, d_model)
    if device is not None and device.type == "cuda":
        available, where = available_device_memory_bytes(device), f" on {device}"
    else:
        available, where = available_memory_bytes(), ""
    if available is not None and need > available:
        raise CltraceError(
            f"training {config.n_features} features per layer on {n_layers} layers of width {d_model} needs at least "
            f"{need / 2**30:.1f} GB, more than the {available / 2**30:.1f} GB available{where}: "
            "lower n_features (or shuffle_contexts, batch_tokens)"
        )


__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "CURVES_FILE", "EVAL_FILE", "METRICS_FILE", "STATE_FILE", "TRANSCODER_DIR",
    "is_debris", "prepare_run_dir", "refuse_if_too_big", "remove_debris", "training_memory_bytes",
]
