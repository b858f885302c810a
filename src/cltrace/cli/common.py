"""What every command module shares: the `cltrace` app itself, the options several commands take,
and the one way an old spelling of an option keeps working (with a deprecation message) for a release.

Short flags mean one thing across commands (tests/test_cli_flags.py checks it): -m model,
-t transcoder, -o output, -s text source, -n tokens, -k how many to show, -b batch size, -q quiet,
-d feature store, -g tokens to generate, -p preset.

Every command that runs a model or a transcoder takes `--device` (`DeviceOption`, resolved by
`device_given`); those where the precision is the user's choice take `--dtype` (`DtypeOption`).
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer

from cltrace.device import rank_device, resolve_device, resolve_dtype
from cltrace.distributed import launched
from cltrace.errors import CltraceError
from cltrace.fields import field_bounds, field_help

app = typer.Typer(
    name="cltrace",
    help="Cross-layer transcoders, attribution graphs and interventions for language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

def decoded_prompt(prompt: str) -> str:
    """The prompt as text: bytes that are not UTF-8 reach Python's argv as lone surrogates
    (surrogateescape), which no tokenizer takes; they become U+FFFD, said once on stderr."""
    try:
        raw = prompt.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that came from no byte (only through the Python API)
        raw = prompt.encode("utf-8", "replace")
    text = raw.decode("utf-8", "replace")
    if text != prompt:
        typer.echo("note: the prompt has bytes that are not UTF-8: each is read as U+FFFD, the replacement character", err=True)
    return text


ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id, local directory or .gguf file; default: SmolLM2-135M-Instruct."),
]

#: Where the model and the transcoder run; `device_given` turns it into a torch device.
DeviceOption = Annotated[str, typer.Option(
    "--device", metavar="DEVICE",
    help="Where the model and transcoder run: auto (the first CUDA GPU torch sees, else the CPU), cpu, cuda, "
    "cuda:N or mps. Under torchrun each rank takes the GPU of its LOCAL_RANK. Attribution, interventions "
    "and evaluation compute in float32 on any device: the replacement model must be exact.")]


class Dtype(str, Enum):
    """The compute precision a user may choose where the method tolerates noise."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


DTYPE_HELP = ("Precision of the matrix products: auto (bfloat16 on a CUDA GPU, float32 elsewhere), float32, or "
              "bfloat16 (faster on GPUs and on CPUs with bf16 units, a few percent of noise on the activations). "
              "Graphs, interventions and evaluation are always float32: exactness needs it.")

#: The compute precision of a command whose method tolerates bfloat16 (`resolve_dtype`, "approximate").
DtypeOption = Annotated[Dtype, typer.Option("--dtype", help=DTYPE_HELP)]


def device_given(spec: str) -> torch.device:
    """The torch device `--device` names, checked to exist here (one line if not); under torchrun, this
    rank's (the GPU of its LOCAL_RANK, or the CPU)."""
    if launched():
        return rank_device(spec, int(os.environ.get("LOCAL_RANK", "0")))
    return resolve_device(spec)


def dtype_given(spec: Dtype, device: torch.device) -> torch.dtype:
    """The compute dtype `--dtype` names on `device` (auto: bfloat16 on CUDA, float32 elsewhere)."""
    return resolve_dtype(spec.value, device, "approximate")


SOURCE_HELP = "Text: 'default', a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][:SPLIT]."
SourceOption = Annotated[str, typer.Option("--source", "-s", help=SOURCE_HELP)]
NCtxOption = Annotated[int, typer.Option("--n-ctx", min=2, help="Tokens per context, BOS included.")]

TRANSCODER_HELP = "A transcoder directory (native or circuit-tracer), or 'default' (the default CLT, trained on first use)."

#: The transcoder where a command needs one given (`-t`); None until `transcoder_given` checks it.
TranscoderOption = Annotated[Path | None, typer.Option("--transcoder", "-t", help=TRANSCODER_HELP)]

#: The positional spelling some commands took before `-t` (kept working for one release).
OldTranscoderArgument = Annotated[Path | None, typer.Argument(hidden=True, show_default=False)]

#: The `--output` spelling of `-o/--out` (kept working for one release).
OldOutputOption = Annotated[Path | None, typer.Option("--output", hidden=True)]

T = TypeVar("T")


def config_option(cls: type, field: str, *names: str) -> Any:
    """A typer option for field `field` of config dataclass `cls`: its bounds and help text are the
    field's own (its default goes on the parameter: `= field_default(cls, field)`)."""
    least, most = field_bounds(cls, field)
    return typer.Option(*names, min=least, max=most, help=field_help(cls, field))


def deprecated(new: T | None, old: T | None, old_name: str, new_name: str) -> T | None:
    """`new`, or `old` (with a one-line deprecation message on stderr) where only the old spelling was used."""
    if old is None:
        return new
    typer.echo(f"warning: {old_name} is deprecated and goes in the next release: use {new_name}", err=True)
    if new is not None and new != old:
        raise CltraceError(f"both {new_name} and {old_name} given: pass only {new_name}")
    return old


def required(value: T | None, name: str, example: str) -> T:
    """`value`, or a one-line error naming the option the user has to give."""
    if value is None:
        raise CltraceError(f"missing option {name}: {example}")
    return value


def transcoder_given(new: Path | None, old: Path | None) -> Path:
    """The transcoder from `-t/--transcoder`, or from the old positional spelling (deprecated)."""
    path = deprecated(new, old, "the transcoder as a positional argument", "-t/--transcoder")
    return required(path, "-t/--transcoder", "pass a transcoder directory, or 'default' for the default CLT")


def transcoder_feature_store(spec: Path, model: str | None = None) -> Path:
    """The feature store `cltrace trace --features auto` built for the transcoder `spec`; a one-line
    error where there is none yet (the default transcoder is never trained just to look for it)."""
    from cltrace.trace.run import feature_db_path
    from cltrace.train.default import DEFAULT_NAME, default_paths, resolve_transcoder
    from cltrace.transcoder import load_transcoder

    if os.fspath(spec) == DEFAULT_NAME and not Path(DEFAULT_NAME).is_dir() and not default_paths()[0].is_dir():
        raise CltraceError(
            "the default transcoder is not trained yet, so it has no feature store: run `cltrace trace PROMPT` "
            "(or `make demo`) first, or pass --db"
        )
    path = resolve_transcoder(spec, model)
    db = feature_db_path(load_transcoder(path))
    if not db.is_file():
        raise CltraceError(f"no feature store for the transcoder '{spec}' yet: run `cltrace trace PROMPT -t {spec}` "
                           "(it builds one), or pass --db")
    return db
