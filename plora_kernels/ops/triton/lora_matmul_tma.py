"""Triton kernel: the fused LoRA GEMM of lora_matmul.py on Hopper's tensor memory accelerator (TMA).

C = A @ B + scaling * ACT @ UP (+ bias), as the portable kernel computes it, with three changes aimed at the gap
to cuBLAS measured on an H200 (benchmarks/NOTES.md):
  * A, B and C move through TMA descriptors: the hardware does the address arithmetic and the bounds, so the
    K loop has no masks and the loads are bulk copies, not per-thread cp.async;
  * the grid is persistent: one program per SM walks the tiles in grouped order, so a tile's epilogue
    overlaps the next tile's loads;
  * W stays in its (out, in) layout: the forward's B = W^T is read as W's tiles and transposed in the dot.
The low-rank seed and the bias are small and use plain masked loads, as in the portable kernel.

Opt-in (``PLORA_LINEAR_KERNEL=triton-tma``) until a GPU run shows it faster. Descriptors need 16-byte aligned
row strides, so other shapes fall back to the portable kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..._backend import autotuning, interpreting
from . import limits
from .tiles import dot_options, grouped_tile, keep_tiles, low_rank_seed, num_sms, tile_config


def _set_block_shapes(nargs):
    """Autotune pre-hook: each config's tile shapes go into the descriptors before it runs."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]
    nargs["c_desc"].block_shape = [bm, bn]


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), best first. 16-bit: 128x256x64 with 3 stages and its C tile take
# 208 KiB of the 227 KiB of shared memory, so 4 stages only fit smaller tiles. fp32 (TF32) doubles every buffer:
# the 16-bit tiles would need 327-426 KB, so it has its own list.
TILES_16 = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 64, 64, 4, 4)]
TILES_FP32 = [(128, 128, 32, 3, 8), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)]  # taken for r <= 16 only
INTERPRETER = (64, 128, 128, 1, 4)


def tma_shared(block_m: int, block_n: int, block_k: int, stages: int, itemsize: int, block_r: int = 64) -> int:
    """An upper bound of a tile's shared memory: the pipelined A/B buffers, the low-rank tiles (once: the
    descriptors' loads land where the dot reads them), the C tile and the slack; checked by the compile matrix."""
    return (stages * (block_m * block_k + block_k * block_n) * itemsize + (block_m + block_n) * block_r * itemsize
            + block_m * block_n * itemsize + limits.SLACK)


def tma_configs(arch: int, dtype: torch.dtype, *, block_r: int = 64, tuning: bool = True, limit: int | None = None):
    """The tiles the TMA kernel may launch with on ``arch`` for ``dtype`` operands (see lora_matmul.gemm_configs)."""
    if arch == 0:
        return [INTERPRETER]
    ok = [c for c in (TILES_FP32 if dtype == torch.float32 else TILES_16)
          if limits.fits(tma_shared(*c[:4], dtype.itemsize, block_r), arch, limit)]
    return ok if tuning else ok[:1]


def _all_configs():
    shapes = [INTERPRETER] if interpreting() else TILES_16 + TILES_FP32
    return [tile_config(c, pre_hook=_set_block_shapes) for c in shapes]


def prune(configs, named_args, **kwargs):
    """Autotune's early pruning by the launch's device, dtype and low-rank width, as lora_matmul.prune."""
    c = named_args["c_desc"].base
    allowed = tma_configs(limits.arch_of(c.device), c.dtype, block_r=kwargs["BLOCK_R"], tuning=autotuning(),
                          limit=limits.device_shared(c.device))
    return keep_tiles(configs, allowed, "lora_matmul_tma", c)


@triton.autotune(configs=_all_configs(), key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "HAS_LORA", "B_NK", "BLOCK_R"],
                 prune_configs_by={"early_config_prune": prune})
