"""Transcoder files: native and circuit-tracer round trips, the circuit-tracer layout, and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers.transcoders import assert_identical
from safetensors.torch import load_file, save_file

from cltrace.errors import CltraceError
from cltrace.fingerprint import file_sha256
from cltrace.transcoder import (
    Transcoder,
    TranscoderConfig,
    circuit_tracer,
    detect_format,
    formats,
    load_transcoder,
    save_transcoder,
)

L, D, F = 3, 8, 12
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make(kind: str, activation: str = "jumprelu", skip: bool = False, dtype: str = "float32") -> Transcoder:
    cfg = TranscoderConfig(
        kind=kind,
        n_layers=L,
        d_model=D,
        n_features=F,
        activation=activation,
        topk_k=4 if activation == "topk" else None,
        skip=skip,
        model_id=MODEL,
        dtype=dtype,
    )
    tc = Transcoder.random(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # nonzero biases, thresholds and skip, so a swapped tensor would show
        for name, p in tc.named_parameters():
            if name in ("b_enc", "b_dec", "activation.threshold", "W_skip"):
                p.copy_(torch.randn(p.shape, generator=g))
    return tc


ROUND_TRIPS = [
    ("clt", "jumprelu", False),
    ("clt", "relu", False),
    ("plt", "jumprelu", False),
    ("plt", "jumprelu", True),
    ("plt", "relu", True),
]


@pytest.mark.parametrize("kind,activation,skip", ROUND_TRIPS)
def test_native_and_circuit_tracer_round_trips_are_exact(
    tmp_path: Path, kind: str, activation: str, skip: bool
) -> None:
    tc = make(kind, activation, skip)
    save_transcoder(tc, tmp_path / "native")
    assert detect_format(tmp_path / "native") == "native"
    from_native = load_transcoder(tmp_path / "native")
    assert_identical(tc, from_native)

    save_transcoder(from_native, tmp_path / "ct", format="circuit-tracer")
    assert detect_format(tmp_path / "ct") == f"circuit-tracer-{kind}"
    from_ct = load_transcoder(tmp_path / "ct")
    assert_identical(tc, from_ct)

    save_transcoder(from_ct, tmp_path / "native2")
    assert_identical(tc, load_transcoder(tmp_path / "native2"))


def test_bfloat16_round_trip_keeps_fp32_thresholds(tmp_path: Path) -> None:
    tc = make("clt", dtype="bfloat16")
    save_transcoder(tc, tmp_path / "ct", format="circuit-tracer")
    loaded = load_transcoder(tmp_path / "ct")
    assert loaded.W_enc.dtype == torch.bfloat16 and loaded.activation.threshold.dtype == torch.float32
    assert_identical(tc, loaded)
    as_fp32 = load_transcoder(tmp_path / "ct", dtype="float32")
    assert as_fp32.config.dtype == "float32" and as_fp32.W_dec[1].dtype == torch.float32
    assert torch.equal(as_fp32.W_dec[1], tc.W_dec[1].float())


def test_topk_transcoder_set_round_trips_through_config_yaml(tmp_path: Path) -> None:
    tc = make("plt", "topk")
    with pytest.warns(UserWarning, match="circuit-tracer 0.5.0"):
        save_transcoder(tc, tmp_path / "ct", format="circuit-tracer")
    assert yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())["k"] == 4
    assert_identical(tc, load_transcoder(tmp_path / "ct"))
    with pytest.raises(CltraceError, match="TopK"):
        save_transcoder(make("clt", "topk"), tmp_path / "clt", format="circuit-tracer")


def test_circuit_tracer_clt_layout(tmp_path: Path) -> None:
    tc = make("clt")
    save_transcoder(tc, tmp_path, format="circuit-tracer")
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["config.yaml"] + [f"W_{p}_{i}.safetensors" for p in ("enc", "dec") for i in range(L)])
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "model_name": MODEL,
    }
    for i in range(L):
        enc = load_file(tmp_path / f"W_enc_{i}.safetensors")
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{i}": (F, D), f"b_enc_{i}": (F,), f"b_dec_{i}": (D,), f"threshold_{i}": (F,)
        }
        dec = load_file(tmp_path / f"W_dec_{i}.safetensors")
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": (F, L - i, D)}
    # Recompute layer 1's pre-activations the way circuit-tracer does: x @ W_enc_i.T + b_enc_i.
    x = torch.randn(5, L, D)
    enc1 = load_file(tmp_path / "W_enc_1.safetensors")
    torch.testing.assert_close(x[:, 1] @ enc1["W_enc_1"].T + enc1["b_enc_1"], tc.encode_pre(x)[:, 1].detach())


def test_circuit_tracer_transcoder_set_layout_and_skip_orientation(tmp_path: Path) -> None:
    tc = make("plt", skip=True)
    save_transcoder(tc, tmp_path, format="circuit-tracer")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and "transcoders" not in config
    x = torch.randn(5, L, D)
    acts, recon = tc(x)
    for i in range(L):
        layer = load_file(tmp_path / f"layer_{i}.safetensors")
        assert {k: tuple(v.shape) for k, v in layer.items()} == {
            "W_enc": (F, D),
            "W_dec": (F, D),
            "b_enc": (F,),
            "b_dec": (D,),
            "activation_function.threshold": (F,),
            "W_skip": (D, D),
        }
        # circuit-tracer's SingleLayerTranscoder: acts @ W_dec + b_dec + x @ W_skip.T
        theirs = acts[:, i] @ layer["W_dec"] + layer["b_dec"] + x[:, i] @ layer["W_skip"].T
        torch.testing.assert_close(theirs, recon[:, i].detach())


def test_loads_circuit_tracer_clt_without_config_yaml(tmp_path: Path) -> None:
    tc = make("clt", "relu")
    save_transcoder(tc, tmp_path / "ct", format="circuit-tracer")
    (tmp_path / "ct" / "config.yaml").unlink()  # load_clt needs only the safetensors files
    loaded = load_transcoder(tmp_path / "ct")
    assert loaded.config.model_id is None and loaded.config.activation == "relu"
    assert all(torch.equal(a, b) for a, b in zip(tc.state_dict().values(), loaded.state_dict().values()))


# -- damaged and unknown inputs --------------------------------------------------------------------


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    save_transcoder(make("clt"), tmp_path / "ct", format="circuit-tracer")
    victim = tmp_path / "ct" / "W_dec_1.safetensors"
    victim.write_bytes(victim.read_bytes()[:-40])
    with pytest.raises(CltraceError, match=r"W_dec_1\.safetensors cannot be read as safetensors"):
        load_transcoder(tmp_path / "ct")

    save_transcoder(make("plt"), tmp_path / "native")
    weights = tmp_path / "native" / "transcoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CltraceError, match=r"transcoder\.safetensors does not match the sha256"):
        load_transcoder(tmp_path / "native")
    with pytest.raises(CltraceError, match=r"transcoder\.safetensors cannot be read as safetensors"):
        load_transcoder(tmp_path / "native", verify=False)


def test_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    save_transcoder(make("clt"), tmp_path)
    weights = tmp_path / "transcoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CltraceError, match=r"transcoder\.safetensors does not match the sha256"):
        load_transcoder(tmp_path)


def test_missing_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    save_transcoder(make("clt"), tmp_path / "ct", format="circuit-tracer")
    file = tmp_path / "ct" / "W_enc_2.safetensors"
    tensors = load_file(file)
    del tensors["b_enc_2"]
    save_file(tensors, file)
    with pytest.raises(CltraceError, match=r"W_enc_2\.safetensors has no tensor 'b_enc_2'"):
        load_transcoder(tmp_path / "ct")

    # Native: drop a decoder and record the new checksum, so only the missing tensor is wrong.
    save_transcoder(make("clt"), tmp_path / "native")
    weights = tmp_path / "native" / "transcoder.safetensors"
    tensors = load_file(weights)
    del tensors["W_dec.1"]
    save_file(tensors, weights)
    meta = json.loads((tmp_path / "native" / "config.json").read_text())
    meta["sha256"]["transcoder.safetensors"] = file_sha256(weights)
    meta["config_sha256"] = formats._config_digest(meta)
    (tmp_path / "native" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CltraceError, match=r"native: missing tensor\(s\) W_dec\.1"):
        load_transcoder(tmp_path / "native")


def test_inconsistent_shapes_name_the_file(tmp_path: Path) -> None:
    save_transcoder(make("clt"), tmp_path, format="circuit-tracer")
    save_file({"W_dec_1": torch.zeros(F, L, D)}, tmp_path / "W_dec_1.safetensors")  # should be [F, L - 1, D]
    with pytest.raises(CltraceError, match=r"W_dec_1\.safetensors: tensor W_dec_1 has shape \(12, 3, 8\)"):
        load_transcoder(tmp_path)


def test_missing_layer_file_is_reported(tmp_path: Path) -> None:
    save_transcoder(make("plt"), tmp_path, format="circuit-tracer")
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(CltraceError, match=r"layer_1\.safetensors is missing"):
        load_transcoder(tmp_path)


def test_unknown_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CltraceError, match=rf"{tmp_path} is not a transcoder directory"):
        load_transcoder(tmp_path)
    with pytest.raises(CltraceError, match="does not exist"):
        load_transcoder(tmp_path / "nowhere")
    with pytest.raises(CltraceError, match="is a file"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(CltraceError, match="unknown transcoder format"):
        save_transcoder(make("clt"), tmp_path / "x", format="onnx")


def test_unsupported_hooks_are_rejected(tmp_path: Path) -> None:
    save_transcoder(make("plt"), tmp_path, format="circuit-tracer")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["feature_input_hook"] = "mlp.hook_in"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CltraceError, match="feature_input_hook 'mlp.hook_in'"):
        load_transcoder(tmp_path)


# -- atomic writes ---------------------------------------------------------------------------------


def test_overwrite_rules(tmp_path: Path) -> None:
    first, second = make("clt"), make("plt")
    save_transcoder(first, tmp_path / "tc")
    with pytest.raises(CltraceError, match="already exists; pass overwrite=True"):
        save_transcoder(second, tmp_path / "tc")
    save_transcoder(second, tmp_path / "tc", overwrite=True)
    assert_identical(second, load_transcoder(tmp_path / "tc"))

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CltraceError, match="does not hold a transcoder"):
        save_transcoder(first, other, overwrite=True)
    assert os.listdir(other) == ["cat.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["photos", "tc"]  # no temporary siblings left behind


def test_failed_write_leaves_the_old_directory_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make("clt")
    save_transcoder(old, tmp_path / "tc", format="circuit-tracer")
    calls = {"n": 0}
    real_save_file = circuit_tracer.save_file

    def failing_save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(circuit_tracer, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_transcoder(make("clt", "relu"), tmp_path / "tc", format="circuit-tracer", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["tc"]
    assert_identical(old, load_transcoder(tmp_path / "tc"))
