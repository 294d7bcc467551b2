"""Triton kernel: the fused LoRA GEMM C = A @ B + scaling * ACT @ UP (+ bias), persistent and warp-specialised.

Same contract as :func:`lora_matmul.lora_matmul`, built to run at cuBLAS speed on Hopper (issue #13):
  * every operand moves by TMA through DEVICE-side descriptors (``tl.make_tensor_descriptor``): Triton's Hopper
    warp specialisation accepts those, not the host-side ones of lora_matmul_tma.py;
  * ``tl.range(..., warp_specialize=True)`` over the persistent tile loop: Triton splits the kernel into a
    producer warpgroup issuing the TMA loads and two consumer warpgroups (each half of the tile's rows) issuing
    wgmma, with ``setmaxnreg`` moving registers from the producer to the consumers;
  * the low-rank term is one more MMA AFTER the K loop (acc += S_tile @ L_tile), not a seed before it: a seed
    makes every tile wait for two small loads before its first wgmma;
  * 128x256 tiles, the shape cuBLAS uses, stored in two 128x128 halves (epilogue subtiling) so that the C
    staging buffer, three stages of A/B and the ACT/UP tiles fit in shared memory (~213 KiB of 227).

Conditions of Triton 3.9's Hopper warp specialisation (third_party/nvidia/hopper WarpSpecialization.cpp) that
shape this code: num_warps == 4 (it adds the other warpgroups itself), num_stages > 1, no ``scf.if`` with an
else branch anywhere in the kernel (so ``flatten=True`` on the tile loop is out: loop fusion creates one), and
the loads in the specialised loop are descriptor loads (a plain ``tl.load`` of ACT or UP makes the pass fail).

Hence the host-side preparation of the small operands: ACT and UP are cast to A's dtype (as the reference casts
the adapters; it also halves UP's shared-memory stages) and, where their rows are not 16-byte aligned (a rank
like 3), copied into zero-padded aligned buffers. Shapes A, B or C cannot describe fall back to the portable
kernel (:func:`supported`).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from .lora_matmul import lora_matmul
from .tiles import dot_options, grouped_tile, num_sms, on_device

# (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, EPILOGUE_SPLIT, num_stages); num_warps is 4 (see above).
# fp16/bf16: 213 KiB of shared memory (3 stages of A/B, 48 KiB each, and of ACT/UP, 12 KiB each; a 32 KiB C half)
GPU_CONFIG = (128, 256, 64, 16, 8, 2, 3)
# fp32 (TF32 wgmma): twice the bytes per element; 177 KiB (4 stages would take 225 KiB, too close to 227)
GPU_CONFIG_FP32 = (128, 128, 32, 16, 8, 2, 3)
# the interpreter's cost is per program and per op: small tiles, a split epilogue and a few persistent programs
# so that edges, subtiling and the persistent loop are all exercised by small test shapes
INTERPRETER_CONFIG = (64, 64, 32, 16, 8, 2, 3)
INTERPRETER_PROGRAMS = 3


def warp_specialize() -> bool:
    """Whether the tile loop is warp-specialised: on a GPU, yes. The interpreter runs ``tl.range`` as a Python
    ``range`` and drops its keywords (triton/runtime/interpreter.py, ``_new_range``), so the flag would be
    harmless there; it is off so that what the interpreter runs is stated, not implied. Device-side
    descriptors themselves do run in the interpreter (``create_make_tensor_descriptor``), with TMA's
    zero-filled out-of-bounds reads and clipped stores."""
    return not interpreting()


def _config(dtype: torch.dtype):
    if interpreting():
        return INTERPRETER_CONFIG
    return GPU_CONFIG_FP32 if dtype == torch.float32 else GPU_CONFIG


@triton.jit
def _lora_matmul_ws_kernel(
    a_ptr, b_ptr, c_ptr, act_ptr, up_ptr, bias_ptr,
    M, N, K, R,
    stride_am, stride_b, stride_cm, stride_actm, stride_up,
    scaling,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, B_NK: tl.constexpr, UP_NK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr,
):
    dtype = c_ptr.dtype.element_ty
    if UPCAST:
        dtype = tl.float32  # the interpreter multiplies bf16 bit patterns; fp32 is right there
    # B is (K, N): row-major (B_NK False: dx's W) or the transpose of a row-major (N, K) tensor (B_NK True: the
    # forward's W^T, read as W's tiles and transposed in the dot); likewise UP, (R, N) or (N, R)^T
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_NK:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                       block_shape=[BLOCK_M, BLOCK_N // EPILOGUE_SPLIT])
    if HAS_LORA:
        act_desc = tl.make_tensor_descriptor(act_ptr, shape=[M, R], strides=[stride_actm, 1],
                                           block_shape=[BLOCK_M, BLOCK_R])
        if UP_NK:
            up_desc = tl.make_tensor_descriptor(up_ptr, shape=[N, R], strides=[stride_up, 1],
                                               block_shape=[BLOCK_N, BLOCK_R])
        else:
            up_desc = tl.make_tensor_descriptor(up_ptr, shape=[R, N], strides=[stride_up, 1],
                                               block_shape=[BLOCK_R, BLOCK_N])

    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # not flatten=True: fusing the two loops creates an if/else, and the Hopper pass then declines to specialise
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGRAMS, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = grouped_tile(tile, grid_m, grid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_BIAS:  # loaded before the K loop so that its latency hides behind it; added in the epilogue
            rn = off_n + tl.arange(0, BLOCK_N)
            bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        for ki in range(k_tiles):  # no masks: TMA zero-fills reads past the edges
            a = a_desc.load([off_m, ki * BLOCK_K]).to(dtype)
            if B_NK:
                acc = tl.dot(a, b_desc.load([off_n, ki * BLOCK_K]).to(dtype).T, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, b_desc.load([ki * BLOCK_K, off_n]).to(dtype), acc, input_precision=PRECISION)
        if HAS_LORA:
            # acc += scaling * ACT @ UP as MMAs into the same accumulator: dividing by scaling before and multiplying
            # after costs fp32 roundings (2^-24), where scaling ACT or UP in their 16-bit dtype would cost a 16-bit
            # one; the host launches only with 2^-20 <= |scaling| <= 2^20, so acc / scaling cannot overflow
            acc = acc * (1.0 / scaling)
            for r0 in range(0, R, BLOCK_R):  # one trip for r <= 16: ACT and UP stay BLOCK_R wide in shared memory
                act = act_desc.load([off_m, r0]).to(dtype)
                if UP_NK:
                    acc = tl.dot(act, up_desc.load([off_n, r0]).to(dtype).T, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(act, up_desc.load([r0, off_n]).to(dtype), acc, input_precision=PRECISION)
            acc = acc * scaling
        if HAS_BIAS:
            acc += bias[None, :]
        if EPILOGUE_SPLIT == 2:
            # two BLOCK_N/2-wide stores: half the C staging buffer, which is what lets 128x256 tiles fit
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            c_desc.store([off_m, off_n], acc0.to(c_desc.dtype))  # TMA clips the stores at the edges
            c_desc.store([off_m, off_n + BLOCK_N // 2], acc1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor a descriptor can address: unit last stride, 16-byte aligned rows and base."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def supported(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> bool:
    """Whether ``a @ b`` (with any low-rank term and bias) can take this kernel: on a GPU, a Hopper one (sm_90:
    device-side TMA needs it, and the configs and the warp specialisation were read for it; Blackwell compiles
    through another pass and is untested); a row-major; b row-major or the transpose of a row-major tensor (W^T);
    out row-major and of a's dtype; 16-byte aligned rows and bases (of the C allocated here too, when out is
    None); fp16/bf16, or fp32 with b = W^T and, on a GPU, TF32 allowed (an IEEE fp32 dot has no wgmma to
    specialise; the interpreter runs it); and a product big enough for 128x256 tiles to pay (N >= 64, K >= 64:
    the N = r products belong to the portable kernel). Anything else runs :func:`lora_matmul.lora_matmul`."""
    if a.dtype not in _DTYPES or b.dtype != a.dtype or a.dim() != 2 or b.dim() != 2:
        return False
    if a.is_cuda and not _hopper(a.device.index if a.device.index is not None else torch.cuda.current_device()):
        return False
    if out is not None and (out.dtype != a.dtype or not _tma_ready(out)):
        return False
    if out is None and (b.shape[1] * a.element_size()) % 16:  # the C we would allocate has unaligned rows
        return False
    # fp32: TF32 wgmma reads both operands K-major from shared memory, so B must be W^T (a row-major B fails to
    # compile); an IEEE fp32 dot (TF32 not allowed) has no wgmma at all
    no_tf32 = a.is_cuda and not torch.backends.cuda.matmul.allow_tf32
    if a.dtype == torch.float32 and (not _tma_ready(b.t()) or no_tf32):
        return False
    return (_tma_ready(a) and (_tma_ready(b) or _tma_ready(b.t())) and a.shape[0] > 0 and b.shape[1] >= 64
            and a.shape[1] >= 64)


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A row-major copy of 2-D ``t`` with its rows padded (zeros) to 16 bytes; only the first t.shape[1] columns
    are described, so the padding is never read."""
    cols = -(-t.shape[1] * t.element_size() // 16) * 16 // t.element_size()
    padded = torch.zeros(t.shape[0], cols, dtype=t.dtype, device=t.device)
    padded[:, :t.shape[1]] = t
    return padded


def low_rank_operands(a: torch.Tensor, lora_act: torch.Tensor, lora_up: torch.Tensor):
    """(act, up, up_nk): lora_act (M, R) and lora_up as descriptors can take them, in a's dtype. ``up_nk``: up is
    (N, R) row-major (lora_up = lora_B^T, as the forward passes it) rather than (R, N) row-major (lora_A, as dx
    passes it). Copies are made only for a dtype other than a's (a cast of an r-wide factor), rows that are not
    16-byte aligned, or an fp32 lora_up that is (R, N) row-major."""
    act = lora_act.to(a.dtype)
    if not _tma_ready(act):
        act = _aligned_copy(act)
    up = lora_up.to(a.dtype)  # keeps the strides: a transposed view stays one
    if _tma_ready(up.t()):
        return act, up.t(), True
    if _tma_ready(up) and a.dtype != torch.float32:  # TF32 wgmma needs UP K-major too: fp32 takes the copy
        return act, up, False
    return act, _aligned_copy(up.t()), True


def _scratch(size: int, alignment: int, stream):
    """Global memory for the device-side descriptors (128 bytes each per program), from torch's caching
    allocator on the launch's (current) stream, so it lives until the kernel has run; its blocks are 512-byte
    aligned, more than the descriptors' 128."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors need a launch-time scratch allocation; install ours unless the program set one
    (triton.set_allocator is per context, so this is checked on every launch)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def lora_matmul_ws(a: torch.Tensor, b: torch.Tensor, *, lora_act: torch.Tensor | None = None,
                   lora_up: torch.Tensor | None = None, scaling: float = 1.0, bias: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``a @ b + scaling * lora_act @ lora_up + bias`` in a's dtype with fp32 accumulation, as
    :func:`lora_matmul.lora_matmul` (same arguments and shapes: a (M, K); b (K, N); lora_act (M, R); lora_up (R, N),
    any float dtype, cast to a's; bias (N,) contiguous; out (M, N)), on the warp-specialised TMA kernel where
    :func:`supported` holds and on the portable kernel otherwise."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    has_lora = lora_act is not None and scaling != 0.0
    if not supported(a, b, out) or (has_lora and not 2.0**-20 <= abs(scaling) <= 2.0**20):
        return lora_matmul(a, b, lora_act=lora_act, lora_up=lora_up, scaling=scaling, bias=bias, out=out)
    with on_device(a.device):  # Triton launches (and allocates its scratch) on the current device
        c = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
        if has_lora:
            act, up, up_nk = low_rank_operands(a, lora_act, lora_up)
            rank = lora_act.shape[1]
        else:
            act, up, up_nk, rank = a, a, False, 0  # placeholders: never read
        b_nk = not _tma_ready(b)  # then b is W^T: describe W (N, K)
        b_desc = b.t() if b_nk else b
        upcast, precision = dot_options(a.dtype)
        block_m, block_n, block_k, block_r, group_m, split, stages = _config(a.dtype)
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        if interpreting():
            programs = INTERPRETER_PROGRAMS
        else:
            programs = num_sms(a.device)
            _ensure_allocator()
        _lora_matmul_ws_kernel[(min(programs, tiles),)](
            a, b_desc, c, act, up, bias if bias is not None else a,
            M, N, K, rank,
            a.stride(0), b_desc.stride(0), c.stride(0), act.stride(0), up.stride(0),
            scaling,
            HAS_LORA=has_lora, HAS_BIAS=bias is not None, B_NK=b_nk, UP_NK=up_nk,
            UPCAST=upcast, PRECISION=precision,
            WARP_SPECIALIZE=warp_specialize(), NUM_PROGRAMS=programs,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=group_m,
            EPILOGUE_SPLIT=split, num_warps=4, num_stages=stages,
        )
        return c
