"""Cross-layer and per-layer transcoders.

A transcoder reads the residual stream before each layer's MLP (`resid_mid`) and reconstructs what
that MLP adds to the residual stream (`mlp_out`). Its features live per layer: a feature of layer l
has an encoder row reading resid_mid of layer l, and decoder vectors writing to the MLP output of

- every layer j >= l, for a cross-layer transcoder (CLT), or
- layer l only, for a per-layer transcoder (PLT), which may add a linear skip path x_l @ W_skip_l.

Shapes use L = n_layers, F = n_features (per layer), d = d_model. Inputs and outputs carry a layer
axis just before the model axis: x is [..., L, d], activations are [..., L, F].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cltrace.errors import CltraceError
from cltrace.transcoder.activation import Activation, JumpReLU, make_activation
from cltrace.transcoder.config import DTYPES, TranscoderConfig
from cltrace.transcoder.kernels import DenseCltDecode

THRESHOLD_INIT = 0.03



def skip_all(x: torch.Tensor, W_skip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., L, d] through every layer's linear skip path W_skip [L, d, d], the product in `dtype`: [..., L, d]."""
    return torch.einsum("...li,lio->...lo", x.to(dtype), W_skip.to(dtype))

class SparseActivations(NamedTuple):
    """Active features of a flattened batch as flat index tensors (all of length n_active)."""

    rows: torch.Tensor  # [n_active] int64, index into the flattened batch
    layers: torch.Tensor  # [n_active] int64, source layer of the feature
    features: torch.Tensor  # [n_active] int64, feature index within its layer
    values: torch.Tensor  # [n_active], activation value
    n_rows: int  # size of the flattened batch


