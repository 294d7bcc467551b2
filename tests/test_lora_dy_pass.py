"""The backward's one pass over dy (ops/triton/lora_dy_pass.py): g = dy B and dB = s dy^T xa against float64."""
import pytest
import torch

from helpers import DEVICE, LINEAR_TOL as TOL, rel_err, triton_runnable

pytestmark = pytest.mark.skipif(not triton_runnable(), reason="Triton is not runnable here")

SHAPES = [  # (M, out, r)
    (70, 77, 3),
    (1, 48, 1),
    (33, 130, 16),
    (96, 40, 40),  # BLOCK_R = 64, the largest
    (5, 300, 8),  # one M-block, many out-blocks: g sums across out-blocks in the scratch
]


def _inputs(M, n_out, r, dtype, adapter_dtype):
    dy = torch.randn(M, n_out, device=DEVICE).to(dtype)
    lora_B = (torch.randn(n_out, r, device=DEVICE) / r**0.5).to(adapter_dtype)
    xa = torch.randn(M, r, device=DEVICE).to(dtype)
    return dy, lora_B, xa


def _check(dy, lora_B, xa, s, g, grad_B):
    tol = TOL[dy.dtype]
    g64 = dy.double() @ lora_B.to(dy.dtype).double()  # the product uses B cast to dy's dtype, as the reference
    grad_B64 = s * dy.double().t() @ xa.double()
    assert g.dtype == dy.dtype and g.shape == g64.shape and rel_err(g, g64) < tol
    assert grad_B.dtype == lora_B.dtype and grad_B.shape == lora_B.shape and rel_err(grad_B, grad_B64) < tol


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty the pass allocates (its partial sums) starts as NaN: a partial the kernel forgot to write,
    or read before writing, shows in the result."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,n_out,r", SHAPES)
def test_matches_float64(dtype, M, n_out, r, poisoned_empty):
    from plora_kernels.ops.triton.lora_dy_pass import lora_dy_pass

    adapter_dtype = torch.float32 if dtype != torch.float32 else dtype  # PEFT's default: fp32 adapters
    dy, lora_B, xa = _inputs(M, n_out, r, dtype, adapter_dtype)
    g, grad_B = lora_dy_pass(dy, lora_B, xa, 1.3)
    _check(dy, lora_B, xa, 1.3, g, grad_B)


@pytest.mark.parametrize("programs", [1, 2, 5, 64])
def test_any_chunking(programs, poisoned_empty):
    """One program (one chunk each way), a few, and more programs than blocks: the same sums."""
    from plora_kernels.ops.triton.lora_dy_pass import lora_dy_pass

    dy, lora_B, xa = _inputs(100, 150, 5, torch.float32, torch.float32)
    g, grad_B = lora_dy_pass(dy, lora_B, xa, 0.7, programs=programs)
    _check(dy, lora_B, xa, 0.7, g, grad_B)


def test_strided_operands(poisoned_empty):
    from plora_kernels.ops.triton.lora_dy_pass import lora_dy_pass

    dy = torch.randn(2 * 77, 70, device=DEVICE).t()[:, ::2]  # (70, 77), neither dimension contiguous
    lora_B = torch.randn(3, 77, device=DEVICE).t()  # (77, 3), a transposed view
    xa = torch.randn(70, 6, device=DEVICE)[:, ::2]
    g, grad_B = lora_dy_pass(dy, lora_B, xa, 2.0)
    _check(dy, lora_B, xa, 2.0, g, grad_B)


@pytest.mark.parametrize("M,n_out", [(0, 40), (9, 0), (0, 0)])
def test_empty(M, n_out):
    from plora_kernels.ops.triton.lora_dy_pass import lora_dy_pass

    dy, lora_B, xa = _inputs(M, n_out, 4, torch.float32, torch.float32)
    g, grad_B = lora_dy_pass(dy, lora_B, xa, 1.0)
    assert g.shape == (M, 4) and grad_B.shape == (n_out, 4)
    assert torch.equal(g, torch.zeros_like(g)) and torch.equal(grad_B, torch.zeros_like(grad_B))


def test_rank_above_the_kernels_runs_as_two_gemms():
    from plora_kernels.ops.triton import lora_dy_pass as mod

    dy, lora_B, xa = _inputs(20, 30, mod.MAX_RANK + 1, torch.float32, torch.float32)
    g, grad_B = mod.lora_dy_pass(dy, lora_B, xa, 0.5)
    _check(dy, lora_B, xa, 0.5, g, grad_B)


@pytest.mark.parametrize("M,N,programs", [(8192, 4096, 264), (8192, 11008, 264), (2048, 4096, 264), (100, 150, 5),
                                          (1, 1, 4), (70000, 64, 132), (8192, 4096, 132)])
def test_chunking_covers_and_fills(M, N, programs):
    from plora_kernels.ops.triton.lora_dy_pass import chunking

    rows, chunks_m, cols, chunks_n = chunking(M, N, programs, 128, 128)
    assert rows % 128 == 0 and cols % 128 == 0
    assert (chunks_m - 1) * rows < M <= chunks_m * rows and (chunks_n - 1) * cols < N <= chunks_n * cols
    blocks = -(-M // 128) * -(-N // 128)
    assert chunks_m * chunks_n <= 2 * programs  # about the asked number of programs, never far above it
    assert chunks_m * chunks_n >= min(blocks, programs) // 2  # and enough of them when the blocks allow
