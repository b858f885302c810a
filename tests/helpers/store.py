"""An activation store harvested from the test text through a tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cltrace.data.harvest import FIRST_POSITION
from cltrace.data.sources import FileSource
from cltrace.data.store import ActivationStore, harvest_to_store
from helpers.models import tiny_model
from helpers.train import write_text

N_CTX = 17

POS = N_CTX - FIRST_POSITION  # positions harvested per context


def tok(text: str) -> list[int]:
    return [1 + (ord(c) % 90) for c in text]


def harvest(tmp_path: Path, out: Path, tokens: int, model: Any = None, **kw: Any) -> ActivationStore:
    """A store of the test text through a tiny llama, one context per forward pass (so bitwise
    comparable with any other harvest of the same contexts)."""
    text = tmp_path / "docs.txt"
    if not text.exists():
        write_text(text)
    options = dict(model_spec="tiny-llama", source_spec="text", tokenize=tok, n_ctx=N_CTX, bos_id=0,
                   harvest_batch=1, shard_contexts=3, progress=False, heldout_fraction=0.1)
    options.update(kw)
    return harvest_to_store(model or tiny_model("llama"), FileSource(text, txt_split="paragraph"), out, tokens, **options)
