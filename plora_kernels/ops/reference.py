"""Pure-torch reference of every op: the CPU path and the oracle the kernels are tested against.

Shapes follow nn.Linear / PEFT: weight (out, in), lora_A (r, in), lora_B (out, r), x (M, in).
Nothing here materialises ``lora_B @ lora_A`` except :func:`unload_value`, the oracle of the merge.
"""
from __future__ import annotations

import torch

from . import streams
from .formats import FP16_MIN_BIASED_EXP


def dropped(x, p: float, seed: int):
    """dropout(x) with the mask of ops.streams (kept values scaled by 1/(1-p)); x itself for p = 0."""
    if p == 0.0:
        return x
    keep = streams.dropout_keep(seed, torch.arange(x.shape[0], device=x.device),
                                torch.arange(x.shape[1], device=x.device), p)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=0):
    """y = x W^T + bias + s (dropout(x) A^T) B^T for 2-D x, in x's dtype; returns (y, xa), xa = dropout(x) A^T.

    On CUDA this is the cuBLAS composition: the skinny product fills y0 = bias + s xa B^T, and the big GEMM
    accumulates into it (beta = 1), so y is written once by the small GEMM and read and written once by the big
    one, instead of a separate pass adding the low-rank term afterwards. Dropout (``dropout_p`` > 0, mask from
    ``seed``, see ops.streams) applies to the adapter's input only, as in PEFT.
    """
    xa = dropped(x, dropout_p, seed) @ lora_A.to(x.dtype).t()
    b_t = lora_B.to(x.dtype).t()
    if bias is not None:
        y = torch.addmm(bias.to(x.dtype), xa, b_t, alpha=scaling)
    else:  # beta = 0: the empty tensor's contents are never read; alpha applies in the GEMM's fp32
        y = torch.addmm(x.new_empty(x.shape[0], weight.shape[0]), xa, b_t, beta=0, alpha=scaling)
    return y.addmm_(x, weight.t()), xa


def lora_grad_A(g, x, lora_A, scaling, dropout_p=0.0, seed=0):
    """dA = s g^T dropout(x) from g = dy B (M x r), in lora_A's dtype: a skinny GEMM with a long reduction over
    M, which cuBLAS splits well."""
    return (g.t() @ dropped(x, dropout_p, seed)).mul_(scaling).to(lora_A.dtype)


def lora_grad_B(dy, xa, lora_B, scaling):
    """dB = s dy^T xa from the forward's xa = dropout(x) A^T, in lora_B's dtype. With g = dy B it is the second
    read of dy: the two contract over different dimensions, so no one GEMM call computes both (the Triton
    path's ops/triton/lora_dy_pass.py does, in one pass)."""
    return (dy.t() @ xa).mul_(scaling).to(lora_B.dtype)


def lora_linear_backward(dy, x, xa, weight, lora_A, lora_B, scaling, compute_dx=True, dropout_p=0.0, seed=0):
    """Gradients of :func:`lora_linear_forward` for 2-D dy, never forming B A: returns (dx or None, dA, dB).

    dx = dy W + s dropout'((dy B) A), where dropout' multiplies by the forward's mask and 1/(1-p). The frozen
    weight's and the bias's gradients, when wanted, are plain torch ops in the autograd layer.
    """
    g = dy @ lora_B.to(dy.dtype)
    dx = None
    if compute_dx:  # as the forward: the skinny term first, the big GEMM accumulating into it
        a_t = lora_A.to(dy.dtype)
        if dropout_p:
            dx = dropped(g @ a_t, dropout_p, seed).mul_(scaling).addmm_(dy, weight)
        else:
            dx = torch.addmm(dy.new_empty(dy.shape[0], weight.shape[1]), g, a_t, beta=0, alpha=scaling)
            dx.addmm_(dy, weight)
    return dx, lora_grad_A(g, x, lora_A, scaling, dropout_p, seed), lora_grad_B(dy, xa, lora_B, scaling)


