"""Triton kernel: merge a LoRA update into W in place with one rounding, W <- round(W + coef * B A).

One pass over W: each program loads a W tile, forms its slice of B A in fp32 from a B row-panel and an
A column-panel (both tiny and L2-resident), adds, rounds once and stores. No W-sized temporary exists.
The same launch reports max |new W| (+inf if any value is not finite in W's dtype) through one atomic,
which the caller uses both to refuse an overflow and to skip the safety pre-pass next time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backend import interpreting

# (mantissa bits, lowest exponent of the rounding grid, largest finite value) per W dtype; see
# reference.ROUNDING_GRID for why bf16 stops at -119.
_FORMAT = {
    torch.float16: (10, -14, 65504.0),
    torch.bfloat16: (7, -119, 3.3895313892515355e38),
    torch.float32: (23, -126, 3.4028234663852886e38),
}
ROUND_NONE, ROUND_NEAREST, ROUND_STOCHASTIC = 0, 1, 2


@triton.jit
def round_to_grid(v, u, MANT: tl.constexpr, EMIN: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round fp32 v onto the grid of a float with MANT mantissa bits; the result is exact in that format.

    Works on the grid rather than with a cast so that nearest-even and stochastic rounding share one
    path and so bf16 is right under the interpreter, whose fp32->bf16 cast truncates.
    """
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    q_exp = tl.maximum(e, EMIN) - MANT
    # 2**-q_exp and 2**q_exp from exponent bits: both stay normal fp32 for the EMIN chosen per format
    inv_q = ((127 - q_exp) << 23).to(tl.float32, bitcast=True)
    q = ((127 + q_exp) << 23).to(tl.float32, bitcast=True)
    t = v * inv_q  # exact: power-of-two scaling
    f = tl.floor(t)
    frac = t - f
    if STOCHASTIC:
        up = u < frac  # P(up) = frac, so E[result] = v
    else:
        up = (frac > 0.5) | ((frac == 0.5) & ((f.to(tl.int32) & 1) == 1))
    return (f + up.to(tl.float32)) * q


