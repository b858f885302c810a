"""The training loop: normalisation, Adam, schedules, checkpoints, exact resume, metrics, curves.

A run folder holds

    config.json      the TrainConfig (a folder holds one run: another config is refused)
    checkpoint/      state.pt: transcoder, optimiser, step, RNG states, data position,
                     normalisation, dead-feature counters (written atomically: temp file + rename)
    metrics.jsonl    one JSON line per `log_every` steps
    curves.png       the training curves, drawn at the end
    transcoder/      the trained transcoder, normalisation folded in (works on raw activations)
    eval.json        the final evaluation on held-out text (written by `train_transcoder`)

Every file is written atomically, so a run killed at any point resumes (`--resume`) to the same
weights as an uninterrupted run; the temporary files a kill leaves are removed when it resumes
(`benchmarks/crash_safety.py` kills runs at random points and checks both).

Inputs and targets are scaled per layer to mean norm √d_model with factors estimated on the
first `norm_tokens` tokens; the factors live in the checkpoint and are folded into the saved
weights at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cltrace.atomic import atomic_write, atomic_write_text
from cltrace.device import rank_device, resolve_device
from cltrace.errors import CltraceError
from cltrace.locks import acquire, release
from cltrace.train.config import TrainConfig
from cltrace.train.curves import plot_curves, read_metrics
from cltrace.train.data import ActivationSource
from cltrace.train.distributed import (
    FeatureShards,
    checkpoint_file,
    describe_checkpoint,
    failures_as_errors,
    has_checkpoint,
    init_layout,
    launched,
    load_optimizer_by_name,
    on_main,
    optimizer_by_name,
    read_checkpoint,
    remove_stale,
)
from cltrace.train.losses import transcoder_loss
from cltrace.train.optimizer import LazyAdam, clip_grad_norm
from cltrace.train.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    STATE_FILE,
    TRANSCODER_DIR,
    prepare_run_dir,
    refuse_if_too_big,
)
from cltrace.train.schedule import lr_at, sparsity_lambda_at
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder
from cltrace.transcoder.fold import fold_normalisation

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1

_DTYPES = {"float32": torch.float32, "bfloat16": torch.float32, "float64": torch.float64}  # weights / data


class TrainingDiverged(CltraceError):
    """The loss or a gradient became NaN or infinite."""


# -- schedules ---------------------------------------------------------------------------------------


# -- normalisation -----------------------------------------------------------------------------------


def estimate_scales(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer factors [L] that scale x and y [N, L, d] to mean norm √d."""
    d = x.shape[-1]
    sx = math.sqrt(d) / x.double().norm(dim=-1).mean(0).clamp_min(1e-12)
    sy = math.sqrt(d) / y.double().norm(dim=-1).mean(0).clamp_min(1e-12)
    return sx.float(), sy.float()


# -- trainer -----------------------------------------------------------------------------------------


