"""What the tests share besides fixtures: the device, tolerances, error measures and input makers.

``from helpers import ...`` works in every test module: pytest puts this folder on ``sys.path`` (it holds the
conftest.py and no ``__init__.py``). conftest.py sets TRITON_INTERPRET before any kernel module is imported, so
nothing here imports one at module level."""
import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# lora_linear tolerances, max |err| / max |ref| per output. fp16 keeps 11 bits; bf16 keeps 8, and under the
# interpreter every fp32->bf16 store truncates instead of rounding, hence the loose bf16 bound.
LINEAR_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def triton_runnable() -> bool:
    """Whether the Triton kernels can run here: on CUDA, or in the interpreter (TRITON_INTERPRET=1) on CPU."""
    from plora_kernels._backend import interpreting, triton_available

    return triton_available() and (DEVICE == "cuda" or interpreting())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 for an empty tensor)."""
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def overflow_fp16_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """Make W[7, 9] overflow fp16 on a merge with scaling 1: 65000 + r * 30 * 30 > 65504 (r >= 1, rows > 7,
    columns > 9), while every factor stays finite."""
    W[7, 9] = 65000.0
    B[7].fill_(30.0)
    A[:, 9].fill_(30.0)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so a value the kernel forgot to write cannot pass as correct."""
    return t.fill_(float("nan"))


def torchrun_2(script, *args, cwd=None) -> str:
    """Run ``script`` on 2 CPU processes with torchrun (gloo, loopback only); return its output, failing the
    test with the output's tail if it exits non-zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out
