"""A tiny model and a hand-built transcoder whose features' triggers and outputs are known, and text
for them: acronyms in parentheses, one character per token."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cltrace.data.harvest import Harvester
from cltrace.features.views import unembedding_directions
from cltrace.model import LoadedModel, wrap_model
from cltrace.transcoder import Transcoder, TranscoderConfig
from helpers.models import VOCAB, char_tokenizer

D_MODEL = 128
CAPITALS = [ord(c) - 31 for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]  # char_tokenizer ids
OPEN = ord("(") - 31
SAID = ord("Q") - 31  # what the planted feature writes: rare in the text, so only its effect names it
#: The planted features (all of layer 0 but the last): on '(' saying 'Q'; on capital letters with a
#: random decoder; and a random encoder and decoder at layer 2 (noise).
ON_OPEN, ON_CAPITAL, NOISE = (0, 0), (0, 1), (2, 0)

WORDS = ["data", "unit", "group", "access", "memory", "control", "display", "timing", "power", "signal", "table",
         "output", "input", "network", "storage", "system", "device", "driver", "packet", "stream"]


def documents(n: int = 120, seed: int = 0) -> list[str]:
    """Sentences naming things by capitalised words with their acronym in parentheses, some with an
    aside in parentheses too."""
    g = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        words = [str(w) for w in g.choice(WORDS, size=int(g.integers(2, 5)), replace=False)]
        name = " ".join(w.capitalize() for w in words)
        acronym = "".join(w[0].upper() for w in words)
        filler = " ".join(str(w) for w in g.choice(WORDS, size=int(g.integers(3, 8))))
        aside = f" (see {words[0]} {int(g.integers(1, 99))})" if g.random() < 0.5 else ""
        docs.append(f"the {name} ({acronym}) sends {filler}{aside}. then the {acronym} is {filler}.")
    return docs


def planted_model(seed: int = 0) -> LoadedModel:
    """A random Llama over one-character tokens whose layer 0 attention writes nothing (so its MLP
    input depends on the token alone) and whose capital letters share a direction of the embedding."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            elif param.dim() == 1:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 1.5 / param.shape[-1] ** 0.5)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        shared = torch.randn(D_MODEL)
        model.model.embed_tokens.weight[CAPITALS] += 1.5 * shared / shared.norm()
    return wrap_model(model, char_tokenizer(), "planted")


def token_inputs(loaded: LoadedModel) -> torch.Tensor:
    """[V, d]: layer 0's MLP input for each token (the same at every position, attention being silent)."""
    ids = torch.stack([torch.zeros(VOCAB, dtype=torch.long), torch.arange(VOCAB)], dim=1)  # [V, 2] BOS, token
    return Harvester(loaded, first_position=1).harvest(ids).x[:, 0].float()  # [V, d]


def _threshold(w: torch.Tensor, inputs: torch.Tensor, on: list[int]) -> float:
    """The midpoint between the scores of the tokens in `on` and of the others (which it must separate)."""
    s = inputs @ w
    off = [t for t in range(1, VOCAB) if t not in on]
    low, high = float(s[on].min()), float(s[off].max())
    assert low > high, "the planted direction does not separate its tokens"
    return (low + high) / 2


def planted_transcoder(loaded: LoadedModel, seed: int = 0) -> Transcoder:
    """A ReLU CLT of 3 layers x 4 features: ON_OPEN fires exactly on '(' and writes the unembedding
    direction of 'Q' into the last layer; ON_CAPITAL fires exactly on capital letters, its decoder
    random; NOISE (layer 2) has a random encoder firing on about a fifth of tokens and a random
    decoder. Every other feature never fires."""
    tc = Transcoder.random(TranscoderConfig("clt", 3, D_MODEL, 4, activation="relu"), seed=seed)
    g = torch.Generator().manual_seed(seed)
    inputs = token_inputs(loaded)
    with torch.no_grad():
        tc.W_enc.zero_()
        tc.b_enc.fill_(-1.0)
        for layer in range(3):
            tc.W_dec[layer].zero_()
        w_open = inputs[OPEN] / inputs[OPEN].norm()
        caps = inputs[CAPITALS].mean(0) - inputs[[t for t in range(1, VOCAB) if t not in CAPITALS]].mean(0)
        w_caps = caps / caps.norm()
        for (layer, f), w, on in ((ON_OPEN, w_open, [OPEN]), (ON_CAPITAL, w_caps, CAPITALS)):
            tc.W_enc[layer, f] = w
            tc.b_enc[layer, f] = -_threshold(w, inputs, on)
        said = unembedding_directions(loaded)[:, SAID]
        strength = 3.0
        tc.W_dec[0][ON_OPEN[1], 2] = strength * said / said.norm()
        rand = torch.randn(3, D_MODEL, generator=g)
        tc.W_dec[0][ON_CAPITAL[1]] = strength * rand / rand.norm()
        noise = torch.randn(D_MODEL, generator=g)
        tc.W_enc[NOISE[0], NOISE[1]] = noise / noise.norm()
        tc.b_enc[NOISE[0], NOISE[1]] = 0.0  # set from the text by `calibrate_noise`
        rand = torch.randn(D_MODEL, generator=g)
        tc.W_dec[2][NOISE[1], 0] = strength * rand / rand.norm()
    return tc


def calibrate_noise(loaded: LoadedModel, tc: Transcoder, ids: torch.Tensor, density: float = 0.2) -> None:
    """Set the NOISE feature's bias so that it fires on about `density` of the tokens of contexts ids [C, T]."""
    x = Harvester(loaded, first_position=1).harvest(ids).x  # [C * (T-1), L, d]
    pre = x[:, NOISE[0]].float() @ tc.W_enc[NOISE[0], NOISE[1]]
    with torch.no_grad():
        tc.b_enc[NOISE[0], NOISE[1]] = -float(torch.quantile(pre, 1 - density))


def tokenize(text: str) -> list[int]:
    """char_tokenizer's ids, without the tokenizer."""
    return [ord(c) - 31 if 32 <= ord(c) < 127 else ord("?") - 31 for c in text]
