"""Saving and loading transcoders: cltrace's native directory and circuit-tracer's layouts.

Native (`format="native"`), a directory holding
    config.json              TranscoderConfig fields, `format: "cltrace-transcoder"`,
                             `format_version: 2`, `sha256: {"transcoder.safetensors": hex}` and
                             `config_sha256`: the sha256 of the file's other keys (canonical JSON),
                             so that a damaged config.json is refused rather than read as another
                             config (version 1, without it, is still read)
    transcoder.safetensors   the module's state dict: W_enc, b_enc, b_dec, activation.threshold,
                             W_dec (PLT) or W_dec.{l} (CLT), W_skip (PLT with skip)

circuit-tracer 0.5.0 (`format="circuit-tracer"`), as its `load_clt` and `load_transcoder_set`
read them:
    CLT   W_enc_{i}.safetensors   W_enc_{i} [F, d], b_enc_{i} [F], b_dec_{i} [d], threshold_{i} [F]
                                  (threshold only for JumpReLU; without it the CLT is a ReLU one)
          W_dec_{i}.safetensors   W_dec_{i} [F, L - i, d]
    PLT   layer_{i}.safetensors   W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d],
                                  activation_function.threshold [F] (JumpReLU only),
                                  W_skip [d, d] applied as x @ W_skip.T (the transpose of ours)
    both  config.yaml             model_kind (cross_layer_transcoder | transcoder_set),
                                  feature_input_hook: hook_resid_mid,
                                  feature_output_hook: hook_mlp_out, model_name (if known)

The PLT config.yaml has no `transcoders` list: circuit-tracer reads a list entry that is not an
hf:// URI as a path relative to the working directory, whereas without one both its cache loader
and its hub loader pick up `layer_*.safetensors` beside config.yaml. A TopK PLT is written with
`activation: topk` and `k`, which circuit-tracer after 0.5.0 reads; 0.5.0 itself loads it as ReLU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from cltrace.atomic import fsync_directory
from cltrace.device import resolve_device
from cltrace.errors import CltraceError, is_int
from cltrace.fingerprint import file_sha256, json_digest
from cltrace.transcoder.circuit_tracer import (
    CT_CONFIG,
    check_compatible,
    read_clt,
    read_ct_config,
    read_plt,
    write_circuit_tracer,
)
from cltrace.transcoder.config import TranscoderConfig
from cltrace.transcoder.files import _dtype_name, _read_json, _read_safetensors
from cltrace.transcoder.transcoder import Transcoder, make_transcoder

NATIVE_FORMAT = "cltrace-transcoder"
NATIVE_VERSION = 2
#: Native versions this cltrace reads; version 1 has no `config_sha256`.
NATIVE_READABLE = (1, 2)
CONFIG_DIGEST_KEY = "config_sha256"
CONFIG_JSON = "config.json"
WEIGHTS = "transcoder.safetensors"
SAVE_FORMATS = ("native", "circuit-tracer")
DETECTED_FORMATS = ("native", "circuit-tracer-clt", "circuit-tracer-plt")

PathLike = str | os.PathLike[str]


# -- public API ----------------------------------------------------------------------------------


def detect_format(path: PathLike) -> str:
    """Which layout the directory `path` holds: "native", "circuit-tracer-clt" or "circuit-tracer-plt"."""
    path = Path(path)
    if not path.exists():
        raise CltraceError(f"{path} does not exist; pass the directory of a saved transcoder")
    if not path.is_dir():
        raise CltraceError(f"{path} is a file; pass the directory that holds it (a transcoder is a directory)")
    if (path / CONFIG_JSON).is_file() and _read_json(path / CONFIG_JSON).get("format") == NATIVE_FORMAT:
        return "native"
    if (path / "W_enc_0.safetensors").is_file():
        return "circuit-tracer-clt"
    if (path / "layer_0.safetensors").is_file():
        return "circuit-tracer-plt"
    if (path / CT_CONFIG).is_file():
        kind = read_ct_config(path).get("model_kind")
        wanted = {"cross_layer_transcoder": "W_enc_0.safetensors", "transcoder_set": "layer_0.safetensors"}
        if kind in wanted:
            raise CltraceError(f"{path / CT_CONFIG} describes a {kind} but {path / wanted[kind]} is missing")
    raise CltraceError(
        f"{path} is not a transcoder directory: expected {CONFIG_JSON} (cltrace), W_enc_0.safetensors "
        f"(circuit-tracer CLT) or layer_0.safetensors (circuit-tracer transcoder set)"
    )


def save_transcoder(
    tc: Transcoder, path: PathLike, format: str = "native", overwrite: bool = False
) -> Path:
    """Write `tc` to the directory `path` in `format` ("native" or "circuit-tracer").

    The directory is written whole into a temporary sibling and then renamed into place, so a
    crash leaves either the old directory or the new one. An existing non-empty directory is
    replaced only with `overwrite=True`, and only if it holds a transcoder.
    """
    if format not in SAVE_FORMATS:
        raise CltraceError(f"unknown transcoder format {format!r}; use one of {', '.join(SAVE_FORMATS)}")
    writer = _write_native if format == "native" else write_circuit_tracer
    if format == "circuit-tracer":
        check_compatible(tc)
    return _write_directory(Path(path), lambda tmp: writer(tc, tmp), overwrite)


def load_transcoder(
    path: PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    verify: bool = True,
) -> Transcoder:
    """Load a transcoder from a native or circuit-tracer directory (the layout is detected).

    `device`: where the weights go ("cpu", "auto", "cuda", "cuda:N", "mps"; the functions that run a
    transcoder with a model move it to the model's device). `dtype` (default: as stored) sets the
    weights' dtype; JumpReLU thresholds stay fp32.
    `verify` checks a native file against its recorded sha256 before reading it.
    """
    target = resolve_device(device)  # a device this machine lacks is refused before anything is read
    path = Path(path)
    fmt = detect_format(path)
    dtype_name = _dtype_name(dtype) if dtype is not None else None
    if fmt == "native":
        config, state = _read_native(path, verify)
    elif fmt == "circuit-tracer-clt":
        config, state = read_clt(path)
    else:
        config, state = read_plt(path)
    if dtype_name is not None:
        config = dataclasses.replace(config, dtype=dtype_name)
    return _build(config, state, path).to(target)


# -- atomic directory writes ---------------------------------------------------------------------


def _write_directory(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise CltraceError(f"{path} exists and is a file; choose a directory path for the transcoder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CltraceError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
        try:
            detect_format(path)
        except CltraceError:
            raise CltraceError(
                f"refusing to overwrite {path}: it does not hold a transcoder; choose another path"
            ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        fsync_directory(tmp, files=True)
        if path.exists():
            # Swap: the old directory is moved aside whole, never partly replaced.
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -- native --------------------------------------------------------------------------------------


def _write_native(tc: Transcoder, directory: Path) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in tc.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": NATIVE_FORMAT})
    meta = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        **tc.config.to_dict(),
        "sha256": {WEIGHTS: file_sha256(directory / WEIGHTS)},
    }
    meta[CONFIG_DIGEST_KEY] = _config_digest(meta)
    (directory / CONFIG_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def _config_digest(meta: dict) -> str:
    """sha256 of config.json's keys other than `config_sha256`, as canonical JSON (sorted keys, no
    spaces), so that it survives re-indenting but not a changed value."""
    body = {k: v for k, v in meta.items() if k != CONFIG_DIGEST_KEY}
    return json_digest(body)


def _read_native(path: Path, verify: bool) -> tuple[TranscoderConfig, dict[str, torch.Tensor]]:
    file = path / CONFIG_JSON
    meta = _read_json(file)
    version = meta.get("format_version")
    if not is_int(version) or version not in NATIVE_READABLE:
        newer = is_int(version) and version > NATIVE_VERSION
        raise CltraceError(
            f"{file} has format_version {version!r}; this cltrace reads versions "
            f"{', '.join(map(str, NATIVE_READABLE))}: "
            + ("upgrade cltrace" if newer else "the file is damaged or not cltrace's: re-export the transcoder")
        )
    # Checked before any field is interpreted: a damaged config.json reads as this one message.
    recorded = meta.get(CONFIG_DIGEST_KEY)
    if recorded is None and version >= 2:
        raise CltraceError(f"{file} has no {CONFIG_DIGEST_KEY}, which format_version {version} requires: the file is "
                           "damaged; re-export the transcoder")
    if recorded is not None and recorded != _config_digest(meta):
        raise CltraceError(f"{file} does not match its {CONFIG_DIGEST_KEY}: the file is damaged or was edited; "
                           "re-export the transcoder")
    checksums = meta.get("sha256")
    if not isinstance(checksums, dict) or not isinstance(checksums.get(WEIGHTS), str):
        raise CltraceError(f"{path / CONFIG_JSON} has no sha256 for {WEIGHTS}; re-export the transcoder")
    fields = {k: v for k, v in meta.items() if k not in ("format", "format_version", "sha256", CONFIG_DIGEST_KEY)}
    try:
        config = TranscoderConfig.from_dict(fields)
    except CltraceError as e:
        raise CltraceError(f"{path / CONFIG_JSON}: {e}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CltraceError(f"{weights} is missing; the transcoder directory is incomplete: re-export it")
    if verify and file_sha256(weights) != checksums[WEIGHTS]:
        raise CltraceError(
            f"{weights} does not match the sha256 recorded in {CONFIG_JSON}: the file is damaged or was "
            f"changed; re-export it"
        )
    return config, _read_safetensors(weights)


def _build(config: TranscoderConfig, state: dict[str, torch.Tensor], source: Path) -> Transcoder:
    """A transcoder of `config` holding `state`, checked name by name and shape by shape."""
    with torch.device("meta"):
        tc = make_transcoder(config)
    expected = tc.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CltraceError(f"{source}: missing tensor(s) {', '.join(missing)}; re-export the transcoder")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CltraceError(f"{source}: unexpected tensor(s) {', '.join(unexpected)} for a {config.kind} of this config")
    converted = {}
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CltraceError(
                f"{source}: tensor {name} has shape {tuple(got.shape)} but the config needs {tuple(want.shape)}"
            )
        converted[name] = got.to(torch.float32 if name == "activation.threshold" else config.torch_dtype)
    tc.load_state_dict(converted, assign=True)
    return tc
