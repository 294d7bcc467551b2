"""The portable GEMM's 64-bit indexing: a launch whose largest element offset reaches 2**31 (150k tokens x 14336,
or a 128k-vocabulary head over 16.8k tokens) indexes in int64, where int32 products would wrap to wrong addresses
with no error. Here the decision on sizes too big to allocate (meta tensors), and the INT64 kernel against float64
math under the interpreter (the threshold lowered so that small shapes take it). The compile matrix checks the
compiled kernel's TTIR multiplies its offsets in i64 (tests/test_kernels_compile.py)."""
import pytest
import torch

from helpers import DEVICE, poison_, rel_err, triton_runnable

pytest.importorskip("triton")


def test_offsets_that_reach_2_31_take_64_bit_indexing():
    from plora_kernels.ops.triton.lora_matmul import needs_int64

    meta = dict(device="meta", dtype=torch.bfloat16)
    assert needs_int64(torch.empty(150_000, 14336, **meta))  # x of a long sequence batch
    assert needs_int64(torch.empty(16_800, 128_256, **meta))  # a 128k-vocabulary head over 16.8k tokens
    assert not needs_int64(torch.empty(8192, 4096, **meta), torch.empty(4096, 4096, **meta).t())
    assert needs_int64(torch.empty(2, 8, **meta).as_strided((2, 8), (2**31, 1)))  # a huge row stride
    assert not needs_int64(None, torch.empty(0, 4096, **meta))


@pytest.mark.skipif(not triton_runnable(), reason="Triton is not runnable here")
@pytest.mark.parametrize("lora", [False, True])
def test_int64_kernel_matches_float64(monkeypatch, lora):
    from plora_kernels.ops.triton import lora_matmul

    monkeypatch.setattr(lora_matmul, "INT32_OFFSETS", 1)  # every launch takes the INT64 path
    M, K, N, r = 37, 129, 77, 3
    a = torch.randn(M, K, device=DEVICE)
    b = torch.randn(N, K, device=DEVICE).t()  # W^T, as the forward passes it
    act = torch.randn(M, r, device=DEVICE) if lora else None
    up = torch.randn(N, r, device=DEVICE).t() if lora else None
    bias = torch.randn(N, device=DEVICE)
    out = poison_(torch.empty(M, N, device=DEVICE))
    got = lora_matmul.lora_matmul(a, b, lora_act=act, lora_up=up, scaling=0.7, bias=bias, out=out)
    want = a.double() @ b.double() + bias.double()
    if lora:
        want += 0.7 * act.double() @ up.double()
    assert rel_err(got, want) < 2e-5
