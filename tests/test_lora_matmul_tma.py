"""The TMA/persistent GEMM (PLORA_LINEAR_KERNEL=triton-tma) against float64 math: forward and every gradient of
lora_linear where it takes the shapes, and the fall-back to the portable kernel where it cannot."""
import pytest
import torch

from plora_kernels import lora_linear
from plora_kernels.ops.triton import lora_matmul_tma

from helpers import DEVICE, LINEAR_TOL as TOL, poison_, rel_err, triton_runnable


@pytest.fixture
def tma(monkeypatch):
    """Run on the TMA kernel and count its launches."""
    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or newer")
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    monkeypatch.setenv("PLORA_LINEAR_KERNEL", "triton-tma")
    calls = []
    launch = lora_matmul_tma.lora_matmul_tma

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(lora_matmul_tma, "lora_matmul_tma", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,n_in,n_out,r,bias", [((70,), 128, 96, 3, True), ((2, 33), 64, 136, 16, False)])
def test_forward_backward_match_float64(tma, dtype, lead, n_in, n_out, r, bias):
    x = torch.randn(*lead, n_in, device=DEVICE).to(dtype).requires_grad_()
    W = (torch.randn(n_out, n_in, device=DEVICE) / n_in**0.5).to(dtype)
    A = (torch.randn(r, n_in, device=DEVICE) / n_in**0.5).requires_grad_()
    B = (torch.randn(n_out, r, device=DEVICE) / r**0.5).requires_grad_()
    b = torch.randn(n_out, device=DEVICE).to(dtype) if bias else None
    s = 1.3
    y = lora_linear(x, W, A, B, s, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, W64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, A, B))
    y64 = x64 @ W64.T + s * (x64 @ A64.T) @ B64.T + (b.double() if bias else 0.0)
    y64.backward(dy.double())
    for got, want in ((y, y64), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        assert rel_err(got, want) < TOL[dtype]
    # the forward's GEMM (B = W^T, read as W's tiles) and the backward's dx (B = W row-major) both took TMA; fp32
    # takes TMA only as TF32 with B = W^T (an IEEE fp32 dot spills on these tiles), so its dx is the portable GEMM
    assert len(tma) == (1 if dtype == torch.float32 else 2)


def test_poisoned_output_is_fully_written(tma):
    from plora_kernels.ops.triton.lora_matmul import lora_matmul

    x = torch.randn(67, 96, device=DEVICE)
    W = torch.randn(72, 96, device=DEVICE)
    out = poison_(torch.empty(67, 72, device=DEVICE))
    lora_matmul(x, W.t(), out=out, tma=True)
    assert len(tma) == 1 and torch.isfinite(out).all()
    assert rel_err(out, x.double() @ W.double().T) < TOL[torch.float32]


def test_unaligned_rows_fall_back_to_the_portable_kernel(tma):
    x = torch.randn(9, 129, device=DEVICE)  # 129 fp32 = 516-byte rows: no descriptor
    W = torch.randn(77, 129, device=DEVICE)
    A = torch.randn(3, 129, device=DEVICE)
    B = torch.randn(77, 3, device=DEVICE)
    y = lora_linear(x, W, A, B, 0.5)
    assert not tma
    assert rel_err(y, x.double() @ W.double().T + 0.5 * (x.double() @ A.double().T) @ B.double().T) < 2e-5
