"""Device and dtype resolution: what `auto` picks, what a machine without CUDA refuses, and the dtype rule."""

from __future__ import annotations

import pytest
import torch

from cltrace.device import resolve_device, resolve_dtype
from cltrace.errors import CltraceError


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_cpu_without_cuda(no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1", "CUDA"])
def test_cuda_without_cuda_is_one_line(no_gpu: None, spec: str) -> None:
    with pytest.raises(CltraceError, match="not available: this torch sees no CUDA GPU") as info:
        resolve_device(spec)
    assert "\n" not in str(info.value)


def test_auto_is_first_gpu_with_cuda(two_gpus: None) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(" Cuda:1 ") == torch.device("cuda", 1)


def test_missing_gpu_index_is_refused(two_gpus: None) -> None:
    with pytest.raises(CltraceError, match=r"does not exist: torch sees 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(CltraceError, match="write cuda:N"):
        resolve_device("cuda:x")


def test_mps_without_mps_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(CltraceError, match="'mps' is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cpu:0", ""])
def test_unknown_device_names_the_choices(spec: str) -> None:
    if spec == "":  # empty means auto, like None
        assert resolve_device(spec).type in ("cpu", "cuda")
        return
    with pytest.raises(CltraceError, match="choose one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device(spec)


CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("device", [CPU, GPU])
def test_exact_work_is_always_float32(device: torch.device) -> None:
    for spec in (None, "auto", "float32", "fp32"):
        assert resolve_dtype(spec, device, "exact") is torch.float32
    with pytest.raises(CltraceError, match="must be exact, which needs float32"):
        resolve_dtype("bfloat16", device, "exact")


def test_approximate_work_picks_bf16_on_gpus_only_when_auto() -> None:
    assert resolve_dtype("auto", GPU, "approximate") is torch.bfloat16
    assert resolve_dtype("auto", CPU, "approximate") is torch.float32
    assert resolve_dtype("auto", torch.device("mps"), "approximate") is torch.float32
    assert resolve_dtype("bf16", CPU, "approximate") is torch.bfloat16  # by name: as the default preset trains
    assert resolve_dtype("float32", GPU, "approximate") is torch.float32


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(CltraceError, match="unknown dtype 'float16': choose auto, float32 or bfloat16"):
        resolve_dtype("float16", CPU, "approximate")
