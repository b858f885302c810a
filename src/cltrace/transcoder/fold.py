"""Folding the training-time normalisation of inputs and targets into a transcoder's weights."""

from __future__ import annotations

import torch

from cltrace.transcoder.transcoder import PerLayerTranscoder, Transcoder


def fold_normalisation(tc: Transcoder, scale_x: torch.Tensor, scale_y: torch.Tensor) -> Transcoder:
    """A copy of `tc` (trained on x·scale_x → y·scale_y) that maps raw x to raw y.

    Encoder columns of layer l are multiplied by scale_x[l] (the pre-activations, and so the
    thresholds and activations, are unchanged); decoders towards layer j and b_dec[j] are divided
    by scale_y[j]; a PLT skip matrix of layer l is multiplied by scale_x[l] / scale_y[l].
    """
    folded = Transcoder.random(tc.config)  # right class and shapes; every tensor is overwritten
    folded.load_state_dict(tc.state_dict())
    sx = scale_x.to(torch.float64)
    sy = scale_y.to(torch.float64)
    L = tc.n_layers
    with torch.no_grad():
        def scaled(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return (t.to(torch.float64) * s).to(t.dtype)

        folded.W_enc.copy_(scaled(tc.W_enc, sx[:, None, None]))
        folded.b_dec.copy_(scaled(tc.b_dec, 1 / sy[:, None]))
        if isinstance(tc, PerLayerTranscoder) and isinstance(folded, PerLayerTranscoder):
            folded.W_dec.copy_(scaled(tc.W_dec, 1 / sy[:, None, None]))
            if tc.W_skip is not None and folded.W_skip is not None:
                folded.W_skip.copy_(scaled(tc.W_skip, (sx / sy)[:, None, None]))
        else:  # a CLT: W_dec[l] [F, L - l, d] writes to layers l..L-1
            for l in range(L):
                folded.W_dec[l].copy_(scaled(tc.W_dec[l], 1 / sy[l:][None, :, None]))
    return folded


__all__ = ["fold_normalisation"]
