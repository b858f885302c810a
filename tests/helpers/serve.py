"""The graph explorer's test folder: the acronym graph of a tiny Llama with a random CLT, its feature
store and the transcoder."""

from __future__ import annotations

import functools
from pathlib import Path

from cltrace.features import build_feature_store
from cltrace.graph.attribution import attribute
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder
from helpers.models import char_tokenizer, tiny_model

ACRONYM = "The National Digital Analytics Group (N"

CORPUS = [
    "The National Digital Analytics Group (NDAG) met today.",
    "The World Health Organization (WHO) said so.",
    "A Big Example Company (ABEC) and the United Nations (UN).",
    "The Central Processing Unit (CPU) runs the code.",
    "National Aeronautics and Space Administration (NASA) launched it.",
] * 4


@functools.cache


def replacement() -> ReplacementModel:
    """The tiny Llama with the character tokenizer and a random 3 x 8-feature CLT."""
    model = tiny_model("llama")
    model.tokenizer = char_tokenizer()
    tc = Transcoder.random(TranscoderConfig("clt", model.n_layers, model.d_model, 8), seed=1)
    return ReplacementModel(model, tc)


def build_folder(root: Path) -> dict[str, Path]:
    """The served folder: acronym.safetensors, features.db for its transcoder, the transcoder."""
    rm = replacement()
    root.mkdir(parents=True, exist_ok=True)
    save_transcoder(rm.transcoder, root / "clt")
    graph = attribute(rm, ACRONYM, max_feature_nodes=400, batch_size=64, progress=False)
    graph.metadata["transcoder_path"] = str(root / "clt")
    graph.save(root / "acronym.safetensors")
    tok = rm.model.tokenizer
    build_feature_store(
        rm.model, rm.transcoder, CORPUS, 600, root / "features.db", n_ctx=32, batch_size=4, top_k=5, n_bands=2,
        per_band=2, window_before=6, window_after=3, tokenize=lambda s: tok(s, add_special_tokens=False)["input_ids"],
        bos_id=0, first_position=1, progress=False,
    )
    return {"root": root, "graph": root / "acronym.safetensors", "db": root / "features.db"}
