"""Reading the files of a saved transcoder: safetensors, JSON, digests and dtype names, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cltrace.errors import CltraceError, first_line
from cltrace.transcoder.config import DTYPES


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or a CltraceError naming the file."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CltraceError(
            f"{file} cannot be read as safetensors ({first_line(e)}); it is truncated or damaged: re-export it"
        ) from None


def _take(tensors: dict[str, torch.Tensor], file: Path, name: str, ndim: int) -> torch.Tensor:
    if name not in tensors:
        raise CltraceError(f"{file} has no tensor {name!r}; it is not a complete circuit-tracer file")
    if tensors[name].dim() != ndim:
        raise CltraceError(f"{file}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {ndim} dims")
    return tensors[name]


def _check_names(tensors: dict[str, torch.Tensor], file: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Exactly the tensors `shapes` names, each with its shape (a threshold may carry a leading 1)."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise CltraceError(f"{file} has no tensor {name!r}; it is not a complete circuit-tracer file")
        got = tuple(tensors[name].shape)
        if got != shape and not ("threshold" in name and tensors[name].numel() == shape[0] and len(got) == 2):
            raise CltraceError(f"{file}: tensor {name} has shape {got}, expected {shape} (dims differ across files)")
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise CltraceError(f"{file} has unexpected tensor(s) {', '.join(unexpected)} that cltrace cannot load")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, a huge integer
        raise CltraceError(f"{file} is not valid JSON ({first_line(e)}); it is damaged: re-export the transcoder") from None
    if not isinstance(data, dict):
        raise CltraceError(f"{file} does not hold a JSON object; it is damaged: re-export the transcoder")
    return data


def _dtype_name(dtype: torch.dtype | str, where: Path | None = None) -> str:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPES:
            return name
    else:
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    source = f"{where} holds weights of " if where is not None else ""
    raise CltraceError(f"{source}unsupported transcoder dtype {dtype}; use one of {', '.join(DTYPES)}")
