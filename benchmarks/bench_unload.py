"""Smoke benchmarks of unload_ and its contenders (see plora_kernels.bench.unload for the full run)."""
import pytest
import torch
from smoke_common import cuda_synced, needs_cuda, needs_interpreter

from plora_kernels.bench.unload import contender_fns, make_tensors

CPU_SHAPE = (256, 512, 16)       # out, in, r
GPU_SHAPE = (8192, 8192, 16)     # the DESIGN target
CPU_CONTENDERS = ("peft", "addmm-fp32", "unload_ nearest", "unload_ stochastic")
GPU_CONTENDERS = CPU_CONTENDERS + ("merge_ nearest", "merge_ stochastic", "cuda nearest", "cuda stochastic")


@pytest.mark.parametrize("contender", CPU_CONTENDERS)
def test_unload_cpu(benchmark, contender, monkeypatch):
    monkeypatch.setenv("PLORA_BACKEND", "torch")
    weight, lora_A, lora_B = make_tensors(*CPU_SHAPE, torch.bfloat16, torch.bfloat16, "cpu")
    fns = contender_fns(weight, lora_A, lora_B)
    benchmark.group = "unload-cpu"
    benchmark(fns[contender])
    assert torch.isfinite(weight.float()).all()


def test_copy_cpu(benchmark):
    weight, _, _ = make_tensors(*CPU_SHAPE, torch.bfloat16, torch.bfloat16, "cpu")
    dst = torch.empty_like(weight)
    benchmark.group = "unload-cpu"
    benchmark(lambda: dst.copy_(weight))


@needs_interpreter
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_unload_cpu_triton_interpreter(benchmark, rounding, monkeypatch):
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    from plora_kernels import unload_

    weight, lora_A, lora_B = make_tensors(*CPU_SHAPE, torch.bfloat16, torch.float32, "cpu")
    benchmark.group = "unload-interpreter"
    benchmark(lambda: unload_(weight, lora_A, lora_B, 2.0, momentum=0.999, rounding=rounding))
    assert torch.isfinite(weight.float()).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("contender", ("copy",) + GPU_CONTENDERS)
def test_unload_gpu(benchmark, contender):
    weight, lora_A, lora_B = make_tensors(*GPU_SHAPE, torch.bfloat16, torch.bfloat16, "cuda")
    if contender == "copy":
        dst = torch.empty_like(weight)
        fn = lambda: dst.copy_(weight)  # noqa: E731
    else:
        skip = {}
        fns = contender_fns(weight, lora_A, lora_B, skip)
        if contender in skip:
            pytest.skip(skip[contender])
        fn = fns[contender]
    run = cuda_synced(fn)
    run()
    benchmark.group = "unload-gpu"
    benchmark(run)
    assert torch.isfinite(weight.float()).all()
