"""Triton kernels of the unload: W <- round(W + coef B A) in place for many layers in one launch, and the fresh
lora_A draws of all of them in another.

The merge streams W once. A 8192 x 8192 bf16 W moves 256 MiB, 68 us at the H200's measured copy speed, so an SM
must retire ~3.8 elements per clock: the budget is ~15 instructions per element with nearest rounding and ~25
with stochastic. Hence:
- small tiles (16 elements per thread) in a persistent grid sized from the compiled kernel's registers, so
  several programs are resident per SM and one program's loads overlap another's math;
- W's tile is loaded before the low-rank product, whose operands are tiny and L2-resident;
- B A by ``tl.dot`` at r >= 16 (the rank-1 FMA loop compiled to ~66 instructions per element there), by FMAs
  below (a dot would pad r to 16);
- nearest rounding by the hardware conversion; stochastic rounding in integer arithmetic on the fp32 bits with
  16 random bits per element, one Philox call per 8 elements (``ops.streams`` defines the stream);
- the check pass reduces "is any merged value non-finite" per program and publishes it with one relaxed
  integer atomic (a float atomic is a fenced round trip to memory per tile).

The layers are rows of a device table (pointers, shapes, strides, coefficient, seed), and a program walks the
tiles of all of them; the check pass (``write=False``) and the writing pass are one compiled kernel, so they
compute the same values bit for bit.
"""
from __future__ import annotations

import struct
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from .. import streams
from ..formats import FP16_MIN_BIASED_EXP, max_finite, rounding_mode
from .tiles import num_sms, on_device

# ------------------------------------------------------------------------------------------------ jit helpers

@triton.jit
def _next_layer(starts_ptr, layer, tile):
    """The layer holding ``tile``: each program visits tiles in increasing order, so it only moves forward."""
    while tl.load(starts_ptr + layer + 1) <= tile:
        layer += 1
    return layer


