"""unload_: merge the adapter into the base weight in place with one rounding, then reset the adapter.

The rule (this package's; see DESIGN): with c = 1 - momentum,
    W <- round(W + c * s * B A)          computed in fp32, rounded once into W's dtype
    m = 0: B <- 0, A <- a fresh nn.Linear-style draw;   m > 0: B <- m B, A kept
so for m > 0 the layer's output is unchanged up to rounding: (W + c s B A) + s (m B) A = W + s B A.

Safety: an unload that would put a non-finite value into W raises and leaves W, A, B bit-identical.
On the kernel path this costs one host sync per call, however many layers it unloads: the bound
|W + c s B A| <= max|W| + c s r max|B| max|A| proves most merges safe, where max|W| comes from the previous
unload's kernel (it reports max |new W| for free) or, the first time, from one read of W, and the factors'
maxima are one multi-tensor reduction. A non-finite factor makes its maximum non-finite, so the same values
catch it. Only a merge the bound cannot clear runs the kernel twice: a dry run with the same random stream,
then the real one.

Many layers at once (:func:`unload_many_`, used by ``unload_all_`` and ``PeriodicUnloader``): the per-layer
cost of an unload is launches and host syncs, not bandwidth (a 4096 x 4096 bf16 merge moves 64 MiB, ~20 us),
so the layers share their checks and their one sync, and their factor resets are multi-tensor ops.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .._backend import requested_unload_kernel, use_triton
from . import reference
from .checks import check_generator_device, check_unload_args

# attribute set on the weight by our last write: (data_ptr, _version, max |W| as a 0-d fp32 tensor);
# kept on the tensor itself so it dies with it, and checked against the version counter so any other
# in-place write to W invalidates it
_AMAX_ATTR = "_plora_amax"
_BOUND_MARGIN = 1.0 + 2.0**-10  # covers fp32 rounding in the kernel's sum of r products and the add


class UnloadSpec(NamedTuple):
    """One layer's unload: the arguments of :func:`unload_`, and a label for error messages."""
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    momentum: float = 0.0
    rounding: str = "nearest"
    generator: torch.Generator | None = None
    label: str = ""


class _Merge(NamedTuple):
    """The kernel path's view of one merge: W (or a row shard of it) <- round(W + coef B A)."""
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    coef: float
    rounding: str
    generator: torch.Generator | None = None
    row_offset: int = 0
    label: str = ""


def _prefix(label: str) -> str:
    return f"unload_ ({label})" if label else "unload_"


def _factor_error(name: str, label: str = "") -> ValueError:
    return ValueError(f"{_prefix(label)}: {name} contains non-finite values; weight, lora_A and lora_B were "
                      "left unchanged")


def _check_finite_factors(lora_A, lora_B, label: str = "") -> None:
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not bool(torch.isfinite(t).all()):
            raise _factor_error(name, label)


def _overflow_error(weight, label: str = "") -> ValueError:
    return ValueError(
        f"{_prefix(label)}: merging would write a non-finite value into the {weight.dtype} weight (overflow or a "
        "non-finite entry already in it); weight, lora_A and lora_B were left unchanged")


