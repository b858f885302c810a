"""How good a transcoder is, in the field's terms, on held-out text.

* NMSE per layer: Σ‖ŷ − y‖² / Σ‖y − ȳ‖² over the evaluated tokens (ȳ: the layer's mean target),
  and its mean over layers.
* L0 per layer: mean active features per token; `l0_mean` is its mean over layers and
  `l0_total` its sum.
* Dead fraction: features that never fired on the evaluated tokens.
* Spliced-in: the model with every MLP block's output replaced by the transcoder's reconstruction
  (no error term), computed layer by layer in one forward pass (a CLT's output at layer l needs
  the features of layers ≤ l, whose inputs already depend on the spliced outputs below);
  KL(original ‖ spliced) of the next-token distribution (nats, mean over tokens) and top-1
  agreement. The attention-sink positions (BOS and the first token, before
  :data:`~cltrace.data.harvest.FIRST_POSITION`; transcoders are not trained on them) keep their
  original MLP outputs and are not scored.

The sink positions are left out of every metric, as they are left out of training. The evaluated
contexts are a seeded random draw from across the held-out split, not its first contexts in order.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cltrace.data.harvest import FIRST_POSITION
from cltrace.data.packing import model_packing, pack_batches
from cltrace.data.sources import open_text_source
from cltrace.device import place
from cltrace.errors import CltraceError
from cltrace.model.hooks import mlp_hooks
from cltrace.model.load import LoadedModel
from cltrace.transcoder import Transcoder


class _Hooks:
    """Capture (and, given a transcoder, splice) every layer's MLP input and output during one forward pass."""

    def __init__(self, loaded: LoadedModel, tc: Transcoder | None) -> None:
        self.loaded = loaded
        self.tc = tc
        self.x: list[torch.Tensor] = []  # per layer: [B, T - FIRST_POSITION, d]
        self.y: list[torch.Tensor] = []
        self.acts: list[torch.Tensor] = []  # per layer: [B, T - FIRST_POSITION, F]

    def open(self) -> contextlib.AbstractContextManager[None]:
        """The hooks, active while the returned context is open."""
        return mlp_hooks(self.loaded, self._input, self._output)

    def _input(self, layer: int, resid_mid: torch.Tensor) -> None:
        x = resid_mid[:, FIRST_POSITION:]  # sink positions left out
        self.x.append(x)
        if self.tc is not None:
            self.acts.append(self.tc.encode_layer(layer, x))

    def _output(self, layer: int, out: torch.Tensor) -> torch.Tensor | None:
        self.y.append(out[:, FIRST_POSITION:])
        if self.tc is None:
            return None
        recon = self.tc.decode_layer(layer, self.acts, self.x[layer]).to(out.dtype)
        return torch.cat([out[:, :FIRST_POSITION], recon], dim=1)


#: Contexts are drawn in a seeded random order from pools of consecutive held-out contexts,
#: SAMPLE_POOL_FACTOR times as many as the evaluation needs and at most SAMPLE_POOL_CONTEXTS: the first
#: contexts in order come from a handful of long documents, which would bias the figures. The pool is
#: bounded because filling it reads about 1/heldout_fraction times its text (a streamed dataset).
SAMPLE_POOL_FACTOR = 64
SAMPLE_POOL_CONTEXTS = 4096


