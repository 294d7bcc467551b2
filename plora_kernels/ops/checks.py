"""Argument checks shared by every op: errors name the argument and what was expected.

Every check here runs before anything is written: an op that refuses its arguments leaves every tensor (and the
random generators it was given) exactly as they were.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROUNDINGS = ("nearest", "stochastic")


def article(word: str) -> str:
    """``word`` with its indefinite article, for messages: "an Embedding", "a Linear"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    return t


def check_int(name: str, value, *, minimum: int | None = None, error=ValueError) -> int:
    """An int (not a bool) >= ``minimum``; ``error`` is raised for a value of another type (ValueError where
    earlier releases raised it, TypeError in new checks), ValueError for one out of range."""
    what = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               high_open: bool = False, finite: bool = True) -> float:
    """A real number (int or float, not a bool, not a tensor) in [low, high] (or [low, high) with ``high_open``);
    TypeError for another type, ValueError for a value out of range or (with ``finite``) not finite."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {value!r} ({type(value).__name__})")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    above = high is not None and not (value < high if high_open else value <= high)
    if (low is not None and not value >= low) or above:
        interval = f"[{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return float(scaling)


def check_momentum(momentum) -> float:
    """m in [0, 1): TypeError for a non-number (a string, a tensor, a bool), ValueError out of range."""
    if isinstance(momentum, (bool, torch.Tensor)) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1), got {momentum!r} ({type(momentum).__name__})")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return float(momentum)


def check_rounding(rounding, allow_none: bool = False) -> str | None:
    if rounding is None and allow_none:
        return None
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}{' or None' if allow_none else ''}, got {rounding!r}")
    return rounding


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


# ------------------------------------------------------------------------------ tensors written in place

_DTENSOR = None


def _dtensor_type():
    global _DTENSOR
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without DTensor
            DTensor = ()
        _DTENSOR = DTensor
    return _DTENSOR


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what an in-place op writes), else the tensor itself."""
    return t.to_local() if isinstance(t, _dtensor_type()) else t


def may_overlap_itself(t: torch.Tensor) -> bool:
    """True unless ``t``'s strides prove that no two of its elements share memory (an expand()ed view has a
    stride 0; an as_strided view can repeat elements). Sorted by stride, each stride must pass the farthest
    element of the dims before it: the usual sufficient condition, exact for every layout torch makes itself."""
    if t.is_contiguous():
        return False
    reach = 0
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s > 1), key=lambda d: d[1]):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) of the memory ``t`` can touch. Distinct allocations never overlap, so
    two tensors share memory exactly when their ranges intersect (a superset test for strided views)."""
    size = t.element_size()
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * size
    reach = sum(st * (s - 1) for s, st in zip(t.shape, t.stride()))
    return start, start + (reach + 1) * size


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may touch a common byte (meta tensors never do: they have no memory)."""
    if not a.numel() or not b.numel() or a.is_meta or b.is_meta or a.device != b.device:
        return False
    sa, ea = _address_range(a)
    sb, eb = _address_range(b)
    return sa < eb and sb < ea


def check_writable(name: str, t: torch.Tensor) -> None:
    """``t`` can be updated in place, once per element: not a meta tensor (no data), not an inference tensor
    outside ``torch.inference_mode()`` (torch refuses in-place updates to them: refused here, before another
    tensor of the same op is written), and no element sharing memory with another."""
    t = _local(t)
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor (it holds no data); materialise the model first, e.g. "
                         "model.to_empty(device=...) and then load or initialise its weights")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode()), which cannot be updated "
                         "in place outside inference mode; clone it outside inference mode first, or unload inside "
                         "torch.inference_mode()")
    if t.numel() > 1 and may_overlap_itself(t):
        raise ValueError(f"{name} has elements that share memory (shape {tuple(t.shape)}, stride {tuple(t.stride())}, "
                         f"e.g. an expand()ed or as_strided view): an in-place unload would write them several times; "
                         f"pass a tensor that owns its memory, e.g. {name}.clone()")


def check_unload_tensors(weight, lora_A, lora_B) -> None:
    """The tensors an unload writes: each writable (:func:`check_writable`), and no two of them overlapping (W is
    written while A and B are read, then A and B are reset). This runs for every layer of every unload, so the
    common case (three contiguous tensors of their own) costs a few attribute reads per tensor."""
    dtensor = _dtensor_type()
    named = (("weight", weight.to_local() if isinstance(weight, dtensor) else weight),
             ("lora_A", lora_A.to_local() if isinstance(lora_A, dtensor) else lora_A),
             ("lora_B", lora_B.to_local() if isinstance(lora_B, dtensor) else lora_B))
    inference_mode = torch.is_inference_mode_enabled()
    ranges = []
    for name, t in named:
        if t.is_meta or (not inference_mode and t.is_inference()) or not t.is_contiguous():
            check_writable(name, t)  # raises, naming the problem (a non-contiguous layout may be fine)
        n = t.numel()
        if n:
            start = t.data_ptr()
            ranges.append((name, start, start + n * t.element_size() if t.is_contiguous()
                           else _address_range(t)[1]))
    # one device (check_factors ran first), so byte ranges compare
    for i, (n1, s1, e1) in enumerate(ranges):
        for n2, s2, e2 in ranges[i + 1:]:
            if s1 < e2 and s2 < e1:
                raise ValueError(f"{n1} and {n2} share memory; an unload writes both, so they must be separate "
                                 f"tensors (e.g. pass {n2}.clone())")


def check_unload_args(weight, lora_A, lora_B, scaling, momentum, rounding) -> tuple[float, float]:
    check_factors(weight, lora_A, lora_B)
    scaling = check_scaling(scaling)
    momentum = check_momentum(momentum)
    check_rounding(rounding)
    check_unload_tensors(weight, lora_A, lora_B)
    return scaling, momentum


def check_generator(generator, name: str = "generator") -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {generator!r} ({type(generator).__name__}); "
                        "for a seed, pass torch.Generator(device).manual_seed(seed)")


def check_generator_device(generator, weight) -> None:
    """A generator, when given, must be a torch.Generator on the weight's device type (it draws the rounding
    stream there)."""
    check_generator(generator)
    if generator is not None and generator.device.type != weight.device.type:
        raise ValueError(f"generator is on {generator.device} but weight is on {weight.device}; pass a generator "
                         "on the weight's device")


def check_seed(seed, name: str = "seed") -> int | None:
    """None or an int (the random streams derive from it)."""
    if seed is None:
        return None
    return check_int(name, seed, error=TypeError)


def check_dropout(p, name: str = "lora_dropout") -> float:
    """A dropout probability: a Python float in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)