@triton.jit
def sr_uniform(seed, rows, group0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    """The stochastic-rounding uniforms of a BLOCK_M x BLOCK_N tile whose columns start at 8 * group0.

    Element (row i, column j) takes 16 bits of Philox4x32 with key ``seed`` and counter (j // 8, i, 0, 0):
    half j % 2 of output word (j % 8) // 2, as (bits + 0.5) / 2**16. One Philox call serves 8 elements;
    one per element (tl.rand) cost ~0.2 ms of issue time at 8192 x 8192, 3x the pass over W. 16 bits leave a
    bias below 2**-17 ulp. The counter is the element's logical position, so the same seed gives the same W
    whatever the tiling, and a row shard (rows offset) draws what the full W would. csrc/ computes the same.
    """
    G: tl.constexpr = BLOCK_N // 8
    zero = tl.zeros((BLOCK_M, G), dtype=tl.int32)
    r0, r1, r2, r3 = tl.philox(seed, (group0 + tl.arange(0, G))[None, :] + zero, rows[:, None] + zero, zero, zero,
                               N_ROUNDS)
    lane = tl.arange(0, 8)[None, None, :]
    word = tl.where(lane < 2, r0[:, :, None], tl.where(lane < 4, r1[:, :, None],
                    tl.where(lane < 6, r2[:, :, None], r3[:, :, None])))
    bits = (word >> ((lane & 1) * 16).to(tl.uint32)) & 0xFFFF
    return tl.reshape((bits.to(tl.float32) + 0.5) * (1.0 / 65536.0), (BLOCK_M, BLOCK_N))


@triton.jit
def _unload_kernel(
    w_ptr, a_ptr, b_ptr, stats_ptr,
    M, N, R: tl.constexpr,
    stride_wm, stride_wn, stride_ar, stride_an, stride_bm, stride_br,
    coef, seed, row_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SMALL_R: tl.constexpr,
    DOT_FP32: tl.constexpr, ROUND: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
    MAX_FINITE: tl.constexpr, WRITE: tl.constexpr, STATS: tl.constexpr = True, N_ROUNDS: tl.constexpr = 10,
    DELTA: tl.constexpr = True,
):
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    # consecutive programs walk along a row panel so they share the same B rows in cache
    pid_m = pid // grid_n
    pid_n = pid % grid_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N

    mask = mask_m[:, None] & mask_n[None, :]
    w_ptrs = w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0)  # issued first: its latency hides behind the delta's math

    if not DELTA:  # ablation: the pass over W without the low-rank product
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif SMALL_R:
        # r < 16: a dot would pad r up to 16; unrolled rank-1 updates do only the work needed (R is a
        # constexpr so each rank compiles once; ranks are few)
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(R):
            b_col = tl.load(b_ptr + rm * stride_bm + k * stride_br, mask=mask_m, other=0.0).to(tl.float32)
            a_row = tl.load(a_ptr + k * stride_ar + rn * stride_an, mask=mask_n, other=0.0).to(tl.float32)
            delta += b_col[:, None] * a_row[None, :]
    else:
        rr = tl.arange(0, BLOCK_R)
        b = tl.load(b_ptr + rm[:, None] * stride_bm + rr[None, :] * stride_br,
                    mask=mask_m[:, None] & (rr[None, :] < R), other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rn[None, :] * stride_an,
                    mask=(rr[:, None] < R) & mask_n[None, :], other=0.0)
        if DOT_FP32:
            # fp32 factors (PEFT's default): full-precision products, not tf32
            delta = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            # 16-bit factors: products are exact in the fp32 accumulator
            delta = tl.dot(b, a, out_dtype=tl.float32)

    v = w.to(tl.float32) + coef * delta
    if ROUND == 2:
        u = sr_uniform(seed, rm + row_offset, pid_n * (BLOCK_N // 8), BLOCK_M, BLOCK_N, N_ROUNDS)
        v = round_to_grid(v, u, MANT, EMIN, True)
    elif ROUND == 1:
        v = round_to_grid(v, v, MANT, EMIN, False)

    if STATS:
        mag = tl.abs(v)
        mag = tl.where(mag <= MAX_FINITE, mag, float("inf"))  # NaN fails the test too
        mag = tl.where(mask, mag, 0.0)
        tl.atomic_max(stats_ptr, tl.max(tl.max(mag, axis=1), axis=0))
    if WRITE:
        tl.store(w_ptrs, v.to(w_ptr.dtype.element_ty), mask=mask)


def dot_in_fp32(a_dtype: torch.dtype, b_dtype: torch.dtype) -> bool:
    """Whether the dot path forms B A from fp32 operands: fp32 or mixed factors (full-precision products, not
    tf32), and bf16 under the interpreter, whose bf16 dot is wrong. Factors of one 16-bit dtype use the
    16-bit dot: their products are exact in the fp32 accumulator."""
    dtypes = {a_dtype, b_dtype}
    return len(dtypes) > 1 or torch.float32 in dtypes or (interpreting() and torch.bfloat16 in dtypes)


def _blocks(R: int, w_bytes: int) -> tuple[int, int, int]:
    """Tile shape and warps for rank R and a W of w_bytes per element. Fixed rather than autotuned:
    autotuning an in-place kernel would need a W-sized backup for its trial runs.

    A streaming kernel needs many warps in flight per SM, so the tile is spread over many threads.
    Compiled for sm_90 (benchmarks/kernel_resources.py, numbers in benchmarks/NOTES.md), 64x256 with 8
    warps took 254 registers per thread with stochastic rounding: one block, 8 warps, per SM. Over 32 warps
    (16 elements per thread) a 16-bit W takes at most 64 registers, 32 warps per SM. Above r = 16 the dot's
    operands need more registers (fp32 factors at r = 64 spilled), and an fp32 W spills at 16 elements per
    thread: both get 8 elements per thread, in blocks small enough to keep 128 registers available.
    """
    if interpreting():
        return 64, 128, 4  # the interpreter's cost is per program: few large tiles
    if w_bytes == 4:
        return 32, 64, 8
    return (64, 256, 32) if R <= 16 else (32, 128, 16)


# ablation knobs for ``plora bench unload --sweep`` (each answers one question about where the time goes);
# production calls leave them at their defaults
TUNING_KEYS = ("block_m", "block_n", "num_warps", "small_r", "stats", "n_rounds", "delta")


def merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, coef: float,
           rounding: str, seed: int, *, write: bool, row_offset: int = 0,
           tuning: dict | None = None) -> torch.Tensor:
    """W <- round(W + coef B A) in place (or a dry run when ``write`` is False).

    ``row_offset``: W is rows [row_offset, row_offset + M) of a larger logical weight (a sharded unload);
    stochastic rounding then uses the random numbers the full weight's unload would use for those rows.

    Returns a 1-element fp32 tensor: max |new W|, or +inf if any new value is not finite in W's dtype.
    Checks are the caller's job (see ops.unload).

    ``tuning`` (benchmarks only) overrides any of :data:`TUNING_KEYS`: the tile (block_m, block_n,
    num_warps), the rank-1-update path instead of the dot (small_r), the max|W| report (stats; off breaks
    the overflow bookkeeping), Philox's rounds (n_rounds; other than 10 changes the random stream) and the
    low-rank product itself (delta; off leaves only the pass over W and the rounding).
    """
    M, N = weight.shape
    R = lora_A.shape[0]
    mant, emin, max_finite = _FORMAT[weight.dtype]
    if weight.dtype == torch.float32:
        mode = ROUND_NONE
    else:
        mode = ROUND_STOCHASTIC if rounding == "stochastic" else ROUND_NEAREST
    factor_dtypes = {lora_A.dtype, lora_B.dtype}
    if torch.float64 in factor_dtypes:
        raise TypeError("the Triton unload kernel takes fp16/bf16/fp32 factors, got float64")
    stats = torch.zeros(1, dtype=torch.float32, device=weight.device)
    block_m, block_n, warps = _blocks(R, weight.element_size())
    knobs = dict(block_m=block_m, block_n=block_n, num_warps=warps, small_r=R < 16, stats=True, n_rounds=10,
                 delta=True)
    unknown = set(tuning or ()) - set(TUNING_KEYS)
    if unknown:
        raise ValueError(f"tuning keys must be among {TUNING_KEYS}, got {sorted(unknown)}")
    knobs.update(tuning or {})
    block_m, block_n, warps = knobs["block_m"], knobs["block_n"], knobs["num_warps"]
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _unload_kernel[grid](
        weight, lora_A, lora_B, stats, M, N, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        coef, seed, row_offset,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(R)),
        SMALL_R=bool(knobs["small_r"]), DOT_FP32=dot_in_fp32(lora_A.dtype, lora_B.dtype), ROUND=mode,
        MANT=mant, EMIN=emin, MAX_FINITE=max_finite, WRITE=write, STATS=bool(knobs["stats"]), N_ROUNDS=int(knobs["n_rounds"]), DELTA=bool(knobs["delta"]),
        num_warps=warps,
    )
    return stats
