"""lora_linear: y = x W^T + bias + s (x A^T) B^T, differentiable, as torch.library custom ops.

Two ops carry the work, so torch.compile sees them as single nodes (no graph breaks):
``plora::lora_linear_fwd`` returns (y, xa) and ``plora::lora_linear_bwd`` returns (dx, dA, dB). The public
``lora_linear`` asks the resolver (:mod:`plora_kernels._backend`) once per call, on the caller's thread, and
passes the answer to both. Backward saves only x and the M x r ``xa``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import resolve
from . import reference
from .checks import check_linear_args


@torch.library.custom_op("plora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Optional[Tensor], impl: str
) -> tuple[Tensor, Tensor]:
    if impl != "torch":
        from .triton.lora_matmul import lora_matmul

        tma = impl == "triton-tma"
        xa = lora_matmul(x, lora_A.t(), tma=tma)
        return lora_matmul(x, weight.t(), lora_s=xa, lora_l=lora_B.t(), scaling=scaling, bias=bias, tma=tma), xa
    return reference.lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias)


@lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, scaling, bias, impl):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("plora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
    compute_dx: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if impl != "torch":
        from .triton.lora_matmul import lora_matmul

        tma = impl == "triton-tma"
        dy = dy.contiguous()
        g = lora_matmul(dy, lora_B, tma=tma)
        dx = lora_matmul(dy, weight, lora_s=g, lora_l=lora_A, scaling=scaling, tma=tma) if compute_dx else None
        grad_A, grad_B = reference.lora_adapter_grads(dy, x, xa, g, lora_A, lora_B, scaling)
    else:
        dx, grad_A, grad_B = reference.lora_linear_backward(dy, x, xa, weight, lora_A, lora_B, scaling, compute_dx)
    # custom ops return tensors only: an unneeded dx is an empty placeholder
    return (dx if dx is not None else dy.new_empty(0)), grad_A, grad_B


@lora_linear_bwd.register_fake
def _(dy, x, xa, weight, lora_A, lora_B, scaling, compute_dx, impl):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if compute_dx else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, scaling, bias, impl = inputs
    _, xa = output
    ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
    ctx.scaling, ctx.impl = scaling, impl
    ctx.mark_non_differentiable(xa)


def _backward(ctx, dy, _dxa):
    x, xa, weight, lora_A, lora_B = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias, _ = ctx.needs_input_grad
    # the forward's choice: the backward may run on autograd's device thread, which sees no choice made in code
    dx, grad_A, grad_B = lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, ctx.scaling, need_x, ctx.impl)
    grad_W = (dy.t() @ x).to(weight.dtype) if need_w else None  # only when W is unfrozen
    grad_bias = dy.sum(0) if need_bias else None
    return (dx if need_x else None), grad_W, grad_A, grad_B, None, grad_bias, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): never autocast there
        return False


def _autocast(t, dtype: torch.dtype):
    """What autocast does to an argument of a lower-precision op such as F.linear: cast a floating tensor that is
    not fp64 to ``dtype``; leave fp64, integer tensors and non-tensors alone."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _implementation(x2: Tensor) -> str:
    """The resolver's answer for x2 (M x in). Under torch.compile it is asked once, when the graph is traced,
    and becomes a constant of the graph (a context variable cannot be traced)."""
    if torch.compiler.is_compiling():
        return _implementation_when_traced(str(x2.device), x2.dtype)
    return resolve("lora_linear", x2, size=x2.shape[0])


@torch.compiler.assume_constant_result
def _implementation_when_traced(device: str, dtype: torch.dtype) -> str:
    return resolve("lora_linear", torch.empty(0, device=device), dtype=dtype)


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None = None) -> Tensor:
    """Fused LoRA linear: ``x @ weight.T + bias + scaling * (x @ lora_A.T) @ lora_B.T``.

    Args:
        x: input of shape (..., in_features), same dtype as ``weight``.
        weight: frozen base weight (out_features, in_features).
        lora_A: (r, in_features); lora_B: (out_features, r). Any float dtype: they are cast to x's dtype
            for the product, and their gradients come back in their own dtype.
        scaling: alpha / r, a Python float.
        bias: optional (out_features,).

    Differentiable in x, lora_A, lora_B (and weight/bias when they require grad). ``B @ A`` is never
    formed; backward keeps x and the (M, r) product ``x @ lora_A.T``. CUDA tensors run the implementation
    measured fastest there (the cuBLAS composition or a Triton kernel), CPU tensors the pure-torch reference;
    ``plora_kernels.implementation(lora_linear=...)`` or ``PLORA_LINEAR_KERNEL`` choose (see ``plora info``). Under ``torch.autocast`` x, weight
    and bias are cast to the autocast dtype, as for ``F.linear``: fp64 tensors are left in fp64 (autocast leaves
    fp64 alone) and an integer x is refused.
    """
    if isinstance(x, Tensor) and _autocast_enabled(x.device.type):
        # custom ops are invisible to autocast; cast as it would for F.linear (adapters are cast in-kernel): only
        # fp16/bf16/fp32 tensors; fp64 and integer tensors stay as they are (and an integer x is refused below)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (_autocast(t, dtype) for t in (x, weight, bias))
    scaling = check_linear_args(x, weight, lora_A, lora_B, scaling, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # resolved here, on the caller's thread, once for the forward and its backward
    y, _ = lora_linear_fwd(x2, weight, lora_A, lora_B, scaling, bias, _implementation(x2))
    return y.reshape(*lead, weight.shape[0])