def token_batches(
    loaded: LoadedModel,
    source: Any,
    n_tokens: int,
    *,
    n_ctx: int = 128,
    batch_size: int = 8,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    heldout_fraction: float = 0.01,
    split_seed: int = 0,
    split: str = "heldout",
    bos_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """[batch, n_ctx] token batches (BOS first) of `source`'s held-out split, ≥ n_tokens scored tokens in all,
    drawn across the split (see `SAMPLE_POOL_FACTOR`).

    `source` is a spec string ("default", a path, "hf:..."), an iterable of documents, or a
    LongTensor [n, n_ctx] of ready token contexts.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.shape[1] <= FIRST_POSITION:
            raise CltraceError(f"token contexts must be [n, n_ctx > {FIRST_POSITION}], got {tuple(source.shape)}")
        per = source.shape[1] - FIRST_POSITION
        need = -(-n_tokens // per)
        yield from source[:need].split(batch_size)
        return
    if isinstance(source, str):
        source = open_text_source(source)
    need = -(-n_tokens // (n_ctx - FIRST_POSITION))  # contexts
    pool = min(SAMPLE_POOL_FACTOR * need, SAMPLE_POOL_CONTEXTS)
    mix = -(-pool // batch_size) * batch_size  # a multiple of the batch, as packing asks
    tokenize, pack = model_packing(
        loaded, n_ctx, batch_size, tokenize=tokenize, bos_id=bos_id, split=split,
        heldout_fraction=heldout_fraction, split_seed=split_seed, drop_last=False, mix_contexts=mix,
    )
    got = 0
    for batch in pack_batches(source, tokenize, pack):
        yield batch.tokens
        got += batch.tokens.shape[0] * (n_ctx - FIRST_POSITION)
        if got >= n_tokens:
            return


def _run_batch(model: LoadedModel, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model on tokens [B, T]: its logits [B, T', V] and every layer's MLP input x [N, L, d] and
    output y [N, L, d] (float64), sink positions left out (T' = T - FIRST_POSITION, N = B·T')."""
    hooks = _Hooks(model, None)
    with hooks.open():
        logits = model.model(input_ids=tokens, use_cache=False).logits[:, FIRST_POSITION:]
    x = torch.stack(hooks.x, dim=2).reshape(-1, model.n_layers, model.d_model)  # [N, L, d]
    y = torch.stack(hooks.y, dim=2).reshape(-1, model.n_layers, model.d_model).to(torch.float64)
    return logits, x, y


def _spliced(model: LoadedModel, tc: Transcoder, tokens: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed KL(original ‖ spliced), tokens whose top-1 agrees), as tensors on the model's device, of the
    model with every MLP block spliced out for the transcoder, on tokens [B, T] whose original logits are `logits`."""
    with _Hooks(model, tc).open():
        sp = model.model(input_ids=tokens, use_cache=False).logits[:, FIRST_POSITION:]
    lp_o = F.log_softmax(logits.double(), dim=-1)
    lp_s = F.log_softmax(sp.double(), dim=-1)
    return (lp_o.exp() * (lp_o - lp_s)).sum(), (logits.argmax(-1) == sp.argmax(-1)).sum()


@torch.no_grad()
def evaluate(
    model: LoadedModel,
    transcoder: Transcoder,
    source: Any,
    n_tokens: int = 4096,
    *,
    n_ctx: int = 128,
    batch_size: int = 8,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    heldout_fraction: float = 0.01,
    split_seed: int = 0,
    spliced: bool = True,
    bos_id: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Evaluate `transcoder` on `model` over about `n_tokens` held-out tokens of `source`.

    Runs on `device` (None: where the model is; the model and the transcoder are moved there, in
    place), in the model's and transcoder's own precision; the sums are float64 on that device.

    Returns a JSON-ready dict: `nmse_mean`, `nmse_per_layer`, `l0_mean`, `l0_total`,
    `l0_per_layer`, `dead_fraction`, `dead_fraction_per_layer`, `spliced_kl`, `spliced_top1`,
    `n_tokens` (tokens scored; sink positions excluded), and the model and transcoder shapes.
    """
    cfg = transcoder.config
    if cfg.n_layers != model.n_layers or cfg.d_model != model.d_model:
        raise CltraceError(
            f"the transcoder ({cfg.n_layers} layers, d_model {cfg.d_model}) does not fit model '{model.name}' "
            f"({model.n_layers} layers, d_model {model.d_model}): evaluate it on the model it was trained for"
        )
    if n_tokens < 1:
        raise CltraceError(f"n_tokens must be at least 1, got {n_tokens}")
    device = place(model.model, device)
    tc = transcoder.to(device)
    sums = _Sums(cfg.n_layers, cfg.n_features, cfg.d_model, device)
    batches = token_batches(model, source, n_tokens, n_ctx=n_ctx, batch_size=batch_size, tokenize=tokenize,
                            heldout_fraction=heldout_fraction, split_seed=split_seed, bos_id=bos_id)
    for tokens in batches:
        tokens = tokens.to(device)
        if sums.n >= n_tokens:
            break
        logits, x, y = _run_batch(model, tokens)
        acts = tc.encode(x)  # [N, L, F]
        sums.add(y, tc.decode(acts, x).to(torch.float64), acts)
        if spliced:
            kl, same = _spliced(model, tc, tokens, logits)
            sums.kl += kl
            sums.agree += same
    if sums.n == 0:
        raise CltraceError("no held-out tokens to evaluate on: give a source with more text")
    return {"model": model.name, "kind": cfg.kind, "n_layers": cfg.n_layers, "n_features": cfg.n_features,
            **sums.result(spliced)}


class _Sums:
    """What `evaluate` sums over its batches, on the model's device (nothing crosses to the host until `result`)."""

    def __init__(self, L: int, Fn: int, d: int, device: torch.device) -> None:
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=device)
        self.sq_err, self.sum_y, self.sum_y2, self.active = zeros(L), zeros(L, d), zeros(L), zeros(L)  # per layer
        self.fired = torch.zeros(L, Fn, dtype=torch.bool, device=device)
        self.kl, self.agree = zeros(()), torch.zeros((), dtype=torch.int64, device=device)
        self.n = 0  # tokens scored

    def add(self, y: torch.Tensor, recon: torch.Tensor, acts: torch.Tensor) -> None:
        """A batch's targets y and reconstructions [N, L, d] (float64) and activations [N, L, F]."""
        self.sq_err += (recon - y).pow(2).sum(dim=(0, 2))
        self.sum_y += y.sum(0)
        self.sum_y2 += y.pow(2).sum(dim=(0, 2))
        nz = acts != 0
        self.active += nz.sum(dim=(0, 2)).double()
        self.fired |= nz.any(0)
        self.n += y.shape[0]

    def result(self, spliced: bool) -> dict[str, Any]:
        L, n = self.sq_err.shape[0], self.n
        var = self.sum_y2 - self.sum_y.pow(2).sum(-1) / n
        nmse = (self.sq_err / var.clamp_min(1e-30)).tolist()
        l0 = (self.active / n).tolist()
        return {
            "n_tokens": n,
            "nmse_mean": sum(nmse) / L,
            "l0_mean": sum(l0) / L,
            "l0_total": sum(l0),
            "dead_fraction": float((~self.fired).double().mean()),
            "spliced_kl": float(self.kl) / n if spliced else None,
            "spliced_top1": int(self.agree) / n if spliced else None,
            "nmse_per_layer": nmse,
            "l0_per_layer": l0,
            "dead_fraction_per_layer": (~self.fired).double().mean(-1).tolist(),
        }


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a plain-text table (summary, then one row per layer)."""
    lines = [
        (
            f"model {result['model']} · {result['kind'].upper()} {result['n_layers']} x {result['n_features']} "
            f"features · {result['n_tokens']} held-out tokens"
        ),
        f"NMSE mean          {result['nmse_mean']:.4f}",
        f"L0 mean per layer  {result['l0_mean']:.2f}   (total {result['l0_total']:.1f})",
        f"dead fraction      {result['dead_fraction']:.4f}",
    ]
    if result.get("spliced_kl") is not None:
        lines.append(f"spliced KL (nats)  {result['spliced_kl']:.4f}")
        lines.append(f"spliced top-1      {100 * result['spliced_top1']:.2f}%")
    lines.append("")
    lines.append(f"{'layer':>5}  {'NMSE':>8}  {'L0':>8}  {'dead':>6}")
    for l, (n, z, d) in enumerate(zip(result["nmse_per_layer"], result["l0_per_layer"], result["dead_fraction_per_layer"])):
        lines.append(f"{l:>5}  {n:>8.4f}  {z:>8.2f}  {d:>6.3f}")
    return "\n".join(lines)


__all__ = ["SAMPLE_POOL_CONTEXTS", "SAMPLE_POOL_FACTOR", "evaluate", "format_table", "token_batches"]