@triton.jit
def _lora_matmul_tma_kernel(
    a_desc, b_desc, c_desc, act_ptr, up_ptr, bias_ptr,
    M, N, K, R, M_BUCKET, N_BUCKET, K_BUCKET,
    stride_actm, stride_actr, stride_upr, stride_upn,
    scaling,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    B_NK: tl.constexpr, NUM_PROGRAMS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    dtype = c_desc.dtype
    if UPCAST:
        dtype = tl.float32  # the interpreter multiplies bf16 bit patterns; fp32 is right there
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, grid_m, grid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if HAS_LORA:  # the low-rank term seeds the accumulator
            acc = low_rank_seed(act_ptr, up_ptr, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), M, N,
                                R, stride_actm, stride_actr, stride_upr, stride_upn, scaling, UPCAST, PRECISION,
                                BLOCK_R, BLOCK_M, BLOCK_N)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        for ki in range(k_tiles):  # no masks: TMA zero-fills reads past the edges
            a = a_desc.load([off_m, ki * BLOCK_K]).to(dtype)
            if B_NK:
                b = b_desc.load([off_n, ki * BLOCK_K]).to(dtype)
                acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
            else:
                b = b_desc.load([ki * BLOCK_K, off_n]).to(dtype)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)

        if HAS_BIAS:
            rn = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))  # TMA clips the store at the edges


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D row-major tensor a descriptor can address: unit last stride, 16-byte aligned rows and base."""
    return (t.dtype in (torch.float16, torch.bfloat16, torch.float32) and t.dim() == 2 and t.stride(1) == 1
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def supported(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> bool:
    """Whether ``a @ b`` can take the TMA kernel: a row-major; b row-major or the transpose of a row-major
    tensor (W^T); out (if given) row-major; all with 16-byte aligned rows; a matrix big enough for it."""
    b_ok = _tma_ready(b) or _tma_ready(b.t())
    # fp32 only as TF32 with B = W^T: an IEEE fp32 dot has no tensor-core path, and on these tiles its FMA form
    # spills thousands of registers (the compile matrix); TF32 reads B K-major
    no_tf32 = a.is_cuda and not torch.backends.cuda.matmul.allow_tf32
    if a.dtype == torch.float32 and (not _tma_ready(b.t()) or no_tf32):
        return False
    return (_tma_ready(a) and b_ok and (out is None or _tma_ready(out)) and a.dtype == b.dtype
            and a.shape[0] > 0 and b.shape[1] >= 64 and a.shape[1] >= 64)


def lora_matmul_tma(a, b, c, lora_act, lora_up, scaling, bias, precision, block_r, buckets):
    """Launch for :func:`lora_matmul.lora_matmul` (which checked :func:`supported` and made ``c``)."""
    M, K = a.shape
    N = b.shape[1]
    b_nk = not _tma_ready(b)  # then b is W^T: describe W (N, K) and transpose its tiles in the dot
    dummy = [1, 1]  # block shapes: set per config by the autotune pre-hook
    a_desc = TensorDescriptor.from_tensor(a, dummy)
    b_desc = TensorDescriptor.from_tensor(b.t() if b_nk else b, dummy)
    c_desc = TensorDescriptor.from_tensor(c, dummy)
    has_lora = lora_act is not None
    act = lora_act if has_lora else a  # placeholders: never read without the low-rank term
    up = lora_up if has_lora else a
    programs = 4 if interpreting() else num_sms(a.device)

    def grid(meta):
        return (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    _lora_matmul_tma_kernel[grid](
        a_desc, b_desc, c_desc, act, up, bias if bias is not None else a,
        M, N, K, lora_act.shape[1] if has_lora else 0, *buckets,
        act.stride(0), act.stride(1), up.stride(0), up.stride(1),
        scaling,
        HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        UPCAST=dot_options(a.dtype)[0], PRECISION=precision,
        B_NK=b_nk, NUM_PROGRAMS=programs, BLOCK_R=block_r,
    )
    return c
