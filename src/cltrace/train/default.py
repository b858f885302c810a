"""The transcoder called `default`: the default CLT for the default model, trained on first use.

Wherever a command takes a transcoder, the name `default` resolves here (`resolve_transcoder`).
The transcoder lives in the user's cache at

    cache_dir()/transcoders/default-<hash>/    the finished transcoder (moved there atomically)
    cache_dir()/runs/default-<hash>/           its run folder: config, metrics, curves, eval.json,
                                               and the checkpoint while it trains

where <hash> is a short hash of the preset's settings (those that differ from TrainConfig's
defaults), so changing the preset (or choosing another one with $CLTRACE_DEFAULT_PRESET, e.g. `tiny`
for tests and the impatient) never reuses a transcoder trained with other settings, while a new
setting whose default keeps the old behaviour reuses it. If it is missing it is trained with the preset, saying how
long that will take first; a run stopped halfway resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cltrace.cache import cache_dir
from cltrace.errors import CltraceError
from cltrace.fingerprint import sha256_hex
from cltrace.locks import locked
from cltrace.model.load import LoadedModel
from cltrace.train.config import PRESETS, TrainConfig, preset
from cltrace.train.run import train_transcoder
from cltrace.train.run_dir import CHECKPOINT_DIR, EVAL_FILE, TRANSCODER_DIR
from cltrace.transcoder import Transcoder, load_transcoder

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"
PRESET_ENV = "CLTRACE_DEFAULT_PRESET"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_preset_name() -> str:
    """The preset the `default` transcoder is trained with: $CLTRACE_DEFAULT_PRESET, else "default"."""
    name = os.environ.get(PRESET_ENV, "").strip() or "default"
    if name not in PRESETS:
        raise CltraceError(f"${PRESET_ENV}={name!r} is not a preset; choose one of {', '.join(PRESETS)} or unset it")
    return name


def config_hash(config: TrainConfig) -> str:
    """A short hash (12 hex digits) of the fields of `config` that differ from TrainConfig's defaults:
    a field added later with a default that keeps the old behaviour leaves every hash, and so every
    cached transcoder, as it was."""
    defaults = type(config)().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if k not in defaults or v != defaults[k]}
    return sha256_hex(json.dumps(changed, sort_keys=True))[:12]


def default_paths(config: TrainConfig | None = None) -> tuple[Path, Path]:
    """(transcoder folder, run folder) of the default transcoder of `config` (default: the current preset)."""
    config = config or preset(default_preset_name())
    key = f"{DEFAULT_NAME}-{config_hash(config)}"
    return cache_dir() / "transcoders" / key, cache_dir() / "runs" / key


def default_transcoder_path(
    *,
    echo: Callable[[str], None] = _stderr,
    progress: bool = True,
    model: LoadedModel | None = None,
    source: Any = None,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    bos_id: int | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """The folder of the default transcoder, trained into the cache first if it is not there yet.

    `model`, `source`, `tokenize` and `bos_id` stand in for the preset's model and text (tests);
    `device`: where it trains (None: where `model` is, else "auto").
    """
    name = default_preset_name()
    config = preset(name)
    target, run = default_paths(config)
    if target.is_dir():
        shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)  # left if a run died right after the move
        return target
    # One process trains it; any other asking meanwhile (a second command, the server) waits for it.
    run.parent.mkdir(parents=True, exist_ok=True)
    with locked(run.parent / f"{run.name}.lock", "the default transcoder's training", wait=True,
                on_wait=lambda: echo(f"another process is training the default transcoder in {run}: waiting for it")):
        if target.is_dir():
            return target
        return _train_default(name, config, target, run, echo, progress, model, source, tokenize, bos_id, device)


def _train_default(
    name: str, config: TrainConfig, target: Path, run: Path, echo: Callable[[str], None], progress: bool,
    model: LoadedModel | None, source: Any, tokenize: Callable[[str], Sequence[int]] | None, bos_id: int | None,
    device: str | torch.device | None = None,
) -> Path:
    """Train the default transcoder into `run` (resuming it) and move it to `target`."""
    started = (run / CHECKPOINT_DIR).is_dir()
    echo(
        f"the default transcoder is not in the cache yet: {'resuming' if started else 'training'} it with the "
        f"'{name}' preset ({config.kind.upper()}, {config.n_features} features per layer, {config.total_tokens:,} tokens) "
        f"in {run}; once done it is kept in {target} and this is not repeated (a stopped run resumes)"
    )
    train_transcoder(config, run, resume=True, model=model, source=source, tokenize=tokenize, progress=progress,
                     estimate=True, echo=echo, bos_id=bos_id, device=device)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_dir():  # another process may have finished the same run first: keep theirs
        os.replace(run / TRANSCODER_DIR, target)  # a directory rename: atomic on one filesystem
    shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)  # hundreds of MB, of no use once finished
    shutil.rmtree(run / TRANSCODER_DIR, ignore_errors=True)
    echo(f"default transcoder ready: {target} (its evaluation: {run / EVAL_FILE})")
    return target


def resolve_transcoder(spec: str | os.PathLike[str], model_spec: str | None = None, **kwargs: Any) -> Path:
    """The transcoder folder a command was given: `default` is the default transcoder (trained on first
    use, see `default_transcoder_path`, which `kwargs` go to); anything else is a path, as given.

    `model_spec` is the model the command runs (None: the default model); the default transcoder
    is refused, before any training, for another model. A folder literally called `default` in the
    working directory wins over the cached transcoder (pass its absolute path to be unambiguous).
    """
    if os.fspath(spec) != DEFAULT_NAME:
        return Path(spec)
    local = Path(DEFAULT_NAME)
    if local.is_dir():
        log.info("using the folder ./%s, not the cached default transcoder", DEFAULT_NAME)
        return local
    if model_spec not in (None, DEFAULT_NAME):
        raise CltraceError(
            f"the transcoder 'default' belongs to the default model, not '{model_spec}'; drop --model, "
            "or give a transcoder trained on that model"
        )
    return default_transcoder_path(**kwargs)


def open_transcoder(spec: str | os.PathLike[str] | Transcoder, **kwargs: Any) -> Transcoder:
    """A transcoder from a folder, the name `default`, or a Transcoder (returned as is)."""
    if isinstance(spec, Transcoder):
        return spec
    return load_transcoder(resolve_transcoder(spec, **kwargs))


__all__ = [
    "DEFAULT_NAME",
    "PRESET_ENV",
    "config_hash",
    "default_paths",
    "default_preset_name",
    "default_transcoder_path",
    "open_transcoder",
    "resolve_transcoder",
]
