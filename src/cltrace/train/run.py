"""`train_transcoder`: text source + model → trained, folded, evaluated transcoder in a run folder."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cltrace.atomic import atomic_write_text
from cltrace.data.harvest import Harvester
from cltrace.data.packing import model_packing
from cltrace.data.sources import open_text_source
from cltrace.data.store import ActivationStore, model_fingerprint
from cltrace.errors import CltraceError
from cltrace.eval import evaluate
from cltrace.model import load_model
from cltrace.model.load import LoadedModel
from cltrace.train.config import TrainConfig
from cltrace.train.data import ActivationSource, HarvestSource, StoreSource
from cltrace.train.losses import transcoder_loss
from cltrace.train.run_dir import EVAL_FILE, TRANSCODER_DIR
from cltrace.train.trainer import Trainer
from cltrace.transcoder import Transcoder, TranscoderConfig

log = logging.getLogger(__name__)


def estimate_seconds(loaded: LoadedModel, config: TrainConfig, harvester: Harvester) -> dict[str, float]:
    """Measure harvest and training speed for a few seconds and extrapolate the run's wall time.

    Training steps are timed at the initial transcoder, whose features are far denser than after
    warm-up, so the estimate is an upper bound for the sparse decode. A run from an activation store
    (`config.store`) harvests only its evaluation tokens.
    """
    harvest_batch = min(config.harvest_batch, 4)
    tokens = torch.randint(0, loaded.vocab_size, (harvest_batch, config.n_ctx))
    harvester.harvest(tokens[:, : min(16, config.n_ctx)])  # warm up (first calls pick kernels)
    t = time.perf_counter()
    x, y = harvester.harvest(tokens)
    harvest_tps = x.shape[0] / (time.perf_counter() - t)
    tc = Transcoder.random(TranscoderConfig(config.kind, loaded.n_layers, loaded.d_model, config.n_features,
                                            config.activation, config.topk_k, config.skip))
    opt = torch.optim.Adam(tc.parameters(), lr=config.lr)
    n = min(config.batch_tokens, x.shape[0])
    xb = x[:n] / x[:n].norm(dim=-1, keepdim=True).mean(0) * loaded.d_model**0.5
    yb = y[:n] / y[:n].norm(dim=-1, keepdim=True).mean(0) * loaded.d_model**0.5
    # The first steps of a process are slow while the kernels for each shape are picked: time steps
    # for a few seconds and keep the fastest of the last three.
    times: list[float] = []
    deadline = time.perf_counter() + 4.0
    while len(times) < 3 or (len(times) < 12 and time.perf_counter() < deadline):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
            loss = transcoder_loss(tc, xb, yb, config.sparsity_lambda, config.sparsity_c, config.preact_lambda,
                                   config.decode)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        times.append(time.perf_counter() - t)
    train_tps = n / min(times[-3:])
    total = config.total_steps * config.batch_tokens
    harvested = 0 if config.store else total
    seconds = harvested / harvest_tps + total / train_tps + 2 * config.eval_tokens / harvest_tps
    return {"harvest_tokens_per_s": harvest_tps, "train_tokens_per_s": train_tps, "seconds": seconds}


#: TrainConfig fields an activation store fixes (the store's manifest settings of the same names).
STORE_FIELDS = ("model", "source", "text_column", "n_ctx", "heldout_fraction", "split_seed")


def store_defaults(store: str | Path) -> dict[str, Any]:
    """Config values that train from the store at `store`: its path, model, text source and packing."""
    settings = ActivationStore(store).settings
    return {"store": str(store), **{k: settings[k] for k in STORE_FIELDS}}


def store_source(config: TrainConfig, model: LoadedModel) -> StoreSource:
    """The StoreSource of `config.store`, refused (one line) when its model or settings differ from the run's."""
    if not config.store:
        raise CltraceError("this run trains from a text source, not an activation store: set store")
    store = ActivationStore(config.store)
    store.check_model(model_fingerprint(model))
    diff = [f"{k}={getattr(config, k)!r} (store: {store.settings[k]!r})" for k in STORE_FIELDS[1:]
            if getattr(config, k) != store.settings[k]]
    if diff:
        raise CltraceError(
            f"activation store '{store.path}' was harvested with other settings than this run's: {', '.join(diff)}; "
            "set them to the store's (`cltrace train --store` does) so that evaluation reads held-out text"
        )
    return StoreSource(store, config.shuffle_contexts)


def train_transcoder(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    model: LoadedModel | None = None,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    source: Any = None,
    progress: bool = True,
    estimate: bool = False,
    echo: Callable[[str], None] = print,
    stop_after: int | None = None,
    bos_id: int | None = None,
) -> dict[str, Any]:
    """Train per `config` into `out_dir`, save the folded transcoder, evaluate it; returns eval results.

    `model` (default: load `config.model`), `source` (default: open `config.source`) and `tokenize`
    (default: the model's tokenizer) may be given directly, e.g. in tests.
    """
    out = Path(out_dir)
    if source is None:
        source = open_text_source(config.source, text_column=config.text_column)
    if model is None:
        model = load_model(config.model)
    if tokenize is None:
        tokenize, _ = model_packing(model, config.n_ctx, 1, bos_id=bos_id)  # its tokenizer, or a clear error
    data: ActivationSource
    if config.store:
        data = store_source(config, model)
    else:
        data = HarvestSource(model, source, tokenize, config.n_ctx, config.shuffle_contexts, config.harvest_batch,
                             config.heldout_fraction, config.split_seed, bos_id=bos_id,
                             autocast_bf16=config.harvest_dtype == "bfloat16", mix_contexts=config.mix_contexts)
    trainer = Trainer(config, data, out, resume=resume, progress=progress, model_id=config.model, stop_after=stop_after)
    if estimate:
        harvester = data.harvester if isinstance(data, HarvestSource) else Harvester(
            model, max_batch=config.harvest_batch, autocast_bf16=config.harvest_dtype == "bfloat16")
        est = estimate_seconds(model, config, harvester)
        left = est["seconds"] * (1 - trainer.step / max(1, config.total_steps))
        where = "activations from the store" if config.store else f"harvest {est['harvest_tokens_per_s']:.0f} tokens/s"
        echo(
            f"estimated time: about {left / 60:.0f} min for {config.total_steps - trainer.step} steps "
            f"({where}, training at most {est['train_tokens_per_s']:.0f} tokens/s before features sparsify)"
        )
    t0 = time.perf_counter()
    folded = trainer.run()
    if trainer.step < config.total_steps:
        return {"stopped_at_step": trainer.step}
    result: dict[str, Any] = {}
    if config.eval_tokens > 0:
        result = evaluate(model, folded, source, config.eval_tokens, n_ctx=config.n_ctx,
                          batch_size=config.harvest_batch, tokenize=tokenize,
                          heldout_fraction=config.heldout_fraction, split_seed=config.split_seed, bos_id=bos_id)
        result["train_seconds"] = trainer.elapsed
        result["train_tokens"] = trainer.tokens
        atomic_write_text(out / EVAL_FILE, json.dumps(result, indent=2) + "\n")
    log.info("run finished in %.0f s: %s", time.perf_counter() - t0, out / TRANSCODER_DIR)
    return result


__all__ = ["STORE_FIELDS", "estimate_seconds", "store_defaults", "store_source", "train_transcoder"]
