"""unload_many_ (and unload_all_ / PeriodicUnloader on top of it): the same result as per-layer unload_ calls,
one host read for any number of layers on the kernel path, and no layer changed by an error there."""
import pytest
import torch

from plora_kernels import unload_
from plora_kernels.ops.unload import UnloadSpec, unload_many_

from helpers import DEVICE, overflow_fp16_, triton_runnable

# (out, in, r, W dtype, factor dtype, momentum, rounding): odd shapes, every dtype, both roundings, an empty W
LAYERS = [
    (77, 129, 3, torch.bfloat16, torch.float32, 0.0, "stochastic"),
    (64, 48, 16, torch.float16, torch.float16, 0.3, "nearest"),
    (33, 65, 1, torch.float32, torch.float32, 0.0, "nearest"),
    (0, 40, 2, torch.bfloat16, torch.float32, 0.0, "stochastic"),
    (50, 31, 8, torch.float16, torch.float32, 0.1, "stochastic"),
]


def _layers(layers=LAYERS):
    out = []
    for n_out, n_in, r, w_dtype, f_dtype, m, rounding in layers:
        W = torch.randn(n_out, n_in, device=DEVICE).to(w_dtype)
        A = (torch.randn(r, n_in, device=DEVICE) * 0.3).to(f_dtype)
        B = (torch.randn(n_out, r, device=DEVICE) * 0.3).to(f_dtype)
        out.append((W, A, B, 2.0 / r, m, rounding))
    return out


def _gens(n, base=0):
    return [torch.Generator(DEVICE).manual_seed(base + i) for i in range(n)]


def _bits(t):
    return t.contiguous().view(torch.uint8).clone()


def _specs(layers, gens):
    return [UnloadSpec(W, A, B, s, m, rnd, g, label=f"layer{i}") for i, ((W, A, B, s, m, rnd), g)
            in enumerate(zip(layers, gens))]


def test_matches_per_layer_unloads_bit_for_bit(backend):
    layers = _layers()
    twins = [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in layer) for layer in layers]
    for _ in range(2):
        unload_many_(_specs(layers, _gens(len(layers))))
        for (W, A, B, s, m, rnd), g in zip(twins, _gens(len(twins))):
            unload_(W, A, B, s, momentum=m, rounding=rnd, generator=g)
        for got, want in zip(layers, twins):
            for x, y in zip(got[:3], want[:3]):
                assert torch.equal(_bits(x), _bits(y))


def _count_host_reads(monkeypatch):
    """Counts every way a tensor's value can reach Python (each is a device sync on a GPU)."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _count_launches(monkeypatch):
    """Counts Triton kernel launches of the unload module and torch ops (each a launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from plora_kernels.ops.triton import unload as tu

    counts = {"triton": 0, "torch": 0, "inside": False}

    class Launches:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counts["triton"] += 1
                counts["inside"] = True  # the interpreter's own tensor copies are not the unload's ops
                try:
                    return self.fn[grid](*args, **kwargs)
                finally:
                    counts["inside"] = False
            return launch

        def __getattr__(self, name):
            return getattr(self.fn, name)

    for name in ("_merge_kernel", "_init_kernel"):
        monkeypatch.setattr(tu, name, Launches(getattr(tu, name)))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not counts["inside"]:
                counts["torch"] += 1
                counts.setdefault("ops", []).append(str(func))
            return func(*args, **(kwargs or {}))

    return counts, Ops


@pytest.mark.parametrize("n_layers", [10, 100])
def test_a_model_unload_is_a_few_launches_and_one_host_read(monkeypatch, n_layers):
    """However many layers: one host read (the check pass's flag), three Triton launches (check, write, the
    fresh A's) and a fixed number of small torch ops (tables, the flag, B's multi-tensor reset)."""
    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    layers = _layers([(8, 16, 4, torch.bfloat16, torch.float32, 0.0, "stochastic")] * n_layers)
    specs = [UnloadSpec(W, A, B, s, m, rnd, label=f"layer{i}", seed=1000 + i)
             for i, (W, A, B, s, m, rnd) in enumerate(layers)]  # host seeds, as PeriodicUnloader passes
    counts, Ops = _count_launches(monkeypatch)
    reads = _count_host_reads(monkeypatch)
    with Ops():
        unload_many_(specs)
    assert reads["n"] == 1
    assert counts["triton"] == 3
    # 16 at 10 and at 100 layers: per launch group a table, tile starts and coefficients lifted from host
    # lists, the flag, the flags' concatenation, the fresh A's tables, B's multi-tensor zeroing
    assert counts["torch"] <= 16, counts["ops"]


@pytest.mark.parametrize("what", ["overflow", "nan_B"])
def test_an_error_in_one_layer_changes_no_layer(monkeypatch, what):
    if not triton_runnable():
        pytest.skip("Triton is not runnable here")
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    layers = _layers([(40, 70, 4, torch.float16, torch.float32, 0.0, "stochastic")] * 4)
    W, A, B = layers[2][:3]
    if what == "overflow":
        overflow_fp16_(W, A, B)
    else:
        B[3, 1] = float("nan")
    saved = [[_bits(t) for t in layer[:3]] for layer in layers]
    with pytest.raises(ValueError, match=r"unload_ \(layer2\).*left unchanged"):
        unload_many_(_specs(layers, _gens(4)))
    for layer, before in zip(layers, saved):
        for t, b in zip(layer[:3], before):
            assert torch.equal(_bits(t), b)


def test_bad_spec_is_named():
    W, A, B = torch.randn(8, 12), torch.randn(3, 12), torch.randn(8, 3)
    with pytest.raises(TypeError, match=r"specs\[1\] must be an UnloadSpec"):
        unload_many_([UnloadSpec(W, A, B, 1.0), (W, A, B, 1.0)])
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        unload_many_([UnloadSpec(W, A, B, 1.0, momentum=1.5)])


def test_layers_sharing_one_weight_merge_in_turn(backend):
    """Tied weights: the second layer's merge applies to (and is checked against) the first one's result."""
    W = torch.randn(40, 64, device=DEVICE).to(torch.float16)
    factors = [((torch.randn(4, 64, device=DEVICE) * 0.2), (torch.randn(40, 4, device=DEVICE) * 0.2))
               for _ in range(2)]
    twin = W.clone()
    unload_many_([UnloadSpec(W, A.clone(), B.clone(), 0.5, 0.2) for A, B in factors])
    for A, B in factors:
        unload_(twin, A.clone(), B.clone(), 0.5, momentum=0.2)
    assert torch.equal(_bits(W), _bits(twin))
    # 60000 + 3000 fits fp16 and + 3000 again does not: only the second merge overflows, and it is caught
    W.fill_(60000.0)
    ones_A, ones_B = torch.ones(1, 64, device=DEVICE), torch.full((40, 1), 3000.0, device=DEVICE)
    with pytest.raises(ValueError, match="left unchanged"):
        unload_many_([UnloadSpec(W, ones_A.clone(), ones_B.clone(), 1.0), UnloadSpec(W, ones_A.clone(),
                                                                                    ones_B.clone(), 1.0)])
    assert torch.isfinite(W).all()