def _draw_seed(generator):
    """The stochastic-rounding seed: an int when drawn on the host (no generator: the global CPU RNG), else
    a 1-element tensor on the generator's device, read later with the batch's one host sync."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device)
    return int(seed.item()) if gen_device.type == "cpu" else seed


def _known_amax(weight):
    hit = getattr(weight, _AMAX_ATTR, None)
    if hit is not None and hit[0] == weight.data_ptr() and hit[1] == weight._version:
        return hit[2]
    return None


def _abs_max(tensors: list[torch.Tensor]) -> list:
    """max |t| per tensor as 0-d float64 tensors (0.0 for an empty one), in few multi-tensor launches."""
    nonempty = [t for t in tensors if t.numel()]
    norms = iter(torch._foreach_norm(nonempty, math.inf, dtype=torch.float64)) if nonempty else iter(())
    return [next(norms) if t.numel() else 0.0 for t in tensors]


def _read_to_host(values: list) -> list[float]:
    """Floats from a list of Python numbers and 0-d/1-element tensors, one concatenation and read per
    (device, dtype): the first read waits for the device, the rest only for their tiny copies."""
    out = [float(v) if isinstance(v, (int, float)) else None for v in values]
    groups: dict = {}
    for i, v in enumerate(values):
        if out[i] is None:
            groups.setdefault((v.device, v.dtype), []).append(i)
    for idx in groups.values():
        for i, x in zip(idx, torch.cat([values[i].reshape(1) for i in idx]).tolist()):
            out[i] = float(x)
    return out


def _merge_kernel(weight):
    """The Triton merge, or its csrc/ CUDA twin for CUDA weights when PLORA_UNLOAD_KERNEL=cuda (same
    contract, same random stream: the two give bit-identical weights)."""
    if weight.is_cuda and requested_unload_kernel() == "cuda":
        from . import cuda_unload

        if not cuda_unload.available():
            raise RuntimeError("PLORA_UNLOAD_KERNEL=cuda needs nvcc (or $PLORA_CSRC_LIB, a prebuilt library) "
                               "to build csrc/plora_unload.cu")
        return cuda_unload.merge_
    from .triton.unload import merge_

    return merge_


def _local(flag: bool) -> bool:
    return flag


def _merge_with_kernel(merges: Sequence[_Merge], all_ranks=_local) -> None:
    """The kernel path of many merges, with their checks; the resets are the caller's.

    Every check happens before the first write, so an error leaves every W unchanged. In steady state
    (max|W| known from the last unload) the checks cost a few multi-tensor launches and one host read.

    ``row_offset`` and ``all_ranks`` serve the sharded unload: a merge's W is rows [row_offset, ...) of a
    larger weight, and ``all_ranks(flag)`` is the AND of ``flag`` over every rank holding a shard, so that all
    ranks take the same branch and an overflow anywhere raises everywhere before any rank writes.
    """
    # the rounding seeds first: each generator gives its seed before the reset's fresh A, as in unload_
    seeds = [_draw_seed(m.generator) if m.rounding == "stochastic" else 0 for m in merges]
    max_a = _abs_max([m.lora_A for m in merges])
    max_b = _abs_max([m.lora_B for m in merges])
    known = [_known_amax(m.weight) if m.weight.numel() else 0.0 for m in merges]
    missing = [m.weight for m, k in zip(merges, known) if k is None]  # first unload, or W changed since
    fresh = iter(_abs_max(missing))
    max_w = [next(fresh) if k is None else k for k in known]
    host = _read_to_host(seeds + max_a + max_b + max_w)
    n = len(merges)
    seeds = [int(x) for x in host[:n]]
    safe = []
    for m, a, b, w in zip(merges, host[n:2 * n], host[2 * n:3 * n], host[3 * n:]):
        if not (math.isfinite(a) and math.isfinite(b)):
            _check_finite_factors(m.lora_A, m.lora_B, m.label)  # names the factor; raises
        bound = (w + abs(m.coef) * m.lora_A.shape[0] * a * b) * _BOUND_MARGIN
        safe.append(bound <= torch.finfo(m.weight.dtype).max)  # False for NaN too
    if not all_ranks(all(safe)):  # a bound cannot clear some merge: exact dry runs with the same random streams
        bad = None
        for m, ok, seed in zip(merges, safe, seeds):
            if ok or not m.weight.numel():
                continue
            new_max = _merge_kernel(m.weight)(m.weight, m.lora_A, m.lora_B, m.coef, m.rounding, seed, write=False,
                                              row_offset=m.row_offset)
            if not bool(torch.isfinite(new_max).all()):
                bad = m
                break
        if not all_ranks(bad is None):  # here or on another rank
            raise _overflow_error((bad or merges[0]).weight, bad.label if bad is not None else "")
    for m, seed in zip(merges, seeds):
        if not m.weight.numel():
            continue
        stats = _merge_kernel(m.weight)(m.weight, m.lora_A, m.lora_B, m.coef, m.rounding, seed, write=True,
                                        row_offset=m.row_offset)
        torch.autograd.graph.increment_version(m.weight)  # raw kernel writes are invisible to autograd otherwise
        setattr(m.weight, _AMAX_ATTR, (m.weight.data_ptr(), m.weight._version, stats.reshape(())))


def _unload_reference(spec: UnloadSpec) -> None:
    _check_finite_factors(spec.lora_A, spec.lora_B, spec.label)
    new = reference.unload_value(spec.weight, spec.lora_A, spec.lora_B, spec.scaling, spec.momentum,
                                 spec.rounding, spec.generator)
    if not bool(torch.isfinite(new).all()):
        raise _overflow_error(spec.weight, spec.label)
    spec.weight.copy_(new)


def _distinct_weight_runs(specs: list[UnloadSpec]) -> list[list[UnloadSpec]]:
    """The specs in order, cut where a weight repeats: a layer whose weight an earlier one in its run merges
    into (tied weights) must be checked against that merge's result, so it starts the next run."""
    runs, seen = [[]], set()
    for spec in specs:
        if spec.weight.data_ptr() in seen and spec.weight.numel():
            runs.append([])
            seen = set()
        runs[-1].append(spec)
        seen.add(spec.weight.data_ptr())
    return [run for run in runs if run]