@triton.jit
def _rounding_bits(seed, rows, group0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The 16-bit rounding stream of a tile whose columns start at 8 * group0 (see ops.streams).

    Built with interleaves so that each thread's 8 consecutive columns come from one Philox call; the
    where/reshape form left four lanes computing the same call.
    """
    G: tl.constexpr = BLOCK_N // 8
    zero = tl.zeros((BLOCK_M, G), dtype=tl.uint32)
    c0 = (group0 + tl.arange(0, G)).to(tl.uint32)[None, :] + zero
    c1 = rows.to(tl.uint32)[:, None] + zero
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # word w of group g at 4 g + w
    return tl.interleave(words & 0xFFFF, words >> 16)  # its low half at 8 g + 2 w, its high half next


@triton.jit
def _to_nearest(v, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """v rounded to nearest-even in DTYPE: the hardware conversion, or integer RNE for bf16 under the
    interpreter, whose fp32 -> bf16 cast truncates."""
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rne = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rne = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, bits | 0x400000, rne)  # NaN stays NaN
        return rne.to(tl.float32, bitcast=True).to(DTYPE)
    return v.to(DTYPE)


@triton.jit
def _to_stochastic(v, bits16, DTYPE: tl.constexpr, FP16_EMIN: tl.constexpr):
    """v rounded into fp16/bf16 with 16 random bits per element: ops.reference.round_stochastic, bit for bit."""
    raw = v.to(tl.uint32, bitcast=True)
    sign = raw & 0x80000000
    mag = raw & 0x7FFFFFFF
    carry = bits16 ^ 0xFFFF
    if DTYPE == tl.bfloat16:
        out = (mag + carry) & 0xFFFF0000
        out = tl.where(mag > 0x7F800000, 0x7FC00000, out)
        return (out | sign).to(tl.float32, bitcast=True).to(DTYPE)
    else:  # fp16: on a grid scaled to a step of 2**16, subnormals included
        e = tl.maximum(mag >> 23, FP16_EMIN)
        up = ((280 - e) << 23).to(tl.float32, bitcast=True)
        down = ((e - 10) << 23).to(tl.float32, bitcast=True)
        fixed = tl.where(e == 255, 0.0, tl.abs(v) * up).to(tl.int32)  # no NaN -> int cast
        out = ((fixed + carry.to(tl.int32)) >> 16).to(tl.float32) * down
        out = tl.where(e == 255, tl.abs(v), out)
        return tl.where(sign != 0, -out, out).to(DTYPE)


@triton.jit
def _is_finite(x, DTYPE: tl.constexpr):
    """Finite in DTYPE, from the bits (a float compare of bf16 is wrong under the interpreter)."""
    if DTYPE == tl.float64:
        return (x.to(tl.int64, bitcast=True) & 0x7FF0000000000000) != 0x7FF0000000000000
    elif DTYPE == tl.float32:
        return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
    elif DTYPE == tl.float16:
        return (x.to(tl.int16, bitcast=True) & 0x7C00) != 0x7C00
    else:
        return (x.to(tl.int16, bitcast=True) & 0x7F80) != 0x7F80


@triton.jit
def _round(v, seed, rows, col0, DTYPE: tl.constexpr, ROUND: tl.constexpr, SOFT_BF16: tl.constexpr,
           FP16_EMIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's merged values rounded once into DTYPE: stochastically (ROUND 2) with the stream of ``seed`` at
    logical rows ``rows`` and columns from ``col0``, to nearest (1), or by a plain cast (fp32/fp64 W)."""
    if ROUND == 2:
        return _to_stochastic(v, _rounding_bits(seed, rows, col0 // 8, BLOCK_M, BLOCK_N), DTYPE, FP16_EMIN)
    elif ROUND == 1:
        return _to_nearest(v, DTYPE, SOFT_BF16)
    else:
        return v.to(DTYPE)


# ----------------------------------------------------------------------------------------------- the merge

@triton.jit
def _add_rank1(delta, lora_A_ptr, lora_B_ptr, k, rm, rn, mask_m, mask_n, s_ar, s_an, s_bm, s_br, COMPUTE: tl.constexpr):
    """delta + B[rm, k] A[k, rn]: one rank's outer product, in COMPUTE."""
    lora_B_col = tl.load(lora_B_ptr + rm * s_bm + k * s_br, mask=mask_m, other=0.0).to(COMPUTE)
    lora_A_row = tl.load(lora_A_ptr + k * s_ar + rn * s_an, mask=mask_n, other=0.0).to(COMPUTE)
    return delta + lora_B_col[:, None] * lora_A_row[None, :]


@triton.jit
def _dot_slice(lora_A_ptr, lora_B_ptr, r0, R, rm, rn, mask_m, mask_n, s_ar, s_an, s_bm, s_br,
               BLOCK_R: tl.constexpr, FACTORS_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """B[rm, r0:r0+BLOCK_R] A[r0:r0+BLOCK_R, rn] in fp32 by tl.dot (ranks past R masked to zero)."""
    rr = r0 + tl.arange(0, BLOCK_R)
    lora_B = tl.load(lora_B_ptr + rm[:, None] * s_bm + rr[None, :] * s_br, mask=mask_m[:, None] & (rr[None, :] < R),
                     other=0.0)
    lora_A = tl.load(lora_A_ptr + rr[:, None] * s_ar + rn[None, :] * s_an, mask=(rr[:, None] < R) & mask_n[None, :],
                     other=0.0)
    if FACTORS_FP32:
        return tl.dot(lora_B.to(tl.float32), lora_A.to(tl.float32), input_precision=DOT_PRECISION)
    return tl.dot(lora_B, lora_A, out_dtype=tl.float32)  # one 16-bit dtype: products exact in fp32


@triton.jit
def _merge_kernel(
    table_ptr, coef_ptr, starts_ptr, flag_ptr, n_layers,
    w_like, lora_A_like, lora_B_like,  # the first layer's tensors: they give the pointer types of every layer
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr, RANK_LOOP: tl.constexpr,
    FMA_R: tl.constexpr, DOT_PRECISION: tl.constexpr, FACTORS_FP32: tl.constexpr, ROUND: tl.constexpr,
    SOFT_BF16: tl.constexpr, CONTIG: tl.constexpr, WRITE: tl.constexpr, EXACT: tl.constexpr, MAX_FINITE: tl.constexpr,
    FP16_EMIN: tl.constexpr,
):
    """table_ptr: one int64 row of 14 per layer: W, A, B addresses, M, N, R, W's strides, A's, B's, the rounding
    seed, the row offset (a row shard draws the full W's random numbers); coef_ptr: one coefficient per layer;
    starts_ptr: each layer's first tile, and the total at [n_layers].

    CONTIG: every W and A of the group has unit column stride, 16-byte aligned rows and a multiple of 16 bytes
    of columns, so tiles move as 16-byte vectors. FMA_R: the rank, unrolled, on the FMA path (0: a runtime loop).
    RANK_LOOP: the dot path's rank exceeds BLOCK_R, so it runs in BLOCK_R-wide slices (a 256-wide fp32 factor
    tile spills in one piece and a 1024-wide one needs ~320 KB of shared memory).
    WRITE: the writing pass, else a check pass (EXACT: the exact one). All compile from this one body with no
    FMA contraction, so they compute the same values bit for bit.
    """
    W_T: tl.constexpr = w_like.dtype.element_ty
    A_T: tl.constexpr = lora_A_like.dtype.element_ty
    COMPUTE: tl.constexpr = tl.float64 if W_T == tl.float64 else tl.float32
    # elements per 16-byte vector: 8 for fp16/bf16, 4 for fp32, 2 for fp64 (never 0: Triton 3.6 crashes on
    # tl.multiple_of(x, 0))
    VEC_W: tl.constexpr = 128 // W_T.primitive_bitwidth
    VEC_A: tl.constexpr = 128 // A_T.primitive_bitwidth
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    n_tiles = tl.load(starts_ptr + n_layers)
    layer = 0
    bad = 0  # exact check: 1 + the index of a layer with a non-finite merged value, 0 if none
    suspect = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # quick check: values it cannot clear
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        layer = _next_layer(starts_ptr, layer, tile)
        row = table_ptr + layer * 14
        # sizes and strides in int32 (the host checks they fit); only a tile's base address is 64-bit
        M = tl.load(row + 3).to(tl.int32)
        N = tl.load(row + 4).to(tl.int32)
        R = tl.load(row + 5).to(tl.int32)
        s_wm = tl.load(row + 6).to(tl.int32)
        s_ar = tl.load(row + 8).to(tl.int32)
        if CONTIG:
            N = tl.multiple_of(N, VEC_W)
            s_wm = tl.multiple_of(s_wm, VEC_W)
            s_ar = tl.multiple_of(s_ar, VEC_A)
            s_wn = 1
            s_an = 1
        else:
            s_wn = tl.load(row + 7).to(tl.int32)
            s_an = tl.load(row + 9).to(tl.int32)
        s_bm = tl.load(row + 10).to(tl.int32)
        s_br = tl.load(row + 11).to(tl.int32)
        grid_n = tl.cdiv(N, BLOCK_N)
        local = (tile - tl.load(starts_ptr + layer)).to(tl.int32)
        # consecutive tiles walk along a row panel of W, so they share B's rows in cache
        row0 = (local // grid_n) * BLOCK_M
        col0 = (local % grid_n) * BLOCK_N
        rm = row0 + offs_m
        rn = col0 + offs_n
        mask_m = rm < M
        mask_n = rn < N
        mask = mask_m[:, None] & mask_n[None, :]

        # 1. W's tile first: its latency hides behind the low-rank product
        w_ptr = tl.load(row + 0).to(tl.pointer_type(W_T))
        if CONTIG:
            w_ptr = tl.multiple_of(w_ptr, 16)  # a pointer's divisibility counts bytes
        w_tile = w_ptr + (row0.to(tl.int64) * s_wm + col0.to(tl.int64) * s_wn)
        w_ptrs = w_tile + (offs_m[:, None] * s_wm + offs_n[None, :] * s_wn)
        w = tl.load(w_ptrs, mask=mask, other=0.0)

        # 2. this tile of B A, in fp32 (fp64 for an fp64 W)
        lora_A_ptr = tl.load(row + 1).to(tl.pointer_type(A_T))
        if CONTIG:
            lora_A_ptr = tl.multiple_of(lora_A_ptr, 16)
        lora_B_ptr = tl.load(row + 2).to(tl.pointer_type(lora_B_like.dtype.element_ty))
        if DOT and RANK_LOOP:  # a rank above BLOCK_R in BLOCK_R-wide slices: the factor tiles stay in registers
            delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                delta += _dot_slice(lora_A_ptr, lora_B_ptr, r0, R, rm, rn, mask_m, mask_n, s_ar, s_an, s_bm, s_br,
                                    BLOCK_R, FACTORS_FP32, DOT_PRECISION)
        elif DOT:
            delta = _dot_slice(lora_A_ptr, lora_B_ptr, 0, R, rm, rn, mask_m, mask_n, s_ar, s_an, s_bm, s_br, BLOCK_R,
                               FACTORS_FP32, DOT_PRECISION)
        else:  # rank-1 FMAs: unrolled when FMA_R > 0, so every factor load is independent of the sums
            delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
            if FMA_R > 0:
                for k in tl.static_range(FMA_R):
                    delta = _add_rank1(delta, lora_A_ptr, lora_B_ptr, k, rm, rn, mask_m, mask_n, s_ar, s_an,
                                       s_bm, s_br, COMPUTE)
            else:
                for k in range(R):
                    delta = _add_rank1(delta, lora_A_ptr, lora_B_ptr, k, rm, rn, mask_m, mask_n, s_ar, s_an,
                                       s_bm, s_br, COMPUTE)
        v = w.to(COMPUTE) + tl.load(coef_ptr + layer) * delta

        # 3. write the value rounded once into W's dtype; or (the check pass) find whether any rounded value is
        #    not finite. A value at most W's largest finite in magnitude cannot round past it, so the quick check
        #    compares and accumulates per element (no reduction per tile, no rounding); only a group it flags
        #    runs the exact check, which rounds the tiles holding a larger or non-finite value.
        if WRITE:
            tl.store(w_ptrs, _round(v, tl.load(row + 12), rm + tl.load(row + 13), col0, W_T, ROUND, SOFT_BF16,
                                    FP16_EMIN, BLOCK_M, BLOCK_N), mask=mask)
        elif not EXACT:  # the quick check: any value the rounding might carry past W's largest finite?
            suspect |= (~(_is_finite(v, COMPUTE) if ROUND == 0 else tl.abs(v) <= MAX_FINITE)).to(tl.int32)
        elif ROUND == 0:  # the exact check of an fp32/fp64 W, which stores v itself: finite is the whole test
            if tl.min(tl.min((_is_finite(v, COMPUTE) | (~mask)).to(tl.int32), axis=1), axis=0) == 0:
                bad = tl.maximum(bad, layer + 1)
        else:  # the exact check, for a group the quick one flagged: round where the quick test cannot decide
            # MAX_FINITE of fp16 and bf16 is exact in fp32; the compare is False for NaN
            safe = (tl.abs(v) <= MAX_FINITE) | (~mask)
            if tl.min(tl.min(safe.to(tl.int32), axis=1), axis=0) == 0:
                new = _round(v, tl.load(row + 12), rm + tl.load(row + 13), col0, W_T, ROUND, SOFT_BF16,
                             FP16_EMIN, BLOCK_M, BLOCK_N)
                ok = _is_finite(new, W_T) | (~mask)
                if tl.min(tl.min(ok.to(tl.int32), axis=1), axis=0) == 0:
                    bad = tl.maximum(bad, layer + 1)
    if not WRITE:
        if not EXACT:
            bad = tl.max(tl.max(suspect, axis=1), axis=0)
        tl.atomic_max(flag_ptr, bad, sem="relaxed")


# ----------------------------------------------------------------------------------------------- lora_A draws

@triton.jit
def _init_kernel(table_ptr, starts_ptr, n_layers, lora_A_like, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                 SOFT_BF16: tl.constexpr):
    """lora_A <- bound * z for every layer of the table (a_ptr, r, in, stride_r, stride_in, seed, bound bits):
    ops.streams' init stream, 4 elements per Philox call."""
    A_T: tl.constexpr = lora_A_like.dtype.element_ty
    COMPUTE: tl.constexpr = tl.float64 if A_T == tl.float64 else tl.float32
    tile = tl.program_id(0)
    layer = 0
    layer = _next_layer(starts_ptr, layer, tile)  # a short table: the walk is a few scalar loads
    row = table_ptr + layer * 7
    R = tl.load(row + 1)
    N = tl.load(row + 2)
    grid_n = tl.cdiv(N, BLOCK_N)
    local = tile - tl.load(starts_ptr + layer)
    rr = (local // grid_n) * BLOCK_R + tl.arange(0, BLOCK_R)
    G: tl.constexpr = BLOCK_N // 4
    g = (local % grid_n) * G + tl.arange(0, G)
    zero = tl.zeros((BLOCK_R, G), dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(tl.load(row + 5), g.to(tl.uint32)[None, :] + zero,
                               rr.to(tl.uint32)[:, None] + zero, zero, zero)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # word w of group g at 4 g + w
    z = ((words >> 8).to(tl.int32) * 2 + (1 - 2**24)).to(COMPUTE) * (2.0**-24)
    bound = tl.load(row + 6).to(tl.float64, bitcast=True).to(COMPUTE)
    rn = (local % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = tl.load(row).to(tl.pointer_type(A_T)) + rr[:, None] * tl.load(row + 3) + rn[None, :] * tl.load(row + 4)
    tl.store(ptrs, _to_nearest(z * bound, A_T, SOFT_BF16), mask=(rr[:, None] < R) & (rn[None, :] < N))


# ------------------------------------------------------------------------------------------------ launchers

def dot_precision(w_dtype: torch.dtype, a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[bool, str]:
    """(whether the dot's operands are cast to fp32, the dot's input precision) for a group's dtypes.

    Factors of one 16-bit dtype use the 16-bit dot (products exact in fp32). Mixed or fp32 factors are cast to
    fp32; on a 16-bit W they use tf32x3 (three tensor-core passes, ~fp32 accuracy, far below W's half ulp) rather
    than the FMA emulation of an IEEE fp32 dot, ~18 instructions per element; an fp32 W keeps IEEE. The
    interpreter's bf16 dot is wrong and it ignores the precision, so bf16 is cast to fp32 there.
    """
    dtypes = {a_dtype, b_dtype}
    fp32 = len(dtypes) > 1 or not dtypes <= {torch.float16, torch.bfloat16} or (
        interpreting() and torch.bfloat16 in dtypes)
    precision = "tf32x3" if fp32 and w_dtype in (torch.float16, torch.bfloat16) and not interpreting() else "ieee"
    return fp32, precision


def uses_dot(w_dtype: torch.dtype, r: int) -> bool:
    """tl.dot for B A from r = 16 (below it would pad r to 16); an fp64 W always sums in fp64 FMAs."""
    return r >= 16 and w_dtype != torch.float64


# the dot path's factor slice: ranks above it run as a loop over 16-wide slices, so a wide rank holds no more
# registers than r = 16 (fp32 factors at r = 64 in one piece spilled on sm_89, 16-bit ones at 32 on Triton 3.6)
RANK_SLICE = 16


def tile_shape(w_dtype: torch.dtype, block_r: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps). Fixed, not autotuned: autotuning an in-place kernel needs a W-sized backup.

    16 elements per thread (32 x 64 over 4 warps) keeps a 16-bit merge near 48 registers with nearest rounding
    and under 80 with stochastic in the sm_90 compile, so 6-10 programs fit per SM; any rank, since wider ones run
    in RANK_SLICE-wide slices. fp32/fp64 W take half the tile. The interpreter's cost is per program: there, few
    large tiles.
    """
    if interpreting():
        return 32, 64, 4
    if w_dtype == torch.float32 and block_r > RANK_SLICE:
        return 16, 32, 4  # the IEEE fp32 dot in a rank loop spilled a register in 16 x 64 (sm_89, sm_90)
    if w_dtype in (torch.float32, torch.float64):
        return 16, 64, 4
    return 32, 64, 4


_RESIDENT: dict = {}  # compiled-variant key -> programs resident per SM


def _programs(device: torch.device, n_tiles: int, key, compiled_fn) -> int:
    """The persistent grid: as many programs as fit on the GPU at once (from the compiled kernel's registers
    and shared memory), never more than the tiles. More would queue behind the first wave and end unevenly."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 4))
    per_sm = _RESIDENT.get(key)
    if per_sm is None:
        kernel = compiled_fn()
        kernel._init_handles()  # loads the binary: its register count is known only then
        props = torch.cuda.get_device_properties(device)
        warps = kernel.metadata.num_warps
        threads = 32 * warps
        per_warp = -(-max(1, kernel.n_regs) * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        by_regs = props.regs_per_multiprocessor // (per_warp * warps)
        by_smem = props.shared_memory_per_multiprocessor // max(1, kernel.metadata.shared)
        by_threads = props.max_threads_per_multi_processor // threads
        per_sm = _RESIDENT[key] = max(1, min(by_regs, by_smem, by_threads, 32))
    return max(1, min(n_tiles, per_sm * num_sms(device)))


def _vector_rows(t: torch.Tensor) -> bool:
    """Unit column stride, a 16-byte aligned start, and rows that start 16 bytes apart: 16-byte vectors."""
    vec = 16 // t.element_size()
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) % vec == 0)


def group_key(m) -> tuple:
    """Merges with equal keys run in one launch: same dtypes, rounding mode, product path and memory layout.
    (W dtype, A dtype, B dtype, rounding mode, dot?, the dot's padded rank, the FMA path's unrolled rank, CONTIG)"""
    w, a = m.weight, m.lora_A
    r = a.shape[0]
    dot = uses_dot(w.dtype, r)
    vec = max(16 // w.element_size(), 16 // a.element_size())
    contig = _vector_rows(w) and _vector_rows(a) and w.shape[1] % vec == 0
    return (w.dtype, a.dtype, m.lora_B.dtype, rounding_mode(w.dtype, m.rounding), dot,
            max(16, triton.next_power_of_2(r)) if dot else 0, 0 if dot or r > 16 else r, contig)


def launch_meta(key: tuple, write: bool, exact: bool = False) -> dict:
    """The constexprs and warps of ``_merge_kernel`` for a group (``group_key``) and pass (write, the quick
    check, or the exact check); ``ops.triton.aot`` compiles with the same dict."""
    w_dtype, a_dtype, b_dtype, mode, dot, block_r, fma_r, contig = key
    block_m, block_n, warps = tile_shape(w_dtype, block_r)
    factors_fp32, precision = dot_precision(w_dtype, a_dtype, b_dtype)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=min(max(block_r, 16), RANK_SLICE),
                RANK_LOOP=block_r > RANK_SLICE, DOT=dot, FMA_R=fma_r,
                DOT_PRECISION=precision, FACTORS_FP32=factors_fp32,
                # the quick check rounds nothing: one compiled variant serves nearest and stochastic
                ROUND=mode if write or exact else min(mode, 1), SOFT_BF16=interpreting(),
                CONTIG=contig, WRITE=write, EXACT=exact and not write, MAX_FINITE=max_finite(w_dtype) if mode else 0.0,
                FP16_EMIN=FP16_MIN_BIASED_EXP, num_warps=warps,
                # no contraction of B A's products and sums into FMAs: the kernel then rounds exactly as the
                # reference and the CUDA twin do (16-bit factors' products are exact either way)
                enable_fp_fusion=False)


def _host_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device`` without a sync: pinned host memory, copied asynchronously."""
    t = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


_INT32_LIMIT = 2**31 // 64  # in-tile offsets are int32: a stride times a tile side must stay below 2**31


def merge_group_(merges: Sequence, *, write: bool, exact: bool = False) -> torch.Tensor:
    """One launch over merges (``ops.merge.Merge``) that share a :func:`group_key` (all non-empty, on one device).

    ``write=True`` merges in place and returns an int32 tensor of one element left at 0. Otherwise nothing is
    written: the quick check returns 1 if some merged value is beyond W's largest finite or not finite (it
    might round to a non-finite value), else 0; the exact check (``exact=True``) returns 1 + the index of a
    merge whose rounded result has a non-finite value, or 0.
    """
    first = merges[0]
    key = group_key(first)
    meta = launch_meta(key, write, exact)
    device = first.weight.device
    with on_device(device):  # the tables' copies and the launch on W's device and its current stream
        starts, rows = [0], []
        for m in merges:
            M, N = m.weight.shape
            R = m.lora_A.shape[0]
            strides = (*m.weight.stride(), *m.lora_A.stride(), *m.lora_B.stride())
            if max(M, N, R, *strides) >= _INT32_LIMIT:
                raise ValueError(f"the Triton unload takes sizes and strides below {_INT32_LIMIT}, got weight "
                                 f"{tuple(m.weight.shape)} with strides {strides}")
            rows.append([m.weight.data_ptr(), m.lora_A.data_ptr(), m.lora_B.data_ptr(), M, N, R, *strides, m.seed,
                         m.row_offset])
            starts.append(starts[-1] + triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]))
        table = _host_table(rows, device)
        tile_starts = _host_table([starts], device).view(-1)
        compute = torch.float64 if key[0] == torch.float64 else torch.float32
        coefs = torch.tensor([m.coef for m in merges], dtype=compute,
                             pin_memory=device.type == "cuda").to(device, non_blocking=True)
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        args = (table, coefs, tile_starts, flag, len(merges), first.weight, first.lora_A, first.lora_B)
        n = _programs(device, starts[-1], (device.index, key, write, exact),
                      lambda: _merge_kernel.warmup(*args, grid=(1,), **meta))
        _merge_kernel[(n,)](*args, **meta)
        return flag


def init_lora_A_group_(lora_As: Sequence[torch.Tensor], seeds: Sequence[int]) -> None:
    """Fresh lora_A draws (ops.streams' init stream) for tensors of one dtype on one device, in one launch."""
    first = lora_As[0]
    block_r, block_n = 16, 256
    starts, rows = [0], []
    for a, seed in zip(lora_As, seeds):
        R, N = a.shape
        bound = struct.unpack("<q", struct.pack("<d", streams.init_bound(N)))[0]  # the fp64 bits, as int64
        rows.append([a.data_ptr(), R, N, a.stride(0), a.stride(1), seed, bound])
        starts.append(starts[-1] + triton.cdiv(R, block_r) * triton.cdiv(N, block_n))
    if starts[-1] == 0:
        return
    with on_device(first.device):
        table = _host_table(rows, first.device)
        tile_starts = _host_table([starts], first.device).view(-1)
        _init_kernel[(starts[-1],)](table, tile_starts, len(lora_As), first, BLOCK_R=block_r, BLOCK_N=block_n,
                                    SOFT_BF16=interpreting(), num_warps=4)
