"""Smoke benchmarks of lora_linear and its contenders (see plora_kernels.bench.linear for the full run)."""
import pytest
import torch
from smoke_common import cuda_synced, needs_cuda, needs_interpreter

from plora_kernels.bench.linear import CONTENDERS, build_case

CPU_SHAPE = (64, 128, 256, 8)          # M, in, out, r: milliseconds on the reference path
GPU_SHAPE = (8192, 4096, 4096, 16)     # the DESIGN target
MODES = ("fwd", "fwd+bwd")


def _call(fns, mode, name):
    fn = fns[mode][name]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn()
        return run
    return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_linear_cpu(benchmark, contender, mode, monkeypatch):
    monkeypatch.setenv("PLORA_BACKEND", "torch")  # the reference path, whatever the environment says
    fns = build_case(*CPU_SHAPE, torch.bfloat16, "cpu")
    benchmark.group = f"linear-cpu-{mode}"
    out = benchmark(_call(fns, mode, contender))
    assert out is not None


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
def test_linear_cpu_triton_interpreter(benchmark, mode, monkeypatch):
    monkeypatch.setenv("PLORA_BACKEND", "triton")
    fns = build_case(*CPU_SHAPE, torch.float32, "cpu")  # the interpreter's bf16 is not trustworthy
    benchmark.group = f"linear-interpreter-{mode}"
    benchmark(_call(fns, mode, "ours"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_linear_gpu(benchmark, contender, mode):
    fns = build_case(*GPU_SHAPE, torch.bfloat16, "cuda")
    run = cuda_synced(_call(fns, mode, contender))
    run()  # compile/autotune outside the measurement
    benchmark.group = f"linear-gpu-{mode}"
    benchmark(run)
