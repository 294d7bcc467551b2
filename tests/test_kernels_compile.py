"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) on a machine without a GPU.

The interpreter accepts code the compiler rejects (a runtime bound in static_range, a dtype mismatch in a
dot), so CI also compiles every kernel variant ahead of time down to PTX/cubin. It runs in a subprocess
because the interpreter flag set by conftest would otherwise replace the compiler.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(r'''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from plora_kernels.ops.triton import lora_matmul, unload

    def compile_one(fn, types, constexprs, arch):
        sig = dict(types)
        sig.update({k: "constexpr" for k in constexprs})
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
        assert kernel.asm.get("cubin"), "no cubin produced"

    i32 = "i32"
    strides = "stride_wm stride_wn stride_ar stride_an stride_bm stride_br".split()
    n = 0
    for arch in (90, 80):
        # each W dtype once, covering the small-r loop, the fp32 ieee dot, the 16-bit dot and both roundings
        for w, f, mant, emin, mx, r, rnd in (("bf16", "fp32", 7, -119, 3.3895313892515355e38, 3, 2),
                                             ("fp16", "fp16", 10, -14, 65504.0, 16, 1),
                                             ("bf16", "bf16", 7, -119, 3.3895313892515355e38, 64, 2),
                                             ("fp32", "fp32", 23, -126, 3.4028234663852886e38, 16, 0)):
            types = dict(w_ptr="*" + w, a_ptr="*" + f, b_ptr="*" + f, stats_ptr="*fp32", M=i32, N=i32,
                         coef="fp32", seed=i32, row_offset=i32, **{s: i32 for s in strides})
            ce = dict(R=r, BLOCK_M=64, BLOCK_N=256, BLOCK_R=max(16, r), SMALL_R=r < 16,
                      DOT_FP32=f == "fp32", ROUND=rnd, MANT=mant, EMIN=emin,
                      MAX_FINITE=mx, WRITE=True)
            compile_one(unload._unload_kernel, types, ce, arch)
            n += 1
        for x, adapters, lora, bias in (("bf16", "fp32", True, True), ("fp16", "fp16", True, False),
                                        ("fp32", "fp32", False, False)):
            types = dict(a_ptr="*" + x, b_ptr="*" + x, c_ptr="*" + x, s_ptr="*" + x, l_ptr="*" + adapters,
                         bias_ptr="*" + x, M=i32, N=i32, K=i32, R=i32, M_BUCKET=i32, N_BUCKET=i32,
                         K_BUCKET=i32, scaling="fp32")
            types.update({s: i32 for s in ("stride_am stride_ak stride_bk stride_bn stride_cm stride_cn "
                                            "stride_sm stride_sr stride_lr stride_ln").split()})
            ce = dict(HAS_LORA=lora, HAS_BIAS=bias, UPCAST=False, PRECISION="ieee" if x == "fp32" else "tf32",
                      BLOCK_R=16, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
            compile_one(lora_matmul._lora_matmul_kernel.fn, types, ce, arch)
            n += 1
    print("compiled", n)
''')


def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 14" in proc.stdout