def _as_int32(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> the int32 tensor with those bits."""
    return (bits - ((bits >> 31) & 1) * 2**32).to(torch.int32)


def round_stochastic(v: torch.Tensor, bits16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 ``v`` into fp16/bf16 with 16 random bits per element, in integer arithmetic on v's bits.

    The magnitude moves away from zero with probability f16 / 2**16, where f16 is the first 16 bits of its
    fraction below the target's grid: exactly the fraction for bf16 (16 bits dropped) and for fp16 normals (13),
    truncated for fp16 subnormals below 2**-17 (a bias under 2**-16 of their grid step). Adding
    ``(2**16 - 1 - bits16)`` to those 16 bits carries into the kept part exactly when ``bits16 < f16``. Non-finite
    values stay non-finite; values past the format's largest finite round to a multiple of its grid that the final
    cast turns into inf, which the unload's check then refuses.
    """
    raw = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign, mag = raw & 0x80000000, raw & 0x7FFFFFFF
    carry = bits16 ^ 0xFFFF
    if dtype == torch.bfloat16:
        out = (mag + carry) & 0xFFFF0000
        out = torch.where(mag > 0x7F800000, 0x7FC00000, out)  # a NaN's carry could reach the sign bit
        return _as_int32(out | sign).view(torch.float32).to(dtype)
    # fp16: scale |v| so the grid step is 2**16 (exact: a power of two), round the integer, scale back
    e = (mag >> 23).clamp_min(FP16_MIN_BIASED_EXP)
    up = _as_int32((280 - e) << 23).view(torch.float32)  # 2**(26 - max(exp, -14))
    down = _as_int32((e - 10) << 23).view(torch.float32)  # the grid step 2**(max(exp, -14) - 10)
    fixed = torch.where(e == 255, 0.0, v.abs() * up).to(torch.int64)  # no NaN -> int cast
    out = ((fixed + carry) >> 16).to(torch.float32) * down
    out = torch.where(e == 255, v.abs(), out)  # inf and NaN as they are
    return torch.where(sign != 0, -out, out).to(dtype)


def round_to(v: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int = 0, row_offset: int = 0) -> torch.Tensor:
    """Round an fp32 tensor into ``dtype`` once: "nearest" (RNE) or "stochastic" with the stream of ``seed``
    (see ops.streams), v being rows [row_offset, ...) of the logical weight."""
    if dtype in (torch.float32, torch.float64) or rounding == "nearest":
        return v.to(dtype)
    rows = torch.arange(v.shape[0], device=v.device) + row_offset
    bits = streams.rounding_bits(seed, rows, torch.arange(v.shape[1], device=v.device))
    return round_stochastic(v, bits, dtype)


def merge_value(weight, lora_A, lora_B, coef, rounding="nearest", seed=0, row_offset=0) -> torch.Tensor:
    """round(W + coef B A) as a new W-sized tensor (the oracle, and the CPU path), computed in fp32 (fp64 for an
    fp64 W) in the kernels' order: the products summed over k one at a time, then scaled, then added to W."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a, b = lora_A.to(compute), lora_B.to(compute)
    # summed elementwise rather than by a GEMM: a BLAS GEMM may change its reduction order with the number of
    # rows, and a row shard must merge bit for bit as the full W does
    delta = torch.zeros(b.shape[0], a.shape[1], dtype=compute, device=weight.device)  # from +0, as the kernels
    for k in range(a.shape[0]):
        delta += b[:, k:k + 1] * a[k:k + 1]
    v = weight.to(compute) + delta.mul_(coef)
    return round_to(v, weight.dtype, rounding, seed, row_offset)


def unload_value(weight, lora_A, lora_B, scaling, momentum=0.0, rounding="nearest", seed=0):
    """The merged weight round(W + (1 - m) s B A) as a new W-sized tensor (oracle only)."""
    return merge_value(weight, lora_A, lora_B, (1.0 - momentum) * scaling, rounding, seed)


def reset_factors_(lora_As, lora_Bs, momenta, init_seeds) -> None:
    """The adapters after an unload, for a list of layers: m = 0 re-draws A (ops.streams' init stream with the
    layer's seed) and zeroes B; m > 0 scales B by m. Zeroing and scaling fp32/fp64 B's are multi-tensor ops."""
    zero = [b for b, m in zip(lora_Bs, momenta) if m == 0.0]
    if zero:
        torch._foreach_zero_(zero)
    scale: dict = {}
    for a, b, m, seed in zip(lora_As, lora_Bs, momenta, init_seeds):
        if m == 0.0:
            bound = streams.init_bound(a.shape[1])
            a.copy_(streams.init_values(seed, a.shape[0], a.shape[1], bound, a.dtype, a.device))
        elif b.dtype in (torch.float32, torch.float64):
            scale.setdefault((m, b.device, b.dtype), []).append(b)
        else:  # not _foreach_mul_: its scalar is rounded to B's dtype first, so fp16 B * m would differ
            b.mul_(m)
    for (m, _, _), bs in scale.items():
        torch._foreach_mul_(bs, m)


def init_lora_A_(lora_A: torch.Tensor, generator=None) -> torch.Tensor:
    """kaiming_uniform_(a=sqrt(5)) on (r, in), as nn.Linear and PEFT: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / lora_A.shape[1] ** 0.5
    return lora_A.uniform_(-bound, bound, generator=generator)
