"""Triton kernel: C = A @ B + scaling * ACT @ UP (+ bias), a GEMM with a low-rank term fused in.

Every GEMM of the LoRA linear is this one kernel:
    forward   xa = x @ lora_A^T                          (no low-rank term; N = r)
              y  = x @ W^T  + s * xa @ lora_B^T + bias
    backward  g  = dy @ lora_B                           (N = r)
              dx = dy @ W   + s * g  @ lora_A
The low-rank term seeds the fp32 accumulator before the K loop (the idea LoRAFusion uses), so y and dx are
written once, in one rounding, and the LoRA cost is one extra (BLOCK_M x r) x (r x BLOCK_N) dot per tile.
ACT (M x r) is the low-rank activation (xa, g) and UP (r x N) the factor that lifts it to C's columns
(lora_B^T, lora_A). B and UP are passed as strided views, so W^T and lora_B^T cost no copies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backend import autotuning, interpreting
from .. import streams
from . import limits
from .tiles import dot_options, dropout_keep, grouped_tile, keep_tiles, low_rank_seed, on_device, tile_config

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) per operand width and architecture, best first: big tiles for the
# wide products (y, dx), skinny-N tiles for the N = r products (x A^T) where big ones would leave the grid small.
# Each list holds what compiles without spills under Triton 3.6 and 3.9 on its architectures (the compile matrix,
# tests/test_kernels_compile.py): 128x256 spills on sm_8x, and with LoRA dropout's mask (its Philox words take
# registers) on sm_90 and sm_100 too; an fp32 dot (IEEE unless TF32 is allowed) spills in most tiles over 32x32.
HOPPER_16 = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (64, 32, 128, 4, 4), (64, 16, 256, 3, 4)]
AMPERE_16 = [(128, 128, 64, 3, 8), (128, 128, 32, 3, 8), (64, 64, 64, 4, 4), (64, 16, 256, 3, 4)]
# when a dropout mask is applied; the last only off the big-tile GPUs (it spills on sm_100), where the 99 KiB of
# sm_89 leave nothing larger
DROPOUT_16 = [(128, 128, 64, 3, 8), (64, 16, 256, 3, 4)]
DROPOUT_16_AMPERE = DROPOUT_16 + [(64, 64, 64, 4, 4)]
FP32 = [(32, 32, 32, 2, 4), (32, 16, 64, 2, 4)]
INTERPRETER = (64, 128, 128, 1, 4)  # the interpreter's cost is per program: few large tiles, no tuning


def gemm_configs(arch: int, dtype: torch.dtype, *, dropout: bool = False, block_r: int = 64, tuning: bool = True,
                 limit: int | None = None) -> list[tuple[int, int, int, int, int]]:
    """The tiles the kernel may launch with on ``arch`` (e.g. 90) for operands of ``dtype`` (``dropout``: with a
    dropout mask; ``block_r``: the low-rank tiles' width): its family's list less what exceeds the shared memory
    of one block (``limit``: the device's own figure), all of them when ``tuning``, else the first
    (``PLORA_AUTOTUNE=0`` pins it: no sweep per new shape bucket)."""
    if arch == 0:
        return [INTERPRETER]
    if dtype == torch.float32:
        family = FP32
    else:
        hopper = arch in limits.BIG_TILE_ARCHS
        family = (DROPOUT_16 if hopper else DROPOUT_16_AMPERE) if dropout else HOPPER_16 if hopper else AMPERE_16
    ok = [c for c in family if limits.fits(limits.gemm_shared(*c[:4], dtype.itemsize, block_r), arch, limit)]
    return ok if tuning else ok[:1]


def _all_configs():
    if interpreting():
        return [tile_config(INTERPRETER)]
    return [tile_config(c) for c in dict.fromkeys(HOPPER_16 + AMPERE_16 + DROPOUT_16_AMPERE + FP32)]


def prune(configs, named_args, **kwargs):
    """Autotune's early pruning: keep the configurations :func:`gemm_configs` allows for the launch's device,
    operand dtype (``a_ptr``'s), dropout and low-rank width (the autotune key holds all of them)."""
    a = named_args["a_ptr"]
    allowed = gemm_configs(limits.arch_of(a.device), a.dtype, dropout=kwargs["DROP"] != 0,
                           block_r=kwargs["BLOCK_R"], tuning=autotuning(), limit=limits.device_shared(a.device))
    return keep_tiles(configs, allowed, "lora_matmul", a)


@triton.autotune(configs=_all_configs(), key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "HAS_LORA", "DROP", "BLOCK_R"],
                 prune_configs_by={"early_config_prune": prune})
@triton.jit
def _lora_matmul_kernel(
    a_ptr, b_ptr, c_ptr, act_ptr, up_ptr, bias_ptr,
    M, N, K, R, M_BUCKET, N_BUCKET, K_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_actm, stride_actr, stride_upr, stride_upn,
    scaling, drop_seed, drop_threshold, drop_scale,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, DROP: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """DROP: where LoRA dropout's mask applies (x being that operand, its logical position the Philox counter):
    0 nowhere, 1 to A (x A^T), 2 to B (g^T x, for dA), 3 to the low-rank term (dx); the kept values are scaled
    by ``drop_scale`` = 1/(1-p) in fp32, after the dot.
    INT64: some element offset of an operand reaches 2**31 (e.g. 150k tokens x 14336), so row and column indices,
    and with them every offset, are 64-bit; int32 arithmetic would wrap to wrong addresses without an error."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    mask_m = rm < M
    mask_n = rn < N
    dtype = a_ptr.dtype.element_ty
    if UPCAST:
        dtype = tl.float32  # the interpreter multiplies bf16 bit patterns; fp32 is right there

    if HAS_LORA:  # the low-rank term seeds the accumulator
        acc = low_rank_seed(act_ptr, up_ptr, rm, rn, M, N, R, stride_actm, stride_actr, stride_upr, stride_upn, scaling,
                            UPCAST, PRECISION, BLOCK_R, BLOCK_M, BLOCK_N)
        if DROP == 3:
            acc = tl.where(dropout_keep(drop_seed, rm, pid_n * BLOCK_N, drop_threshold, BLOCK_M, BLOCK_N),
                           acc * drop_scale, 0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=((k0 + rk) < K)[:, None] & mask_n[None, :], other=0.0)
        if DROP == 1:
            a = tl.where(dropout_keep(drop_seed, rm, k0, drop_threshold, BLOCK_M, BLOCK_K), a, 0.0)
        elif DROP == 2:
            b = tl.where(dropout_keep(drop_seed, k0 + rk, pid_n * BLOCK_N, drop_threshold, BLOCK_K, BLOCK_N), b, 0.0)
        acc += tl.dot(a.to(dtype), b.to(dtype), input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if DROP == 1 or DROP == 2:
        acc *= drop_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


INT32_OFFSETS = 2**31  # an element offset at or past it needs the kernel's 64-bit indexing (INT64)


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether the largest element offset of any 2-D operand, sum((size - 1) * |stride|), reaches 2**31."""
    return any(t is not None and sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= INT32_OFFSETS
               for t in tensors)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def lora_matmul(a: torch.Tensor, b: torch.Tensor, *, lora_act: torch.Tensor | None = None,
                lora_up: torch.Tensor | None = None, scaling: float = 1.0,
                bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                tma: bool = False, dropout: tuple[int, float, int] | None = None) -> torch.Tensor:
    """Return ``a @ b + scaling * lora_act @ lora_up + bias`` in a's dtype with fp32 accumulation.

    a: (M, K); b: (K, N) any strides; lora_act: (M, R) and lora_up: (R, N), any float dtype (cast to a's);
    bias: (N,); out: optional (M, N) destination, any strides. Shapes are the caller's contract (checked
    at the public API). ``tma``: run the TMA kernel (lora_matmul_tma.py) where it can take the shapes (the
    resolver's ``triton-tma``). ``dropout``: (where, p, seed): LoRA dropout's mask (ops.streams) on operand a
    (where = 1), on operand b (2) or on the low-rank term (3), kept values scaled by 1/(1-p).
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    if M == 0 or N == 0:
        return c
    with on_device(a.device):  # Triton launches on the current device and stream: make them a's
        has_lora = lora_act is not None
        R = lora_act.shape[1] if has_lora else 0
        act = lora_act if has_lora else a  # placeholders: never read when the flags are off
        up = lora_up if has_lora else b
        upcast, precision = dot_options(a.dtype)
        block_r = min(64, max(16, triton.next_power_of_2(R)))
        buckets = (_bucket(M), _bucket(N), _bucket(K))
        drop, p, seed = dropout or (0, 0.0, 0)
        if tma and not drop:  # the TMA kernel has no dropout: the masked products take the portable kernel
            from . import lora_matmul_tma

            # fp32 (TF32) tiles with low-rank tiles wider than 16 exceed shared memory: the portable kernel takes them
            if lora_matmul_tma.supported(a, b, out) and (a.dtype != torch.float32 or block_r <= 16):
                return lora_matmul_tma.lora_matmul_tma(a, b, c, lora_act, lora_up, scaling, bias, precision, block_r,
                                                       buckets)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _lora_matmul_kernel[grid](
            a, b, c, act, up, bias if bias is not None else a,
            M, N, K, R, *buckets,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            act.stride(0), act.stride(1), up.stride(0), up.stride(1),
            scaling, seed, streams.keep_threshold(p), 1.0 / (1.0 - p),
            HAS_LORA=has_lora, HAS_BIAS=bias is not None,
            UPCAST=upcast, PRECISION=precision,
            BLOCK_R=block_r, DROP=drop, INT64=needs_int64(a, b, c, act, up),
        )
        return c
