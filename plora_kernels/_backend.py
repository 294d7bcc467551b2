"""Which implementation runs each op: one resolver, one precedence, and ``plora info`` asks it too.

Ops and their implementations:
- ``lora_linear`` (forward and backward): ``torch`` (the cuBLAS composition, also the CPU path), ``triton``
  (the portable fused kernel), ``triton-tma`` (Hopper: host-side TMA descriptors and a persistent grid),
  ``triton-ws`` (Hopper: persistent, warp-specialised, device-side TMA; ops/triton/lora_matmul_ws.py);
- ``unload`` (the merge): ``torch`` (the reference; it materialises the merged W), ``triton`` (the grouped
  in-place kernel), ``cuda`` (the csrc/ twin).

Precedence, first match wins:
1. a choice in code: ``with plora_kernels.implementation(lora_linear="triton"): ...`` (tests and benchmarks
   use it instead of touching ``os.environ``);
2. environment variables: ``PLORA_LINEAR_KERNEL`` / ``PLORA_UNLOAD_KERNEL`` for one op, then
   ``PLORA_BACKEND=torch|triton|auto`` for every op (``triton`` means each op's Triton kernel);
3. the measured default (``defaults.py``): per GPU architecture, op, dtype and size bucket, the implementation
   recorded fastest in ``benchmarks/results/``; where nothing was measured, the safe default (the cuBLAS
   composition for ``lora_linear``; the Triton kernel for ``unload``, the only path without a W-sized temporary).

CPU tensors run ``torch``, unless a choice above asks for Triton and ``TRITON_INTERPRET=1`` lets it run there
(that is how CI tests the kernels).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
IMPLEMENTATIONS = {
    "lora_linear": ("torch", "triton", "triton-tma", "triton-ws"),
    "unload": ("torch", "triton", "cuda"),
}
ENV_VARS = {"lora_linear": "PLORA_LINEAR_KERNEL", "unload": "PLORA_UNLOAD_KERNEL"}
# the earlier names of the two environment variables' values, and what they mean now
LINEAR_KERNELS = IMPLEMENTATIONS["lora_linear"]
UNLOAD_KERNELS = IMPLEMENTATIONS["unload"]

_chosen: contextvars.ContextVar[dict] = contextvars.ContextVar("plora_implementation", default={})


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    """Whether the GEMM kernels autotune over their configurations (``PLORA_AUTOTUNE=0`` pins the first one, as
    the GPU test run does: a sweep per new shape bucket would cost more than the tests)."""
    return os.environ.get("PLORA_AUTOTUNE", "1").strip() not in ("0", "")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def _check_choice(op: str, name, source: str) -> str:
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"op must be one of {tuple(IMPLEMENTATIONS)}, got {op!r}")
    if not isinstance(name, str) or name.strip().lower() not in IMPLEMENTATIONS[op]:
        raise ValueError(f"{source} must be one of {IMPLEMENTATIONS[op]}, got {name!r}")
    return name.strip().lower()


@contextlib.contextmanager
def implementation(**choices: str | None):
    """Run ``op=implementation`` in this block (this thread / task only), above any environment variable.

    ``with implementation(lora_linear="torch", unload="triton"): ...``; None leaves an op to the next rule.
    """
    checked = {op: _check_choice(op, name, f"implementation({op}=...)") for op, name in choices.items()
               if name is not None}
    token = _chosen.set({**_chosen.get(), **checked})
    try:
        yield
    finally:
        _chosen.reset(token)


def requested_backend() -> str:
    name = os.environ.get("PLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PLORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _requested(op: str) -> tuple[str | None, str]:
    """(the implementation asked for, where the ask came from), or (None, "default")."""
    if op in _chosen.get():
        return _chosen.get()[op], "code"
    env = os.environ.get(ENV_VARS[op], "").strip()
    if env:
        return _check_choice(op, env, ENV_VARS[op]), ENV_VARS[op]
    backend = requested_backend()
    if backend != "auto":
        return backend, "PLORA_BACKEND"
    return None, "default"


def requested_linear_kernel() -> str | None:
    """The lora_linear implementation asked for in code or the environment, or None (the measured default)."""
    return _requested("lora_linear")[0]


def requested_unload_kernel() -> str | None:
    """The unload implementation asked for in code or the environment, or None (the measured default)."""
    return _requested("unload")[0]


def _runnable(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run on ``device`` here, or None."""
    if name == "torch":
        return None
    if name.startswith("triton"):
        if not triton_available():
            return "Triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return None
        return f"Triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a tensor on {device}"
    if name == "cuda":
        return None if device.type == "cuda" else f"the csrc/ CUDA kernel runs CUDA tensors, got {device}"
    return f"unknown implementation {name!r}"


def resolve(op: str, t: torch.Tensor, *, dtype: torch.dtype | None = None, size: int | None = None) -> str:
    """The implementation that runs ``op`` on tensors like ``t`` (its device; ``dtype`` and ``size``, e.g. the
    number of rows of x, pick the measured default's bucket)."""
    name, source = _requested(op)
    if name is not None:
        why = _runnable(name, t.device)
        if why is not None:
            if source == "PLORA_BACKEND" and name == "triton" and t.device.type == "cpu" and not interpreting():
                raise RuntimeError("PLORA_BACKEND=triton needs Triton and CUDA tensors (or TRITON_INTERPRET=1 for "
                                   f"CPU tensors); {why}")
            raise RuntimeError(f"{source} asks for {op}={name}, which cannot run here: {why}")
        return name
    if t.device.type != "cuda":
        return "torch"
    from .defaults import measured_default

    return measured_default(op, t.device, dtype or t.dtype, size)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the unload on ``t`` runs a kernel (Triton or the CUDA twin) rather than the torch reference."""
    return resolve("unload", t) != "torch"


def describe(devices=None) -> dict[str, dict[str, str]]:
    """What each op will run on each device kind, for ``plora info``: {device: {op: implementation (source)}}."""
    out: dict[str, dict[str, str]] = {}
    kinds = devices if devices is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for kind in kinds:
        t = torch.empty(0, device=kind)
        row = {}
        for op in IMPLEMENTATIONS:
            try:
                name = resolve(op, t, dtype=torch.bfloat16)
                source = _requested(op)[1]
                row[op] = f"{name} ({'measured default' if source == 'default' and kind != 'cpu' else source})"
            except Exception as exc:  # noqa: BLE001 - reported, not raised: info must always print
                row[op] = f"error: {exc}"
        out[kind] = row
    return out
