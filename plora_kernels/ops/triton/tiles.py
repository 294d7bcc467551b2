"""Helpers shared by the LoRA GEMM kernels (lora_matmul.py, lora_matmul_tma.py, lora_matmul_ws.py, lora_dy_pass.py):
how their dots run (the one interpreter-specific choice), the grouped tile order, the low-rank term, and LoRA
dropout's mask. One module they all import, so none imports another's internals."""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..._backend import interpreting


def on_device(device: torch.device):
    """A block in which Triton launches on ``device`` and its current stream. Triton launches on the CURRENT
    device and stream, not the tensors': with W on cuda:1 while cuda:0 is current (a ``device_map="auto"`` model)
    a launch would address cuda:1's memory from cuda:0, and a table copied on one stream could be read by a
    kernel on another. Every launcher wraps its host work and launches in this."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def num_sms(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device: the persistent grids' program count."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) for the dots of a kernel whose operands are ``dtype``. UPCAST: the interpreter
    multiplies bf16 bit patterns as if they were fp16 (wrong values, no error), so under it bf16 operands are
    cast to fp32 first. PRECISION: fp32 operands use TF32 where torch's own matmuls may
    (``torch.backends.cuda.matmul.allow_tf32``), exact fp32 products otherwise."""
    upcast = interpreting() and dtype == torch.bfloat16
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return upcast, "ieee" if ieee else "tf32"


def tile_config(shape: tuple[int, int, int, int, int], pre_hook=None) -> triton.Config:
    """The autotune config of a GEMM tile (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)."""
    m, n, k, stages, warps = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=stages,
                         num_warps=warps, pre_hook=pre_hook)


def tile_shape(config: triton.Config) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) of a :func:`tile_config`."""
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_stages, config.num_warps


def keep_tiles(configs: list, allowed: list, kernel: str, t: torch.Tensor) -> list:
    """Autotune's early pruning: the configs whose tile is among ``allowed`` (what the launch's device holds);
    an error naming the kernel if none is."""
    kept = [c for c in configs if tile_shape(c) in allowed]
    if not kept:
        raise RuntimeError(f"{kernel}: no tile fits {t.device} for {t.dtype} operands")
    return kept


@triton.jit
def grouped_tile(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile number ``tile`` in grouped order: GROUP_M row panels share each column panel of
    B while it is in L2."""
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % group_size, (tile % width) // group_size


@triton.jit
def dropout_keep(seed, rows, cols0, threshold, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The dropout keep mask of x's tile at logical rows ``rows`` and columns ``cols0 + [0, BLOCK_C)``: the top
    24 bits of word j % 4 of Philox(seed, (j // 4, i)) below ``threshold`` (ops.streams.dropout_keep)."""
    G: tl.constexpr = BLOCK_C // 4
    zero = tl.zeros((BLOCK_R, G), dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, (cols0 // 4 + tl.arange(0, G)).to(tl.uint32)[None, :] + zero,
                               rows.to(tl.uint32)[:, None] + zero, zero, zero)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # word w of group g at 4 g + w
    return (words >> 8) < threshold


@triton.jit
def low_rank_seed(act_ptr, up_ptr, rm, rn, M, N, R, stride_actm, stride_actr, stride_upr, stride_upn, scaling,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """scaling * ACT[rm] @ UP[:, rn] in fp32: the accumulator's starting value. The factors (possibly fp32
    adapters) are cast to ACT's dtype, as the reference does; r is padded to BLOCK_R >= 16, the smallest dot."""
    dtype = act_ptr.dtype.element_ty
    if UPCAST:
        dtype = tl.float32  # the interpreter multiplies bf16 bit patterns; fp32 is right there
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        act = tl.load(act_ptr + rm[:, None] * stride_actm + (r0 + rr)[None, :] * stride_actr,
                      mask=(rm < M)[:, None] & ((r0 + rr) < R)[None, :], other=0.0)
        up = tl.load(up_ptr + (r0 + rr)[:, None] * stride_upr + rn[None, :] * stride_upn,
                     mask=((r0 + rr) < R)[:, None] & (rn < N)[None, :], other=0.0)
        acc += tl.dot(act.to(dtype), up.to(dtype), input_precision=PRECISION)
    return acc * scaling
