"""The training loss's sparse decode: only the features in the activation's support are decoded.

Each source layer's decode is a sparse-dense product (`SparseCltDecode`, `SparseMatmul`) instead
of a gather of every active feature's decoder rows, which would need n_active x L x d memory.
With `row_grads`, each decoder's gradient is a sparse tensor over the rows of the features
present: a lazy optimiser (`cltrace.train.optimizer.LazyAdam`) then leaves every other row, and
its moments, untouched, which is what makes wide transcoders trainable where memory bandwidth is
the limit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cltrace.transcoder.kernels import SparseCltDecode, SparseLayout, SparseMatmul
from cltrace.transcoder.transcoder import PerLayerTranscoder, Transcoder


class SparseDecode(NamedTuple):
    """A sparse decode's reconstruction and the decoder norm of each decoded entry's feature."""

    recon: torch.Tensor  # [n_rows, L, d]
    norms: torch.Tensor  # [n], ‖W_dec‖ of entry i's feature (all its decoder vectors concatenated)


def csr_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row offsets [n_rows + 1] of entries whose row indices `rows` [n] are sorted."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow


def decode_sparse_matmul(tc: Transcoder, rows: torch.Tensor, layers: torch.Tensor, features: torch.Tensor,
                         values: torch.Tensor, n_rows: int, x: torch.Tensor | None = None, row_grads: bool = False,
                         decoder_norms: torch.Tensor | None = None) -> SparseDecode:
    """`tc.decode_sparse`'s reconstruction [n_rows, L, d] and gradients, for training.

    The n entries (`rows`, `layers`, `features`, `values`, as `Transcoder.decode_sparse` takes
    them) must be in row-major order, as `nonzero` gives them. `x` [n_rows, L, d] is needed only
    by a PLT with a skip path. `decoder_norms` [L, F] (default `tc.decoder_norms()`) gives the
    entries' norms. With `row_grads`, decoder gradients, those of the entries' norms included,
    are sparse over the rows of the features present, and `decoder_norms` must carry no gradient.
    """
    values = values.to(tc.b_dec.dtype)
    if decoder_norms is None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not row_grads):
            decoder_norms = tc.decoder_norms()  # [L, F]
    if isinstance(tc, PerLayerTranscoder):
        recon, norms = _plt_decode(tc, rows, layers, features, values, n_rows, decoder_norms, row_grads)
    else:
        recon, norms = _clt_decode(tc, rows, layers, features, values, n_rows, decoder_norms, row_grads)
    return SparseDecode(tc._add_skip(recon + tc.b_dec, x), norms)


def _clt_decode(tc: Transcoder, rows: torch.Tensor, layers: torch.Tensor, features: torch.Tensor, values: torch.Tensor,
                n_rows: int, all_norms: torch.Tensor, row_grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every source layer's sparse product in one buffer: ([n_rows, L, d], the entries' norms [n])."""
    layout = []
    norms = all_norms[layers, features].to(values.dtype)  # [n]
    for l in range(tc.n_layers):
        at = (layers == l).nonzero().squeeze(1)  # [n_l]
        r = rows.index_select(0, at)
        layout.append(SparseLayout(at, csr_offsets(r, n_rows), features.index_select(0, at), r))
    flat, norms = SparseCltDecode.apply(values, norms, layout, n_rows, row_grads, *tc.W_dec)  # [n_rows, L·d], [n]
    return flat.view(n_rows, tc.n_layers, tc.d_model), norms


def _plt_decode(tc: PerLayerTranscoder, rows: torch.Tensor, layers: torch.Tensor, features: torch.Tensor,
                values: torch.Tensor, n_rows: int, all_norms: torch.Tensor,
                row_grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparse product over (row, layer) pairs: ([n_rows, L, d], the entries' norms [n])."""
    L, Fn = tc.n_layers, tc.n_features
    out_rows = rows * L + layers  # [n], sorted like the entries
    flat = layers * Fn + features  # [n], the entry's row of W_dec viewed as [L·F, d]
    norms = all_norms.reshape(-1).index_select(0, flat)  # [n]
    crow = csr_offsets(out_rows, n_rows * L)
    # rows of W_dec [L, F, d] named by (layer, feature): 2 row dimensions
    out, norms = SparseMatmul.apply(values, norms, tc.W_dec, crow, flat, out_rows, n_rows * L, row_grads, 2)  # [n_rows·L, d]
    return out.view(n_rows, L, tc.d_model), norms


__all__ = ["SparseDecode", "csr_offsets", "decode_sparse_matmul"]
