"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) on a machine without a GPU (the TMA GEMM
for Hopper only, where it must issue TMA loads and wgmma), and the
unload kernel's production tiles keep at least 32 warps per SM on Hopper without spilling (registers read
from the cubin).

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
    from plora_kernels.ops.triton import aot, unload

    n = 0
    for arch in (90, 80):
        # each W dtype once, covering the small-r loop, the fp32 ieee dot, the 16-bit dot, both roundings and
        # both production tiles, and the rank-1-update path at r=16 as --sweep runs it
        for w, f, r, rounding, small_r in (("bf16", "fp32", 3, 2, None), ("fp16", "fp16", 16, 1, None),
                                           ("bf16", "bf16", 64, 2, None), ("bf16", "fp32", 64, 2, None),
                                           ("bf16", "fp32", 16, 2, None),  # PLoRALinear's default
                                           ("bf16", "bf16", 16, 2, True), ("fp32", "fp32", 16, 0, None)):
            bm, bn, warps = unload._blocks(r, 4 if w == "fp32" else 2)  # GPU tiles: TRITON_INTERPRET is unset
            kernel = aot.compile_unload(w=w, factors=f, r=r, rounding=rounding, small_r=small_r,
                                        block_m=bm, block_n=bn, num_warps=warps, arch=arch)
            assert kernel.asm.get("cubin"), "no cubin produced"
            if arch == 90:
                # the point of the production tiles: a streaming kernel with many warps in flight per SM and
                # no real spilling (bf16 W, fp32 factors, stochastic, r=16 keeps 32 bytes of stack)
                got = aot.resources(kernel, warps)
                assert got.get("warps_per_sm", 32) >= 32 and (got.get("stack_bytes") or 0) <= 64, \
                    (w, f, r, rounding, got)
            n += 1
        for x, adapters, lora, bias in (("bf16", "fp32", True, True), ("fp16", "fp16", True, False),
                                        ("fp32", "fp32", False, False)):
            kernel = aot.compile_lora_matmul(x=x, adapters=adapters, lora=lora, bias=bias, block_m=128,
                                             block_n=128, block_k=64, num_stages=3, num_warps=8, arch=arch)
            assert kernel.asm.get("cubin"), "no cubin produced"
            n += 1
        if arch == 90:  # TMA is Hopper's: both orientations of B, with and without the low-rank seed
            for lora, b_nk in ((True, True), (False, False)):
                kernel = aot.compile_lora_matmul_tma(lora=lora, b_nk=b_nk, arch=arch)
                got = aot.resources(kernel, 8)
                assert got.get("tma_loads", 1) > 0 and got.get("hgmma", 1) > 0, got
                n += 1
    print("compiled", n)
''')


def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 22" in proc.stdout
