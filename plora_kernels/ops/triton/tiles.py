"""Triton jit helpers shared by the fused LoRA GEMMs (lora_matmul.py, lora_matmul_tma.py, lora_matmul_ws.py): the
grouped tile order, the low-rank term, and LoRA dropout's mask. One module both import, so neither imports the
other's internals."""
import triton
import triton.language as tl


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
def low_rank_seed(s_ptr, l_ptr, rm, rn, M, N, R, stride_sm, stride_sr, stride_lr, stride_ln, scaling,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """scaling * S[rm] @ L[:, rn] in fp32: the accumulator's starting value. The factors (possibly fp32
    adapters) are cast to S's dtype, as the reference does; r is padded to BLOCK_R >= 16, the smallest dot."""
    dtype = s_ptr.dtype.element_ty
    if UPCAST:
        dtype = tl.float32  # the interpreter multiplies bf16 bit patterns; fp32 is right there
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        s = tl.load(s_ptr + rm[:, None] * stride_sm + (r0 + rr)[None, :] * stride_sr,
                    mask=(rm < M)[:, None] & ((r0 + rr) < R)[None, :], other=0.0)
        l = tl.load(l_ptr + (r0 + rr)[:, None] * stride_lr + rn[None, :] * stride_ln,
                    mask=((r0 + rr) < R)[:, None] & (rn < N)[None, :], other=0.0)
        acc += tl.dot(s.to(dtype), l.to(dtype), input_precision=PRECISION)
    return acc * scaling
