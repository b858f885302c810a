"""Static views of a feature, from the weights alone: the tokens it promotes and suppresses and those that drive it."""

from __future__ import annotations

from typing import Any

import torch

from cltrace.data.harvest import base_transformer

# -- static views: what a feature says and what drives it ------------------------------------------


def final_norm_weight(loaded: Any) -> torch.Tensor:
    """The elementwise weight of the model's final norm [d] (Gemma's 1 + w), ones if there is none."""
    base = base_transformer(loaded)
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(base, name, None)
        weight = getattr(module, "weight", None)
        if weight is not None:
            w = weight.detach().float()
            return 1.0 + w if loaded.adapter.rms_kind == "rms_offset" else w
    return torch.ones(loaded.d_model, device=loaded.device)


def unembedding_directions(loaded: Any) -> torch.Tensor:
    """[d, V]: the directions whose product with a residual-stream vector gives its direct logit effect
    (final norm weight times the unembedding; the norm's denominator and bias left out)."""
    W_U = loaded.model.get_output_embeddings().weight.detach().float()  # [V, d]
    return final_norm_weight(loaded).to(W_U.device)[:, None] * W_U.T  # [d, V]


def summed_decoders(tc: Any, layer: int, features: torch.Tensor | None = None) -> torch.Tensor:
    """[F, d] (or [len(features), d]): each feature of `layer`'s decoder vectors summed over its output
    layers; `features` picks some of them (default: all)."""
    if features is None:
        features = torch.arange(tc.n_features, device=tc.W_enc.device)
    return tc.decoder_vectors(layer, features).detach().float().sum(1)


@torch.no_grad()
def token_views(loaded: Any, tc: Any, n: int = 10, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Per feature [L, F, n]: the promoted tokens (top of decoder · unembedding), the suppressed
    ones (bottom), and the input tokens whose embedding its encoder reads most (encoder · embedding),
    as ids and scores."""
    U = unembedding_directions(loaded)  # [d, V]
    E = loaded.model.get_input_embeddings().weight.detach().float()  # [V, d]
    L, Fn = tc.n_layers, tc.n_features
    n = min(n, U.shape[1])
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("promoted_ids", "promoted", "suppressed_ids", "suppressed", "inputs_ids", "inputs")}
    for layer in range(L):
        D = summed_decoders(tc, layer).to(U.device)  # [F, d]
        W = tc.W_enc[layer].detach().float().to(E.device)  # [F, d]
        for s in range(0, Fn, chunk):
            logits = D[s : s + chunk] @ U  # [c, V]
            top = logits.topk(n, dim=-1)
            bot = logits.topk(n, dim=-1, largest=False)
            inp = (W[s : s + chunk] @ E.T).topk(n, dim=-1)  # [c, n]
            for key, res in (("promoted", top), ("suppressed", bot), ("inputs", inp)):
                out[key].append(res.values.cpu())
                out[key + "_ids"].append(res.indices.cpu())
    return {k: torch.cat(v).view(L, Fn, n) for k, v in out.items()}


__all__ = ["final_norm_weight", "summed_decoders", "token_views", "unembedding_directions"]
