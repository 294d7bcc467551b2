"""LoRA dropout at no memory cost: dropout on the adapter's input, its mask regenerated from a seed (ops.streams)
wherever it is needed, never stored; the same mask from the reference and the Triton kernels."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from plora_kernels import lora_linear
from plora_kernels.ops import reference, streams

from helpers import DEVICE, poison_, triton_runnable


def _tensors(M=37, n_in=72, n_out=24, r=3, dtype=torch.float32):
    x = torch.randn(M, n_in, device=DEVICE, dtype=dtype, requires_grad=True)
    W = torch.randn(n_out, n_in, device=DEVICE, dtype=dtype) / n_in**0.5
    A = (torch.randn(r, n_in, device=DEVICE) * 0.3).requires_grad_()
    B = (torch.randn(n_out, r, device=DEVICE) * 0.3).requires_grad_()
    return x, W, A, B


def _seed_after(manual):
    """The seed lora_linear draws right after torch.manual_seed(manual) (the CPU default generator)."""
    torch.manual_seed(manual)
    return streams.draw_seed(None if DEVICE == "cpu" else torch.cuda.default_generators[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gradients_match_an_explicit_mask_in_float64(backend, p):
    x, W, A, B = _tensors()
    b = torch.randn(24, device=DEVICE)
    seed = _seed_after(11)
    torch.manual_seed(11)
    y = lora_linear(x, W, A, B, 0.7, b, lora_dropout=p)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = streams.dropout_keep(seed, torch.arange(37, device=DEVICE), torch.arange(72, device=DEVICE), p)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    xd = x64 * keep.double() / (1 - p)
    y64 = x64 @ W.double().T + b.double() + 0.7 * (xd @ A64.T) @ B64.T
    y64.backward(dy.double())
    for got, want in ((y, y64), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-5


def test_keep_rate_and_unbiased_expectation():
    """Keep rate 1 - p within 6 standard deviations over 2**17 draws; the mean of dropout(x) over 200 seeds within
    6 standard errors of x (the threshold rounds 1 - p to 2**-24, a bias far below these tolerances)."""
    p = 0.1
    n_rows, n_cols = 256, 512
    keep = streams.dropout_keep(12345, torch.arange(n_rows), torch.arange(n_cols), p)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5
    x = torch.randn(8, 64, dtype=torch.float64)
    seeds = 200
    mean = sum(reference.dropped(x, p, s) for s in range(seeds)) / seeds
    sd = x.abs() * (p / (1 - p)) ** 0.5 / seeds**0.5  # per element: x * keep/(1-p) has sd |x| sqrt(p/(1-p))
    assert ((mean - x).abs() <= 6 * sd + 1e-12).all()


@pytest.mark.parametrize("where", [1, 2, 3])
def test_triton_kernels_draw_the_reference_mask_bit_for_bit(where):
    """Each place the Triton GEMM applies the mask (on operand a, on operand b, on the low-rank term) reproduces
    reference.dropped exactly: multiplying by an identity (or a K = 0 product) leaves only the masked values."""
    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    from plora_kernels.ops.triton.lora_matmul import lora_matmul

    p, seed = 0.3, 2**40 + 17
    x = torch.randn(70, 133, device=DEVICE)
    want = reference.dropped(x, p, seed)
    if where == 1:  # x @ I, the mask on a = x
        got = lora_matmul(x, torch.eye(133, device=DEVICE), out=poison_(torch.empty(70, 133, device=DEVICE)),
                          dropout=(1, p, seed))
    elif where == 2:  # I @ x, the mask on b = x
        got = lora_matmul(torch.eye(70, device=DEVICE), x, out=poison_(torch.empty(70, 133, device=DEVICE)),
                          dropout=(2, p, seed))
    else:  # no K loop: the low-rank term x @ I alone
        got = lora_matmul(torch.empty(70, 0, device=DEVICE), torch.empty(0, 133, device=DEVICE), lora_act=x,
                          lora_up=torch.eye(133, device=DEVICE), out=poison_(torch.empty(70, 133, device=DEVICE)),
                          dropout=(3, p, seed))
    assert torch.equal(got, want)


def test_the_backward_saves_nothing_larger_than_without_dropout():
    """Saved tensors, counted by saved_tensors_hooks: the same with and without dropout (x, xa, W, A, B and the 0-d
    seed, which p = 0 saves too), so nothing M x in but x."""
    def saved_shapes(p):
        shapes = []
        x, W, A, B = _tensors()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            lora_linear(x, W, A, B, 0.5, lora_dropout=p).sum().backward()
        return sorted(shapes)

    plain, dropped = saved_shapes(0.0), saved_shapes(0.05)
    assert dropped == plain
    assert sum(s == (37, 72) for s in dropped) == 1  # x itself, once


def test_p_zero_is_the_plain_op_and_draws_nothing(backend):
    x, W, A, B = _tensors()
    torch.manual_seed(3)
    y0 = lora_linear(x, W, A, B, 0.5)
    after_plain = torch.get_rng_state()
    torch.manual_seed(3)
    y1 = lora_linear(x, W, A, B, 0.5, lora_dropout=0.0)
    assert torch.equal(y0, y1) and torch.equal(torch.get_rng_state(), after_plain)


def test_manual_seed_and_checkpointing_reproduce_the_mask(backend):
    x, W, A, B = _tensors()
    grads = []
    for use_checkpoint in (False, True):
        for t in (x, A, B):
            t.grad = None
        torch.manual_seed(5)
        if use_checkpoint:  # re-runs the forward in the backward, with the RNG state it saved
            y = checkpoint(lora_linear, x, W, A, B, 0.5, None, 0.2, use_reentrant=False)
        else:
            y = lora_linear(x, W, A, B, 0.5, lora_dropout=0.2)
        y.square().sum().backward()
        grads.append([t.grad.clone() for t in (x, A, B)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_compiles_without_graph_breaks():
    x, W, A, B = _tensors()
    fn = torch.compile(lambda *t: lora_linear(*t, 0.5, lora_dropout=0.1), backend="eager", fullgraph=True)
    torch.manual_seed(9)
    got = fn(x, W, A, B)
    torch.manual_seed(9)
    want = lora_linear(x, W, A, B, 0.5, lora_dropout=0.1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad,exc", [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_dropout_names_the_argument(bad, exc):
    x, W, A, B = _tensors()
    with pytest.raises(exc, match="lora_dropout"):
        lora_linear(x, W, A, B, 0.5, lora_dropout=bad)


def test_plora_linear_drops_in_training_mode_only(backend):
    from plora_kernels import PLoRALinear, apply_plora

    layer = PLoRALinear(72, 24, r=3, alpha=6, lora_dropout=0.25, device=DEVICE)
    plain = PLoRALinear(72, 24, r=3, alpha=6, device=DEVICE)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        b = torch.randn(24, 3)
        for m in (layer, plain):
            m.lora_B.copy_(b)
    x = torch.randn(5, 72, device=DEVICE)
    layer.eval()
    plain.eval()
    assert torch.equal(layer(x), plain(x))  # eval: exactly the plain op
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    want = lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias, lora_dropout=0.25)
    assert torch.equal(y, want) and not torch.equal(y, plain(x))
    model = apply_plora(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, lora_dropout=0.1)
    assert model[0].lora_dropout == 0.1 and "lora_dropout=0.1" in repr(model)
