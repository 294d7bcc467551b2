"""Compile the Triton kernels ahead of time for a GPU architecture, on any machine (no GPU needed), and read
what the compiler gave each variant: registers, spills, shared memory, resident blocks per SM, atomics, vector
widths, MMA and TMA use, and the SASS instructions per element of the unload merge's tile loop.

This is how the kernels are checked for sm_90/sm_80 in CI (tests/test_kernels_compile.py) and how tile
choices are reasoned about between GPU sessions (benchmarks/kernel_resources.py). Launches specialise their
arguments (an int equal to 1 becomes the constant 1, 16-divisible ints and 16-byte aligned pointers get a
divisibility hint), so the compiles here do the same: without it no access would be vectorised and the
counts would mislead. The merge is compiled from the production launch helpers of ``unload`` (tile, dot
precision, rounding mode), so what is checked here is what a GPU runs.

Must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..._backend import interpreting
from . import lora_dy_pass, lora_matmul, lora_matmul_tma, lora_matmul_ws, unload

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
INIT_TILE = (16, 256, 4)  # (BLOCK_R, BLOCK_N, warps) of init_lora_A_group_
REGISTERS_PER_SM = 65536  # sm_90 (and sm_80)
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = MAX_THREADS_PER_SM // 32


def _compile(fn, types: dict, constexprs: dict, unit: tuple, divisible: tuple, arch: int, **options):
    types, constexprs = dict(types), dict(constexprs)
    for name in unit:
        types[name] = "constexpr"
        constexprs[name] = 1
    signature = dict(types)
    signature.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    # ptxas runs with -v; its log (spills in bytes, registers) is printed only when asked for: capture it
    log, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    kernel.ptxas_log = log.getvalue()  # empty when the kernel came from Triton's cache
    return kernel


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTX_VECTOR = r"\.v4\.(?:b32|f32|u32|s32)|\.v2\.(?:b64|f64|u64)|\.v8\.(?:b16|f16|bf16)"
_PTX_LD128 = re.compile(r"\bld\.global[.\w]*?(?:" + _PTX_VECTOR + r")\b")
_PTX_ST128 = re.compile(r"\bst\.global[.\w]*?(?:" + _PTX_VECTOR + r")\b")


def ptx_facts(kernel) -> dict:
    """What the PTX and ptxas's log show, without disassembling the cubin (which costs ~0.35 s a kernel):
    ``ptx_ld128``/``ptx_st128`` 16-byte global loads and stores (ptxas keeps a vector access whole),
    ``ptx_mma``/``ptx_wgmma`` tensor-core instructions, ``ptx_atomics`` (atom./red.), ``ptx_tma_loads``/
    ``ptx_tma_stores`` (bulk tensor copies into and out of shared memory), and from ptxas's log
    ``spill_store_bytes``, ``spill_load_bytes`` and ``stack_frame_bytes`` (None when the kernel came from a cache
    and ptxas did not run)."""
    ptx = kernel.asm["ptx"]
    out = {"ptx_ld128": len(_PTX_LD128.findall(ptx)), "ptx_st128": len(_PTX_ST128.findall(ptx)),
           "ptx_mma": ptx.count("mma.sync"), "ptx_wgmma": ptx.count("wgmma.mma_async"),
           "ptx_atomics": len(re.findall(r"\b(?:atom|red)\.", ptx)),
           # TMA: a bulk tensor copy into shared memory is a load, one out of it a store
           "ptx_tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\w+\.shared", ptx)),
           "ptx_tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\w+\.global", ptx))}
    hit = _PTXAS_SPILLS.search(getattr(kernel, "ptxas_log", "") or "")
    stack, stores, loads = (int(g) for g in hit.groups()) if hit else (None, None, None)
    out.update(stack_frame_bytes=stack, spill_store_bytes=stores, spill_load_bytes=loads)
    return out


def _need_compiler() -> None:
    if interpreting():
        raise RuntimeError("ops.triton.aot compiles for a GPU: unset TRITON_INTERPRET (the interpreter replaces "
                           "the compiler, and the launch helpers pick interpreter tiles under it)")


def merge_launch(*, w: str = "bf16", factors: str = "fp32", r: int = 16, rounding: str = "nearest",
                 write: bool = True, exact: bool = False, contig: bool = True) -> dict:
    """What ``unload.merge_group_`` passes to ``_merge_kernel`` on a GPU for one group: ``unload.launch_meta`` of
    the ``group_key`` of meta tensors with the group's dtypes and rank (``contig``: rows of 16-byte vectors, as
    a contiguous weight has; else a transposed W). ``rounding`` is "nearest" or "stochastic" (an fp32/fp64 W
    takes neither: its mode is 0)."""
    _need_compiler()
    w_t, f_t = _DTYPES[w], _DTYPES[factors]
    weight = torch.empty(64, 64, dtype=w_t, device="meta")
    layer = SimpleNamespace(weight=weight if contig else weight.t(),
                            lora_A=torch.empty(r, 64, dtype=f_t, device="meta"),
                            lora_B=torch.empty(64, r, dtype=f_t, device="meta"), rounding=rounding)
    return unload.launch_meta(unload.group_key(layer), write, exact)


def compile_unload(*, w: str = "bf16", factors: str = "fp32", r: int = 16, rounding: str = "nearest",
                   write: bool = True, exact: bool = False, contig: bool = True, arch: int = 90):
    """``_merge_kernel`` for one group as ``merge_group_`` launches it on a GPU: the constexprs of
    :func:`merge_launch` (``enable_fp_fusion=False`` among them) and the launch's argument specialisation. The
    seven tensor arguments (table, coefficients, tile starts, flag, and the first layer's W, A, B) are fresh or
    weight allocations: 16-byte aligned. ``n_layers`` is a runtime int (a group of one layer would specialise
    it to the constant 1)."""
    _need_compiler()
    meta = merge_launch(w=w, factors=factors, r=r, rounding=rounding, write=write, exact=exact, contig=contig)
    warps = meta.pop("num_warps")
    options = {"enable_fp_fusion": meta.pop("enable_fp_fusion")}
    compute = "fp64" if w == "fp64" else "fp32"
    types = dict(table_ptr="*i64", coef_ptr="*" + compute, starts_ptr="*i64", flag_ptr="*i32", n_layers="i32",
                 w_like="*" + w, lora_A_like="*" + factors, lora_B_like="*" + factors)
    divisible = ("table_ptr", "coef_ptr", "starts_ptr", "flag_ptr", "w_like", "lora_A_like", "lora_B_like")
    return _compile(unload._merge_kernel, types, meta, unit=(), divisible=divisible, arch=arch, num_warps=warps,
                    **options)


def compile_init(*, a: str = "fp32", arch: int = 90):
    """``_init_kernel`` (the fresh lora_A draws) as ``init_lora_A_group_`` launches it on a GPU."""
    _need_compiler()
    types = dict(table_ptr="*i64", starts_ptr="*i64", n_layers="i32", lora_A_like="*" + a)
    return _compile(unload._init_kernel, types, dict(BLOCK_R=INIT_TILE[0], BLOCK_N=INIT_TILE[1], SOFT_BF16=False),
                    unit=(), divisible=("table_ptr", "starts_ptr", "lora_A_like"), arch=arch, num_warps=INIT_TILE[2])


# the portable GEMM's launches (ops/lora_linear.py): which operands have a unit stride (the launch specialises a
# stride of 1 to a constant) and what is fused. forward: y = x W^T + s xa B^T + bias (B = W^T and UP = lora_B^T
# are views with unit K / r stride); xa: x A^T (N = r), with LoRA dropout's mask on x or without; dx: dy W + s g A
# (B = W, UP = lora_A row-major), with the mask on the low-rank term or without; dA: g^T x with the mask on x
# (a = g^T: unit M stride).
GEMM_KINDS = {
    "forward": dict(unit=("stride_ak", "stride_bk", "stride_cn", "stride_actr", "stride_upr"), lora=True, bias=True,
                    drop=0),
    "xa": dict(unit=("stride_ak", "stride_bk", "stride_cn"), lora=False, bias=False, drop=0),
    "xa-dropout": dict(unit=("stride_ak", "stride_bk", "stride_cn"), lora=False, bias=False, drop=1),
    "dx": dict(unit=("stride_ak", "stride_bn", "stride_cn", "stride_actr", "stride_upn"), lora=True, bias=False,
               drop=0),
    "dx-dropout": dict(unit=("stride_ak", "stride_bn", "stride_cn", "stride_actr", "stride_upn"), lora=True,
                       bias=False, drop=3),
    "dA-dropout": dict(unit=("stride_am", "stride_bn", "stride_cn"), lora=False, bias=False, drop=2),
}


def compile_lora_matmul(*, x="bf16", adapters="fp32", kind="forward", lora=None, bias=None, drop=None,
                        block_m=128, block_n=256, block_k=64, num_stages=3, num_warps=8, precision=None,
                        int64=False, block_r=16, arch=90):
    """The fused GEMM as ops/lora_linear.py launches it for ``kind`` (:data:`GEMM_KINDS`); ``lora``, ``bias`` and
    ``drop`` override the kind's. x (and a, b, c, act) in ``x``, UP in ``adapters``. ``int64``: the 64-bit
    indexing a launch takes when an offset reaches 2**31 (e.g. 150k rows of 14336: every stride still fits int32)."""
    spec = GEMM_KINDS[kind]
    lora = spec["lora"] if lora is None else lora
    bias = spec["bias"] if bias is None else bias
    drop = spec["drop"] if drop is None else drop
    types = dict(a_ptr="*" + x, b_ptr="*" + x, c_ptr="*" + x, act_ptr="*" + x, up_ptr="*" + adapters,
                 bias_ptr="*" + x, M="i32", N="i32", K="i32", R="i32", M_BUCKET="i32", N_BUCKET="i32",
                 K_BUCKET="i32", scaling="fp32", drop_seed="i64", drop_threshold="i32", drop_scale="fp32")
    types.update({s: "i32" for s in ("stride_am stride_ak stride_bk stride_bn stride_cm stride_cn "
                                    "stride_actm stride_actr stride_upr stride_upn").split()})
    ce = dict(HAS_LORA=lora, HAS_BIAS=bias, UPCAST=False, DROP=drop, INT64=int64,
              PRECISION=precision or ("ieee" if x == "fp32" else "tf32"), BLOCK_R=block_r,
              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
    divisible = [n for n in ("a_ptr", "b_ptr", "c_ptr", "act_ptr", "up_ptr", "M", "N", "K", "stride_am", "stride_ak",
                             "stride_bk", "stride_bn", "stride_cm", "stride_actm", "stride_upr", "stride_upn")
                 if n not in spec["unit"]]
    return _compile(lora_matmul._lora_matmul_kernel.fn, types, ce, unit=spec["unit"], divisible=tuple(divisible),
                    arch=arch, num_warps=num_warps, num_stages=num_stages)


def compile_lora_matmul_tma(*, x="bf16", adapters="fp32", lora=True, bias=False, b_nk=True, block_m=128,
                            block_n=256, block_k=64, num_stages=3, num_warps=8, num_programs=132, block_r=16,
                            arch=90):
    """The TMA/persistent fused GEMM as the forward calls it (b_nk: B = W^T read as W's tiles)."""
    b_block = [block_n, block_k] if b_nk else [block_k, block_n]
    types = dict(a_desc=f"tensordesc<{x}[{block_m}, {block_k}]>",
                 b_desc=f"tensordesc<{x}[{b_block[0]}, {b_block[1]}]>",
                 c_desc=f"tensordesc<{x}[{block_m}, {block_n}]>",
                 act_ptr="*" + x, up_ptr="*" + adapters, bias_ptr="*" + x, M="i32", N="i32", K="i32", R="i32",
                 M_BUCKET="i32", N_BUCKET="i32", K_BUCKET="i32", stride_actm="i32", stride_actr="i32",
                 stride_upr="i32", stride_upn="i32", scaling="fp32")
    ce = dict(HAS_LORA=lora, HAS_BIAS=bias, UPCAST=False,
              PRECISION="tf32", B_NK=b_nk, NUM_PROGRAMS=num_programs, BLOCK_R=block_r,  # fp32: TMA only as TF32
              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
    return _compile(lora_matmul_tma._lora_matmul_tma_kernel.fn, types, ce, unit=("stride_actr", "stride_upr"),
                    divisible=("act_ptr", "up_ptr", "M", "N", "K", "stride_actm", "stride_upn"),
                    arch=arch, num_warps=num_warps, num_stages=num_stages)


def compile_lora_matmul_ws(*, x="bf16", lora=True, bias=False, b_nk=True, up_nk=True, num_programs=132, arch=90):
    """The warp-specialised fused GEMM as ``lora_matmul_ws`` launches it on a GPU: its config for x's dtype,
    num_warps 4, warp specialisation on. Forward: b_nk (B = W^T, read as W's tiles) and up_nk (UP = lora_B^T);
    dx: neither (B = W and UP = lora_A, both row-major). ACT and UP come in x's dtype (the launch casts them). M, N,
    K, r and the row strides are multiples of 16 (transformer widths, r = 16), as the launch specialises them."""
    bm, bn, bk, br, gm, split, stages = lora_matmul_ws.GPU_CONFIG_FP32 if x == "fp32" else lora_matmul_ws.GPU_CONFIG
    types = dict(a_ptr="*" + x, b_ptr="*" + x, c_ptr="*" + x, act_ptr="*" + x, up_ptr="*" + x, bias_ptr="*" + x,
                 M="i32", N="i32", K="i32", R="i32", stride_am="i32", stride_b="i32", stride_cm="i32",
                 stride_actm="i32", stride_up="i32", scaling="fp32")
    ce = dict(HAS_LORA=lora, HAS_BIAS=bias, B_NK=b_nk, UP_NK=up_nk, UPCAST=False, PRECISION="tf32",
              WARP_SPECIALIZE=True, NUM_PROGRAMS=num_programs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
              GROUP_M=gm, EPILOGUE_SPLIT=split)
    return _compile(lora_matmul_ws._lora_matmul_ws_kernel, types, ce, unit=(),
                    divisible=("a_ptr", "b_ptr", "c_ptr", "act_ptr", "up_ptr", "bias_ptr", "M", "N", "K", "R",
                               "stride_am", "stride_b", "stride_cm", "stride_actm", "stride_up"),
                    arch=arch, num_warps=4, num_stages=stages)


def compile_lora_dy_pass(*, dy="bf16", adapters="fp32", r=16, arch=90):
    """The backward's one pass over dy as ``lora_dy_pass`` launches it on ``arch`` (the config it picks there for
    dy's dtype and the rank): dy (M, out) row-major, lora_B (out, r) in the adapters' dtype, xa (M, r) in dy's;
    widths multiples of 16."""
    block_m, block_n, warps, stages = lora_dy_pass.config(arch, _DTYPES[dy], r)  # the caller checked it is not None
    types = dict(dy_ptr="*" + dy, lora_B_ptr="*" + adapters, xa_ptr="*" + dy, g_part_ptr="*fp32",
                 grad_B_part_ptr="*fp32", M="i32", N="i32", R="i32", ROWS_PER_CHUNK="i32", COLS_PER_CHUNK="i32",
                 stride_dym="i32", stride_bn="i32", stride_xam="i32")
    ce = dict(UPCAST=False, PRECISION="ieee" if dy == "fp32" else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
              BLOCK_R=max(16, triton.next_power_of_2(r)))
    return _compile(lora_dy_pass._lora_dy_pass_kernel, types, ce, unit=("stride_dyn", "stride_br", "stride_xar"),
                    divisible=("dy_ptr", "lora_B_ptr", "xa_ptr", "g_part_ptr", "grad_B_part_ptr", "M", "N",
                               "ROWS_PER_CHUNK", "COLS_PER_CHUNK", "stride_dym", "stride_bn", "stride_xam"),
                    arch=arch, num_warps=warps, num_stages=stages)


_I64_TENSOR_MUL = re.compile(r"arith\.muli [^\n]*: tensor<[0-9x]*xi64>")


def i64_offsets(kernel) -> bool:
    """Whether the kernel's TTIR multiplies index tensors in 64 bits (the INT64 GEMM's offsets)."""
    return bool(_I64_TENSOR_MUL.search(kernel.asm["ttir"]))


_SETMAXNREG = re.compile(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+);")


def lora_matmul_ws_resources(*, sass: bool = True, **kw) -> dict:
    """:func:`resources` of :func:`compile_lora_matmul_ws` plus what shows the warp specialisation took place:
    ``warp_specialized`` (a ``ttg.warp_specialize`` op in the TTGIR), ``warpgroups`` (the launch's warps / 4:
    the producer and the consumers), the ``setmaxnreg_inc``/``setmaxnreg_dec`` register counts in the PTX (the
    consumers' raise, the producer's drop), ``tma_stores`` (UTMASTG) and ``wgmma_waits`` (WARPGROUP.DEPBAR: a
    wait for all wgmma in flight, once per K step in Triton 3.9's Hopper specialisation)."""
    kernel = compile_lora_matmul_ws(**kw)
    out = resources(kernel, sass=sass)
    hits = _SETMAXNREG.findall(kernel.asm["ptx"])
    out.update({
        "warp_specialized": "ttg.warp_specialize(" in kernel.asm["ttgir"],
        "warpgroups": kernel.metadata.num_warps // 4,
        "setmaxnreg_inc": sorted({int(n) for kind, n in hits if kind == "inc"}),
        "setmaxnreg_dec": sorted({int(n) for kind, n in hits if kind == "dec"}),
    })
    tool = _cuobjdump()
    if tool is not None and sass:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as fh:
                fh.write(kernel.asm["cubin"])
            sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
        ops = [op for _, op, _ in parse_sass(sass)]
        out["tma_stores"] = sum(1 for op in ops if re.match(r"UTMASTG\b", op))
        out["wgmma_waits"] = sum(1 for op in ops if re.match(r"WARPGROUP\.DEPBAR\b", op))
    return out


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_ATOMIC = re.compile(r"^(?:ATOMG?|ATOMS|REDG?)\.")  # memory atomics/reductions (not REDUX: warp reductions)
_FLOAT_TYPE = re.compile(r"\.(?:BF16|F16|F32|F64)(?:x2|_V2)?(?:\.|$)|\.FTZ(?:\.|$)|\.RN(?:\.|$)")
_FLOAT_MATH = re.compile(r"^(?:FFMA|FMUL|FADD|DFMA|DMUL|DADD|HFMA2|HMUL2|HADD2)\b")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every SASS instruction in cuobjdump's listing."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _INSTRUCTION.findall(sass)]


def _branch_target(op: str, rest: str) -> int | None:
    hit = re.match(r"0x([0-9a-f]+)\b", rest) if op.split(".")[0] == "BRA" else None
    return int(hit.group(1), 16) if hit else None


def _backward_branches(ins) -> list[tuple[int, int]]:
    """(target, branch address) of each branch to an earlier address: the loops' back edges. A branch to itself
    (the ``BRA .`` that pads the end of a kernel) is no loop."""
    return [(t, addr) for addr, op, rest in ins if (t := _branch_target(op, rest)) is not None and t < addr]


def tile_loop(ins, rank_trips: int = 1, persistent: bool = True) -> dict:
    """The SASS instructions one iteration of a kernel's persistent tile loop issues (per warp).

    The loop is the backward branch spanning the most code (``tl.range`` over tiles, rotated by the compiler
    so that its back edge is an unconditional ``BRA`` to the top); its body is every instruction from the
    branch target to the branch, NOPs excluded. Loops nested in it count once each (the walk to the next
    layer's row of the table normally runs its test once per tile) except those doing float arithmetic
    (FFMA/FMUL/FADD/DFMA/...: the rank-1 FMA loop over r), which count ``rank_trips`` times. Out-of-line code the
    body branches or calls to past its end (the 64-bit division subroutine, taken only for shapes over 2**32)
    is not counted. A kernel that is not persistent (``persistent=False``: one tile per program), or has no
    backward branch, counts whole, NOPs excluded, its loops once each."""
    loops = _backward_branches(ins)
    if not loops or not persistent:
        body = [i for i in ins if not i[1].startswith("NOP") and _branch_target(i[1], i[2]) != i[0]]
        return {"loop_instructions": len(body), "inner_loops": [], "loop_count": len(body), "persistent": False}
    lo, hi = max(loops, key=lambda t: t[1] - t[0])
    body = [i for i in ins if lo <= i[0] <= hi and not i[1].startswith("NOP")]
    inner, extra = [], 0
    for a, b in loops:
        if (a, b) != (lo, hi) and lo <= a and b <= hi:
            part = [i for i in body if a <= i[0] <= b]
            fp = any(_FLOAT_MATH.match(i[1]) for i in part)
            inner.append({"instructions": len(part), "float_math": fp})
            extra += (rank_trips - 1) * len(part) if fp else 0
    return {"loop_instructions": len(body), "inner_loops": inner, "loop_count": len(body) + extra,
            "persistent": True}


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int) -> dict:
    """Resident blocks per SM on sm_90 and what limits them: registers (65536 per SM, allocated per warp in
    units of 256), shared memory (228 KiB per SM, 1 KiB of it reserved per block), threads (2048) and blocks
    (32)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    limits = {"registers": (REGISTERS_PER_SM // per_warp) // num_warps,
              "shared": SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK),
              "threads": MAX_THREADS_PER_SM // (32 * num_warps), "blocks": MAX_BLOCKS_PER_SM}
    limiter = min(limits, key=limits.get)
    return {"blocks_per_sm": limits[limiter], "blocks_limited_by": limiter}


def resources(kernel, num_warps: int | None = None, *, tile: tuple[int, int] | None = None,
              rank_trips: int = 1, persistent: bool = True, sass: bool = True) -> dict:
    """What the compiler gave a kernel, read from its cubin (cuobjdump) and SASS, plus :func:`ptx_facts`
    (``sass=False``: the registers, stack and those facts only, without the slow disassembly):

    - ``registers`` per thread, ``stack_bytes`` and ``local_bytes`` (a spill needs a stack), ``spill_stores``/
      ``spill_loads`` (STL/LDL instructions), ``shared_bytes`` (Triton's dynamic shared memory);
    - ``blocks_per_sm`` resident on sm_90 from those (see :func:`blocks_per_sm`), ``warps_per_sm``;
    - ``float_atomics``: atomics/reductions to memory (ATOM, ATOMG, ATOMS, RED, REDG) with a float type
      (.F16/.BF16/.F32/.F64, .FTZ, .RN), ``int_atomics`` the others, ``membar`` the MEMBAR fences,
      ``loop_atomics`` the atomics inside the tile loop;
    - 16-byte global accesses (``ldg128``/``stg128``) among all (``ldg``/``stg``), MMA (``hmma``/``hgmma``) and TMA
      loads, layout conversions in the TTGIR, ``instructions`` in the whole kernel (NOPs excluded);
    - with ``tile`` = (rows, columns) of one loop iteration: ``sass_per_element``, the SASS instructions one
      iteration of the persistent tile loop issues (:func:`tile_loop`; ``rank_trips``: the trip count of a nested
      rank loop; ``persistent=False``: the whole kernel, one tile per program), divided by the elements each
      thread handles in it, rows * columns / threads. An instruction issues once per warp for its 32 threads, so
      this is issue slots per element: the number to hold against the SM's 4 issues per clock and the elements
      per clock a streaming kernel must retire.
    """
    num_warps = num_warps or kernel.metadata.num_warps
    out = {"shared_bytes": kernel.metadata.shared, "num_warps": num_warps, **ptx_facts(kernel)}
    tool = _cuobjdump()
    if tool is None:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        listing = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout if sass else ""
    for key, field in (("registers", "REG"), ("stack_bytes", "STACK"), ("local_bytes", "LOCAL")):
        hit = re.search(rf"\b{field}:(\d+)", usage)
        out[key] = int(hit.group(1)) if hit else None
    if not sass:
        return out
    sass = listing
    ins = parse_sass(sass)
    ops = [op for _, op, _ in ins]

    def count(pattern):
        return sum(1 for op in ops if re.match(pattern, op))

    atomics = [op for op in ops if _ATOMIC.match(op)]
    loop = tile_loop(ins, rank_trips, persistent)
    out.update({
        "spill_stores": count(r"STL\b"), "spill_loads": count(r"LDL\b"),
        "float_atomics": sum(1 for op in atomics if _FLOAT_TYPE.search(op)),
        "int_atomics": sum(1 for op in atomics if not _FLOAT_TYPE.search(op)),
        "membar": count(r"MEMBAR\b"),
        "ldg128": count(r"LDG\.E\.(?:EL\.)?128\b"), "ldg": count(r"LDG\b"),
        "stg128": count(r"STG\.E\.(?:EL\.)?128\b"), "stg": count(r"STG\b"),
        "hgmma": count(r"HGMMA\b"), "hmma": count(r"HMMA\b"), "tma_loads": count(r"UTMALDG\b"),
        "bar_sync": count(r"BAR\.SYNC"), "instructions": sum(1 for op in ops if not op.startswith("NOP")),
        "layout_conversions": kernel.asm["ttgir"].count("convert_layout"),
        "loop_instructions": loop["loop_instructions"], "inner_loops": loop["inner_loops"],
    })
    if loop["persistent"]:  # the atomics must sit after the loop: one per program, not one per tile
        lo, hi = max(_backward_branches(ins), key=lambda t: t[1] - t[0])
        out["loop_atomics"] = sum(1 for a, op, _ in ins if lo <= a <= hi and _ATOMIC.match(op))
    if tile is not None:
        out["sass_per_element"] = loop["loop_count"] / (tile[0] * tile[1] / (32 * num_warps))
    if out["registers"] is not None:
        out.update(blocks_per_sm(out["registers"], num_warps, out["shared_bytes"]))
        out["warps_per_sm"] = out["blocks_per_sm"] * num_warps
    return out


def unload_resources(*, w: str = "bf16", factors: str = "fp32", r: int = 16, rounding: str = "nearest",
                     write: bool = True, exact: bool = False, contig: bool = True, arch: int = 90,
                     sass: bool = True) -> dict:
    """:func:`resources` of one production merge variant (:func:`compile_unload`), with its launch
    (``meta``: tile, rank, dot, rounding mode) and the instructions per element of its tile loop; the rank-1
    FMA loop runs ``r`` times per tile where it is a runtime loop (no dot, rank above 16)."""
    meta = merge_launch(w=w, factors=factors, r=r, rounding=rounding, write=write, exact=exact, contig=contig)
    kernel = compile_unload(w=w, factors=factors, r=r, rounding=rounding, write=write, exact=exact, contig=contig,
                            arch=arch)
    got = resources(kernel, meta["num_warps"], tile=(meta["BLOCK_M"], meta["BLOCK_N"]), sass=sass,
                    rank_trips=1 if meta["DOT"] or meta["FMA_R"] else r)
    got["meta"] = meta
    return got


def init_resources(*, a: str = "fp32", arch: int = 90, sass: bool = True) -> dict:
    """:func:`resources` of the fresh-A kernel (one tile per program: the whole kernel counts)."""
    return resources(compile_init(a=a, arch=arch), INIT_TILE[2], tile=INIT_TILE[:2], persistent=False, sass=sass)
