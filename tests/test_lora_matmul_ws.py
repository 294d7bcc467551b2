"""The warp-specialised TMA GEMM (lora_matmul_ws) against float64 math: both orientations of B (the forward's
W^T, dx's row-major W) with the matching UP (lora_B^T, lora_A), with and without the low-rank term and the bias,
in fp32/fp16/bf16, on shapes with edges in every dimension and ranks that need padding or two BLOCK_R chunks;
and the fall-back to the portable kernel for what the descriptors cannot take. Outputs are poisoned with NaN
first, so a tile the kernel forgot cannot pass. Under the interpreter the kernel runs with small tiles and three
persistent programs (lora_matmul_ws.INTERPRETER_CONFIG), so every shape here spans several tiles per program."""
import pytest
import torch

from plora_kernels.ops.triton import lora_matmul_ws as ws

from helpers import DEVICE, LINEAR_TOL, poison_, rel_err, triton_runnable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N, r): edges in M, N and K; r = 3 (rows of S and L not 16-byte aligned: padded copies), 16 (one
# BLOCK_R chunk, no copy for 16-bit L), 20 (two chunks, the second one partly out of bounds)
SHAPES = [(70, 96, 136, 3), (129, 64, 64, 16), (33, 200, 72, 20)]


@pytest.fixture
def fallbacks(monkeypatch):
    """Skip where the kernel cannot run; record the calls that fell back to the portable kernel."""
    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    if DEVICE == "cuda":
        if torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the warp-specialised TMA kernel is built for Hopper (sm_90)")
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # fp32 takes the kernel with TF32
    calls = []
    portable = ws.lora_matmul

    def counted(a, b, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return portable(a, b, **kwargs)

    monkeypatch.setattr(ws, "lora_matmul", counted)
    return calls


def _tol(dtype):
    if dtype == torch.float32 and DEVICE == "cuda":
        return 5e-3  # TF32
    return LINEAR_TOL[dtype]  # bf16: the interpreter's fp32->bf16 casts truncate


def _operands(M, K, N, r, dtype, orientation, adapters=torch.float32):
    """a, b, lora_act, lora_up as the two call sites pass them: "forward" b = W^T (a view of the (N, K) weight),
    UP = lora_B^T (a view of (N, r)); "dx" b = W (K, N) row-major, UP = lora_A (r, N) row-major."""
    a = torch.randn(M, K, device=DEVICE).to(dtype)
    act = (torch.randn(M, r, device=DEVICE) / r**0.5).to(dtype)
    if orientation == "forward":
        b = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype).t()
        up = torch.randn(N, r, device=DEVICE).to(adapters).t()
    else:
        b = (torch.randn(K, N, device=DEVICE) / K**0.5).to(dtype)
        up = torch.randn(r, N, device=DEVICE).to(adapters)
    return a, b, act, up


def _truth(a, b, act=None, up=None, scaling=1.0, bias=None):
    y = a.double() @ b.double()
    if act is not None:
        y = y + scaling * act.double() @ up.double()
    if bias is not None:
        y = y + bias.double()
    return y


def _runs_here(dtype, orientation):
    """fp32 takes the kernel only with B = W^T (TF32 wgmma reads B K-major); see ws.supported."""
    return not (dtype == torch.float32 and orientation == "dx")


@pytest.mark.parametrize("orientation", ["forward", "dx"])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(fallbacks, dtype, M, K, N, r, orientation):
    a, b, act, up = _operands(M, K, N, r, dtype, orientation)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    out = poison_(torch.empty(M, N, dtype=dtype, device=DEVICE))
    got = ws.lora_matmul_ws(a, b, lora_act=act, lora_up=up, scaling=1.7, bias=bias, out=out)
    assert got is out and torch.isfinite(out).all()
    assert rel_err(out, _truth(a, b, act, up, 1.7, bias)) < _tol(dtype)
    assert ws.supported(a, b, out) == _runs_here(dtype, orientation)
    assert len(fallbacks) == (0 if _runs_here(dtype, orientation) else 1)


@pytest.mark.parametrize("orientation", ["forward", "dx"])
@pytest.mark.parametrize("lora,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_each_term_alone(fallbacks, dtype, lora, bias, orientation):
    M, K, N, r = 70, 96, 136, 8
    a, b, act, up = _operands(M, K, N, r, dtype, orientation, adapters=dtype)
    b_vec = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    act, up = (act, up) if lora else (None, None)
    got = ws.lora_matmul_ws(a, b, lora_act=act, lora_up=up, scaling=0.5, bias=b_vec)  # out allocated by the call
    assert got.shape == (M, N) and got.dtype == dtype
    assert rel_err(got, _truth(a, b, act, up, 0.5, b_vec)) < _tol(dtype)
    assert not fallbacks


def test_fp32_row_major_up_is_transposed(fallbacks):
    """TF32 wgmma reads UP K-major: an fp32 (r, N) row-major UP is copied to (N, r) (on every device, so that the
    interpreter runs the layout the GPU does)."""
    a, b, act, _ = _operands(40, 64, 72, 16, torch.float32, "forward")
    up = torch.randn(16, 72, device=DEVICE)
    _, up_desc, up_nk = ws.low_rank_operands(a, act, up)
    assert up_nk and up_desc.is_contiguous() and torch.equal(up_desc, up.t())
    got = ws.lora_matmul_ws(a, b, lora_act=act, lora_up=up, scaling=1.1)
    assert rel_err(got, _truth(a, b, act, up, 1.1)) < _tol(torch.float32) and not fallbacks


def test_zero_scaling_drops_the_low_rank_term(fallbacks):
    a, b, act, up = _operands(40, 64, 64, 4, torch.float16, "forward")
    up = torch.full_like(up, float("inf"))  # would poison the result if it were read
    got = ws.lora_matmul_ws(a, b, lora_act=act, lora_up=up, scaling=0.0)
    assert rel_err(got, _truth(a, b)) < _tol(torch.float16) and not fallbacks


def test_store_stays_inside_a_strided_out(fallbacks):
    """out as a column slice of a wider buffer (row stride > N): TMA clips the edge tile's stores at N, so the
    columns past it keep their sentinel."""
    M, K, N = 50, 64, 72
    a, b, act, up = _operands(M, K, N, 16, torch.bfloat16, "forward")
    big = torch.full((M, N + 24), 7.0, dtype=torch.bfloat16, device=DEVICE)
    out = poison_(big[:, :N])
    ws.lora_matmul_ws(a, b, lora_act=act, lora_up=up, scaling=2.0, out=out)
    assert not fallbacks and torch.isfinite(out).all()
    assert rel_err(out, _truth(a, b, act, up, 2.0)) < _tol(torch.bfloat16)
    assert (big[:, N:] == 7.0).all()


def test_empty_m(fallbacks):
    a, b, act, up = _operands(0, 64, 72, 4, torch.bfloat16, "forward")
    got = ws.lora_matmul_ws(a, b, lora_act=act, lora_up=up, scaling=1.0)
    assert got.shape == (0, 72) and got.dtype == torch.bfloat16 and not fallbacks


def _unsupported_cases():
    def make(M, K, N, dtype=torch.float32, **kw):
        return {"a": torch.randn(M, K, device=DEVICE).to(dtype), "b": torch.randn(N, K, device=DEVICE).to(dtype).t(),
                **kw}

    wide = torch.randn(20, 2 * 96, device=DEVICE)
    return {
        "unaligned rows": make(9, 129, 77),  # 129 fp32 = 516-byte rows of a and W: no descriptor
        "strided a": {"a": wide[:, ::2], "b": torch.randn(72, 96, device=DEVICE).t()},
        "unaligned C rows": make(40, 64, 130),  # a allocated C of 130 fp32 = 520-byte rows: no descriptor
        "narrow N": make(40, 64, 48),  # N = r sized products belong to the portable kernel
        "short K": make(40, 32, 72),
        "out of another dtype": make(40, 64, 72, out=torch.empty(40, 72, dtype=torch.float64, device=DEVICE)),
        "fp32 row-major B": {"a": torch.randn(40, 64, device=DEVICE), "b": torch.randn(64, 72, device=DEVICE)},
    }


@pytest.mark.parametrize("case", list(_unsupported_cases()))
def test_unsupported_shapes_fall_back(fallbacks, case):
    kw = _unsupported_cases()[case]
    a, b, out = kw["a"], kw["b"], kw.get("out")
    assert not ws.supported(a, b, out)
    M, N, r = a.shape[0], b.shape[1], 5
    act = torch.randn(M, r, device=DEVICE).to(a.dtype)
    up = torch.randn(r, N, device=DEVICE).to(a.dtype)
    if out is not None:
        poison_(out)
    got = ws.lora_matmul_ws(a, b, lora_act=act, lora_up=up, scaling=0.7, out=out)
    assert len(fallbacks) == 1
    assert rel_err(got, _truth(a, b, act, up, 0.7)) < _tol(a.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_linear_on_triton_ws(fallbacks, monkeypatch, dtype):
    """Through lora_linear with PLORA_LINEAR_KERNEL=triton-ws: the forward's y and the backward's dx each take the
    kernel once (xa, N = r, stays on the portable kernel; g comes from the one pass over dy), and every output
    matches float64."""
    from plora_kernels import lora_linear

    monkeypatch.setenv("PLORA_LINEAR_KERNEL", "triton-ws")
    calls = []
    launch = ws.lora_matmul_ws

    def counted(a, b, **kwargs):
        calls.append(tuple(b.shape))
        return launch(a, b, **kwargs)

    monkeypatch.setattr(ws, "lora_matmul_ws", counted)
    n_in, n_out, r, act = 128, 96, 16, 1.3
    x = torch.randn(2, 35, n_in, device=DEVICE).to(dtype).requires_grad_()
    W = (torch.randn(n_out, n_in, device=DEVICE) / n_in**0.5).to(dtype)
    A = (torch.randn(r, n_in, device=DEVICE) / n_in**0.5).requires_grad_()
    B = (torch.randn(n_out, r, device=DEVICE) / r**0.5).requires_grad_()
    bias = torch.randn(n_out, device=DEVICE).to(dtype)
    y = lora_linear(x, W, A, B, act, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, W64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, A, B))
    y64 = x64 @ W64.T + act * (x64 @ A64.T) @ B64.T + bias.double()
    y64.backward(dy.double())
    for got, want in ((y, y64), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        assert rel_err(got, want) < _tol(dtype)
    assert calls == [(n_in, n_out), (n_out, n_in)] and not fallbacks
