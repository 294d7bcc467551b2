"""Which implementation runs an op: the Triton kernels or the pure-torch reference.

``PLORA_BACKEND=auto|triton|torch`` overrides the default (auto: Triton for CUDA tensors when Triton is
importable, the reference otherwise). ``TRITON_INTERPRET=1`` lets the Triton kernels run on CPU tensors,
which is how CI exercises them.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def requested_backend() -> str:
    name = os.environ.get("PLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PLORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` should run the Triton kernels."""
    name = requested_backend()
    if name == "torch":
        return False
    runnable = triton_available() and (t.is_cuda or (interpreting() and t.device.type == "cpu"))
    if name == "triton" and not runnable:
        raise RuntimeError(
            "PLORA_BACKEND=triton needs Triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got a tensor on {t.device} with triton {'installed' if triton_available() else 'missing'}"
        )
    if name == "auto":
        return triton_available() and t.is_cuda
    return True


LINEAR_KERNELS = ("triton", "triton-tma", "torch")
UNLOAD_KERNELS = ("triton", "cuda")


def requested_linear_kernel() -> str:
    """``PLORA_LINEAR_KERNEL=triton|triton-tma|torch``: torch keeps only lora_linear on the cuBLAS composition
    (measured faster on an H200 until the fused kernel is tuned: benchmarks/NOTES.md) while unload_ keeps its
    kernel; triton-tma runs the big GEMMs on the TMA/persistent kernel (not yet timed)."""
    name = os.environ.get("PLORA_LINEAR_KERNEL", "triton").strip().lower() or "triton"
    if name not in LINEAR_KERNELS:
        raise ValueError(f"PLORA_LINEAR_KERNEL must be one of {LINEAR_KERNELS}, got {name!r}")
    return name


def use_triton_linear(t: torch.Tensor) -> bool:
    """Whether lora_linear on ``t`` runs the Triton kernels: :func:`use_triton` and :func:`requested_linear_kernel`."""
    return use_triton(t) and requested_linear_kernel() != "torch"


def requested_unload_kernel() -> str:
    """``PLORA_UNLOAD_KERNEL=triton|cuda``: which kernel merges CUDA weights (default triton; cuda is the
    csrc/ twin, built with nvcc on first use). CPU tensors under the interpreter always use Triton."""
    name = os.environ.get("PLORA_UNLOAD_KERNEL", "triton").strip().lower() or "triton"
    if name not in UNLOAD_KERNELS:
        raise ValueError(f"PLORA_UNLOAD_KERNEL must be one of {UNLOAD_KERNELS}, got {name!r}")
    return name


def describe() -> dict[str, str]:
    """What the ops will run on CPU and on CUDA tensors, for ``plora info``."""
    name = requested_backend()
    have = triton_available()
    if name == "torch" or not have:
        cpu = "torch reference"
    elif name == "triton" and interpreting():
        cpu = "triton (interpreter)"
    elif name == "triton":
        cpu = "error: PLORA_BACKEND=triton on CPU needs TRITON_INTERPRET=1"
    else:  # auto keeps CPU tensors on the reference even when interpreting
        cpu = "torch reference"
    cuda = "triton" if name != "torch" and have else "torch reference"
    if cuda == "triton":
        linear = requested_linear_kernel()
        unload = "csrc CUDA kernel" if requested_unload_kernel() == "cuda" else "triton"
        if (linear, unload) != ("triton", "triton"):
            cuda = f"lora_linear: {linear}, unload_: {unload}"
    return {"cpu": cpu, "cuda": cuda}
