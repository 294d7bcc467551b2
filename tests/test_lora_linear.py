"""lora_linear (forward and every gradient) against float64 math, on the reference and the Triton kernels."""
import pytest
import torch

from plora_kernels import lora_linear
from plora_kernels.ops import reference

from helpers import DEVICE, LINEAR_TOL as TOL, poison_, rel_err, triton_runnable

SHAPES = [  # (lead dims of x, in, out, r)
    ((7,), 129, 77, 3),
    ((1,), 64, 48, 1),
    ((2, 5), 96, 40, 16),
    ((33,), 72, 130, 8),
    ((3,), 48, 40, 80),  # r > 64: the low-rank term takes two BLOCK_R chunks
]


def _make(lead, n_in, n_out, r, dtype, adapter_dtype, bias):
    x = torch.randn(*lead, n_in, device=DEVICE).to(dtype)
    W = (torch.randn(n_out, n_in, device=DEVICE) / n_in**0.5).to(dtype)
    A = (torch.randn(r, n_in, device=DEVICE) / n_in**0.5).to(adapter_dtype)
    B = (torch.randn(n_out, r, device=DEVICE) / r**0.5).to(adapter_dtype)  # non-zero: B = 0 hides bugs
    b = torch.randn(n_out, device=DEVICE).to(dtype) if bias else None
    return x, W, A, B, b


def _float64_truth(x, W, A, B, b, s, dy):
    x64, W64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, A, B))
    y64 = x64 @ W64.T + s * (x64 @ A64.T) @ B64.T
    if b is not None:
        y64 = y64 + b.double()
    y64.backward(dy.double())
    return y64, x64.grad, A64.grad, B64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,n_in,n_out,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_float64(backend, dtype, lead, n_in, n_out, r, bias):
    adapter_dtype = torch.float32 if dtype != torch.float32 else dtype  # PEFT default: fp32 adapters
    x, W, A, B, b = _make(lead, n_in, n_out, r, dtype, adapter_dtype, bias)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    s = 1.7
    y = lora_linear(x, W, A, B, s, b)
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, dA64, dB64 = _float64_truth(x, W, A, B, b, s, dy)
    tol = TOL[dtype]
    assert rel_err(y, y64) < tol
    assert rel_err(x.grad, dx64) < tol
    assert A.grad.dtype == adapter_dtype and rel_err(A.grad, dA64) < tol
    assert B.grad.dtype == adapter_dtype and rel_err(B.grad, dB64) < tol


def test_non_contiguous_input_and_adapters(backend):
    x_big = torch.randn(9, 2 * 129, device=DEVICE)
    x = x_big[:, ::2]  # strided view
    W = torch.randn(77, 129, device=DEVICE) / 12
    A = torch.randn(129, 3, device=DEVICE).t()  # (3, 129) with transposed strides
    B = torch.randn(3, 77, device=DEVICE).t()
    assert not x.is_contiguous() and not A.is_contiguous() and not B.is_contiguous()
    y = lora_linear(x, W, A, B, 0.5)
    y64 = x.double() @ W.double().T + 0.5 * (x.double() @ A.double().T) @ B.double().T
    assert rel_err(y, y64) < TOL[torch.float32]


def test_empty_batch(backend):
    x = torch.randn(0, 3, 64, device=DEVICE, requires_grad=True)
    W = torch.randn(32, 64, device=DEVICE)
    A = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    B = torch.randn(32, 4, device=DEVICE, requires_grad=True)
    y = lora_linear(x, W, A, B, 2.0)
    assert y.shape == (0, 3, 32)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
    assert x.grad.shape == x.shape


def test_weight_gets_grad_only_when_it_requires_one(backend):
    x, W, A, B, b = _make((6,), 40, 24, 4, torch.float32, torch.float32, True)
    A.requires_grad_()
    y = lora_linear(x, W, A, B, 1.0, b)
    y.sum().backward()
    assert W.grad is None and b.grad is None and x.grad is None and A.grad is not None
    W.requires_grad_()
    b.requires_grad_()
    dy = torch.randn(6, 24, device=DEVICE)
    lora_linear(x, W, A, B, 1.0, b).backward(dy)
    assert rel_err(W.grad, (dy.double().T @ x.double())) < 1e-5
    assert rel_err(b.grad, dy.double().sum(0)) < 1e-5


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 gradcheck runs on the CPU reference")
def test_gradcheck_float64():
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t[:4], 0.8, t[4]), (x, W, A, B, b))


