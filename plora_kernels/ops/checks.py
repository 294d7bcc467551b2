"""Argument checks shared by every op: errors name the argument and what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROUNDINGS = ("nearest", "stochastic")


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    return t


def check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return float(scaling)


def check_factors(weight, lora_A, lora_B) -> tuple[int, int, int]:
    """Check W (out, in), lora_A (r, in), lora_B (out, r) agree; return (out, in, r)."""
    _tensor("weight", weight)
    _tensor("lora_A", lora_A)
    _tensor("lora_B", lora_B)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape (r, {in_f}) with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B must have shape ({out_f}, {r}) to match weight and lora_A, got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}; put them on one device")
    return out_f, in_f, r


def check_linear_args(x, weight, lora_A, lora_B, scaling, bias) -> float:
    _tensor("x", x)
    out_f, in_f, _ = check_factors(weight, lora_A, lora_B)
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must have shape (..., {in_f}) to match weight, got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype} (cast x or the layer)")
    if bias is not None:
        _tensor("bias", bias)
        if tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    return check_scaling(scaling)


def check_unload_args(weight, lora_A, lora_B, scaling, momentum, rounding) -> tuple[float, float]:
    check_factors(weight, lora_A, lora_B)
    scaling = check_scaling(scaling)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1), got {type(momentum).__name__}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return scaling, float(momentum)


def check_generator_device(generator, weight) -> None:
    """A generator, when given, must live on the weight's device type (it draws the rounding stream there)."""
    if generator is not None and generator.device.type != weight.device.type:
        raise ValueError(f"generator is on {generator.device} but weight is on {weight.device}; pass a generator "
                         "on the weight's device")
