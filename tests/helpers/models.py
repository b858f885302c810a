"""Tiny random models of every supported family, built from configs (no downloads), their tokenizers
and prompts."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from cltrace.model import LoadedModel, wrap_model

VOCAB = 96

_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64,
)

FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    # Sliding windows shorter than the test prompts, and both soft-cappings, so that every
    # Gemma-specific path is exercised.
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=20.0, attn_logit_softcapping=30.0,
    ),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=3, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
}

FAMILIES = list(FAMILY_CONFIGS)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 1..95) and "<bos>" (0): exactly the tiny
    models' 96-token vocabulary, so that real text runs through them."""
    vocab = {"<bos>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="?")


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    """A tiny randomly initialised model of `family`, with weights large enough to matter.

    transformers' own init (std 0.02, unit norm weights) makes every layer nearly the identity;
    random norm weights and O(1) activations make the tests able to tell right from wrong.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family](), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.normal_(0.0 if family.startswith("gemma") and param.dim() == 1 else 1.0, 0.2)
            elif param.dim() == 1:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 1.5 / param.shape[-1] ** 0.5)
    return wrap_model(model, name=f"tiny-{family}")


def prompt_ids(n_pos: int = 9, seed: int = 1) -> torch.Tensor:
    """A random prompt [pos], longer than the Gemma sliding windows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n_pos,), generator=g)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: "<bos>", "<unk>", "t2" … "t95".

    Its normaliser deletes "~", so a prompt of only "~" tokenizes to nothing.
    """
    vocab = {"<bos>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("~", "")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
