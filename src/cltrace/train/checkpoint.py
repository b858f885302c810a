"""Checkpoints of a training run in either layout: one process's `state.pt` or sharded step folders.

Sharded: `checkpoint/step-<step>/shard-<i>-of-<n>.pt` (one per feature slice, with its optimiser
state and dead-feature counters), `common.pt` (step, schedule position, data position, RNG,
normalisation) and `checkpoint/manifest.json`, written last, naming the step folder. A reader takes
the parts of every shard that overlap its own slice, so a checkpoint resumes on any number of ranks
(one process included), and one process's `state.pt` resumes on many.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cltrace.errors import CltraceError

MANIFEST_FILE = "manifest.json"
COMMON_FILE = "common.pt"
SINGLE_STATE_FILE = "state.pt"  # the one-process checkpoint (see cltrace.train.trainer)
MANIFEST_FORMAT = "cltrace-sharded-checkpoint"
MANIFEST_VERSION = 1


# -- slicing features --------------------------------------------------------------------------------


def feature_slice(n_features: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` of `parts` near-equal parts of n_features features (the first ones larger)."""
    if n_features < parts:
        raise CltraceError(f"n_features={n_features} is fewer than the {parts} feature-parallel ranks; "
                           "lower --feature-parallel or raise n_features")
    base, extra = divmod(n_features, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def feature_axis(name: str, kind: str) -> int | None:
    """The feature axis of full-transcoder tensor `name` (a state_dict key), None if replicated."""
    if name in ("W_enc", "b_enc", "activation.threshold"):
        return 1  # [L, F, d], [L, F], [L, F]
    if name == "W_dec":
        return 1  # PLT [L, F, d]
    if name.startswith("W_dec."):
        return 0  # CLT layer l: [F, L - l, d]
    if name in ("b_dec", "W_skip"):
        return None
    raise CltraceError(f"unknown transcoder tensor {name!r} in a checkpoint")


def _narrow(t: torch.Tensor, axis: int | None, start: int, end: int) -> torch.Tensor:
    return t if axis is None else t.narrow(axis, start, end - start)


def _joined(parts: list[Any], axis: int | None) -> Any:
    """A copy of the shards' parts of one value joined along its feature axis (a replicated value has one part)."""
    joined = parts[0] if len(parts) == 1 or axis is None else torch.cat(parts, dim=axis)
    return joined.clone() if torch.is_tensor(joined) else joined


# -- reading and writing checkpoints of any layout ---------------------------------------------------


def has_checkpoint(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds a checkpoint of either layout."""
    return (ckpt_dir / MANIFEST_FILE).is_file() or (ckpt_dir / SINGLE_STATE_FILE).is_file()


def checkpoint_file(ckpt_dir: Path) -> Path:
    """The file a user would name for the checkpoint in `ckpt_dir` (manifest or state.pt)."""
    return ckpt_dir / MANIFEST_FILE if (ckpt_dir / MANIFEST_FILE).is_file() else ckpt_dir / SINGLE_STATE_FILE


def describe_checkpoint(ckpt_dir: Path) -> str:
    """Where a stopped run stands and how to continue it, for error messages."""
    manifest = ckpt_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            step = json.loads(manifest.read_text(encoding="utf-8"))["step"]
        except (OSError, ValueError, KeyError):
            step = "?"
        where = f"the last checkpoint (step {step}) is in {ckpt_dir}"
    elif (ckpt_dir / SINGLE_STATE_FILE).is_file():
        where = f"the last checkpoint is {ckpt_dir / SINGLE_STATE_FILE}"
    else:
        return "no checkpoint was written yet: start the run again"
    return f"{where}; rerun the same command with --resume (on any number of ranks) to continue from it"


def remove_stale(ckpt_dir: Path, keep: str | None) -> None:
    """Delete step folders other than `keep` and, once a sharded checkpoint exists, the one-process state.pt."""
    for old in ckpt_dir.glob("step-*"):
        if old.is_dir() and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    if keep is not None:
        (ckpt_dir / SINGLE_STATE_FILE).unlink(missing_ok=True)
    else:  # a one-process state.pt was just written: the sharded checkpoint is older
        (ckpt_dir / MANIFEST_FILE).unlink(missing_ok=True)


def _load(path: Path) -> Any:
    # torch's file is a zip whose every record carries a CRC32, but torch.load checks none of them
    # (a flipped byte in a tensor loads as a wrong weight): check them all first (a fast pass beside
    # the load itself).
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    # missing, truncated, not a zip; a flipped flag byte reads as encryption or an unknown compression
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
        raise CltraceError(f"cannot read checkpoint {path} ({type(exc).__name__}); delete the folder to start afresh") from None
    if damaged is not None:
        raise CltraceError(f"checkpoint {path} is damaged (its record {damaged!r} fails its CRC32); delete the folder to start afresh")
    try:
        # weights_only: tensors and plain containers only; a checkpoint never holds code to run.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged or missing file: say so, never start over silently
        raise CltraceError(f"cannot read checkpoint {path} ({type(exc).__name__}); delete the folder to start afresh") from None


def optimizer_by_name(opt: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]) -> dict[str, dict[str, Any]]:
    """Adam's per-parameter state keyed by tensor name (not by position, which differs between layouts)."""
    return {name: dict(opt.state[p]) for name, p in named if p in opt.state}


def load_optimizer_by_name(opt: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]],
                           state: dict[str, dict[str, Any]]) -> None:
    """Restore per-parameter state saved by `optimizer_by_name` (moved to each parameter's device)."""
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    sd["state"] = {
        index[id(p)]: {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state[name].items()}
        for name, p in named if name in state
    }
    opt.load_state_dict(sd)


