"""Where and in which precision computation runs: the one place that resolves `--device` and `--dtype`.

Devices: "auto" is the first CUDA device when torch sees one, else the CPU; "cpu", "cuda", "cuda:N"
and "mps" are taken by name, and a device this machine lacks is refused with one line.

Precision (`resolve_dtype`): float32 wherever the result must be exact — attribution graphs, the
replacement model's exactness, interventions and evaluation — because the local replacement model
reproduces the model only to rounding, and bf16 rounding (about 3 significant digits) would swamp
the error nodes it is checked against. bfloat16 is allowed for work that tolerates noise (training,
harvesting): "auto" picks it on CUDA GPUs and float32 elsewhere; asked for by name it is used on any
device (the CPU's bf16 matrix units make it worthwhile there too, as the default training preset does).

Under torchrun each rank takes the GPU of its LOCAL_RANK (`rank_device`), and the process group uses
NCCL when the device is a CUDA GPU and gloo on the CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

from cltrace.errors import CltraceError

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Purpose = Literal["exact", "approximate"]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device named by `spec` ("auto", "cpu", "cuda", "cuda:N", "mps"), checked to exist here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise CltraceError("device 'mps' is not available: this torch sees no Apple GPU; use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise CltraceError(f"device {spec!r} is not valid: write cuda:N with N a GPU number, e.g. cuda:0")
        if not torch.cuda.is_available():
            why = ("it is a CPU-only build: install a CUDA build of torch" if torch.version.cuda is None
                   else f"built for CUDA {torch.version.cuda}: check the driver and CUDA_VISIBLE_DEVICES")
            raise CltraceError(
                f"device {spec!r} is not available: this torch sees no CUDA GPU (torch {torch.__version__}, {why}); "
                "or use --device cpu or auto"
            )
        index, count = int(index_text), torch.cuda.device_count()
        if index >= count:
            raise CltraceError(f"device {spec!r} does not exist: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    raise CltraceError(f"unknown device {spec!r}: choose one of {', '.join(DEVICE_NAMES)}")


def rank_device(spec: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of one torchrun rank: the CPU, or the GPU of its LOCAL_RANK where `spec` names CUDA (or is
    "auto" with CUDA at hand). A GPU number written in `spec` is refused, since every rank would take the
    same one; a torch.device is taken as it is (already chosen for this rank)."""
    if isinstance(spec, torch.device):
        return resolve_device(spec)
    name = (spec or "auto").strip().lower()
    if name.startswith("cuda:"):
        raise CltraceError(f"--device {spec} under torchrun: each rank takes the GPU of its LOCAL_RANK; pass --device cuda")
    device = resolve_device(spec)
    if device.type != "cuda":
        return device
    return resolve_device(f"cuda:{local_rank}")


def place(module: torch.nn.Module, spec: str | torch.device | None) -> torch.device:
    """Move `module` (in place, as `nn.Module.to` does) to the device `spec` names, and return its device;
    None leaves it where it is. A module without parameters is on the CPU."""
    if spec is not None:
        module.to(resolve_device(spec))
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a CUDA GPU runs asynchronously): for timings only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(spec: str | None, device: torch.device, purpose: Purpose = "exact") -> torch.dtype:
    """The compute dtype for `purpose` on `device`, from `spec` ("auto", "float32", "bfloat16"; None: auto).

    "exact" work (attribution, the replacement model, interventions, evaluation) is always float32;
    asking for bfloat16 there is refused. "approximate" work (training, harvesting) may use bfloat16;
    "auto" picks bfloat16 on CUDA and float32 on the CPU and MPS.
    """
    name = (spec or "auto").strip().lower().replace("bf16", "bfloat16").replace("fp32", "float32")
    if name not in ("auto", *DTYPES):
        raise CltraceError(f"unknown dtype {spec!r}: choose auto, float32 or bfloat16")
    if purpose == "exact":
        if name == "bfloat16":
            raise CltraceError(
                "bfloat16 is not allowed here: attribution and the replacement model must be exact, which needs "
                "float32; drop --dtype or pass float32"
            )
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


__all__ = ["DEVICE_NAMES", "DTYPES", "Purpose", "place", "rank_device", "resolve_device", "resolve_dtype", "synchronize"]
