"""Stage-aware learning-rate schedule: a cosine envelope with a short re-warmup after each unload."""
from __future__ import annotations

import math

import torch


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


def stage_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, every: int, warmup: int = 0,
                          restart_warmup: int = 0, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR: linear warmup, cosine decay to ``min_lr_ratio``, and ``restart_warmup`` steps of linear
    re-warmup after every unload (every ``every`` steps). Step it once per optimizer step."""
    for name, v in (("total_steps", total_steps), ("every", every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: stage_lr_factor(s, total_steps, every, warmup, restart_warmup, min_lr_ratio))