class Transcoder(nn.Module):
    """Base of CLT and PLT: encoder, biases and activation shared by both.

    Parameters: `W_enc` [L, F, d] (one encoder row per feature), `b_enc` [L, F], `b_dec` [L, d],
    and `activation` (a JumpReLU holds `threshold` [L, F] in fp32). Subclasses own the decoder.
    """

    config: TranscoderConfig
    W_dec: nn.Parameter | nn.ParameterList  # each subclass says which

    def __init__(self, config: TranscoderConfig) -> None:
        super().__init__()
        self.config = config
        L, Fn, d, dtype = config.n_layers, config.n_features, config.d_model, config.torch_dtype
        self.W_enc = nn.Parameter(torch.zeros(L, Fn, d, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(L, Fn, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(L, d, dtype=dtype))
        self.activation: Activation = make_activation(
            config.activation, L, Fn, topk_k=config.topk_k, threshold_init=THRESHOLD_INIT
        )
        self.W_skip: nn.Parameter | None = None  # a PLT's linear skip path, [L, d_in, d_out]

    # -- shape helpers ---------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def _check_input(self, x: torch.Tensor, name: str = "x") -> None:
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.n_layers, self.d_model):
            raise CltraceError(
                f"{name} has shape {tuple(x.shape)} but the transcoder expects [..., n_layers={self.n_layers}, "
                f"d_model={self.d_model}]"
            )

    def _check_acts(self, acts: torch.Tensor) -> None:
        if acts.dim() < 2 or tuple(acts.shape[-2:]) != (self.n_layers, self.n_features):
            raise CltraceError(
                f"activations have shape {tuple(acts.shape)} but the transcoder expects "
                f"[..., n_layers={self.n_layers}, "
                f"n_features={self.n_features}]"
            )

    # -- encoder ---------------------------------------------------------------------------------

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., L, F] of x [..., L, d]: every layer's encoder in one einsum."""
        self._check_input(x)
        x = x.to(self.W_enc.dtype)
        return torch.einsum("...ld,lfd->...lf", x, self.W_enc) + self.b_enc  # [..., L, F]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., L, F] of x [..., L, d]."""
        return self.activation(self.encode_pre(x))

    def encode_sparse(self, x: torch.Tensor, with_grad: bool = False) -> SparseActivations:
        """Active features of x [..., L, d] as flat indices into x flattened to [n_rows, L, d].

        With `with_grad`, also lists the zero activations through which the activation's
        estimator passes gradient (see `Activation.support`), so that `decode_sparse` over them
        trains exactly like a dense decode.
        """
        self._check_input(x)
        x = x.reshape(-1, self.n_layers, self.d_model)
        pre = self.encode_pre(x)  # [n_rows, L, F]
        acts = self.activation(pre)  # [n_rows, L, F]
        rows, layers, features = self.activation.support(pre, with_grad=with_grad).nonzero(as_tuple=True)
        return SparseActivations(rows, layers, features, acts[rows, layers, features], x.shape[0])

    def encode_layer_pre(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., F] of layer `layer`'s features on that layer's input x [..., d]."""
        return x.to(self.W_enc.dtype) @ self.W_enc[layer].T + self.b_enc[layer]  # [..., F]

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Activations [..., F] of layer `layer`'s features on that layer's input x [..., d]."""
        return self.activation.at_layer(self.encode_layer_pre(layer, x), layer)

    # -- decoder ---------------------------------------------------------------------------------

    def decode_layer(self, layer: int, acts: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction [..., d] of layer `layer`'s MLP output.

        `acts[k]` [..., F] are the activations of layer k's features, for every k <= layer; `x`
        [..., d] (layer `layer`'s input) is needed only by a PLT with a skip path.
        """
        raise NotImplementedError

    def skip_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The skip path's part [..., d] of layer `layer`'s reconstruction, x [..., d] @ W_skip[layer]."""
        if self.W_skip is None:
            raise CltraceError("this transcoder has no skip path (only a PLT trained with skip has one)")
        return x.to(self.W_skip.dtype) @ self.W_skip[layer]

    def feature_pre_activations(self, x: torch.Tensor, layers: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., n] in fp32 of the n features (layers[i], features[i]) at inputs x [..., n, d]."""
        w = self.W_enc[layers, features].float()  # [n, d]
        return (x.float() * w).sum(-1) + self.b_enc[layers, features].float()

    def _add_skip(self, recon: torch.Tensor, x: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """recon [..., L, d] plus x [..., L, d] through every layer's skip path (product in `dtype`), if there is one."""
        if self.W_skip is None:
            return recon
        if x is None:
            raise CltraceError("this transcoder has a skip path: pass the input x to decode")
        self._check_input(x)
        return recon + skip_all(x, self.W_skip, dtype or self.W_skip.dtype).to(recon.dtype)

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Dense reconstruction [..., L, d] of every layer's MLP output from acts [..., L, F].

        `x` (the input, [..., L, d]) is needed only by a PLT with a skip path.
        """
        raise NotImplementedError

    def decode_sparse(
        self,
        rows: torch.Tensor,
        layers: torch.Tensor,
        features: torch.Tensor,
        values: torch.Tensor,
        n_rows: int,
        x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reconstruction [n_rows, L, d] from the active features only.

        The n active features are given as flat tensors of length n: `rows` (index into the
        flattened batch), `layers` (source layer), `features` (index within that layer) and
        `values` (activation). Decoder rows are gathered with index_select and summed with
        index_add, so the cost scales with n (not F) and gradients reach W_dec and `values`.
        `x` [n_rows, L, d] is needed only by a PLT with a skip path.
        """
        raise NotImplementedError

    def decode_dense(self, acts: torch.Tensor, x: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
        """`decode(acts, x)` for acts [N, L, F] with the products in `compute_dtype` and the sums in
        the weights' dtype: the training loss's dense path."""
        raise NotImplementedError

    def _place(self, outs: list[torch.Tensor], n_rows: int) -> torch.Tensor:
        """[n_rows, L, d] from each source layer's decoded output [n_rows, n_out(l)·d]."""
        raise NotImplementedError

    def _check_sparse(
        self, rows: torch.Tensor, layers: torch.Tensor, features: torch.Tensor, values: torch.Tensor, n_rows: int
    ) -> None:
        named = {"rows": rows, "layers": layers, "features": features, "values": values}
        if any(t.dim() != 1 for t in named.values()) or len({t.shape[0] for t in named.values()}) != 1:
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named.items())
            raise CltraceError(
                f"decode_sparse: rows, layers, features and values must be 1-D of one length, got {shapes}"
            )
        bounds = {"rows": n_rows, "layers": self.n_layers, "features": self.n_features}
        for name, bound in bounds.items():
            t = named[name]
            if t.dtype != torch.long:
                raise CltraceError(f"decode_sparse: {name} must be an int64 tensor, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
                bad = int(t.max()) if int(t.max()) >= bound else int(t.min())
                raise CltraceError(f"decode_sparse: {name} index {bad} is out of range [0, {bound})")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations [..., L, F], reconstruction [..., L, d]) of x [..., L, d]."""
        acts = self.encode(x)
        return acts, self.decode(acts, x)

    def decoder_norms(self) -> torch.Tensor:
        """[L, F]: the norm of all of a feature's decoder vectors concatenated."""
        raise NotImplementedError

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """[n, n_out_layers, d]: the decoder vectors of `features` (of `layer`) towards each
        layer in `output_layers(layer)`, in that order."""
        raise NotImplementedError

    def output_layers(self, layer: int) -> range:
        """The layers a feature of `layer` writes to."""
        raise NotImplementedError

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise CltraceError(f"layer {layer} is out of range for a transcoder with {self.n_layers} layers")

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def random(
        cls,
        config: TranscoderConfig,
        seed: int = 0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        threshold_init: float | None = None,
        bandwidth: float | None = None,
    ) -> Transcoder:
        """A transcoder with the paper's initialisation.

        Encoder U(±1/√F), decoder U(±1/√(L·d)), JumpReLU thresholds `threshold_init` (None: 0.03)
        and estimator `bandwidth` (None: JumpReLU's default), biases and any skip matrix zero. Draws
        come from `generator` (or one seeded with `seed`) in fp32 on the CPU, so a seed gives the
        same weights whatever the dtype or device.
        """
        target = _class_for(config)
        if cls is not Transcoder and not issubclass(target, cls):
            raise CltraceError(f"{cls.__name__}.random got a config of kind {config.kind!r}; use Transcoder.random")
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        tc = target(config)
        L, d, Fn = config.n_layers, config.d_model, config.n_features

        def uniform(shape: torch.Size, bound: float) -> torch.Tensor:
            return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound

        with torch.no_grad():
            tc.W_enc.copy_(uniform(tc.W_enc.shape, 1 / math.sqrt(Fn)))
            for w in tc._decoder_parameters():
                w.copy_(uniform(w.shape, 1 / math.sqrt(L * d)))
            if isinstance(tc.activation, JumpReLU):
                if threshold_init is not None:
                    tc.activation.threshold.fill_(float(threshold_init))
                if bandwidth is not None:
                    tc.activation.bandwidth = float(bandwidth)
        return tc.to(device)

    def _decoder_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def _apply(self, fn: Any, recurse: bool = True) -> Transcoder:
        # Keep config.dtype true to the weights after `.to(dtype)`, `.half()` and the like.
        super()._apply(fn, recurse)
        for name, dtype in DTYPES.items():
            if self.W_enc.dtype == dtype and self.config.dtype != name:
                self.config = dataclasses.replace(self.config, dtype=name)
        return self

    def extra_repr(self) -> str:
        c = self.config
        return f"n_layers={c.n_layers}, d_model={c.d_model}, n_features={c.n_features}, dtype={c.dtype}"


class CrossLayerTranscoder(Transcoder):
    """CLT: `W_dec[l]` [F, L - l, d] holds the decoders of layer l's features towards layers l..L-1."""

    W_dec: nn.ParameterList

    def __init__(self, config: TranscoderConfig) -> None:
        if config.kind != "clt":
            raise CltraceError(f"CrossLayerTranscoder needs kind 'clt', got {config.kind!r}")
        super().__init__(config)
        L, Fn, d = config.n_layers, config.n_features, config.d_model
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(Fn, L - l, d, dtype=config.torch_dtype)) for l in range(L)]
        )

    def _decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.W_dec)

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        self._check_acts(acts)
        acts = acts.to(self.b_dec.dtype)
        recon = self.b_dec.expand(*acts.shape[:-1], self.d_model)  # [..., L, d]
        for l in range(self.n_layers):
            out = torch.einsum("...f,fjd->...jd", acts[..., l, :], self.W_dec[l])  # [..., L - l, d]
            recon = recon + F.pad(out, (0, 0, l, 0))  # placed at target layers l..L-1
        return recon

    def decode_layer(self, layer: int, acts: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        out = self.b_dec[layer].expand(*acts[layer].shape[:-1], self.d_model)  # [..., d]
        for k in range(layer + 1):
            out = out + acts[k] @ self.W_dec[k][:, layer - k, :]
        return out

    def decode_dense(self, acts: torch.Tensor, x: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
        flat = DenseCltDecode.apply(acts, compute_dtype, *self.W_dec)  # [N, L·d]
        return flat.view(acts.shape[0], self.n_layers, self.d_model) + self.b_dec

    def _place(self, outs: list[torch.Tensor], n_rows: int) -> torch.Tensor:
        d = self.d_model
        recon_flat = outs[0]  # [n_rows, L·d]: target layer j occupies columns j·d:(j+1)·d
        for l, out in enumerate(outs[1:], start=1):
            recon_flat = recon_flat + F.pad(out, (l * d, 0))  # layer l writes to layers l..L-1
        return recon_flat.view(n_rows, self.n_layers, d)

    def decode_sparse(
        self,
        rows: torch.Tensor,
        layers: torch.Tensor,
        features: torch.Tensor,
        values: torch.Tensor,
        n_rows: int,
        x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_sparse(rows, layers, features, values, n_rows)
        L, d = self.n_layers, self.d_model
        recon = self.b_dec.new_zeros(n_rows * L, d)  # [(row, target layer), d]
        values = values.to(self.b_dec.dtype)
        # The decoders of layer l have their own shape, so gather them one source layer at a time:
        # sort the entries by layer once, then take each layer's run.
        order = torch.argsort(layers, stable=True)
        counts = torch.bincount(layers, minlength=L).tolist()
        for l, at in enumerate(order.split(counts)):  # at: [n_l] positions of layer l's entries
            if at.numel() == 0:
                continue
            dec = self.W_dec[l].index_select(0, features.index_select(0, at))  # [n_l, L - l, d]
            scaled = dec * values.index_select(0, at)[:, None, None]  # [n_l, L - l, d]
            targets = rows.index_select(0, at)[:, None] * L + torch.arange(l, L, device=rows.device)  # [n_l, L - l]
            recon = recon.index_add(0, targets.reshape(-1), scaled.reshape(-1, d))
        return recon.view(n_rows, L, d) + self.b_dec

    def decoder_norms(self) -> torch.Tensor:
        # ‖W_dec,i‖ over all target layers: the norm runs over [L - l, d]. vector_norm rather than
        # pow-sum-sqrt: its backward is one pass over the decoders instead of three.
        return torch.stack([torch.linalg.vector_norm(w, dim=(1, 2)) for w in self.W_dec])  # [L, F]

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        return self.W_dec[layer].index_select(0, features.to(torch.long))  # [n, L - layer, d]

    def output_layers(self, layer: int) -> range:
        self._check_layer(layer)
        return range(layer, self.n_layers)


class PerLayerTranscoder(Transcoder):
    """PLT: `W_dec` [L, F, d]; with `config.skip`, `W_skip` [L, d, d] adds recon_l += x_l @ W_skip_l.

    W_skip_l is stored input-major ([d_in, d_out]), as circuit-tracer's CLT does. circuit-tracer's
    per-layer files store the transpose (it computes x @ W_skip.T); the circuit-tracer export and
    import transpose it.
    """

    W_dec: nn.Parameter

    def __init__(self, config: TranscoderConfig) -> None:
        if config.kind != "plt":
            raise CltraceError(f"PerLayerTranscoder needs kind 'plt', got {config.kind!r}")
        super().__init__(config)
        L, Fn, d, dtype = config.n_layers, config.n_features, config.d_model, config.torch_dtype
        self.W_dec = nn.Parameter(torch.zeros(L, Fn, d, dtype=dtype))
        if config.skip:
            self.W_skip = nn.Parameter(torch.zeros(L, d, d, dtype=dtype))

    def _decoder_parameters(self) -> list[nn.Parameter]:
        return [self.W_dec]

    def decode_layer(self, layer: int, acts: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        out = acts[layer] @ self.W_dec[layer] + self.b_dec[layer]  # [..., d]
        if self.W_skip is not None:
            if x is None:
                raise CltraceError("this transcoder has a skip path: pass the layer's input x to decode_layer")
            out = out + self.skip_layer(layer, x)
        return out

    def decode_dense(self, acts: torch.Tensor, x: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
        products = torch.einsum("nlf,lfd->nld", acts.to(compute_dtype), self.W_dec.to(compute_dtype))  # [N, L, d]
        return self._add_skip(products.to(self.b_dec.dtype) + self.b_dec, x, compute_dtype)

    def _place(self, outs: list[torch.Tensor], n_rows: int) -> torch.Tensor:
        return torch.stack(outs, dim=1)  # [n_rows, L, d]

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        self._check_acts(acts)
        recon = torch.einsum("...lf,lfd->...ld", acts.to(self.W_dec.dtype), self.W_dec) + self.b_dec  # [..., L, d]
        return self._add_skip(recon, x)

    def decode_sparse(
        self,
        rows: torch.Tensor,
        layers: torch.Tensor,
        features: torch.Tensor,
        values: torch.Tensor,
        n_rows: int,
        x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_sparse(rows, layers, features, values, n_rows)
        L, Fn, d = self.n_layers, self.n_features, self.d_model
        if x is not None and tuple(x.shape) != (n_rows, L, d):
            raise CltraceError(f"decode_sparse: x has shape {tuple(x.shape)}, expected [n_rows={n_rows}, {L}, {d}]")
        dec = self.W_dec.view(L * Fn, d).index_select(0, layers * Fn + features)  # [n, d]
        scaled = dec * values.to(dec.dtype)[:, None]  # [n, d]
        recon = self.b_dec.new_zeros(n_rows * L, d).index_add(0, rows * L + layers, scaled)  # [(row, layer), d]
        return self._add_skip(recon.view(n_rows, L, d) + self.b_dec, x)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1)  # [L, F]

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        return self.W_dec[layer].index_select(0, features.to(torch.long))[:, None, :]  # [n, 1, d]

    def output_layers(self, layer: int) -> range:
        self._check_layer(layer)
        return range(layer, layer + 1)


def _class_for(config: TranscoderConfig) -> type[Transcoder]:
    return CrossLayerTranscoder if config.kind == "clt" else PerLayerTranscoder


def make_transcoder(config: TranscoderConfig) -> Transcoder:
    """An all-zero transcoder of the config's kind (JumpReLU thresholds at 0.03); fill it by loading."""
    return _class_for(config)(config)


__all__ = [
    "CrossLayerTranscoder",
    "PerLayerTranscoder",
    "SparseActivations",
    "Transcoder",
    "TranscoderConfig",
    "make_transcoder",
]
