"""circuit-tracer's transcoder layouts (see `cltrace.transcoder.formats` for the files): write, read, check."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from cltrace.errors import CltraceError, first_line
from cltrace.transcoder.activation import JumpReLU, TopK
from cltrace.transcoder.config import TranscoderConfig
from cltrace.transcoder.files import _check_names, _dtype_name, _read_safetensors, _take
from cltrace.transcoder.transcoder import Transcoder

CT_CONFIG = "config.yaml"
CT_INPUT_HOOK = "hook_resid_mid"
CT_OUTPUT_HOOK = "hook_mlp_out"


def check_compatible(tc: Transcoder) -> None:
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


def write_circuit_tracer(tc: Transcoder, directory: Path) -> None:
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


def read_clt(path: Path) -> tuple[TranscoderConfig, dict[str, torch.Tensor]]:
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


def read_plt(path: Path) -> tuple[TranscoderConfig, dict[str, torch.Tensor]]:
    model_id = _check_ct_config(path, "transcoder_set")
    yaml_config = read_ct_config(path) if (path / CT_CONFIG).is_file() else {}
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
        names: dict[str, tuple[int, ...]] = {"W_enc": (n_features, d_model), "W_dec": (n_features, d_model)}
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
    config = read_ct_config(path)
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


def read_ct_config(path: Path) -> dict:
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


__all__ = ["CT_CONFIG", "CT_INPUT_HOOK", "CT_OUTPUT_HOOK", "check_compatible", "read_clt", "read_ct_config", "read_plt", "write_circuit_tracer"]
