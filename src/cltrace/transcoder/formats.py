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
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cltrace.atomic import fsync_directory
from cltrace.errors import CltraceError, first_line, is_int
from cltrace.fingerprint import file_sha256, json_digest
from cltrace.transcoder.activation import JumpReLU, TopK
from cltrace.transcoder.transcoder import DTYPES, Transcoder, TranscoderConfig, make_transcoder

NATIVE_FORMAT = "cltrace-transcoder"
NATIVE_VERSION = 2
#: Native versions this cltrace reads; version 1 has no `config_sha256`.
NATIVE_READABLE = (1, 2)
CONFIG_DIGEST_KEY = "config_sha256"
CONFIG_JSON = "config.json"
WEIGHTS = "transcoder.safetensors"
CT_CONFIG = "config.yaml"
CT_INPUT_HOOK = "hook_resid_mid"
CT_OUTPUT_HOOK = "hook_mlp_out"
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
        kind = _read_ct_config(path).get("model_kind")
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
    writer = _write_native if format == "native" else _write_circuit_tracer
    if format == "circuit-tracer":
        _check_circuit_tracer_compatible(tc)
    return _write_directory(Path(path), lambda tmp: writer(tc, tmp), overwrite)


def load_transcoder(
    path: PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    verify: bool = True,
) -> Transcoder:
    """Load a transcoder from a native or circuit-tracer directory (the layout is detected).

    `dtype` (default: as stored) sets the weights' dtype; JumpReLU thresholds stay fp32.
    `verify` checks a native file against its recorded sha256 before reading it.
    """
    path = Path(path)
    fmt = detect_format(path)
    dtype_name = _dtype_name(dtype) if dtype is not None else None
    if fmt == "native":
        config, state = _read_native(path, verify)
    elif fmt == "circuit-tracer-clt":
        config, state = _read_circuit_tracer_clt(path)
    else:
        config, state = _read_circuit_tracer_plt(path)
    if dtype_name is not None:
        config = dataclasses.replace(config, dtype=dtype_name)
    return _build(config, state, path).to(device)


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


# -- circuit-tracer ------------------------------------------------------------------------------


def _check_circuit_tracer_compatible(tc: Transcoder) -> None:
    config = tc.config
    if config.kind == "clt" and config.activation == "topk":
        raise CltraceError(
            "circuit-tracer's load_clt reads only JumpReLU and ReLU cross-layer transcoders; save this TopK one "
            "in the native format"
        )
    if config.kind == "plt" and config.activation == "topk":
        warnings.warn(
            "circuit-tracer 0.5.0 ignores `activation: topk` in config.yaml and runs this transcoder set as ReLU; "
            "later circuit-tracer versions read it",
            stacklevel=3,
        )


