"""Compile the Triton kernels ahead of time for a GPU architecture, on any machine (no GPU needed), and read
what the compiler gave each variant: registers, spills, shared memory, vector widths, MMA and TMA use.

This is how the kernels are checked for sm_90/sm_80 in CI (tests/test_kernels_compile.py) and how tile
choices are reasoned about between GPU sessions (benchmarks/kernel_resources.py). Launches specialise their
arguments (unit strides become constants, 16-divisible sizes and pointers get a divisibility hint), so the
compiles here do the same: without it no access would be vectorised and the counts would mislead.

Must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import lora_matmul, lora_matmul_tma, unload

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
MAX_WARPS_PER_SM = 64


def _compile(fn, types: dict, constexprs: dict, unit: tuple, divisible: tuple, arch: int, **options):
    types, constexprs = dict(types), dict(constexprs)
    for name in unit:
        types[name] = "constexpr"
        constexprs[name] = 1
    signature = dict(types)
    signature.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_unload(*, w="bf16", factors="bf16", r=16, rounding=2, block_m=64, block_n=256, num_warps=32,
                   small_r=None, stats=True, n_rounds=10, delta=True, arch=90):
    """The merge kernel for one variant; rounding 0/1/2 = none/nearest/stochastic (fp32 W takes 0)."""
    mant, emin, max_finite = unload._FORMAT[_DTYPES[w]]
    strides = "stride_wm stride_wn stride_ar stride_an stride_bm stride_br".split()
    types = dict(w_ptr="*" + w, a_ptr="*" + factors, b_ptr="*" + factors, stats_ptr="*fp32", M="i32", N="i32",
                 coef="fp32", seed="i32", row_offset="i32", **{s: "i32" for s in strides})
    ce = dict(R=r, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)),
              SMALL_R=r < 16 if small_r is None else small_r,
              DOT_FP32=unload.dot_in_fp32(_DTYPES[factors], _DTYPES[factors]),
              ROUND=rounding, MANT=mant, EMIN=emin, MAX_FINITE=max_finite, WRITE=True, STATS=stats,
              N_ROUNDS=n_rounds, DELTA=delta)
    # a contiguous W (out, in), A (r, in) and B (out, r)
    return _compile(unload._unload_kernel, types, ce, unit=("stride_wn", "stride_an", "stride_br"),
                    divisible=("w_ptr", "a_ptr", "b_ptr", "stats_ptr", "M", "N", "stride_wm", "stride_ar"),
                    arch=arch, num_warps=num_warps)


def compile_lora_matmul(*, x="bf16", adapters="fp32", lora=True, bias=False, block_m=128, block_n=256,
                        block_k=64, num_stages=3, num_warps=8, precision=None, arch=90):
    """The fused GEMM as the forward calls it: a = x (M, K) row-major, b = W^T (a view: K contiguous),
    s = xa (M, r), l = lora_B^T (a view: r contiguous)."""
    types = dict(a_ptr="*" + x, b_ptr="*" + x, c_ptr="*" + x, s_ptr="*" + x, l_ptr="*" + adapters,
                 bias_ptr="*" + x, M="i32", N="i32", K="i32", R="i32", M_BUCKET="i32", N_BUCKET="i32",
                 K_BUCKET="i32", scaling="fp32")
    types.update({s: "i32" for s in ("stride_am stride_ak stride_bk stride_bn stride_cm stride_cn "
                                    "stride_sm stride_sr stride_lr stride_ln").split()})
    ce = dict(HAS_LORA=lora, HAS_BIAS=bias, UPCAST=False,
              PRECISION=precision or ("ieee" if x == "fp32" else "tf32"), BLOCK_R=16,
              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
    return _compile(lora_matmul._lora_matmul_kernel.fn, types, ce,
                    unit=("stride_ak", "stride_bk", "stride_cn", "stride_sr", "stride_lr"),
                    divisible=("a_ptr", "b_ptr", "c_ptr", "s_ptr", "l_ptr", "M", "N", "K", "stride_am",
                               "stride_bn", "stride_cm", "stride_sm", "stride_ln"),
                    arch=arch, num_warps=num_warps, num_stages=num_stages)


def compile_lora_matmul_tma(*, x="bf16", adapters="fp32", lora=True, bias=False, b_nk=True, block_m=128,
                            block_n=256, block_k=64, num_stages=3, num_warps=8, num_programs=132, arch=90):
    """The TMA/persistent fused GEMM as the forward calls it (b_nk: B = W^T read as W's tiles)."""
    b_block = [block_n, block_k] if b_nk else [block_k, block_n]
    types = dict(a_desc=f"tensordesc<{x}[{block_m}, {block_k}]>",
                 b_desc=f"tensordesc<{x}[{b_block[0]}, {b_block[1]}]>",
                 c_desc=f"tensordesc<{x}[{block_m}, {block_n}]>",
                 s_ptr="*" + x, l_ptr="*" + adapters, bias_ptr="*" + x, M="i32", N="i32", K="i32", R="i32",
                 M_BUCKET="i32", N_BUCKET="i32", K_BUCKET="i32", stride_sm="i32", stride_sr="i32",
                 stride_lr="i32", stride_ln="i32", scaling="fp32")
    ce = dict(HAS_LORA=lora, HAS_BIAS=bias, UPCAST=False,
              PRECISION="ieee" if x == "fp32" else "tf32", B_NK=b_nk, NUM_PROGRAMS=num_programs, BLOCK_R=16,
              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
    return _compile(lora_matmul_tma._lora_matmul_tma_kernel.fn, types, ce, unit=("stride_sr", "stride_lr"),
                    divisible=("s_ptr", "l_ptr", "M", "N", "K", "stride_sm", "stride_ln"),
                    arch=arch, num_warps=num_warps, num_stages=num_stages)


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def resources(kernel, num_warps: int) -> dict:
    """What the compiler gave a kernel: registers and stack per thread (from the cubin), shared memory,
    16-byte global loads/stores in the SASS, MMA/TMA instructions, and the warps per SM those allow."""
    out = {"shared_bytes": kernel.metadata.shared, "num_warps": num_warps}
    tool = _cuobjdump()
    if tool is None:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    for key, field in (("registers", "REG"), ("stack_bytes", "STACK")):
        hit = re.search(rf"{field}:(\d+)", usage)
        out[key] = int(hit.group(1)) if hit else None
    out.update({
        "ldg128": len(re.findall(r"\bLDG\.E\.(?:EL\.)?128", sass)), "ldg": len(re.findall(r"\bLDG\b", sass)),
        "stg128": len(re.findall(r"\bSTG\.E\.(?:EL\.)?128", sass)), "stg": len(re.findall(r"\bSTG\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)), "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "tma_loads": len(re.findall(r"\bUTMALDG\b", sass)), "sass_lines": len(sass.splitlines()),
        "layout_conversions": kernel.asm["ttgir"].count("convert_layout"),
    })
    if out["registers"]:
        # registers are allocated per warp in units of 256 (8 per thread)
        per_warp = -(-out["registers"] // 8) * 8 * 32
        blocks = min(REGISTERS_PER_SM // (per_warp * num_warps), MAX_WARPS_PER_SM // num_warps,
                     SHARED_PER_SM // max(out["shared_bytes"] + 1024, 1))  # ~1 KiB reserved per block
        out["warps_per_sm"] = blocks * num_warps
    return out
