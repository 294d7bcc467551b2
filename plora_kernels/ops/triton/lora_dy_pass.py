"""Triton kernel: the LoRA backward's two skinny products in ONE pass over dy.

    g      = dy @ lora_B             (M x r; dA = s g^T x and dx's low-rank term need it)
    grad_B = scaling * dy^T @ xa     (out x r)

As two GEMM calls they read dy (M x out, the backward's largest activation) twice: they contract over different
dimensions (g over out, grad_B over M), so no single GEMM call serves both. Here each program loads a tile of
dy once and feeds both dots. At M = 8192, out = 4096, bf16 that is 64 MiB of reads instead of 128.

Deterministic, no atomics. Program (i, j) owns the rows of M-chunk i and the columns of out-chunk j and walks
its out-blocks (outer loop) and its M-blocks (inner loop):
  * grad_B's block sums over the M-chunk in registers and is written once, as chunk i's partial sum;
  * g's rows sum over the out-blocks in a private fp32 scratch of chunk j (read-modify-write by this program
    only: CHUNK_M x r x 4 bytes, small enough to stay in L2).
The host adds the partials in a fixed order. Their traffic, 8 r (chunks_n M + chunks_m out) bytes (fp32, written
and read once) against dy's 2 M out, is 4 r (chunks_n / out + chunks_m / M) of dy's bytes; the grid is cut in
the ratio that makes it smallest for one program per SM. By that count, at the size above with r = 16 on 132
SMs (8 x 16 chunks): 25%, so 1.25 reads of dy where two GEMMs make 2. The sm_90 compile (bf16, r = 16): 130
registers, 108 KiB of shared memory for 3 stages of 128 x 128 dy tiles, so one 8-warp program per SM; r = 128
spills, hence MAX_RANK = 64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from .. import reference
from . import limits
from .tiles import dot_options, num_sms, on_device

# (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU; the interpreter's cost is per program and per op, so it
# takes small blocks, which also make small test shapes cross block and chunk edges
# best first; the launch takes the first whose shared memory fits the device (fp32 dy at r = 64 needed 240 KiB in
# the 16-bit tile, over every GPU's limit). fp32 dy spills on every architecture from r = 32 (the compile matrix),
# so it takes the pass only up to MAX_RANK_FP32, in small tiles, and two GEMMs above.
GPU_CONFIGS = [(128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 2)]
GPU_CONFIGS_FP32 = [(32, 32, 4, 2)]
MAX_RANK_FP32 = 16
INTERPRETER_CONFIG = (32, 32, 4, 1)
INTERPRETER_PROGRAMS = 4
MAX_RANK = 64  # beyond it the two accumulators spill (sm_90 compile, r = 128): the pair runs as two GEMMs


@triton.jit
def _lora_dy_pass_kernel(
    dy_ptr, lora_B_ptr, xa_ptr, g_part_ptr, grad_B_part_ptr,
    M, N, R, ROWS_PER_CHUNK, COLS_PER_CHUNK,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    chunk_m = tl.program_id(0)
    chunk_n = tl.program_id(1)
    m_start = chunk_m * ROWS_PER_CHUNK
    m_end = tl.minimum(m_start + ROWS_PER_CHUNK, M)
    n_start = chunk_n * COLS_PER_CHUNK
    n_end = tl.minimum(n_start + COLS_PER_CHUNK, N)
    dtype = dy_ptr.dtype.element_ty
    if UPCAST:
        dtype = tl.float32  # the interpreter multiplies bf16 bit patterns; fp32 is right there
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    # the scratch rows are BLOCK_R wide: the padded columns hold zeros and are never read back by the host
    g_part_ptr += chunk_n.to(tl.int64) * M * BLOCK_R
    for n0 in range(n_start, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < n_end
        lora_B = tl.load(lora_B_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                         mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(dtype)
        grad_B = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        # the previous out-block's g stores, made by other threads of this program, are visible after this
        tl.debug_barrier()
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mask_m = rm < m_end
            dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :] * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(dtype)
            xa = tl.load(xa_ptr + rm[:, None].to(tl.int64) * stride_xam + rr[None, :] * stride_xar,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(dtype)
            grad_B = tl.dot(tl.trans(dy), xa, grad_B, input_precision=PRECISION)
            g = tl.dot(dy, lora_B, input_precision=PRECISION)
            g_ptrs = g_part_ptr + rm[:, None].to(tl.int64) * BLOCK_R + rr[None, :]
            if n0 != n_start:
                g += tl.load(g_ptrs, mask=mask_m[:, None], other=0.0)
            tl.store(g_ptrs, g, mask=mask_m[:, None])
        grad_B_ptrs = (grad_B_part_ptr + chunk_m.to(tl.int64) * N * BLOCK_R + rn[:, None].to(tl.int64) * BLOCK_R
                       + rr[None, :])
        tl.store(grad_B_ptrs, grad_B, mask=mask_n[:, None])


def _split(size: int, block: int, chunks: int) -> tuple[int, int]:
    """(elements per chunk, chunk count) for ``size`` cut into at most ``chunks`` runs of whole blocks."""
    blocks = triton.cdiv(size, block)
    per_chunk = triton.cdiv(blocks, max(1, min(chunks, blocks))) * block
    return per_chunk, triton.cdiv(size, per_chunk)


def chunking(M: int, N: int, programs: int, block_m: int, block_n: int) -> tuple[int, int, int, int]:
    """(rows per chunk, M-chunks, columns per chunk, out-chunks): about ``programs`` programs, split so that
    chunks_n / N = chunks_m / M, which minimises the partial sums' traffic chunks_n M + chunks_m N."""
    chunks_n = max(1, round(math.sqrt(programs * N / M)))
    cols, chunks_n = _split(N, block_n, chunks_n)
    rows, chunks_m = _split(M, block_m, triton.cdiv(programs, chunks_n))
    return rows, chunks_m, cols, chunks_n


