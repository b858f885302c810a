"""The training schedules: the learning rate and the sparsity coefficient at each step."""

from __future__ import annotations

from cltrace.train.config import TrainConfig


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): constant, then linear decay to 0 over the last lr_decay_frac."""
    total = config.total_steps
    decay_steps = int(round(config.lr_decay_frac * total))
    start = total - decay_steps
    if decay_steps == 0 or step < start:
        return config.lr
    return config.lr * max(0.0, (total - step) / decay_steps)


def sparsity_lambda_at(config: TrainConfig, step: int) -> float:
    """λ of step `step`: ramps linearly from 0 to sparsity_lambda over the first sparsity_warmup_frac."""
    warm = config.sparsity_warmup_frac * config.total_steps
    if warm <= 0:
        return config.sparsity_lambda
    return config.sparsity_lambda * min(1.0, (step + 1) / warm)
