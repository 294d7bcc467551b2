"""unload_ against the float64/fp32 reference on both backends: merge rule, rounding, reset, safety."""
import math

import pytest
import torch

from plora_kernels import lora_linear, unload_
from plora_kernels.ops import reference

from helpers import DEVICE, overflow_fp16_, triton_runnable

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |v| (fp32 tensor in, fp32 out)."""
    if dtype == torch.float32:
        return torch.full_like(v, 2.0**-23) * v.abs().clamp_min(2.0**-126)
    mant, emin = {torch.float16: (10, -14), torch.bfloat16: (7, -133 + 7)}[dtype]
    e = torch.frexp(v)[1] - 1
    return torch.ldexp(torch.ones_like(v), e.clamp_min(emin) - mant)


def _factors(n_out, n_in, r, w_dtype, f_dtype):
    W = torch.randn(n_out, n_in, device=DEVICE).to(w_dtype)
    A = (torch.randn(r, n_in, device=DEVICE) * 0.3).to(f_dtype)
    B = (torch.randn(n_out, r, device=DEVICE) * 0.3).to(f_dtype)
    return W, A, B


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.3])
def test_nearest_merge_matches_reference(backend, w_dtype, r, momentum):
    f_dtype = torch.float32 if r != 16 else w_dtype  # fp32 adapters (PEFT default) and same-dtype ones
    W, A, B = _factors(77, 129, r, w_dtype, f_dtype)
    s = 2.0 / r
    update = (1 - momentum) * s * (B.double() @ A.double())
    exact = W.double() + update
    W1, A1, B1 = W.clone(), A.clone(), B.clone()
    unload_(W1, A1, B1, s, momentum=momentum, rounding="nearest")
    # one rounding from the exact value: within half an ulp of W's dtype, plus the fp32 arithmetic's
    # error, a few fp32 ulps of the terms (it matters only where W and the update nearly cancel)
    half_ulp = 0.5 * _ulp(exact.float(), w_dtype).double() if w_dtype != torch.float32 else 0.0
    update_mag = (1 - momentum) * s * (B.double().abs() @ A.double().abs())
    fp32_slack = 2.0**-21 * (W.double().abs() + update_mag)
    assert ((W1.double() - exact).abs() <= half_ulp + fp32_slack).all()
    if w_dtype != torch.float32:
        # equal to the reference's fp32 value rounded nearest, but for rare near-ties decided by sum order
        want = reference.unload_value(W, A, B, s, momentum, "nearest")
        assert (W1 != want).float().mean().item() <= 0.01
    if momentum == 0.0:
        assert torch.equal(B1, torch.zeros_like(B1))
        bound = 1 / math.sqrt(129)
        assert A1.abs().max().item() <= bound and not torch.equal(A1, A)
        assert A1.std().item() > bound / 3  # a real uniform draw, not a constant
    else:
        assert torch.equal(A1, A)
        torch.testing.assert_close(B1, B * momentum, rtol=0, atol=0)


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16])
def test_output_preserved_for_momentum(backend, w_dtype):
    W, A, B = _factors(48, 96, 8, w_dtype, torch.float32)
    x = torch.randn(10, 96, device=DEVICE).to(w_dtype)
    before = lora_linear(x, W, A, B, 0.5).double()
    unload_(W, A, B, 0.5, momentum=0.3)
    after = lora_linear(x, W, A, B, 0.5).double()
    ulp = 2.0**-10 if w_dtype == torch.float16 else 2.0**-7
    # only W's rounding changes the output: |x| ~ 1 over 96 inputs, W entries move < 1 ulp each
    assert (after - before).abs().max().item() < 96**0.5 * 4 * ulp * 4


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_is_unbiased_and_on_the_grid(backend, w_dtype):
    W, A, B = _factors(64, 128, 4, w_dtype, torch.float32)
    A.mul_(0.01)  # updates well below one ulp: nearest would erase most of them
    exact = (W.float() + 1.0 * (B.float() @ A.float()))
    n = 48
    total = torch.zeros_like(exact, dtype=torch.float64)
    for seed in range(n):
        W1 = W.clone()
        unload_(W1, A.clone(), B.clone(), 1.0, momentum=0.0, rounding="stochastic",
                generator=torch.Generator(DEVICE).manual_seed(seed))
        lo = exact.to(w_dtype)  # each result is one of the two neighbours of the exact value
        assert ((W1.float() - exact).abs() <= _ulp(exact, w_dtype) * (1 + 1e-6)).all()
        del lo
        total += W1.double()
    bias_in_ulps = ((total / n - exact.double()) / _ulp(exact, w_dtype).double()).mean().item()
    assert abs(bias_in_ulps) < 0.05


def test_stochastic_rounding_is_reproducible(backend):
    W, A, B = _factors(77, 129, 3, torch.bfloat16, torch.float32)
    outs = []
    for seed in (7, 7, 8):
        W1, A1 = W.clone(), A.clone()
        unload_(W1, A1, B.clone(), 1.0, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(seed))
        outs.append((W1, A1))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


def test_many_tiny_merges_nearest_loses_them_stochastic_tracks_fp32(backend):
    """design §1: per-stage updates below half a bf16 ulp vanish under nearest, forever."""
    W0 = (1.0 + torch.rand(32, 64, device=DEVICE)).to(torch.bfloat16)  # |W| in [1, 2): ulp 2**-7
    A = torch.full((1, 64), 1.0, device=DEVICE)
    B = torch.full((32, 1), 2.0**-10, device=DEVICE)  # each merge adds 2**-10 = 1/8 ulp
    stages = 64
    W_near, W_sto = W0.clone(), W0.clone()
    gen = torch.Generator(DEVICE).manual_seed(0)
    for _ in range(stages):
        unload_(W_near, A.clone(), B.clone(), 1.0, momentum=0.0, rounding="nearest")
        unload_(W_sto, A.clone(), B.clone(), 1.0, momentum=0.0, rounding="stochastic", generator=gen)
    fp32_total = W0.float() + stages * 2.0**-10
    assert torch.equal(W_near, W0)  # every update rounded away
    drift = (W_sto.float() - fp32_total).mean().item()
    assert abs(drift) < 2.0**-7 * 0.1  # mean drift over 2048 entries: well under a tenth of an ulp


@pytest.mark.parametrize("what", ["nan_A", "inf_B", "overflow", "nan_in_W"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_failed_unload_leaves_everything_bit_identical(backend, what, rounding):
    W, A, B = _factors(40, 70, 4, torch.float16, torch.float32)
    if what == "nan_A":
        A[1, 3] = float("nan")
    elif what == "inf_B":
        B[5, 0] = float("inf")
    elif what == "overflow":
        overflow_fp16_(W, A, B)
    else:
        W[0, 0] = float("nan")
    saved = [t.clone() for t in (W, A, B)]
    with pytest.raises(ValueError, match="left unchanged"):
        unload_(W, A, B, 1.0, rounding=rounding, generator=torch.Generator(DEVICE).manual_seed(0))
    for got, want in zip((W, A, B), saved):
        assert torch.equal(got.view(torch.int16) if got.dtype == torch.float16 else got.view(torch.int32),
                           want.view(torch.int16) if want.dtype == torch.float16 else want.view(torch.int32))


def test_large_but_safe_values_pass_the_exact_check(backend):
    """Near the fp16 limit the cheap bound cannot clear the merge; the exact check must let it through."""
    W, A, B = _factors(16, 32, 2, torch.float16, torch.float32)
    W[3, 3] = 65000.0
    A.mul_(1e-3)
    B.mul_(1e-3)
    big = W[3, 3].item()  # 64992, the fp16 value nearest 65000; one ulp there is 32
    unload_(W, A, B, 1.0)
    assert torch.isfinite(W).all() and W[3, 3].item() == big


def test_non_contiguous_weight(backend):
    base = torch.randn(129, 77, device=DEVICE).to(torch.bfloat16)
    W = base.t()  # (77, 129) with column-major strides
    A = torch.randn(3, 129, device=DEVICE)
    B = torch.randn(77, 3, device=DEVICE)
    want = reference.unload_value(W, A, B, 0.5, 0.2, "nearest")
    unload_(W, A, B, 0.5, momentum=0.2)
    assert (W != want).float().mean().item() <= 0.01


def test_triton_path_allocates_no_weight_sized_tensor(monkeypatch):
    """No torch op during a kernel-path unload makes anything bigger than a factor (r x in, out x r)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    W, A, B = _factors(256, 384, 16, torch.bfloat16, torch.float32)

    class Sizes(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not any(t is a for a in args):
                    Sizes.biggest = max(Sizes.biggest, t.numel())
            return out

    for _ in range(2):  # first call measures max|W|, the second uses the cached value
        with Sizes():
            unload_(W, A, B, 1.0, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(0))
        assert Sizes.biggest <= max(A.numel(), B.numel()) < W.numel() // 8  # factor-sized at most


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(momentum=-0.1), r"momentum must be in \[0, 1\)"),
    (dict(rounding="up"), r"rounding must be one of"),
    (dict(lora_A=torch.randn(3, 11)), r"lora_A must have shape \(r, 12\)"),
    (dict(lora_B=torch.randn(8, 2)), r"lora_B must have shape \(8, 3\)"),
    (dict(weight=torch.randn(8, 12, 1)), r"weight must be 2-D"),
    (dict(scaling=float("inf")), r"scaling must be finite"),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(weight=torch.randn(8, 12), lora_A=torch.randn(3, 12), lora_B=torch.randn(8, 3), scaling=1.0)
    args.update(kwargs)
    saved = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    extra = {k: args.pop(k) for k in ("momentum", "rounding") if k in args}
    with pytest.raises((ValueError, TypeError), match=match):
        unload_(**args, **extra)
    for k, v in saved.items():
        assert torch.equal(args[k], v)


