"""unload_: merge the adapter into the base weight in place with one rounding, then reset the adapter.

The rule (this package's; see DESIGN): with c = 1 - momentum,
    W <- round(W + c * s * B A)          computed in fp32, rounded once into W's dtype
    m = 0: B <- 0, A <- a fresh nn.Linear-style draw;   m > 0: B <- m B, A kept
so for m > 0 the layer's output is unchanged up to rounding: (W + c s B A) + s (m B) A = W + s B A.

Safety: an unload that would put a non-finite value into W raises and leaves W, A, B bit-identical.
On the kernel path this costs nothing extra in steady state: a bound |W + c s B A| <= max|W| + c s
sum_k max|B_k| max|A_k| proves most merges safe, where max|W| comes from the previous unload's kernel (it
reports max |new W| for free) or, the first time, from one read of W. Only a merge the bound cannot clear
runs the kernel twice: a dry run with the same random stream, then the real one.
"""
from __future__ import annotations

import torch

from .._backend import requested_unload_kernel, use_triton
from . import reference
from .checks import check_generator_device, check_unload_args

# attribute set on the weight by our last write: (data_ptr, _version, max |W| as a 1-element fp32 tensor);
# kept on the tensor itself so it dies with it, and checked against the version counter so any other
# in-place write to W invalidates it
_AMAX_ATTR = "_plora_amax"
_BOUND_MARGIN = 1.0 + 2.0**-10  # covers fp32 rounding in the kernel's sum of r products and the add


def _check_finite_factors(lora_A, lora_B) -> None:
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"unload_: {name} contains non-finite values; weight, lora_A and lora_B were left unchanged")


def _overflow_error(weight) -> ValueError:
    return ValueError(
        f"unload_: merging would write a non-finite value into the {weight.dtype} weight (overflow or a "
        "non-finite entry already in it); weight, lora_A and lora_B were left unchanged")


def _draw_seed(generator, device) -> int:
    gen_device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device).item())


def _known_amax(weight):
    hit = getattr(weight, _AMAX_ATTR, None)
    if hit is not None and hit[0] == weight.data_ptr() and hit[1] == weight._version:
        return hit[2]
    return None


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


def _unload_with_kernel(weight, lora_A, lora_B, coef, rounding, generator, *, row_offset: int = 0,
                   all_ranks=_local) -> None:
    """The kernel path of the merge, with its checks (non-finite factors, overflow); the reset is the caller's.

    ``row_offset`` and ``all_ranks`` serve the sharded unload: W is rows [row_offset, ...) of a larger
    weight, and ``all_ranks(flag)`` is the AND of ``flag`` over every rank holding a shard, so that all
    ranks take the same branch and an overflow anywhere raises everywhere before any rank writes.
    """
    merge_ = _merge_kernel(weight)
    seed = _draw_seed(generator, weight.device) if rounding == "stochastic" else 0
    finite = torch.isfinite(lora_A).all() & torch.isfinite(lora_B).all()
    if weight.numel() == 0:
        safe = finite
    else:
        amax = _known_amax(weight)
        if amax is None:  # first unload of this weight, or it changed since: one read of W
            amax = torch.linalg.vector_norm(weight, float("inf"), dtype=torch.float32).reshape(1)
        bound = (lora_B.abs().amax(0).float() * lora_A.abs().amax(1).float()).sum() * abs(coef)
        safe = finite & ((amax + bound) * _BOUND_MARGIN <= torch.finfo(weight.dtype).max).all()
    # the factors' check and the bound share one host sync: the only one of a steady-state nearest unload
    if not bool(safe):
        _check_finite_factors(lora_A, lora_B)
        safe = False
    if not all_ranks(bool(safe)):  # the bound cannot clear it: an exact dry run with the same random stream
        ok = weight.numel() == 0 or bool(torch.isfinite(
            merge_(weight, lora_A, lora_B, coef, rounding, seed, write=False, row_offset=row_offset)).all())
        if not all_ranks(ok):
            raise _overflow_error(weight)
    if weight.numel() == 0:
        return
    stats = merge_(weight, lora_A, lora_B, coef, rounding, seed, write=True, row_offset=row_offset)
    torch.autograd.graph.increment_version(weight)  # raw kernel writes are invisible to autograd otherwise
    setattr(weight, _AMAX_ATTR, (weight.data_ptr(), weight._version, stats))


def _unload_reference(weight, lora_A, lora_B, scaling, momentum, rounding, generator) -> None:
    new = reference.unload_value(weight, lora_A, lora_B, scaling, momentum, rounding, generator)
    if not bool(torch.isfinite(new).all()):
        raise _overflow_error(weight)
    weight.copy_(new)


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
    :func:`plora_kernels.distributed.unload_dtensor_`.
    """
    from ..distributed import is_dtensor, unload_dtensor_  # lazily: it imports this module

    if is_dtensor(weight):
        return unload_dtensor_(weight, lora_A, lora_B, scaling, momentum=momentum, rounding=rounding,
                               generator=generator)
    scaling, momentum = check_unload_args(weight, lora_A, lora_B, scaling, momentum, rounding)
    check_generator_device(generator, weight)
    with torch.no_grad():
        if use_triton(weight):  # checks the factors itself, together with its overflow bound
            _unload_with_kernel(weight, lora_A, lora_B, (1.0 - momentum) * scaling, rounding, generator)
        else:
            _check_finite_factors(lora_A, lora_B)
            _unload_reference(weight, lora_A, lora_B, scaling, momentum, rounding, generator)
        reference.reset_factors_(lora_A, lora_B, momentum, generator)