def test_kernel_writes_every_output_element():
    """The fused GEMM on a NaN-poisoned destination: every element must be overwritten."""
    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    from plora_kernels.ops.triton.lora_matmul import lora_matmul

    x = torch.randn(37, 129, device=DEVICE)
    W = torch.randn(77, 129, device=DEVICE)
    A = torch.randn(3, 129, device=DEVICE)
    B = torch.randn(77, 3, device=DEVICE)
    xa = reference.lora_linear_forward(x, W, A, B, 1.0)[1]
    out = poison_(torch.empty(37, 77, device=DEVICE))
    lora_matmul(x, W.t(), lora_act=xa, lora_up=B.t(), scaling=0.3, out=out)
    want = x.double() @ W.double().T + 0.3 * xa.double() @ B.double().T
    assert not out.isnan().any()
    assert rel_err(out, want) < TOL[torch.float32]


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(4, 10)), r"x must have shape \(\.\.\., 12\)"),
    (dict(lora_A=torch.randn(3, 11)), r"lora_A must have shape \(r, 12\)"),
    (dict(lora_B=torch.randn(8, 4)), r"lora_B must have shape \(8, 3\)"),
    (dict(bias=torch.randn(7)), r"bias must have shape \(8,\)"),
    (dict(x=torch.randn(4, 12, dtype=torch.float64)), r"weight dtype"),
    (dict(scaling="2"), r"scaling must be a Python float"),
    (dict(weight=torch.randn(8, 12).long()), r"weight must be a floating-point tensor"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(x=torch.randn(4, 12), weight=torch.randn(8, 12), lora_A=torch.randn(3, 12),
                lora_B=torch.randn(8, 3), scaling=1.0, bias=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        lora_linear(**args)


def test_opcheck_and_compile_without_graph_breaks(backend):
    from plora_kernels.nn import PLoRALinear
    from plora_kernels.ops.lora_linear import lora_linear_bwd, lora_linear_fwd

    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    W = torch.randn(16, 32, device=DEVICE)
    A = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    B = torch.randn(16, 4, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE)
    impl = "triton" if backend == "triton" else "torch"
    for p in (0.0, 0.25):
        torch.library.opcheck(lora_linear_fwd, (x, W, A, B, 0.5, b, impl, p))
        xa = x.detach() @ A.detach().T
        torch.library.opcheck(lora_linear_bwd, (torch.randn(6, 16, device=DEVICE), x.detach(), xa, W, A.detach(),
                                                B.detach(), 0.5, True, impl, p, torch.tensor(7)))
    layer = PLoRALinear(32, 16, r=4, device=DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    inp = torch.randn(2, 3, 32, device=DEVICE)
    torch.testing.assert_close(compiled(inp), layer(inp))
    compiled(inp).sum().backward()
    assert layer.lora_A.grad is not None


def test_autocast_runs_in_the_autocast_dtype(backend):
    from plora_kernels.nn import PLoRALinear

    layer = PLoRALinear(40, 24, r=4, device=DEVICE)  # fp32 weight and adapters, as under Trainer(bf16=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 40, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad is not None
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=3e-2)


def test_linear_kernel_choice(monkeypatch):
    """PLORA_LINEAR_KERNEL=torch keeps lora_linear off the Triton kernel (unload_ unaffected); bad names raise."""
    import plora_kernels.ops.triton.lora_matmul as kernel_module

    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    monkeypatch.setenv("PLORA_LINEAR_KERNEL", "torch")

    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel ran although PLORA_LINEAR_KERNEL=torch")

    monkeypatch.setattr(kernel_module, "lora_matmul", boom)
    x, W = torch.randn(5, 24, device=DEVICE), torch.randn(16, 24, device=DEVICE)
    A, B = torch.randn(4, 24, device=DEVICE), torch.randn(16, 4, device=DEVICE)
    want = x.double() @ W.double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    torch.testing.assert_close(lora_linear(x, W, A, B, 0.5).double(), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("PLORA_LINEAR_KERNEL", "cublas")
    with pytest.raises(ValueError, match="PLORA_LINEAR_KERNEL"):
        lora_linear(x, W, A, B, 0.5)


def test_the_backward_runs_what_the_forward_chose(monkeypatch):
    """The implementation is resolved once, on the caller's thread, and travels with the graph: on CUDA the
    backward runs on autograd's device thread, which does not see a choice made in code around the forward."""
    import plora_kernels as pk
    from plora_kernels.ops.triton import lora_matmul as lm

    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    from plora_kernels.ops.triton import lora_dy_pass as dp

    calls = []
    original, original_dy_pass = lm.lora_matmul, dp.lora_dy_pass
    monkeypatch.setattr(lm, "lora_matmul", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(dp, "lora_dy_pass", lambda *a, **k: calls.append(2) or original_dy_pass(*a, **k))
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    W, A, B = (torch.randn(*s, device=DEVICE) for s in ((8, 16), (2, 16), (8, 2)))
    A.requires_grad_()
    with pk.implementation(lora_linear="triton"):
        y = pk.lora_linear(x, W, A, B, 0.5)
    assert calls == [1, 1]  # x A^T and the fused GEMM
    y.sum().backward()  # outside the block: still the forward's choice
    assert calls == [1, 1, 2, 1]  # the one pass over dy (g, dB), then the fused dx GEMM
