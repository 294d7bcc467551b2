"""Pure-torch reference of every op: the CPU path and the oracle the kernels are tested against.

Shapes follow nn.Linear / PEFT: weight (out, in), lora_A (r, in), lora_B (out, r), x (M, in).
Nothing here materialises ``lora_B @ lora_A`` except :func:`unload_value`, the oracle of the merge.
"""
from __future__ import annotations

import torch

# Rounding to a 16-bit float, described as a grid: a value v with binary exponent e (clamped below at
# EMIN) lies on a grid of spacing q = 2**(e - MANT). fp16's EMIN is its smallest normal exponent, so its
# subnormals come out right; bf16 shares fp32's exponent range and we stop at -119 so q stays a normal
# fp32 (values below 2**-119 round on a 2**-126 grid, still representable and still unbiased).
ROUNDING_GRID = {torch.float16: (10, -14), torch.bfloat16: (7, -119)}


def lora_linear_forward(x, weight, lora_A, lora_B, scaling, bias=None):
    """y = x W^T + bias + s (x A^T) B^T for 2-D x, in x's dtype; returns (y, xa) with xa = x A^T."""
    xa = x @ lora_A.to(x.dtype).t()
    y = torch.addmm(bias.to(x.dtype), x, weight.t()) if bias is not None else x @ weight.t()
    y = y.addmm_(xa, lora_B.to(x.dtype).t(), alpha=scaling)
    return y, xa


def lora_adapter_grads(dy, x, xa, g, lora_A, lora_B, scaling):
    """dA = s g^T x and dB = s dy^T xa from the M x r intermediates (g = dy B), in the adapters' dtype.

    Shared by every backend: these are skinny GEMMs with a long reduction over M, which cuBLAS already
    splits well, so the Triton path calls this too.
    """
    grad_A = (g.t() @ x).mul_(scaling).to(lora_A.dtype)
    grad_B = (dy.t() @ xa).mul_(scaling).to(lora_B.dtype)
    return grad_A, grad_B


def lora_linear_backward(dy, x, xa, weight, lora_A, lora_B, scaling, compute_dx=True):
    """Gradients of :func:`lora_linear_forward` for 2-D dy, never forming B A: returns (dx or None, dA, dB).

    dx = dy W + s (dy B) A. The frozen weight's and the bias's gradients, when wanted, are plain torch
    ops in the autograd layer and shared by every backend.
    """
    g = dy @ lora_B.to(dy.dtype)
    dx = torch.addmm(dy @ weight, g, lora_A.to(dy.dtype), alpha=scaling) if compute_dx else None
    grad_A, grad_B = lora_adapter_grads(dy, x, xa, g, lora_A, lora_B, scaling)
    return dx, grad_A, grad_B


def round_to(v: torch.Tensor, dtype: torch.dtype, rounding: str, generator=None) -> torch.Tensor:
    """Round an fp32 tensor into ``dtype`` once: "nearest" (RNE) or "stochastic" (unbiased)."""
    if dtype in (torch.float32, torch.float64) or rounding == "nearest":
        return v.to(dtype)
    mant, emin = ROUNDING_GRID[dtype]
    exponent = ((v.view(torch.int32) >> 23) & 0xFF) - 127
    q_exp = exponent.clamp_min(emin) - mant
    t = torch.ldexp(v, -q_exp)  # exact: a power-of-two scaling
    floor = t.floor()
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    up = (u < (t - floor)).to(torch.float32)  # P(up) = the fractional part: unbiased
    return torch.ldexp(floor + up, q_exp).to(dtype)


def unload_value(weight, lora_A, lora_B, scaling, momentum=0.0, rounding="nearest", generator=None):
    """The merged weight round(W + (1 - m) s B A), computed in fp32 as a new W-sized tensor (oracle only)."""
    a, b = lora_A.float(), lora_B.float()
    # summed over k one elementwise op at a time rather than by a GEMM: a BLAS GEMM may change its
    # reduction order with the number of rows, and a row shard must merge bit for bit as the full W does
    delta = b[:, :1] * a[:1]
    for k in range(1, a.shape[0]):
        delta += b[:, k:k + 1] * a[k:k + 1]
    v = weight.float() + delta.mul_((1.0 - momentum) * scaling)
    return round_to(v, weight.dtype, rounding, generator)


def reset_factors_(lora_As, lora_Bs, momenta, generators) -> None:
    """The adapters after an unload, for a list of layers: m = 0 re-draws A (nn.Linear/PEFT init) and zeroes
    B; m > 0 scales B by m. The zeroing is one multi-tensor op; each fresh A comes from its layer's generator."""
    zero = [b for b, m in zip(lora_Bs, momenta) if m == 0.0]
    if zero:
        torch._foreach_zero_(zero)
    for a, b, m, g in zip(lora_As, lora_Bs, momenta, generators):
        if m == 0.0:
            init_lora_A_(a, g)
        else:  # not _foreach_mul_: its scalar is rounded to B's dtype first, so fp16 B * m would differ
            b.mul_(m)


def init_lora_A_(lora_A: torch.Tensor, generator=None) -> torch.Tensor:
    """kaiming_uniform_(a=sqrt(5)) on (r, in), as nn.Linear and PEFT: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / lora_A.shape[1] ** 0.5
    return lora_A.uniform_(-bound, bound, generator=generator)
