"""Training configuration: one dataclass, a docstring per field, JSON round trip, presets.

Every run writes its `TrainConfig` as `config.json` beside its outputs, so a run folder says how
to reproduce it. `from_dict` rejects unknown keys and impossible values with a `CltraceError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cltrace.data.harvest import FIRST_POSITION
from cltrace.errors import CltraceError, is_int
from cltrace.fields import check_keys, from_mapping
from cltrace.notation import NotationError, split_setting

DECODES = ("sparse", "dense")
OPTIMIZERS = ("adam", "lazy_adam")
TRAIN_DTYPES = ("float32", "bfloat16", "float64")
HARVEST_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """How to train a transcoder: what, on which model and text, for how long, with which loss."""

    # -- what is trained ---------------------------------------------------------------------------
    kind: str = "clt"
    """"clt" (cross-layer transcoder) or "plt" (per-layer transcoders)."""
    n_features: int = 512
    """Features per layer, F."""
    activation: str = "jumprelu"
    """Feature nonlinearity: "jumprelu" (default), "relu" or "topk"."""
    topk_k: int | None = None
    """Features kept per layer and token when activation is "topk"; null otherwise."""
    skip: bool = False
    """PLT only: learn a linear skip path x_l @ W_skip_l beside the features."""

    # -- data --------------------------------------------------------------------------------------
    model: str = "default"
    """Model to train on: "default" (SmolLM2-135M-Instruct), a hub id, a local directory or a .gguf file."""
    source: str = "default"
    """Text source: "default" (offline corpus), a .txt/.jsonl/.parquet file or folder, or "hf:NAME[:CONFIG][:SPLIT]"."""
    text_column: str = "text"
    """Column/field holding the text in .jsonl, .parquet and Hugging Face sources."""
    store: str | None = None
    """Activation store folder (written by `cltrace harvest`) to train from instead of harvesting the text
    on the fly; null streams. Its model, source and packing must match this config's."""
    n_ctx: int = 128
    """Tokens per context, BOS included; the BOS position is not trained on."""
    batch_tokens: int = 1024
    """Tokens per optimiser step."""
    total_tokens: int = 1_000_000
    """Training tokens in all (the run takes total_tokens // batch_tokens steps)."""
    shuffle_contexts: int = 32
    """Contexts harvested together and shuffled token-wise before being cut into steps (the shuffle buffer)."""
    mix_contexts: int = 4096
    """Contexts of token ids packed ahead and shuffled before harvesting (rounded up to whole shuffle buffers;
    1: none), so that a shuffle buffer draws from hundreds of documents instead of the few consecutive ones
    its contexts would otherwise come from. Applies to harvesting on the fly; an activation store keeps the
    order it was harvested in (`cltrace harvest --mix-contexts`)."""
    harvest_batch: int = 16
    """Contexts per forward pass of the model while harvesting."""
    norm_tokens: int = 4096
    """Tokens of the first shuffle buffer used to estimate the per-layer normalisation scales."""
    heldout_fraction: float = 0.01
    """Share of documents (by text hash) held out from training and used by the final evaluation."""
    split_seed: int = 0
    """Salt of the held-out split's hash."""

    # -- optimisation ------------------------------------------------------------------------------
    lr: float = 3e-4
    """Adam learning rate; constant, then decayed linearly to zero over the last `lr_decay_frac` of steps."""
    lr_decay_frac: float = 0.2
    """Share of the run, at its end, over which the learning rate decays linearly to zero."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    sparsity_lambda: float = 2e-4
    """λ of the sparsity penalty λ Σ_i tanh(c · ‖W_dec,i‖ · a_i) (per token, summed over all features)."""
    sparsity_c: float = 1.0
    """c, the tanh scale of the sparsity penalty."""
    sparsity_warmup_frac: float = 0.5
    """Share of the run, from its start, over which λ ramps linearly from 0 to sparsity_lambda."""
    preact_lambda: float = 3e-6
    """λ_p of the pre-activation loss λ_p Σ_i ReLU(θ_i − h_i) · ‖W_dec,i‖, which keeps features alive."""
    threshold_init: float = 0.03
    """Initial JumpReLU threshold, on normalised inputs (mean norm √d_model)."""
    bandwidth: float = 0.1
    """Width ε of the rectangle kernel of the JumpReLU threshold's straight-through estimator."""
    seed: int = 0
    """Seed of the initial weights and of the token shuffle."""
    dtype: str = "float32"
    """Compute dtype of training: "float32", "bfloat16" (fp32 weights and Adam, bf16 matrix products under
    autocast; several times faster on CPUs with AVX512-BF16/AMX and on GPUs) or "float64" (exactness tests)."""
    harvest_dtype: str = "float32"
    """Compute dtype of the model while harvesting: "float32" or "bfloat16" (autocast; faster, with a few percent of noise on the activations)."""
    decode: str = "sparse"
    """"sparse" (decode only the active features; default) or "dense" (the naive full decoder product)."""
    optimizer: str = "adam"
    """"adam", or "lazy_adam": Adam that updates only the decoder rows of the features in a step's support
    (the rest keep their weights and moments), for wide transcoders; needs decode "sparse" and one process,
    and holds the decoder norms of the pre-activation loss constant (that loss then trains the encoder)."""

    # -- bookkeeping -------------------------------------------------------------------------------
    checkpoint_every: int = 100
    """Steps between checkpoints (a checkpoint is also written at the end)."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl."""
    dead_window: int = 10_000_000
    """A feature that has not fired in this many training tokens (or the whole run, if shorter) is dead."""
    eval_tokens: int = 4096
    """Held-out tokens of the final evaluation (0 skips it)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_tokens

    def validate(self) -> None:
        """Raise CltraceError naming the first impossible value."""

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise CltraceError(f"train config: {message}")

        def is_num(v: Any) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)

        require(self.kind in ("clt", "plt"), f"kind must be 'clt' or 'plt', got {self.kind!r}")
        require(self.activation in ("jumprelu", "relu", "topk"),
                f"activation must be 'jumprelu', 'relu' or 'topk', got {self.activation!r}")
        for name in ("n_features", "n_ctx", "batch_tokens", "total_tokens", "shuffle_contexts", "mix_contexts", "harvest_batch",
                     "norm_tokens", "checkpoint_every", "log_every", "dead_window"):
            v = getattr(self, name)
            require(is_int(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        require(self.n_ctx > FIRST_POSITION,
                f"n_ctx must be at least {FIRST_POSITION + 1} (BOS, the first token and one trained token), got {self.n_ctx}")
        require(is_int(self.eval_tokens) and self.eval_tokens >= 0, f"eval_tokens must be an integer >= 0, got {self.eval_tokens!r}")
        require(is_int(self.seed) and is_int(self.split_seed), "seed and split_seed must be integers")
        if self.activation == "topk":
            require(is_int(self.topk_k) and 1 <= self.topk_k <= self.n_features,
                    f"topk_k must be an integer in [1, n_features={self.n_features}] for activation 'topk', got {self.topk_k!r}")
        else:
            require(self.topk_k is None, f"topk_k is only for activation 'topk'; set it to null (got {self.topk_k!r})")
        require(isinstance(self.skip, bool), f"skip must be true or false, got {self.skip!r}")
        require(not (self.skip and self.kind != "plt"), "skip is only for kind 'plt'; set skip to false")
        for name in ("model", "source", "text_column"):
            v = getattr(self, name)
            require(isinstance(v, str) and v.strip() != "", f"{name} must be a non-empty string, got {v!r}")
        require(self.store is None or (isinstance(self.store, str) and self.store.strip() != ""),
                f"store must be a folder path or null, got {self.store!r}")
        buffer_tokens = self.shuffle_contexts * (self.n_ctx - FIRST_POSITION)
        require(self.batch_tokens <= buffer_tokens,
                f"batch_tokens={self.batch_tokens} exceeds the shuffle buffer of shuffle_contexts x "
                f"(n_ctx - {FIRST_POSITION} sink positions) = "
                f"{buffer_tokens} tokens; raise shuffle_contexts or lower batch_tokens")
        require(self.total_tokens >= self.batch_tokens,
                f"total_tokens={self.total_tokens} is less than one step of batch_tokens={self.batch_tokens}")
        require(is_num(self.heldout_fraction) and 0 < self.heldout_fraction < 1,
                f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        require(is_num(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        for name in ("lr_decay_frac", "sparsity_warmup_frac"):
            v = getattr(self, name)
            require(is_num(v) and 0 <= v <= 1, f"{name} must be in [0, 1], got {v!r}")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            require(is_num(v) and 0 <= v < 1, f"{name} must be in [0, 1), got {v!r}")
        for name in ("grad_clip", "sparsity_lambda", "preact_lambda"):
            v = getattr(self, name)
            require(is_num(v) and v >= 0, f"{name} must be a number >= 0, got {v!r}")
        for name in ("sparsity_c", "bandwidth"):
            v = getattr(self, name)
            require(is_num(v) and v > 0, f"{name} must be a positive number, got {v!r}")
        require(is_num(self.threshold_init) and self.threshold_init >= 0,
                f"threshold_init must be a number >= 0, got {self.threshold_init!r}")
        require(self.dtype in TRAIN_DTYPES, f"dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        require(self.harvest_dtype in HARVEST_DTYPES,
                f"harvest_dtype must be one of {', '.join(HARVEST_DTYPES)}, got {self.harvest_dtype!r}")
        require(self.decode in DECODES, f"decode must be 'sparse' or 'dense', got {self.decode!r}")
        require(self.optimizer in OPTIMIZERS, f"optimizer must be 'adam' or 'lazy_adam', got {self.optimizer!r}")
        require(self.optimizer != "lazy_adam" or self.decode == "sparse",
                "optimizer 'lazy_adam' needs decode 'sparse' (the dense decode gives every decoder row a gradient)")

    # -- JSON ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config, rejecting unknown keys (and, through validation, impossible values)."""
        return from_mapping(cls, data, "train config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> TrainConfig:
        """A config from JSON text; CltraceError (naming `where`) for bad JSON, unknown keys or values."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CltraceError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or delete it") from None
        except (ValueError, RecursionError) as exc:  # an integer too long to read, nesting too deep
            raise CltraceError(f"{where} is not valid JSON ({type(exc).__name__}); fix or delete it") from None
        try:
            return cls.from_dict(data)
        except CltraceError as exc:
            raise CltraceError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a config.json (a run folder's, or one given with --config).

        A config file is meant to be edited, so it carries no checksum: any valid content loads as
        written, and anything else is a one-line CltraceError naming the file.
        """
        path = Path(path)
        if not path.is_file():
            raise CltraceError(f"no train config at {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc).splitlines()[0]
            raise CltraceError(f"cannot read train config {path} ({reason}); fix or delete it") from None
        return cls.from_json(text, where=str(path))

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with some fields replaced (unknown names and impossible values rejected)."""
        check_keys(TrainConfig, overrides, "train config")
        data = self.to_dict()
        data.update(overrides)
        return TrainConfig(**data)


def parse_override(text: str) -> tuple[str, Any]:
    """`"key=value"` → (key, value), the value read as JSON where it parses (numbers, true, null), else a string."""
    try:
        key, raw = split_setting(text)  # the one --set grammar, shared with `intervene --set`
    except NotationError as exc:
        raise CltraceError(f"override {text!r} {exc}; write key=value (for example lr=1e-4)") from None
    key = key.replace("-", "_")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (or too deep / too long a number): the text itself
        value = raw
    if isinstance(value, float) and value.is_integer() and "." not in raw and "e" not in raw.lower():
        value = int(value)
    return key, value


# Presets -----------------------------------------------------------------------------------------

#: The default CLT for the default model, sized to finish in well under an hour on a small CPU.
#: bf16 products and the dense decode are the fastest path on such a CPU (bf16 GEMMs outrun fp32
#: ones, and at this size and L0 the sparse decode is slower than the dense one; see
#: benchmarks/results/train_speed.json), so the preset uses them. Steps of 256 tokens rather than
#: 1,024: on this budget the number of optimiser steps limits quality more than the gradient noise
#: does. Its measured quality is in benchmarks/results/train_default_preset.json and the README.
DEFAULT_PRESET = TrainConfig(
    n_features=256, n_ctx=128, batch_tokens=256, total_tokens=500_000, shuffle_contexts=64, harvest_batch=16,
    lr=1e-3, sparsity_lambda=1.5e-3, sparsity_warmup_frac=0.5, dtype="bfloat16", harvest_dtype="bfloat16",
    decode="dense", checkpoint_every=200, log_every=20, eval_tokens=2048,
)

#: A minutes-long smoke run (and the size tests use).
TINY_PRESET = TrainConfig(
    n_features=64, n_ctx=32, batch_tokens=256, total_tokens=4096, shuffle_contexts=16, harvest_batch=8,
    norm_tokens=256, checkpoint_every=4, log_every=2, eval_tokens=256, sparsity_lambda=1e-3,
)

#: For when the default's budget cannot reach the quality bar (mean NMSE <= 0.35 and spliced top-1 >= 30%
#: at L0 <= 64): the default CLT with several times the tokens (quality keeps improving with tokens)
#: and half the sparsity penalty, decaying the learning rate over the last 30%. λ is set so that L0
#: stays near the bar while the rate decays (L0 climbs as it does); the token count keeps the whole
#: run to a few hours on a small CPU. Its measured quality and time are in
#: benchmarks/results/train_quality_preset.json and the README.
QUALITY_PRESET = dataclasses.replace(DEFAULT_PRESET, total_tokens=2_700_000, sparsity_lambda=7.5e-4, lr_decay_frac=0.3)

PRESETS: dict[str, TrainConfig] = {"default": DEFAULT_PRESET, "quality": QUALITY_PRESET, "tiny": TINY_PRESET}


def preset(name: str) -> TrainConfig:
    """A copy of the preset called `name`."""
    if name not in PRESETS:
        raise CltraceError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


__all__ = ["DEFAULT_PRESET", "PRESETS", "QUALITY_PRESET", "TINY_PRESET", "TrainConfig", "parse_override", "preset"]
