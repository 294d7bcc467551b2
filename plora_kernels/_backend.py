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

# the active implementation() blocks of this thread / task, outermost first: (block id, its choices)
_blocks: contextvars.ContextVar[tuple] = contextvars.ContextVar("plora_implementation", default=())


def _chosen_now() -> dict:
    """The choices in force: every active block's, an inner block's over an outer one's."""
    out: dict = {}
    for _, choices in _blocks.get():
        out.update(choices)
    return out


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter. Read as Triton reads ``TRITON_INTERPRET``: on for
    1/true/yes/on (any case), off for anything else ("false" included), so we never disagree with it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def autotuning() -> bool:
    """Whether the GEMM kernels autotune over their configurations, read at each launch: ``PLORA_AUTOTUNE`` unset,
    or 1/true/yes/on, tunes; 0/false/no/off pins the first configuration that fits the device (as the GPU test run
    does: a sweep per new shape bucket would cost more than the tests); anything else is refused."""
    value = os.environ.get("PLORA_AUTOTUNE", "").strip().lower()
    if value in _TRUE or value == "":
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"PLORA_AUTOTUNE must be one of 1/true/yes/on or 0/false/no/off, got "
                     f"{os.environ['PLORA_AUTOTUNE']!r}")


# The Triton releases this package supports, oldest and newest: CI compiles every kernel variant under both
# (tests/test_kernels_compile.py). 3.6 is what torch 2.11 pins; 3.7.x what torch 2.12 and 2.13 pin.
TRITON_OLDEST = (3, 6)
TRITON_NEWEST = (3, 9)
# what an implementation needs beyond a supported Triton, when it compiles for a GPU:
# (oldest Triton, architectures as major * 10 + minor, the reason shown by the resolver and `plora info`)
REQUIREMENTS = {
    "triton-tma": (TRITON_OLDEST, (90, 100, 103), "TMA descriptors need Hopper or Blackwell (sm_90, sm_100)"),
    "triton-ws": ((3, 7), (90,), "Hopper warp specialisation needs sm_90 and Triton >= 3.7 (Triton 3.6's "
                                 "warp-specialisation pass crashes on this kernel)"),
}


@functools.lru_cache(maxsize=None)
def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, None when it cannot be imported."""
    try:
        import triton
    except Exception:  # pragma: no cover - depends on the machine
        return None
    major, minor = (int("".join(ch for ch in part if ch.isdigit()) or 0) for part in triton.__version__.split(".")[:2])
    return major, minor


def triton_available() -> bool:
    return triton_version() is not None


def _version(v: tuple[int, int]) -> str:
    return ".".join(map(str, v))


def _triton_refusal(name: str, device: torch.device) -> str | None:
    """Why Triton implementation ``name`` cannot compile for ``device`` here, or None. The interpreter (CPU
    tensors) compiles nothing, so only a GPU is held to the version and architecture requirements."""
    version = triton_version()
    if version is None:
        return "Triton is not installed"
    if device.type != "cuda":
        return None
    if version < TRITON_OLDEST:
        return (f"Triton {_version(version)} is older than the oldest supported ({_version(TRITON_OLDEST)}); "
                f"pip install 'triton>={_version(TRITON_OLDEST)}'")
    oldest, archs, why = REQUIREMENTS.get(name, (TRITON_OLDEST, None, ""))
    from .ops.triton.limits import arch_of

    arch = arch_of(device)
    if version < oldest or (archs is not None and arch not in archs):
        return f"{why}; this is Triton {_version(version)} on sm_{arch}"
    return None


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
    block = object()
    _blocks.set(_blocks.get() + ((block, checked),))
    try:
        yield
    finally:
        # remove this block's own frame, wherever it is: blocks exited out of order (two generators, say) then
        # leave nothing behind, where restoring a saved state would revive the other block's choice
        _blocks.set(tuple(f for f in _blocks.get() if f[0] is not block))


def requested_backend() -> str:
    name = os.environ.get("PLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PLORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _requested(op: str) -> tuple[str | None, str]:
    """(the implementation asked for, where the ask came from), or (None, "default")."""
    chosen = _chosen_now()
    if op in chosen:
        return chosen[op], "code"
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
        if not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
            return f"Triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a tensor on {device}"
        return _triton_refusal(name, device)
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
    from .defaults import SAFE_DEFAULT, measured_default

    name = measured_default(op, t.device, dtype or t.dtype, size)
    if _runnable(name, t.device) is None:
        return name
    # a measured or safe default this machine cannot run (no Triton, an older one, another GPU): the next safe one
    return next(n for n in (SAFE_DEFAULT[op], "cuda", "torch") if n in IMPLEMENTATIONS[op] and _runnable(n, t.device)
                is None)


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


def refusals(device: torch.device | str) -> dict[str, str]:
    """{"op: implementation": why it cannot run on ``device`` here} for every implementation the resolver would
    refuse there (``plora info`` prints them): no Triton, a Triton older than the support window, an
    architecture a kernel was not built for."""
    device = torch.device(device)
    return {f"{op}: {name}": why for op, names in IMPLEMENTATIONS.items() for name in names
            if (why := _runnable(name, device)) is not None}


def settings() -> dict[str, str]:
    """Every environment variable the package reads, as it reads it (``plora info`` prints them)."""
    def parsed(name, fn):
        raw = os.environ.get(name)
        try:
            return f"{raw!r} -> {fn()}" if raw is not None else f"(unset) -> {fn()}"
        except ValueError as exc:
            return f"{raw!r} -> refused: {exc}"

    return {
        "TRITON_INTERPRET": parsed("TRITON_INTERPRET", lambda: "on" if interpreting() else "off"),
        "PLORA_AUTOTUNE": parsed("PLORA_AUTOTUNE", lambda: "tune" if autotuning() else "pinned"),
        "PLORA_BACKEND": parsed("PLORA_BACKEND", requested_backend),
        **{var: parsed(var, lambda op=op: _requested(op)[0] or "the measured default")
           for op, var in ENV_VARS.items()},
        "PLORA_CSRC_LIB": os.environ.get("PLORA_CSRC_LIB", "(unset)"),
        "PLORA_CSRC_CACHE": os.environ.get("PLORA_CSRC_CACHE", "(unset)"),
    }