# --- the guard cannot be bypassed: no cached bound, every merged value is checked before the first write ------

def _assert_unchanged(tensors, saved):
    for got, want in zip(tensors, saved):
        assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.parametrize("how", ["data", "shared_storage", "tied"])
def test_writes_the_version_counter_misses_are_still_caught(backend, how):
    """Writes through .data, through the nn.Linear whose storage from_linear shares, or through a tied weight
    do not bump W._version; an unload after them must still refuse to write inf, and change nothing."""
    from plora_kernels import PLoRALinear

    linear = torch.nn.Linear(70, 40, device=DEVICE, dtype=torch.float16)
    layer = PLoRALinear.from_linear(linear, r=4, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.unload_(torch.Generator(DEVICE).manual_seed(0))  # a first, clean unload (a cache would be warm now)
    W, A, B = layer.weight, layer.lora_A, layer.lora_B
    with torch.no_grad():
        B.fill_(0.0)
        B[7].fill_(30.0)
        A[:, 9].fill_(30.0)  # 4 * 30 * 30 = 3600 added to W[7, 9]
        if how == "data":
            W.data[7, 9] = 65000.0
        elif how == "shared_storage":
            linear.weight[7, 9] = 65000.0
        else:
            tied = torch.nn.Linear(70, 40, device=DEVICE, dtype=torch.float16)
            tied.weight = torch.nn.Parameter(W.data)  # another module holding the same storage
            tied.weight.data[7, 9] = 65000.0
    assert W[7, 9].item() == 64992.0  # the fp16 value nearest 65000, written behind the version counter
    saved = [t.detach().clone() for t in (W, A, B)]
    with pytest.raises(ValueError, match="left unchanged"):
        layer.unload_(torch.Generator(DEVICE).manual_seed(1))
    _assert_unchanged((W, A, B), saved)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_fp32_product_overflow_is_refused(backend, w_dtype):
    """Finite factors whose product overflows fp32 inside the kernel: B A = 2 * 1e20 * 1e20 = inf in fp32."""
    W = torch.randn(24, 40, device=DEVICE).to(w_dtype)
    A = torch.randn(2, 40, device=DEVICE) * 1e-3
    B = torch.randn(24, 2, device=DEVICE) * 1e-3
    A[:, 5] = 1e20
    B[3, :] = 1e20
    saved = [t.clone() for t in (W, A, B)]
    with pytest.raises(ValueError, match="non-finite value into the"):
        unload_(W, A, B, 1.0, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(0))
    _assert_unchanged((W, A, B), saved)


def test_a_finite_merge_right_below_the_limit_is_never_refused(backend):
    """The check is exact, not a bound: the largest finite fp16 value plus a tiny update merges."""
    W = torch.randn(16, 32, device=DEVICE).to(torch.float16)
    W[2, 3] = 65504.0
    A = torch.randn(4, 32, device=DEVICE) * 1e-2
    B = torch.randn(16, 4, device=DEVICE) * 1e-2
    unload_(W, A, B, 1.0, rounding="nearest")
    assert torch.isfinite(W).all() and W[2, 3].item() == 65504.0


def test_fp64_weight_is_merged_in_fp64(backend):
    W = torch.randn(33, 65, device=DEVICE, dtype=torch.float64)
    A = torch.randn(5, 65, device=DEVICE, dtype=torch.float64)
    B = torch.randn(33, 5, device=DEVICE, dtype=torch.float64)
    exact = W + 0.7 * 0.4 * (B @ A)
    unload_(W, A.clone(), B.clone(), 0.4, momentum=0.3)
    assert W.dtype == torch.float64
    assert ((W - exact).abs() <= 1e-14 * (exact.abs() + 1)).all()  # fp32 math would leave ~1e-7


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp64_factors_on_a_lower_precision_weight(backend, w_dtype):
    W, A, B = _factors(20, 36, 3, w_dtype, torch.float64)
    want = reference.unload_value(W, A, B, 0.5, 0.0, "nearest")
    unload_(W, A, B, 0.5)
    assert torch.equal(W, want)


def test_reference_and_kernel_draw_the_same_numbers(monkeypatch):
    """The same generator state gives the same W (stochastic) and the same fresh A on every backend."""
    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    W, A, B = _factors(37, 72, 5, torch.bfloat16, torch.float32)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PLORA_BACKEND", backend)
        W1, A1, B1 = W.clone(), A.clone(), B.clone()
        unload_(W1, A1, B1, 0.5, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(3))
        out[backend] = (W1, A1)
    assert torch.equal(out["torch"][0], out["triton"][0]) and torch.equal(out["torch"][1], out["triton"][1])
