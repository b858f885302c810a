"""What a transcoder is: its kind, shape, nonlinearity, dtype and the model sites it reads and writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from cltrace.errors import CltraceError, is_int
from cltrace.fields import from_mapping
from cltrace.transcoder.activation import ACTIVATIONS

KINDS = ("clt", "plt")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
INPUT_HOOKS = ("resid_mid",)
OUTPUT_HOOKS = ("mlp_out",)


@dataclass
class TranscoderConfig:
    """What a transcoder is: its shape, nonlinearity and the model sites it reads and writes."""

    kind: str
    """"clt" (a feature of layer l writes to layers l..L-1) or "plt" (it writes to layer l only)."""

    n_layers: int
    """Number of model layers covered, L; the transcoder reads and writes every one of them."""

    d_model: int
    """Width of the model's residual stream, d."""

    n_features: int
    """Number of features per layer, F (the transcoder has L·F features in all)."""

    activation: str = "jumprelu"
    """Feature nonlinearity: "jumprelu" (learned per-feature threshold), "relu" or "topk"."""

    topk_k: int | None = None
    """Features kept per layer and token when activation is "topk"; None otherwise."""

    skip: bool = False
    """PLT only: add a learned linear skip path, recon_l += x_l @ W_skip_l."""

    model_id: str | None = None
    """Identifier of the model the transcoder was trained on (hub id or local path), if known."""

    input_hook: str = "resid_mid"
    """Site read: the residual stream before the MLP's pre-norm."""

    output_hook: str = "mlp_out"
    """Site reconstructed: what the MLP block adds to the residual stream (after any post-norm)."""

    dtype: str = "float32"
    """Storage dtype of the weights ("float32", "bfloat16", "float16", "float64"); thresholds stay fp32."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise CltraceError naming the first impossible value."""

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise CltraceError(f"transcoder config: {message}")

        require(self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("n_layers", "d_model", "n_features"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        require(
            self.activation in ACTIVATIONS,
            f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}",
        )
        if self.activation == "topk":
            require(
                is_int(self.topk_k) and 1 <= self.topk_k <= self.n_features,
                f"topk_k must be an integer in [1, n_features={self.n_features}] for activation 'topk', "
                f"got {self.topk_k!r}",
            )
        else:
            require(self.topk_k is None, f"topk_k is only for activation 'topk'; set it to null (got {self.topk_k!r})")
        require(isinstance(self.skip, bool), f"skip must be true or false, got {self.skip!r}")
        require(not (self.skip and self.kind != "plt"), "skip is only supported for kind 'plt'; set skip to false")
        require(
            self.model_id is None or isinstance(self.model_id, str),
            f"model_id must be a string or null, got {self.model_id!r}",
        )
        require(
            self.input_hook in INPUT_HOOKS,
            f"input_hook must be one of {', '.join(INPUT_HOOKS)}, got {self.input_hook!r}",
        )
        require(
            self.output_hook in OUTPUT_HOOKS,
            f"output_hook must be one of {', '.join(OUTPUT_HOOKS)}, got {self.output_hook!r}",
        )
        require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The weights' torch dtype."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        """Build a config from `to_dict`'s output, rejecting unknown keys and impossible values."""
        return from_mapping(cls, data, "transcoder config")


__all__ = ["DTYPES", "INPUT_HOOKS", "KINDS", "OUTPUT_HOOKS", "TranscoderConfig"]