def read_checkpoint(ckpt_dir: Path, start: int, end: int) -> dict[str, Any]:
    """The checkpoint in `ckpt_dir`, either layout, with features [start, end) of every sharded tensor.

    Returns the common fields of a one-process `state.pt` (version, config, fingerprint, step,
    tokens, data, scale_x, scale_y, rng, elapsed) and `tensors` {name: tensor}, `adam` {name:
    {step, exp_avg, exp_avg_sq}} and `last_fired` [L, end − start], cut to the slice.
    """
    try:
        return _read_checkpoint(ckpt_dir, start, end)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        # A file that loads (its CRCs hold) but lacks what a checkpoint holds: not one cltrace wrote.
        raise CltraceError(f"the checkpoint in {ckpt_dir} does not have a checkpoint's structure ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else '?'}); delete the folder to start afresh") from None


def _read_checkpoint(ckpt_dir: Path, start: int, end: int) -> dict[str, Any]:
    manifest_path = ckpt_dir / MANIFEST_FILE
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            assert manifest["format"] == MANIFEST_FORMAT
        except Exception:  # noqa: BLE001 - any damage reads the same to the user
            raise CltraceError(f"checkpoint manifest {manifest_path} is damaged; delete the folder to start afresh") from None
        if manifest.get("version") != MANIFEST_VERSION:
            raise CltraceError(f"checkpoint {manifest_path} has version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
        folder = ckpt_dir / manifest["folder"]
        state = dict(_load(folder / COMMON_FILE))
        if not 0 <= start < end <= manifest["n_features"]:
            raise CltraceError(f"checkpoint {manifest_path} has {manifest['n_features']} features per layer; "
                               f"features [{start}, {end}) were asked for")
        parts = [(s["start"], s["end"], folder / s["file"]) for s in manifest["shards"]]
        kind = state["config"]["kind"]
        opened = [(s, e, _load(path)) for s, e, path in parts if s < end and e > start]
    else:
        path = ckpt_dir / SINGLE_STATE_FILE
        whole = _load(path)
        state = {k: v for k, v in whole.items() if k not in ("transcoder", "optimizer", "last_fired")}
        kind = whole["config"]["kind"]
        names = list(whole["transcoder"])  # a module's state_dict follows its parameters' order
        adam = {names[i]: st for i, st in whole["optimizer"]["state"].items()}
        n = whole["last_fired"].shape[1]
        opened = [(0, n, {"tensors": whole["transcoder"], "adam": adam, "last_fired": whole["last_fired"]})]
    tensors: dict[str, list[torch.Tensor]] = {}
    adam_parts: dict[str, dict[str, list[Any]]] = {}
    fired: list[torch.Tensor] = []
    for s, e, shard in opened:  # each shard's overlap with [start, end), in feature order
        lo, hi = max(s, start) - s, min(e, end) - s
        for name, t in shard["tensors"].items():
            axis = feature_axis(name, kind)
            if axis is None:
                tensors.setdefault(name, [t])
                continue
            tensors.setdefault(name, []).append(_narrow(t, axis, lo, hi))
        for name, st in shard["adam"].items():
            axis = feature_axis(name, kind)
            slot = adam_parts.setdefault(name, {})
            for k, v in st.items():
                cut = torch.is_tensor(v) and v.dim() > 0 and axis is not None
                if cut or k not in slot:
                    slot.setdefault(k, []).append(_narrow(v, axis, lo, hi) if cut else v)
        fired.append(shard["last_fired"][:, lo:hi])
    state["tensors"] = {n: _joined(ts, feature_axis(n, kind)) for n, ts in tensors.items()}
    state["adam"] = {n: {k: _joined(vs, feature_axis(n, kind)) for k, vs in st.items()} for n, st in adam_parts.items()}
    state["last_fired"] = torch.cat(fired, dim=1).clone()
    return state


__all__ = [
    "COMMON_FILE", "MANIFEST_FILE", "MANIFEST_FORMAT", "MANIFEST_VERSION", "SINGLE_STATE_FILE", "checkpoint_file",
    "describe_checkpoint", "feature_axis", "feature_slice", "has_checkpoint", "load_optimizer_by_name",
    "optimizer_by_name", "read_checkpoint", "remove_stale",
]