def dy_pass_shared(block_m: int, block_n: int, stages: int, block_r: int, itemsize: int) -> int:
    """An upper bound of a config's shared memory: ``stages`` buffers of a dy tile and its xa rows (Ampere keeps
    one fewer), lora_B's block, an fp32 staging of grad_B's block and the slack (the compile matrix checks it
    against every compiled config)."""
    return (stages * (block_m * block_n + block_m * block_r) * itemsize + block_n * block_r * (itemsize + 4)
            + limits.SLACK)


def config(arch: int, dtype: torch.dtype, rank: int, limit: int | None = None) -> tuple[int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for dy of ``dtype`` at ``rank`` on ``arch`` (0: the interpreter):
    the first config that fits one block's shared memory (``limit``: the device's own figure); None where the
    pass does not serve (the rank is too wide for its registers): the launch then runs two GEMMs."""
    if arch == 0:
        return INTERPRETER_CONFIG
    fp32 = dtype == torch.float32
    if rank > (MAX_RANK_FP32 if fp32 else MAX_RANK):
        return None
    block_r = max(16, triton.next_power_of_2(rank))
    for block_m, block_n, warps, stages in GPU_CONFIGS_FP32 if fp32 else GPU_CONFIGS:
        if limits.fits(dy_pass_shared(block_m, block_n, stages, block_r, dtype.itemsize), arch, limit):
            return block_m, block_n, warps, stages
    return None


def lora_dy_pass(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float,
                 programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(g, grad_B)`` = ``(dy @ lora_B, scaling * dy.T @ xa)``, reading dy once.

    dy: (M, out), any strides; lora_B: (out, r), any float dtype, cast to dy's for the product as the reference
    does; xa: (M, r), the forward's ``dropout(x) @ lora_A.T``. g comes back in dy's dtype and grad_B in
    lora_B's, each rounded once from fp32 sums. ``programs``: how many programs the grid aims at (default: one
    per SM, what the registers allow; a few under the interpreter).
    """
    M, N = dy.shape
    R = lora_B.shape[1]
    tile = config(limits.arch_of(dy.device), dy.dtype, R, limits.device_shared(dy.device))
    if tile is None or M == 0 or N == 0:
        # nothing to share (an empty dy), or too wide a rank for the registers or the shared memory: two GEMMs
        return dy @ lora_B.to(dy.dtype), reference.lora_grad_B(dy, xa, lora_B, scaling)
    upcast, precision = dot_options(dy.dtype)
    block_m, block_n, warps, stages = tile
    block_r = max(16, triton.next_power_of_2(R))
    if programs is None:
        programs = INTERPRETER_PROGRAMS if interpreting() else num_sms(dy.device)
    rows, chunks_m, cols, chunks_n = chunking(M, N, programs, block_m, block_n)
    with on_device(dy.device):  # Triton launches on the current device and stream: make them dy's
        g_part = torch.empty((chunks_n, M, block_r), dtype=torch.float32, device=dy.device)
        grad_B_part = torch.empty((chunks_m, N, block_r), dtype=torch.float32, device=dy.device)
        _lora_dy_pass_kernel[(chunks_m, chunks_n)](
            dy, lora_B, xa, g_part, grad_B_part,
            M, N, R, rows, cols,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
            UPCAST=upcast, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
            num_warps=warps, num_stages=stages,
        )
        # fixed-order sums of a few partials each: the same bits on every run
        g = g_part[:, :, :R].sum(0).to(dy.dtype)
        grad_B = grad_B_part[:, :, :R].sum(0).mul_(scaling).to(lora_B.dtype)
        return g, grad_B