class Trainer:
    """Trains a transcoder from an ActivationSource into a run folder.

    `run()` trains to `config.total_steps` (resuming from the folder's checkpoint if there is one),
    saves the folded transcoder and the curves, and returns the folded transcoder.

    Under torchrun (several ranks, see `cltrace.train.distributed`), each rank trains its slice of
    the features and writes its shard of the checkpoint; rank 0 writes the shared files, and every
    rank returns the whole (gathered) transcoder.

    `device` (default: the CPU; under torchrun, each rank's) holds the transcoder, Adam's state and
    the step's tensors. Buffers already there (harvested on that GPU) are indexed in place; buffers
    on the host (an activation store) are gathered per step into pinned memory and copied
    asynchronously when the device is a CUDA GPU.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: ActivationSource,
        out_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
        model_id: str | None = None,
        stop_after: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.out = Path(out_dir)
        self.progress = progress
        self.stop_after = stop_after  # for tests: stop (without finishing) after this many steps
        if launched():  # each rank on its LOCAL_RANK's GPU, or all on the CPU
            wanted = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        else:
            wanted = resolve_device(device or "cpu")
        # None in one process; under torchrun, the layout the CLI set (or all-features)
        self.layout = init_layout(device=wanted if device is not None else None)
        self.is_main = self.layout is None or self.layout.is_main
        self.device = self.layout.device if self.layout is not None else wanted
        refuse_if_too_big(config, data.n_layers, data.d_model, self.device)
        self._lock: int | None = None  # the run folder's lock, held by the main process until run() ends
        self.has_checkpoint = on_main(self.layout, lambda: self._claim_run_dir(resume))
        try:
            (self.out / CHECKPOINT_DIR).mkdir(exist_ok=True)
            self.fingerprint = data.fingerprint()
            dtype = _DTYPES[config.dtype]
            tc_config = TranscoderConfig(
                kind=config.kind, n_layers=data.n_layers, d_model=data.d_model, n_features=config.n_features,
                activation=config.activation, topk_k=config.topk_k, skip=config.skip,
                model_id=model_id or self.fingerprint.get("model"), dtype="float64" if config.dtype == "float64" else "float32",
            )
            self.tc: Transcoder | None = Transcoder.random(
                tc_config, seed=config.seed, threshold_init=config.threshold_init, bandwidth=config.bandwidth,
            ).to(dtype).to(self.device)
            # Several ranks: every rank draws the same full initial weights (so runs on any number of
            # ranks are comparable), keeps its slice of the features and drops the rest.
            self.shards = FeatureShards(self.layout, self.tc) if self.layout is not None else None
            if self.shards is not None:
                self.tc_config = self.tc.config
                self.tc = None
                params = self.shards.parameters()
            else:
                params = list(self.tc.parameters())
            betas = (config.adam_beta1, config.adam_beta2)
            if config.optimizer == "lazy_adam":
                if self.shards is not None:
                    raise CltraceError("optimizer 'lazy_adam' trains in one process; run without torchrun or use 'adam'")
                self.opt: torch.optim.Optimizer = LazyAdam(params, lr=config.lr, betas=betas)
            else:
                # fused: one kernel for all parameters, much faster than the per-tensor loop on a large decoder
                self.opt = torch.optim.Adam(params, lr=config.lr, betas=betas, fused=True)
            self.step = 0
            self.tokens = 0
            self.buffer_start: dict[str, Any] | None = None  # data position of the current buffer's start
            self.buffer_index = 0
            self.step_in_buffer = 0
            self.scale_x: torch.Tensor | None = None
            self.scale_y: torch.Tensor | None = None
            n_local = self.shards.end - self.shards.start if self.shards is not None else config.n_features
            self.last_fired = torch.zeros(data.n_layers, n_local, dtype=torch.int64, device=self.device)
            self.elapsed = 0.0
            if self.has_checkpoint:
                self._load_checkpoint()
        except BaseException:  # refused (a checkpoint of another model, ...): the folder is free again at once
            release(self._lock)
            self._lock = None
            raise

    # -- checkpoints ---------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """The one-process checkpoint; with several ranks, only its common fields (the shards hold the rest)."""
        state = {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "step": self.step,
            "tokens": self.tokens,
            "data": {"buffer_start": self.buffer_start, "buffer_index": self.buffer_index, "step_in_buffer": self.step_in_buffer},
            "scale_x": None if self.scale_x is None else self.scale_x.cpu(),
            "scale_y": None if self.scale_y is None else self.scale_y.cpu(),
            "rng": {"torch": torch.get_rng_state()},
            "elapsed": self.elapsed,
        }
        if self.shards is None:
            state.update(transcoder=self._whole().state_dict(), optimizer=self.opt.state_dict(), last_fired=self.last_fired.cpu())
        return state

    def _whole(self) -> Transcoder:
        """The transcoder of a run in one process (a sharded run holds only its slices, in `shards`)."""
        if self.tc is None:
            raise RuntimeError("a sharded run holds no whole transcoder: gather it from its shards")
        return self.tc

    def _named_tensors(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained tensors by full-transcoder name (this rank's slices, where sharded)."""
        return self.shards.named_tensors() if self.shards is not None else list(self._whole().named_parameters())

    def save_checkpoint(self) -> None:
        ckpt = self.out / CHECKPOINT_DIR
        if self.shards is not None:
            self.shards.save_checkpoint(ckpt, self._state(), optimizer_by_name(self.opt, self._named_tensors()), self.last_fired)
            return
        atomic_write(ckpt / STATE_FILE, lambda p: torch.save(self._state(), p))
        remove_stale(ckpt, keep=None)  # a sharded checkpoint resumed in one process is now older

    def _load_checkpoint(self) -> None:
        """Resume from the folder's checkpoint, written by one process or by any number of ranks."""
        ckpt = self.out / CHECKPOINT_DIR
        path = checkpoint_file(ckpt)
        start, end = (self.shards.start, self.shards.end) if self.shards is not None else (0, self.config.n_features)
        state = read_checkpoint(ckpt, start, end)
        if state.get("version") != CHECKPOINT_VERSION:
            raise CltraceError(f"checkpoint {path} has version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            got, want = state["fingerprint"], self.fingerprint
            raise CltraceError(
                f"checkpoint {path} is from another model ({got.get('model')}, {got.get('n_layers')} layers, "
                f"d_model {got.get('d_model')}, weights {got.get('weights_sha256')}) than this one ({want.get('model')}, "
                f"{want.get('n_layers')} layers, d_model {want.get('d_model')}, weights {want.get('weights_sha256')}); "
                "resume with the same model or choose a new folder"
            )
        if state["config"] != self.config.to_dict():
            raise CltraceError(f"checkpoint {path} was written by another config than {self.out / CONFIG_FILE}; choose a new folder")
        if self.shards is not None:
            self.shards.shard.load_full(state["tensors"], sliced=True)
        else:
            self._whole().load_state_dict(state["tensors"])
        load_optimizer_by_name(self.opt, self._named_tensors(), state["adam"])
        self.step, self.tokens = state["step"], state["tokens"]
        data = state["data"]
        self.buffer_start, self.buffer_index, self.step_in_buffer = data["buffer_start"], data["buffer_index"], data["step_in_buffer"]
        self.scale_x, self.scale_y = (None if s is None else s.to(self.device) for s in (state["scale_x"], state["scale_y"]))
        self.last_fired = state["last_fired"].to(self.device)
        torch.set_rng_state(state["rng"]["torch"])
        self.elapsed = state.get("elapsed", 0.0)
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the checkpoint (they will be written again by the resumed run)."""
        path = self.out / METRICS_FILE
        if not path.is_file() or not self.is_main:
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a torn last line
        atomic_write_text(path, "".join(k + "\n" for k in kept))

    # -- loop ----------------------------------------------------------------------------------------

    def _perm(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.buffer_index)
        return torch.randperm(n, generator=g)

    def _claim_run_dir(self, resume: bool) -> bool:
        """Lock the run folder (made if missing), then `prepare_run_dir`: a second process on the same
        folder is refused before it touches anything."""
        if not self.out.exists():
            self.out.mkdir(parents=True, exist_ok=True)
        if self.out.is_dir():
            self._lock = acquire(self.out, f"run folder '{self.out}'")
        try:
            return prepare_run_dir(self.out, self.config, resume)
        except BaseException:
            release(self._lock)
            self._lock = None
            raise

    def run(self) -> Transcoder:
        try:
            with failures_as_errors(self.layout, self._resume_hint):
                return self._run()
        finally:
            release(self._lock)
            self._lock = None

    def _resume_hint(self) -> str:
        return describe_checkpoint(self.out / CHECKPOINT_DIR)

    def _run(self) -> Transcoder:
        cfg = self.config
        total = cfg.total_steps
        bar = None
        if self.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, file=sys.stderr, unit="step", dynamic_ncols=True,
                       desc=f"training {cfg.kind.upper()}")
        metrics_file = open(self.out / METRICS_FILE if self.is_main else os.devnull, "a", encoding="utf-8")
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        window: list[dict[str, torch.Tensor]] = []
        dtype = _DTYPES[cfg.dtype]
        try:
            if self.step < total:
                stream = self.data.buffers(self.buffer_start)
                skip = self.step_in_buffer
                for x, y, after in stream:
                    if self.scale_x is None or self.scale_y is None:  # set together
                        n = min(cfg.norm_tokens, x.shape[0])
                        self.scale_x, self.scale_y = (s.to(self.device) for s in estimate_scales(x[:n], y[:n]))
                    scale_x, scale_y = self.scale_x, self.scale_y
                    perm = self._perm(x.shape[0]).to(x.device)  # where the buffer is: one copy per buffer
                    steps_here = x.shape[0] // cfg.batch_tokens
                    for k in range(skip, steps_here):
                        if self.step >= total or (self.stop_after is not None and self.step >= self.stop_after):
                            break
                        idx = perm[k * cfg.batch_tokens : (k + 1) * cfg.batch_tokens]
                        xb, yb = self._batch(x, idx, scale_x, dtype), self._batch(y, idx, scale_y, dtype)
                        terms = self._train_step(xb, yb)
                        self.step_in_buffer = k + 1
                        window.append(terms)
                        self.elapsed = elapsed0 + time.perf_counter() - t_start
                        if self.step % cfg.log_every == 0 or self.step == total:
                            row = self._metrics_row(window)
                            metrics_file.write(json.dumps(row) + "\n")
                            metrics_file.flush()
                            if bar is not None:
                                bar.set_postfix(nmse=f"{row['nmse']:.3f}", l0=f"{row['l0']:.1f}", refresh=False)
                            window = []
                        if bar is not None:
                            bar.update(1)
                        if self.step % cfg.checkpoint_every == 0 or self.step == total:
                            metrics_file.flush()
                            self.save_checkpoint()
                    if self.step >= total or (self.stop_after is not None and self.step >= self.stop_after):
                        break
                    # next buffer
                    self.buffer_start = after
                    self.buffer_index += 1
                    self.step_in_buffer = 0
                    skip = 0
        finally:
            metrics_file.close()
            if bar is not None:
                bar.close()
        if self.step < total:
            return self.folded()
        self.save_checkpoint()
        folded = self.folded()
        if self.is_main:
            save_transcoder(folded, self.out / TRANSCODER_DIR, overwrite=True)
            try:
                plot_curves(self.out / METRICS_FILE, self.out / CURVES_FILE)
            except Exception as exc:  # noqa: BLE001 - a missing plot must not lose a finished run
                log.warning("could not draw %s: %s", CURVES_FILE, exc)
        if self.shards is not None:
            self.shards.barrier()  # no rank returns before the transcoder is on disk
        return folded

    def _batch(self, t: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `idx` of the buffer `t` [tokens, layer, d] on the trainer's device, in `dtype`, scaled per layer."""
        if t.device == self.device:
            rows = t[idx]  # [batch, layer, d]
        elif self.device.type == "cuda":  # from the host: staged in pinned memory, copied beside the GPU's work
            staged = torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
            rows = torch.index_select(t, 0, idx, out=staged).to(self.device, non_blocking=True)
        else:
            rows = t[idx].to(self.device)
        return rows.to(dtype) * scale.to(dtype)[:, None]

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        lr = lr_at(cfg, self.step)
        lam = sparsity_lambda_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            if self.shards is None:
                terms = transcoder_loss(self._whole(), xb, yb, lam, cfg.sparsity_c, cfg.preact_lambda, decode=cfg.decode,
                                        row_grads=cfg.optimizer == "lazy_adam")
            else:  # this rank's features on its data group's part of the batch; terms of the whole batch
                terms = self.shards.loss(self.shards.batch_part(xb), self.shards.batch_part(yb), lam, cfg.sparsity_c,
                                         cfg.preact_lambda, cfg.decode)
        loss = terms.pop("loss", terms["total"])
        # several ranks: the global verdict, the same on every rank (so all of them stop together)
        loss_bad = terms.pop("nonfinite") if self.shards is not None else ~torch.isfinite(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.shards is not None:
            gnorm = self.shards.sync_and_clip(cfg.grad_clip)
        else:
            params = [p for p in self._whole().parameters() if p.grad is not None]
            gnorm = clip_grad_norm(params, cfg.grad_clip)
        # The loss and the gradient norm are checked together, before Adam moves a weight: one wait for
        # the device per step instead of two.
        bad_loss, bad_grad = torch.stack([loss_bad.to(gnorm.device), ~torch.isfinite(gnorm)]).tolist()
        if bad_loss:
            self._diverged(f"the loss is {float(terms['total'].detach())}")
        if bad_grad:
            self._diverged(f"the gradient norm is {float(gnorm)}")
        self.opt.step()
        self.step += 1
        self.tokens += xb.shape[0]
        self.last_fired[terms["fired"]] = self.tokens
        out = {k: v.detach() for k, v in terms.items() if k != "fired"}
        out["lr"] = torch.tensor(lr, dtype=torch.float64)
        out["lambda"] = torch.tensor(lam, dtype=torch.float64)
        out["grad_norm"] = gnorm.detach()
        return out

    def _diverged(self, what: str) -> None:
        ckpt = self.out / CHECKPOINT_DIR
        kept = f"the last good checkpoint is {checkpoint_file(ckpt)}" if has_checkpoint(ckpt) else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {what}; {kept}; lower lr or sparsity_lambda and resume or restart"
        )

    def dead_fraction(self) -> float:
        """Share of features that have not fired in the last dead_window tokens (or ever, in a shorter run)."""
        if self.tokens == 0:
            return 0.0
        if self.tokens <= self.config.dead_window:
            dead = self.last_fired == 0
        else:
            dead = (self.tokens - self.last_fired) >= self.config.dead_window
        return float(dead.float().mean()) if self.shards is None else self.shards.dead_count(dead)

    def _metrics_row(self, window: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        def mean(key: str) -> torch.Tensor:
            return torch.stack([w[key].double() for w in window]).mean(0)

        nmse_layers = mean("nmse_per_layer")
        l0_layers = mean("l0_per_layer")
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed, 3),
            "lr": float(window[-1]["lr"]),
            "lambda": float(window[-1]["lambda"]),
            "total": float(mean("total")),
            "mse": float(mean("mse")),
            "sparsity": float(mean("sparsity")),
            "preact": float(mean("preact")),
            "grad_norm": float(mean("grad_norm")),
            "nmse": float(nmse_layers.mean()),
            "l0": float(l0_layers.mean()),
            "dead_fraction": self.dead_fraction(),
            "nmse_per_layer": [round(float(v), 5) for v in nmse_layers],
            "l0_per_layer": [round(float(v), 3) for v in l0_layers],
        }

    def folded(self) -> Transcoder:
        """The transcoder with the normalisation folded in (works on raw model activations)."""
        if self.scale_x is None or self.scale_y is None:
            raise CltraceError("no training step was taken yet: nothing to save")
        whole = self._whole() if self.shards is None else self.shards.gather(self.tc_config, float(self.config.bandwidth))
        tc = fold_normalisation(whole, self.scale_x, self.scale_y)
        return tc.to(torch.float32) if self.config.dtype != "float32" else tc




__all__ = [
    "Trainer",
    "TrainingDiverged",
    "estimate_scales",
    "fold_normalisation",
    "plot_curves",
    "prepare_run_dir",
    "read_metrics",
]
