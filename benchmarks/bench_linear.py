"""Smoke benchmarks of lora_linear and its contenders (see plora_kernels.bench.linear for the full run): the cuBLAS
floor, PEFT's unfused layer, every resolver implementation of lora_linear (each under
``plora_kernels.implementation(lora_linear=name)``) and the default, with fp32 adapters (PEFT's default) and
adapters in x's dtype. An implementation the resolver refuses here (Triton on CPU tensors without
TRITON_INTERPRET=1, say) is skipped with its reason."""
import pytest
import torch
from smoke_common import cuda_synced, needs_cuda

from plora_kernels.bench.linear import MODES, build_case, contenders

CPU_SHAPE = (64, 128, 256, 8)          # M, in, out, r: milliseconds on the reference path
GPU_SHAPE = (8192, 4096, 4096, 16)     # the target of docs/design.md §5
ADAPTERS = {"fp32 A,B": torch.float32, "bf16 A,B": torch.bfloat16}


def _case(shape, device, adapter_dtype, contender):
    skipped = {}
    fns = build_case(*shape, torch.bfloat16, device, adapter_dtype, skipped=skipped)
    if contender in skipped:
        pytest.skip(skipped[contender])
    return fns


@pytest.mark.parametrize("adapters", list(ADAPTERS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", list(contenders()))
def test_linear_cpu(benchmark, contender, mode, adapters):
    fns = _case(CPU_SHAPE, "cpu", ADAPTERS[adapters], contender)
    benchmark.group = f"linear-cpu-{mode}-{adapters}"
    out = benchmark(fns[mode][contender])
    assert out is not None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("adapters", list(ADAPTERS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", list(contenders()))
def test_linear_gpu(benchmark, contender, mode, adapters):
    fns = _case(GPU_SHAPE, "cuda", ADAPTERS[adapters], contender)
    run = cuda_synced(fns[mode][contender])
    run()  # compile/autotune outside the measurement
    benchmark.group = f"linear-gpu-{mode}-{adapters}"
    benchmark(run)
