"""Smoke benchmarks of unload_, its passes and its contenders (see plora_kernels.bench.unload for the full run)."""
import pytest
import torch
from smoke_common import cuda_synced, needs_cuda, needs_interpreter

from plora_kernels.bench.unload import (
    CONTENDERS,
    MODEL_MOMENTA,
    contender_fns,
    make_tensors,
    model_specs,
    model_tensors,
)

CPU_SHAPE = (256, 512, 16)       # out, in, r
INTERPRETER_SHAPE = (32, 64, 16)  # one tile: the interpreter's cost is per program
GPU_SHAPE = (8192, 8192, 16)     # the target of docs/design.md §5
CPU_CONTENDERS = ("peft", "peft safe_merge", "addmm-fp32", "unload_ nearest", "unload_ stochastic")
TRITON_PASSES = tuple(c for c in CONTENDERS if c.startswith("triton "))
GPU_CONTENDERS = tuple(c for c in CONTENDERS if c != "copy")


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


@pytest.mark.parametrize("momentum", MODEL_MOMENTA)
def test_model_unload_cpu(benchmark, momentum, monkeypatch):
    """unload_many_ over the layers of a micro model (the GPU run merges the 1b config's 112 layers)."""
    monkeypatch.setenv("PLORA_BACKEND", "torch")
    from plora_kernels.ops.unload import unload_many_

    layers, tensors = model_tensors("micro", torch.bfloat16, "cpu")
    specs = model_specs(layers, tensors, momentum)
    benchmark.group = "unload-model-cpu"
    benchmark(lambda: unload_many_(specs))
    assert all(torch.isfinite(w.float()).all() for w, _, _ in tensors)


@needs_interpreter
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_unload_cpu_triton_interpreter(benchmark, rounding, monkeypatch):
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    from plora_kernels import unload_

    weight, lora_A, lora_B = make_tensors(*INTERPRETER_SHAPE, torch.bfloat16, torch.float32, "cpu")
    benchmark.group = "unload-interpreter"
    benchmark(lambda: unload_(weight, lora_A, lora_B, 2.0, momentum=0.999, rounding=rounding))
    assert torch.isfinite(weight.float()).all()


@needs_interpreter
@pytest.mark.parametrize("contender", TRITON_PASSES)
def test_merge_pass_cpu_triton_interpreter(benchmark, contender):
    weight, lora_A, lora_B = make_tensors(*INTERPRETER_SHAPE, torch.bfloat16, torch.float32, "cpu")
    fns = contender_fns(weight, lora_A, lora_B)
    benchmark.group = "unload-interpreter"
    benchmark(fns[contender])
    assert torch.isfinite(weight.float()).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32], ids=["bf16-factors", "fp32-factors"])
@pytest.mark.parametrize("contender", ("copy",) + GPU_CONTENDERS)
def test_unload_gpu(benchmark, contender, factor_dtype):
    weight, lora_A, lora_B = make_tensors(*GPU_SHAPE, torch.bfloat16, factor_dtype, "cuda")
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


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("momentum", MODEL_MOMENTA)
def test_model_unload_gpu(benchmark, momentum):
    """unload_many_ over the 112 targeted layers of the 1b config (bf16 W, fp32 factors, r=16, stochastic)."""
    from plora_kernels.ops.unload import unload_many_

    layers, tensors = model_tensors("1b", torch.bfloat16, "cuda")
    run = cuda_synced(lambda: unload_many_(model_specs(layers, tensors, momentum)))
    run()
    benchmark.group = "unload-model-gpu"
    benchmark(run)