def _write_circuit_tracer(tc: Transcoder, directory: Path) -> None:
    config = tc.config

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().contiguous().clone()  # a file of its own, not a view into the stack

    threshold = tc.activation.threshold if isinstance(tc.activation, JumpReLU) else None
    yaml_config: dict[str, object]
    if config.kind == "clt":
        for i in range(config.n_layers):
            enc = {f"W_enc_{i}": cpu(tc.W_enc[i]), f"b_enc_{i}": cpu(tc.b_enc[i]), f"b_dec_{i}": cpu(tc.b_dec[i])}
            if threshold is not None:
                enc[f"threshold_{i}"] = cpu(threshold[i])
            save_file(enc, str(directory / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": cpu(tc.W_dec[i])}, str(directory / f"W_dec_{i}.safetensors"))
        yaml_config = {"model_kind": "cross_layer_transcoder"}
    else:
        for i in range(config.n_layers):
            layer = {"W_enc": cpu(tc.W_enc[i]), "W_dec": cpu(tc.W_dec[i])}
            layer |= {"b_enc": cpu(tc.b_enc[i]), "b_dec": cpu(tc.b_dec[i])}
            if threshold is not None:
                layer["activation_function.threshold"] = cpu(threshold[i])
            if tc.W_skip is not None:
                layer["W_skip"] = cpu(tc.W_skip[i].T)  # circuit-tracer computes x @ W_skip.T
            save_file(layer, str(directory / f"layer_{i}.safetensors"))
        yaml_config = {"model_kind": "transcoder_set"}
        if isinstance(tc.activation, TopK):
            yaml_config.update(activation="topk", k=tc.activation.k)
        elif threshold is None:
            yaml_config["activation"] = "relu"
    yaml_config.update(feature_input_hook=CT_INPUT_HOOK, feature_output_hook=CT_OUTPUT_HOOK)
    if config.model_id is not None:
        yaml_config["model_name"] = config.model_id
    (directory / CT_CONFIG).write_text(yaml.safe_dump(yaml_config, sort_keys=False))


def _read_circuit_tracer_clt(path: Path) -> tuple[TranscoderConfig, dict[str, torch.Tensor]]:
    model_id = _check_ct_config(path, "cross_layer_transcoder")
    n_layers = _count_layer_files(path, "W_enc_{}.safetensors")
    n_decoders = _count_layer_files(path, "W_dec_{}.safetensors")
    if n_decoders > n_layers:  # a lost last encoder file would otherwise read as a shallower CLT
        raise CltraceError(f"{path / f'W_enc_{n_layers}.safetensors'} is missing but {path / f'W_dec_{n_layers}.safetensors'} "
                           "exists; the circuit-tracer CLT directory is incomplete")
    state: dict[str, list[torch.Tensor]] = {"W_enc": [], "b_enc": [], "b_dec": [], "activation.threshold": []}
    decoders: dict[str, torch.Tensor] = {}
    # Layer 0 fixes the dimensions, the dtype and the activation; later layers must agree.
    first = _read_safetensors(path / "W_enc_0.safetensors")
    n_features, d_model = _take(first, path / "W_enc_0.safetensors", "W_enc_0", ndim=2).shape
    has_threshold = "threshold_0" in first
    dtype = first["W_enc_0"].dtype
    for i in range(n_layers):
        enc_file = path / f"W_enc_{i}.safetensors"
        enc = first if i == 0 else _read_safetensors(enc_file)
        names = {f"W_enc_{i}": (n_features, d_model), f"b_enc_{i}": (n_features,), f"b_dec_{i}": (d_model,)}
        if has_threshold:
            names[f"threshold_{i}"] = (n_features,)
        _check_names(enc, enc_file, names)
        state["W_enc"].append(enc[f"W_enc_{i}"])  # [F, d]
        state["b_enc"].append(enc[f"b_enc_{i}"])
        state["b_dec"].append(enc[f"b_dec_{i}"])
        if has_threshold:
            state["activation.threshold"].append(enc[f"threshold_{i}"].reshape(n_features))
        dec_file = path / f"W_dec_{i}.safetensors"
        if not dec_file.is_file():
            raise CltraceError(f"{dec_file} is missing; the circuit-tracer CLT directory is incomplete")
        dec = _read_safetensors(dec_file)
        _check_names(dec, dec_file, {f"W_dec_{i}": (n_features, n_layers - i, d_model)})
        decoders[f"W_dec.{i}"] = dec[f"W_dec_{i}"]
    config = TranscoderConfig(
        kind="clt",
        n_layers=n_layers,
        d_model=d_model,
        n_features=n_features,
        activation="jumprelu" if has_threshold else "relu",
        model_id=model_id,
        dtype=_dtype_name(dtype, where=path / "W_enc_0.safetensors"),
    )
    stacked = {name: torch.stack(ts) for name, ts in state.items() if ts}
    return config, {**stacked, **decoders}


def _read_circuit_tracer_plt(path: Path) -> tuple[TranscoderConfig, dict[str, torch.Tensor]]:
    model_id = _check_ct_config(path, "transcoder_set")
    yaml_config = _read_ct_config(path) if (path / CT_CONFIG).is_file() else {}
    n_layers = _count_layer_files(path, "layer_{}.safetensors")
    # Layer 0 fixes the dimensions, the dtype, the activation and the skip; later layers must agree.
    layers = [_read_safetensors(path / "layer_0.safetensors")]
    n_features, d_model = _take(layers[0], path / "layer_0.safetensors", "W_enc", ndim=2).shape
    has_threshold = "activation_function.threshold" in layers[0]
    has_skip = "W_skip" in layers[0]
    k_tensor = layers[0].get("k")  # circuit-tracer after 0.5.0 writes k into a TopK layer file
    if k_tensor is not None and k_tensor.numel() != 1:
        raise CltraceError(f"{path / 'layer_0.safetensors'}: tensor k has shape {tuple(k_tensor.shape)}, expected one value")
    dtype = layers[0]["W_enc"].dtype
    for i in range(n_layers):
        file = path / f"layer_{i}.safetensors"
        tensors = layers[0] if i == 0 else _read_safetensors(file)
        names = {"W_enc": (n_features, d_model), "W_dec": (n_features, d_model)}
        names |= {"b_enc": (n_features,), "b_dec": (d_model,)}
        if has_threshold:
            names["activation_function.threshold"] = (n_features,)
        if has_skip:
            names["W_skip"] = (d_model, d_model)
        _check_names({k: v for k, v in tensors.items() if k != "k"}, file, names)
        if i > 0:
            layers.append(tensors)

    activation, topk_k = "relu", None
    if has_threshold:
        activation = "jumprelu"
    elif yaml_config.get("activation") == "topk" or k_tensor is not None:
        activation = "topk"
        topk_k = yaml_config.get("k", int(k_tensor) if k_tensor is not None else None)
        if not isinstance(topk_k, int):
            raise CltraceError(f"{path / CT_CONFIG} sets activation topk without an integer k; add `k: <int>`")
    config = TranscoderConfig(
        kind="plt",
        n_layers=n_layers,
        d_model=d_model,
        n_features=n_features,
        activation=activation,
        topk_k=topk_k,
        skip=has_skip,
        model_id=model_id,
        dtype=_dtype_name(dtype, where=path / "layer_0.safetensors"),
    )
    state = {name: torch.stack([t[name] for t in layers]) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if has_threshold:
        thresholds = [t["activation_function.threshold"].reshape(n_features) for t in layers]
        state["activation.threshold"] = torch.stack(thresholds)
    if has_skip:
        state["W_skip"] = torch.stack([t["W_skip"].T for t in layers])  # back to x @ W_skip
    return config, state


def _check_ct_config(path: Path, kind: str) -> str | None:
    """Check config.yaml (optional for circuit-tracer) against what cltrace can run; return model_name."""
    if not (path / CT_CONFIG).is_file():
        return None
    config = _read_ct_config(path)
    file = path / CT_CONFIG
    if config.get("model_kind", kind) != kind:
        raise CltraceError(f"{file} says model_kind {config.get('model_kind')!r} but the files are a {kind}")
    for key, want in (("feature_input_hook", CT_INPUT_HOOK), ("feature_output_hook", CT_OUTPUT_HOOK)):
        if config.get(key, want) != want:
            raise CltraceError(
                f"{file} has {key} {config[key]!r}; cltrace reads only {CT_INPUT_HOOK} -> {CT_OUTPUT_HOOK} transcoders"
            )
    model_name = config.get("model_name")
    return str(model_name) if model_name is not None else None


def _count_layer_files(path: Path, pattern: str) -> int:
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    found = sorted(int(m.group(1)) for p in path.iterdir() if (m := regex.match(p.name)))
    for i, index in enumerate(found):
        if index != i:
            raise CltraceError(f"{path / pattern.format(i)} is missing; layer files must run from 0 without gaps")
    return len(found)


# -- file helpers --------------------------------------------------------------------------------


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


def _read_ct_config(path: Path) -> dict:
    file = path / CT_CONFIG
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
        raise CltraceError(f"{file} is not valid YAML ({first_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CltraceError(f"{file} does not hold a YAML mapping")
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