def unload_many_(specs: Sequence[UnloadSpec]) -> None:
    """:func:`unload_` for many layers at once: the same result per layer, at a fraction of the overhead.

    Each ``UnloadSpec`` holds one layer's ``unload_`` arguments (and a ``label`` that error messages name).
    The layers on the kernel path share their checks and one host sync, and every check runs before the first
    write: an error changes no layer (layers that share one weight are merged one after another, each checked
    against the result of the one before). On the torch reference path the layers are unloaded one by one, and an
    error leaves the failing layer and those after it unchanged. FSDP2 layers (DTensors) are unloaded one by
    one with :func:`plora_kernels.distributed.unload_dtensor_`.

    A generator shared by several layers is consumed in a fixed order (reproducible), which on the kernel
    path is: every layer's rounding seed, then every layer's fresh A. Per-layer generators (as
    ``PeriodicUnloader`` uses) give exactly what per-layer ``unload_`` calls give.
    """
    from ..distributed import is_dtensor, unload_dtensor_  # lazily: it imports this module

    kernel, one_by_one = [], []  # the specs checked, by path; one_by_one keeps (spec, is a DTensor)
    for i, spec in enumerate(specs):
        if not isinstance(spec, UnloadSpec):
            raise TypeError(f"specs[{i}] must be an UnloadSpec, got {type(spec).__name__}")
        if is_dtensor(spec.weight):  # unload_dtensor_ checks its own arguments
            one_by_one.append((spec, True))
            continue
        scaling, momentum = check_unload_args(spec.weight, spec.lora_A, spec.lora_B, spec.scaling,
                                              spec.momentum, spec.rounding)
        check_generator_device(spec.generator, spec.weight)
        spec = spec._replace(scaling=scaling, momentum=momentum)
        if use_triton(spec.weight):
            kernel.append(spec)
        else:
            one_by_one.append((spec, False))
    with torch.no_grad():
        for wave in _distinct_weight_runs(kernel):
            _merge_with_kernel([_Merge(s.weight, s.lora_A, s.lora_B, (1.0 - s.momentum) * s.scaling, s.rounding,
                                       s.generator, label=s.label) for s in wave])
        reference.reset_factors_([s.lora_A for s in kernel], [s.lora_B for s in kernel],
                                 [s.momentum for s in kernel], [s.generator for s in kernel])
        for s, sharded in one_by_one:
            if sharded:
                unload_dtensor_(s.weight, s.lora_A, s.lora_B, s.scaling, momentum=s.momentum,
                                rounding=s.rounding, generator=s.generator)
            else:
                _unload_reference(s)
                reference.reset_factors_([s.lora_A], [s.lora_B], [s.momentum], [s.generator])


def unload_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
            momentum: float = 0.0, rounding: str = "nearest", generator: torch.Generator | None = None) -> None:
    """Merge ``scaling * lora_B @ lora_A`` into ``weight`` in place and reset the adapter (PeriodicLoRA).

    Args:
        weight: (out, in) base weight, fp16/bf16/fp32; updated in place with ONE rounding.
        lora_A: (r, in), lora_B: (out, r), any float dtype; reset in place.
        scaling: alpha / r.
        momentum: m in [0, 1). W gets (1 - m) of the update; m = 0 zeroes B and re-draws A
            (kaiming-uniform, a=sqrt(5)), m > 0 keeps A and scales B by m.
        rounding: "nearest" (round-to-nearest-even) or "stochastic" (unbiased; reproducible from
            ``generator``). Ignored for fp32 weights.
        generator: torch.Generator for the stochastic rounding stream and A's fresh draw.

    Raises ValueError/TypeError for bad arguments, and ValueError if the merge would write a non-finite
    value into W; in every error case weight, lora_A and lora_B are left bit-identical.

    FSDP2 parameters (DTensors) are unloaded shard by shard without gathering W, see
    :func:`plora_kernels.distributed.unload_dtensor_`. Many layers: :func:`unload_many_`.
    """
    unload_many_([UnloadSpec(weight, lora_A, lora_B, scaling, momentum, rounding, generator)])
