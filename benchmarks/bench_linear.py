"""Smoke benchmarks of lora_linear and its contenders (see plora_kernels.bench.linear for the full run)."""
import os

import pytest
import torch

from plora_kernels.bench.linear import CONTENDERS, build_case

CPU_SHAPE = (64, 128, 256, 8)          # M, in, out, r: milliseconds on the reference path
GPU_SHAPE = (8192, 4096, 4096, 16)     # the DESIGN target
MODES = ("fwd", "fwd+bwd")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_synced(fn):
    """Each call waits for the GPU: pytest-benchmark times wall clock."""
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


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


@pytest.mark.skipif(not interpreting, reason="set TRITON_INTERPRET=1 to run the Triton kernels on CPU")
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
