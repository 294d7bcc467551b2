"""Stage-aware learning-rate schedule: a cosine envelope with a short re-warmup after each unload."""
from __future__ import annotations

import math

import torch

from ..ops.checks import check_int, check_real
from .unloader import check_every


def stage_lr_factor(step: int, total_steps: int, every: int, warmup: int = 0, restart_warmup: int = 0,
                    min_lr_ratio: float = 0.0) -> float:
    """The LR multiplier at ``step`` (0-based), ReLoRA's "jagged cosine" with our parameters."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    factor = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    since_unload = step % every
    if step >= every and since_unload < restart_warmup:
        # the adapter just restarted from zero: ramp up again instead of jumping to the envelope
        factor *= (since_unload + 1) / (restart_warmup + 1)
    return factor


def stage_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, every: int | str = "auto",
                          warmup: int = 0, restart_warmup: int = 0,
                          min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR: linear warmup, cosine decay to ``min_lr_ratio``, and ``restart_warmup`` steps of linear
    re-warmup after every unload (every ``every`` steps). Step it once per optimizer step.

    ``total_steps`` is a positive int; ``every`` a positive int (``every > total_steps``: one stage, no
    re-warmup) or "auto" (the default): :func:`plora_kernels.train.auto_every` of ``total_steps``, the interval
    that ``PeriodicUnloader(every="auto", total_steps=...)`` and ``PLoRACallback()`` use for the same run (one
    stage for a run of fewer than 400 steps); ``warmup`` an int in [0, total_steps], ``restart_warmup`` a
    non-negative int, ``min_lr_ratio`` in [0, 1].
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    total_steps = check_int("total_steps", total_steps, minimum=1)
    every = check_every(every, total_steps)
    warmup = check_int("warmup", warmup, minimum=0)
    if warmup > total_steps:
        raise ValueError(f"warmup must be at most total_steps={total_steps}, got {warmup}")
    restart_warmup = check_int("restart_warmup", restart_warmup, minimum=0)
    min_lr_ratio = check_real("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: stage_lr_factor(s, total_steps, every, warmup, restart_warmup, min_lr_ratio))
