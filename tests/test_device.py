"""Device and dtype resolution: what `auto` picks, what a machine without CUDA refuses, and the dtype rule."""

from __future__ import annotations

from pathlib import Path

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


# -- torchrun ranks, moving modules, and the memory a device has -------------------------------------


def test_each_rank_takes_the_gpu_of_its_local_rank(two_gpus: None) -> None:
    from cltrace.device import rank_device

    assert rank_device("auto", 1) == torch.device("cuda", 1)
    assert rank_device("cuda", 0) == torch.device("cuda", 0)
    assert rank_device("cpu", 1) == CPU
    assert rank_device(torch.device("cuda", 1), 0) == torch.device("cuda", 1)  # already chosen for this rank
    with pytest.raises(CltraceError, match="each rank takes the GPU of its LOCAL_RANK; pass --device cuda"):
        rank_device("cuda:1", 0)


def test_ranks_without_cuda_run_on_the_cpu(no_gpu: None) -> None:
    from cltrace.device import rank_device

    assert rank_device("auto", 3) == CPU
    with pytest.raises(CltraceError, match="sees no CUDA GPU"):
        rank_device("cuda", 0)


def test_place_moves_a_module_or_refuses_in_one_line(no_gpu: None) -> None:
    from cltrace.device import place

    layer = torch.nn.Linear(2, 2)
    assert place(layer, None) == CPU and place(layer, "cpu") == CPU and place(layer, "auto") == CPU
    assert place(torch.nn.ReLU(), None) == CPU  # no parameters: on the CPU
    with pytest.raises(CltraceError, match="not available") as info:
        place(layer, "cuda")
    assert "\n" not in str(info.value) and layer.weight.device == CPU


def test_the_no_cuda_line_says_what_to_do(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(CltraceError, match="CPU-only build: install a CUDA build of torch.*use --device cpu or auto"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(CltraceError, match="built for CUDA 12.8: check the driver and CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda")


def test_gpu_memory_counts_what_this_process_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the limit is its free memory plus what torch's allocator already holds there (the model,
    which the estimates count); on the CPU the host's available memory; an explicit limit wins."""
    import cltrace.graph.config as config_module
    import cltrace.resources as resources
    from cltrace.graph.config import AttributionConfig

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (asked.append(device) or (3 << 30, 80 << 30)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1 << 30)
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 7 << 30)
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: 7 << 30)
    assert resources.available_device_memory_bytes(GPU) == 4 << 30 and asked == [GPU]
    assert resources.available_device_memory_bytes(CPU) == 7 << 30
    assert AttributionConfig().memory_limit(GPU) == 4 << 30
    assert AttributionConfig().memory_limit(CPU) == AttributionConfig().memory_limit() == 7 << 30
    assert AttributionConfig(max_memory_bytes=5).memory_limit(GPU) == 5


def test_training_is_refused_by_the_memory_of_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import cltrace.train.run_dir as run_dir
    from cltrace.train import preset

    cfg = preset("tiny")
    need = run_dir.training_memory_bytes(cfg, 4, 64)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 1, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(run_dir, "available_memory_bytes", lambda: need)
    run_dir.refuse_if_too_big(cfg, 4, 64, CPU)  # the host has enough
    with pytest.raises(CltraceError, match=r"GB available on cuda:0: lower n_features"):
        run_dir.refuse_if_too_big(cfg, 4, 64, GPU)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1)  # what this process holds there counts
    run_dir.refuse_if_too_big(cfg, 4, 64, GPU)


@pytest.mark.parametrize(("device", "cuda", "backend", "gpu"), [
    (None, False, "gloo", None), (None, True, "nccl", 1), (CPU, True, "gloo", None),
    (torch.device("cuda", 1), True, "nccl", torch.device("cuda", 1)),
])
def test_torchrun_uses_nccl_on_gpus_and_gloo_on_the_cpu(monkeypatch: pytest.MonkeyPatch, device: torch.device | None,
                                                        cuda: bool, backend: str, gpu: object) -> None:
    import torch.distributed as dist

    from cltrace import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    chosen: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def refuse(name: str, **kwargs: object) -> None:
        chosen.append(name)
        raise RuntimeError("no peers in a test")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    with pytest.raises(CltraceError, match="cannot join the torch.distributed process group"):
        distributed.init_layout(device=device)
    assert chosen == ([gpu] if gpu is not None else []) + [backend]


def test_the_python_api_refuses_a_missing_gpu_before_any_work(no_gpu: None, tmp_path: Path) -> None:
    """load_model, load_transcoder and train_transcoder check the device first: one line, nothing read or written."""
    from cltrace.model import load_model
    from cltrace.train import preset, train_transcoder
    from cltrace.transcoder import load_transcoder

    for call in (lambda: load_model(str(tmp_path / "missing"), device="cuda"),
                 lambda: load_transcoder(tmp_path / "missing", device="cuda:0"),
                 lambda: train_transcoder(preset("tiny"), tmp_path / "run", device="cuda")):
        with pytest.raises(CltraceError, match="not available: this torch sees no CUDA GPU"):
            call()
    assert not (tmp_path / "run").exists()
