"""Every Triton launch happens inside ``tiles.on_device`` of its tensors' device.

Triton launches on the CURRENT device and stream, not the tensors': with W on cuda:1 while cuda:0 is current (a
``device_map="auto"`` model) an unguarded launch addresses cuda:1's memory from cuda:0, and a table copied on one
device's stream can be read by a kernel on another. A CPU machine has no second GPU, so the proof has two halves:
(1) with the guard replaced by a recorder, every kernel launch of every op and implementation (run on CPU tensors
under the interpreter) happens inside a guard entered for the launch's tensors' device; (2) the guard for a CUDA
device enters ``torch.cuda.device`` of that device (faked here), which sets the current device and so the
current stream Triton uses.
"""
import contextlib

import pytest
import torch

import plora_kernels as pk

from helpers import DEVICE, triton_runnable

pytestmark = pytest.mark.skipif(not triton_runnable(), reason="Triton is not runnable here")


@pytest.fixture
def launches(monkeypatch):
    """[(kernel name, the guards' devices entered at launch)] for every Triton launch in the test."""
    from plora_kernels.ops.triton import lora_dy_pass, lora_matmul, lora_matmul_ws, unload

    entered, seen = [], []

    @contextlib.contextmanager
    def recorder(device):
        entered.append(torch.device(device))
        try:
            yield
        finally:
            entered.pop()

    for module in (lora_matmul, lora_matmul_ws, lora_dy_pass, unload):
        monkeypatch.setattr(module, "on_device", recorder)
    kernels = {"_lora_matmul_kernel": lora_matmul._lora_matmul_kernel, "_merge_kernel": unload._merge_kernel,
               "_init_kernel": unload._init_kernel, "_lora_dy_pass_kernel": lora_dy_pass._lora_dy_pass_kernel,
               "_lora_matmul_ws_kernel": lora_matmul_ws._lora_matmul_ws_kernel}
    from plora_kernels.ops.triton import lora_matmul_tma

    kernels["_lora_matmul_tma_kernel"] = lora_matmul_tma._lora_matmul_tma_kernel
    for name, kernel in kernels.items():
        fn = getattr(kernel, "fn", None) if hasattr(kernel, "configs") else kernel  # the autotuner's function
        target = fn if fn is not None else kernel
        original = target.run

        def run(*args, _name=name, _original=original, **kwargs):
            seen.append((_name, list(entered)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(target, "run", run)
    return seen


@pytest.mark.parametrize("impl", ["triton", "triton-tma", "triton-ws"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_every_linear_launch_is_guarded(launches, impl, dropout):
    x = torch.randn(70, 128, device=DEVICE, requires_grad=True)
    W = torch.randn(96, 128, device=DEVICE) / 128**0.5
    A = (torch.randn(16, 128, device=DEVICE) / 128**0.5).requires_grad_()
    B = torch.randn(96, 16, device=DEVICE).requires_grad_()
    with pk.implementation(lora_linear=impl):
        pk.lora_linear(x, W, A, B, 0.5, lora_dropout=dropout).sum().backward()
    names = {name for name, _ in launches}
    assert {"_lora_matmul_kernel", "_lora_dy_pass_kernel"} <= names, names
    if impl == "triton-ws" and not dropout:
        assert "_lora_matmul_ws_kernel" in names, names
    if impl == "triton-tma" and not dropout:
        assert "_lora_matmul_tma_kernel" in names, names
    assert all(stack == [x.device] for _, stack in launches), launches


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_every_unload_launch_is_guarded(launches, rounding):
    W = torch.randn(64, 96, device=DEVICE).to(torch.bfloat16)
    A = torch.randn(16, 96, device=DEVICE)
    B = torch.randn(64, 16, device=DEVICE)
    with pk.implementation(unload="triton"):
        pk.unload_(W, A, B, 0.5, rounding=rounding)  # quick check, writing pass, fresh lora_A
        W[7, 9] = 3.3e38  # a merge past bf16's largest finite: the exact check runs, then the refusal
        B[7].fill_(1e37)
        A[:, 9].fill_(1.0)
        with pytest.raises(ValueError, match="non-finite"):
            pk.unload_(W, A, B, 1.0, rounding=rounding)
    names = [name for name, _ in launches]
    assert names.count("_merge_kernel") >= 4 and "_init_kernel" in names, names
    assert all(stack == [W.device] for _, stack in launches), launches


def test_the_guard_enters_the_tensors_cuda_device(monkeypatch):
    """on_device(cuda:1) is torch.cuda.device(cuda:1): it makes cuda:1 current (and its stream the current one)
    for the block, whatever device was current before; a CPU device enters nothing."""
    from plora_kernels.ops.triton import tiles

    current = [0]

    class FakeDevice:  # torch.cuda.device's contract: set the current device, restore it on exit
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with tiles.on_device(torch.device("cuda", 1)):
        assert current[0] == 1
    assert current[0] == 0
    with tiles.on_device(torch.device("cpu")):
        assert current[0] == 0
