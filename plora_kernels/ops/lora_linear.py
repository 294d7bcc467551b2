"""lora_linear: y = x W^T + bias + s (x A^T) B^T, differentiable, as torch.library custom ops.

Two ops carry the work, so torch.compile sees them as single nodes (no graph breaks):
``plora::lora_linear_fwd`` returns (y, xa) and ``plora::lora_linear_bwd`` returns (dx, dA, dB). The public
``lora_linear`` asks the resolver (:mod:`plora_kernels._backend`) once per call, on the caller's thread, and
passes the answer to both. Backward saves only x and the M x r ``xa``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._backend import resolve
from . import reference, streams
from .checks import check_dropout, check_linear_args


def _big_gemm(impl: str):
    """The kernel of the big fused GEMMs (y, dx) for a Triton implementation; the skinny ones (x A^T, dy B) take
    the portable kernel (triton-ws declines N = r)."""
    if impl == "triton-ws":
        from .triton.lora_matmul_ws import lora_matmul_ws

        return lambda *args, tma=False, **kw: lora_matmul_ws(*args, **kw)
    from .triton.lora_matmul import lora_matmul

    return lora_matmul


def _dropout_seed(x: Tensor, p: float) -> int:
    """LoRA dropout's seed, drawn on the host from the default generator of x's device (so torch.manual_seed
    reproduces it on every backend, and activation checkpointing, which restores the RNG state before it re-runs
    the forward, draws the same one); 0, and nothing drawn, without dropout."""
    if p == 0.0:
        return 0
    if x.device.type == "cuda":
        return streams.draw_seed(torch.cuda.default_generators[x.device.index or 0])
    return streams.draw_seed(None)


@torch.library.custom_op("plora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Optional[Tensor], impl: str,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa = dropout(x) A^T, the dropout seed as a 0-d int64 CPU tensor): the backward regenerates the mask
    from the seed, so nothing larger than xa is kept for it."""
    seed = _dropout_seed(x, dropout_p)
    if impl != "torch":
        from .triton.lora_matmul import lora_matmul

        tma = impl == "triton-tma"
        xa = lora_matmul(x, lora_A.t(), tma=tma, dropout=(1, dropout_p, seed) if dropout_p else None)
        y = _big_gemm(impl)(x, weight.t(), lora_act=xa, lora_up=lora_B.t(), scaling=scaling, bias=bias, tma=tma)
    else:
        y, xa = reference.lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
    return y, xa, torch.tensor(seed, dtype=torch.int64)


@lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, scaling, bias, impl, dropout_p):
    return (x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0]),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("plora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
    compute_dx: bool, impl: str, dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    seed = int(seed)  # a CPU tensor: no device sync
    if impl != "torch":
        from .triton.lora_dy_pass import lora_dy_pass
        from .triton.lora_matmul import lora_matmul

        tma = impl == "triton-tma"
        dy = dy.contiguous()
        g, grad_B = lora_dy_pass(dy, lora_B, xa, scaling)  # both skinny products of dy in one read of it
        dx = None
        if compute_dx:
            if dropout_p:  # the mask on the low-rank term: the portable kernel applies it
                dx = lora_matmul(dy, weight, lora_act=g, lora_up=lora_A, scaling=scaling,
                                 dropout=(3, dropout_p, seed))
            else:
                dx = _big_gemm(impl)(dy, weight, lora_act=g, lora_up=lora_A, scaling=scaling, tma=tma)
        if dropout_p:  # dA's pass over x regenerates the mask in the tiles of x it loads
            grad_A = lora_matmul(g.t(), x, dropout=(2, dropout_p, seed)).mul_(scaling).to(lora_A.dtype)
        else:
            grad_A = reference.lora_grad_A(g, x, lora_A, scaling)
    else:
        dx, grad_A, grad_B = reference.lora_linear_backward(dy, x, xa, weight, lora_A, lora_B, scaling, compute_dx,
                                                            dropout_p, seed)
    # custom ops return tensors only: an unneeded dx is an empty placeholder
    return (dx if dx is not None else dy.new_empty(0)), grad_A, grad_B


@lora_linear_bwd.register_fake
def _(dy, x, xa, weight, lora_A, lora_B, scaling, compute_dx, impl, dropout_p, seed):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if compute_dx else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, scaling, bias, impl, dropout_p = inputs
    _, xa, seed = output
    ctx.save_for_backward(x, xa, weight, lora_A, lora_B, seed)
    ctx.scaling, ctx.impl, ctx.dropout_p = scaling, impl, dropout_p
    ctx.mark_non_differentiable(xa, seed)


def _backward(ctx, dy, _dxa, _dseed):
    x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias, _, _ = ctx.needs_input_grad
    # the forward's choice: the backward may run on autograd's device thread, which sees no choice made in code
    dx, grad_A, grad_B = lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, ctx.scaling, need_x, ctx.impl,
                                         ctx.dropout_p, seed)
    grad_W = (dy.t() @ x).to(weight.dtype) if need_w else None  # only when W is unfrozen
    grad_bias = dy.sum(0) if need_bias else None
    return (dx if need_x else None), grad_W, grad_A, grad_B, None, grad_bias, None, None


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


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None = None,
                lora_dropout: float = 0.0) -> Tensor:
    """Fused LoRA linear: ``x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    Args:
        x: input of shape (..., in_features), same dtype as ``weight``.
        weight: frozen base weight (out_features, in_features).
        lora_A: (r, in_features); lora_B: (out_features, r). Any float dtype: they are cast to x's dtype
            for the product, and their gradients come back in their own dtype.
        scaling: alpha / r, a Python float.
        bias: optional (out_features,).
        lora_dropout: dropout probability p in [0, 1) on the adapter's input only (PEFT's semantics; kept values
            scaled by 1/(1-p)). The mask is never stored: the forward and the backward regenerate it from a seed
            drawn from the default generator of x's device. 0 (the default) is the plain op. A module passes 0
            in eval mode.

    Differentiable in x, lora_A, lora_B (and weight/bias when they require grad). ``B @ A`` is never
    formed; backward keeps x and the (M, r) product ``x @ lora_A.T``. CUDA tensors run the implementation
    measured fastest there (the cuBLAS composition or a Triton kernel), CPU tensors the pure-torch reference;
    ``plora_kernels.implementation(lora_linear=...)`` or ``PLORA_LINEAR_KERNEL`` choose (see ``plora info``).
    Under ``torch.autocast`` x, weight
    and bias are cast to the autocast dtype, as for ``F.linear``: fp64 tensors are left in fp64 (autocast leaves
    fp64 alone) and an integer x is refused.
    """
    if isinstance(x, Tensor) and _autocast_enabled(x.device.type):
        # custom ops are invisible to autocast; cast as it would for F.linear (adapters are cast in-kernel): only
        # fp16/bf16/fp32 tensors; fp64 and integer tensors stay as they are (and an integer x is refused below)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (_autocast(t, dtype) for t in (x, weight, bias))
    scaling = check_linear_args(x, weight, lora_A, lora_B, scaling, bias)
    lora_dropout = check_dropout(lora_dropout)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # not -1: ambiguous for in_features = 0, which nn.Linear allows
    # resolved here, on the caller's thread, once for the forward and its backward
    y, _, _ = lora_linear_fwd(x2, weight, lora_A, lora_B, scaling, bias, _implementation(x2), lora_dropout)
    # y is the op's own fresh output, never seen by the caller, so the (..., out) tensor may share its storage
    # without being a view of it (what aten's matmul does for N-d inputs): a view would make FSDP2 warn that the
    # module returned one, since an in-place op on a view drops its pre-backward hook
    return torch.ops.aten._unsafe_view(y, (*lead, weight.shape[0]))
