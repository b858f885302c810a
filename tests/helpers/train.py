"""Training inputs: a planted dictionary, its config, and small text corpora and model folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cltrace.train import TrainConfig
from cltrace.train.data import ActivationSource
from helpers.models import tiny_model, tiny_tokenizer


class Planted(ActivationSource):
    """x = s @ A, y = s @ D for sparse codes s: a planted dictionary D the transcoder should find."""

    def __init__(self, n_layers: int = 2, d: int = 32, n_planted: int = 24, p: float = 0.08, n: int = 2048,
                 nan_at_buffer: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.n_layers, self.d_model, self.P, self.p, self.n = n_layers, d, n_planted, p, n
        A = torch.randn(n_layers, n_planted, d, generator=g)
        D = torch.randn(n_layers, n_planted, d, generator=g)
        self.A = A / A.norm(dim=-1, keepdim=True)
        self.D = D / D.norm(dim=-1, keepdim=True)
        self.nan_at_buffer = nan_at_buffer

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "planted", "n_layers": self.n_layers, "d_model": self.d_model}

    def buffers(self, start: dict[str, Any] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        i = start["i"] if start else 0
        while True:
            g = torch.Generator().manual_seed(1000 + i)
            on = torch.rand(self.n, self.n_layers, self.P, generator=g) < self.p
            s = on * (1 + 0.5 * torch.rand(self.n, self.n_layers, self.P, generator=g))
            x = torch.einsum("nlp,lpd->nld", s, self.A)
            y = torch.einsum("nlp,lpd->nld", s, self.D)
            if self.nan_at_buffer is not None and i == self.nan_at_buffer:
                x[5, 0, 0] = float("nan")
            i += 1
            yield x, y, {"i": i}


def planted_config(**kw: Any) -> TrainConfig:
    base = dict(
        kind="clt", n_features=64, model="planted", n_ctx=3, batch_tokens=256, shuffle_contexts=2048,
        total_tokens=256 * 350, norm_tokens=2048, lr=3e-3, sparsity_lambda=0.1, checkpoint_every=1000,
        log_every=50, eval_tokens=0, threshold_init=0.1, sparsity_warmup_frac=0.3,
    )
    base.update(kw)
    return TrainConfig(**base)


def write_text(path: Path, n_docs: int = 60) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "past", "quietly", "under", "grey", "skies"]
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g).tolist())
            for n in torch.randint(10, 40, (n_docs,), generator=g)]
    path.write_text("\n\n".join(docs))
    return path


def resume_config() -> TrainConfig:
    return TrainConfig(
        model="tiny-llama", source="text", n_features=32, n_ctx=17, batch_tokens=16, shuffle_contexts=4,
        total_tokens=16 * 24, harvest_batch=4, norm_tokens=64, checkpoint_every=3, log_every=1, eval_tokens=32,
        heldout_fraction=0.1, lr=1e-3, sparsity_lambda=1e-2,
    )


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny llama with a word-level tokenizer ("t2" … "t95"), saved as a local model folder."""
    tiny_model("llama", seed=seed).model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def word_docs(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Documents of the tiny tokenizer's words."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{int(i)}" for i in torch.randint(2, 96, (int(n),), generator=g))
            for n in torch.randint(20, 60, (n_docs,), generator=g)]
