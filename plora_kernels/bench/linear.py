"""``plora bench linear``: every implementation of the LoRA linear, and the default, against cuBLAS and PEFT.

Forward and forward+backward of ``y = x W^T + s (x A^T) B^T`` (no bias, W frozen; forward+backward produces dx,
dA and dB, no dW). Contenders, all timed in the same process on the same tensors:

  floor          cuBLAS base GEMM only: ``x @ W.T`` (fwd); ``x @ W.T`` and ``dy @ W`` (fwd+bwd)
  peft           PEFT's unfused layer: ``base(x) + lora_B(lora_A(x.to(A's dtype))) * s`` with nn.Linear modules,
                 the sum cast back to x's dtype, autograd backward
  <each resolver implementation of lora_linear> ``plora_kernels.lora_linear`` under
                 ``plora_kernels.implementation(lora_linear=name)``: every name in
                 ``_backend.IMPLEMENTATIONS["lora_linear"]`` (torch = the cuBLAS composition, triton, triton-tma, and
                 any added later); one the resolver refuses on this device is skipped, with its reason
  default        ``plora_kernels.lora_linear`` with no choice: what the resolver picks (the measured default on a
                 GPU); the row is labelled with, and records, the implementation it resolved to

``--pieces`` (Triton) adds rows timing the fused forward's parts alone: the Triton GEMM without the
low-rank term (against the floor: how far the GEMM itself is from cuBLAS), the fused GEMM given a precomputed xa,
and xa = x @ A.T by Triton and by cuBLAS, for the portable and the TMA kernel; and the backward's two skinny
products (g = dy @ B, dB = s dy^T xa) in the Triton pass that reads dy once against two cuBLAS GEMMs.

Shapes (a full run on a GPU): M in {2048, 8192} x the Llama-7B projections (in -> out: 4096 -> 4096,
4096 -> 11008, 11008 -> 4096) x r in {16, 64} x x/W in bf16 and fp16 x adapters A, B in fp32 (PEFT's default,
and what PLoRALinear trains with) and in x's dtype. ``--quick``: the target only, M=8192, 4096 -> 4096, r=16, bf16,
both adapter dtypes. The target config runs first. On CPU a small shape; Triton rows run there in the interpreter
(TRITON_INTERPRET=1: one timed call, a smoke test of the code path) or are skipped.

Every forward+backward callable runs with ``torch.autograd.set_multithreading_enabled(False)``: the backward then
runs on the calling thread, where the ``implementation(...)`` choice (a context variable) is visible; on the
autograd engine's CUDA worker thread it would not be. Before timing, each contender is run once and checked
against an fp32 reference, and the implementations ``resolve`` answered for its forward and backward are recorded
(``ran``). Reported per row: median (p20/p80), TFLOP/s, ``x floor`` = time / the floor's time, ``x peft`` = PEFT's
time / the row's time (a speed-up), and for the default row ``x best`` = its time / the fastest implementation's.
FLOPs: forward 2·M·in·out·(1 + r/out + r/in); forward+backward 4·M·in·out + 6·M·r·(in + out); the floor rows count
only their GEMMs (2·M·in·out, 4·M·in·out).

Targets at M=8192, in=out=4096, r=16, bf16 (per adapter dtype): the default's forward <= 1.05x the floor, its
forward+backward <= 1.08x the floor and >= 1.25x faster than PEFT; and on every shape of the run the default is
never slower than the fastest implementation (within 2%, the noise of timing the same code twice).

The record is written after every config (``"complete": false`` until the end), and on SIGINT/SIGTERM what was
measured is saved before exiting with status 130: a run cut off by a time limit keeps its rows.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
from torch import nn

from . import common

GPU_MS = (2048, 8192)
GPU_FEATURES = ((4096, 4096), (4096, 11008), (11008, 4096))  # Llama-7B: q/k/v/o, gate/up, down (in -> out)
GPU_RANKS = (16, 64)
GPU_DTYPES = "bf16,fp16"
# fp32 adapters (what training passes) last: of two rows of one shape and implementation, the later one is what
# benchmarks/make_defaults.py compares
ADAPTER_MODES = ("same", "fp32")
TARGET_SHAPE, TARGET_RANK, TARGET_DTYPE = (8192, 4096, 4096), 16, "bf16"
CPU_SHAPE = (64, 128, 128)  # M, in, out: small, so that the Triton rows can run in the interpreter
CPU_RANKS = (16,)
SCALING = 2.0
TARGET_FWD = 1.05          # default forward / floor
TARGET_FWD_BWD = 1.08      # default forward+backward / floor
TARGET_X_PEFT = 1.25       # PEFT's forward+backward / the default's
BEST_TOLERANCE = 0.02      # "never slower than the fastest implementation": within this fraction
MODES = ("fwd", "fwd+bwd")

BASELINES = {
    "floor": "cuBLAS base GEMM only: x@W.T (fwd); x@W.T and dy@W (fwd+bwd)",
    "peft": "PEFT's unfused layer: nn.Linear base(x) + lora_B(lora_A(x.to(A.dtype)))*s, cast back to x's dtype; "
            "autograd backward",
}
KNOWN = {
    "torch": "the cuBLAS composition (s*xa@B.T by a skinny GEMM, the base GEMM accumulating into it; backward alike)",
    "triton": "the portable fused Triton kernel",
    "triton-tma": "the Hopper Triton kernel: TMA descriptors and a persistent grid",
    "triton-ws": "the Hopper warp-specialized Triton kernel",
}


def implementations() -> tuple[str, ...]:
    """The resolver's implementations of lora_linear, read when called (so that one added later is timed too)."""
    from .. import _backend

    return tuple(_backend.IMPLEMENTATIONS["lora_linear"])


def contenders() -> dict[str, str]:
    """name -> description of every contender, in table order."""
    out = dict(BASELINES)
    for name in implementations():
        out[name] = (f"plora_kernels.lora_linear under implementation(lora_linear={name!r})"
                     + (f": {KNOWN[name]}" if name in KNOWN else ""))
    out["default"] = "plora_kernels.lora_linear with no choice: the implementation the resolver picks"
    return out


def lora_flops(M: int, k_in: int, n_out: int, r: int, mode: str) -> float:
    if mode == "fwd":
        return 2.0 * M * k_in * n_out * (1 + r / n_out + r / k_in)
    return 4.0 * M * k_in * n_out + 6.0 * M * r * (k_in + n_out)


def floor_flops(M: int, k_in: int, n_out: int, mode: str) -> float:
    return (2.0 if mode == "fwd" else 4.0) * M * k_in * n_out


# ------------------------------------------------------------------------------------------- contenders
def make_tensors(M, k_in, n_out, r, dtype, device, adapter_dtype=None):
    """Random x, W, A, B, dy for one shape (seeded by the shape, so that every contender, part and adapter dtype
    sees the same values): x, W, dy in ``dtype``, A and B in ``adapter_dtype`` (default: ``dtype``)."""
    device = torch.device(device)
    adapter_dtype = adapter_dtype or dtype
    gen = torch.Generator(device=device).manual_seed(M * 7 + k_in * 3 + n_out + r)

    def randn(*shape, scale=1.0, to=dtype):
        return (torch.randn(*shape, device=device, dtype=torch.float32, generator=gen) * scale).to(to)

    x = randn(M, k_in)
    weight = randn(n_out, k_in, scale=k_in ** -0.5)
    lora_A = ((torch.rand(r, k_in, device=device, generator=gen) * 2 - 1) * k_in ** -0.5).to(adapter_dtype)
    lora_B = randn(n_out, r, scale=0.02, to=adapter_dtype)  # non-zero: a trained adapter, not a fresh one
    return x, weight, lora_A, lora_B, randn(M, n_out)


def _peft_modules(weight: torch.Tensor, lora_A: nn.Parameter, lora_B: nn.Parameter):
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    kw = {"bias": False, "device": "meta"}
    base, down, up = nn.Linear(in_f, out_f, **kw), nn.Linear(in_f, r, **kw), nn.Linear(r, out_f, **kw)
    base.weight = nn.Parameter(weight, requires_grad=False)
    down.weight = lora_A
    up.weight = lora_B
    return base, down, up


def runnable(name: str, t: torch.Tensor) -> str | None:
    """Why implementation ``name`` of lora_linear cannot run on tensors like ``t``, or None (the resolver's word)."""
    from .. import _backend

    try:
        with _backend.implementation(lora_linear=name):
            _backend.resolve("lora_linear", t, size=t.shape[0] if t.dim() else None)
    except (RuntimeError, ValueError) as exc:
        return str(exc)[:300]
    return None


def resolved_default(t: torch.Tensor) -> tuple[str, str]:
    """(the implementation lora_linear runs on ``t`` with no choice in code, what decided it)."""
    from .. import _backend

    name = _backend.resolve("lora_linear", t, size=t.shape[0])
    source = _backend._requested("lora_linear")[1]
    return name, "measured default" if source == "default" and t.is_cuda else source


def _wrap(mode: str, fn, choice: str | None = None):
    """``fn`` under the implementation ``choice`` (None: the resolver's default), without autograd for the forward,
    and with the backward on the calling thread for forward+backward (see the module docstring)."""
    from .. import _backend

    def choose():
        return _backend.implementation(lora_linear=choice) if choice else contextlib.nullcontext()

    if mode == "fwd":
        def run():
            with choose(), torch.no_grad():
                return fn()
    else:
        def run():
            with choose(), torch.autograd.set_multithreading_enabled(False):
                return fn()
    return run


def build_case(M, k_in, n_out, r, dtype, device, adapter_dtype=None, scaling=SCALING, names=None, skipped=None):
    """Random tensors for one shape and every contender as a zero-argument callable, ready to time:
    ``{"fwd": {name: fn}, "fwd+bwd": {name: fn}}`` (a forward returns y, a forward+backward (dx, dA, dB)).

    ``names``: the implementations to include (default: all); one the resolver refuses here goes into ``skipped``
    (a dict) with the reason instead. "default" runs whatever the resolver picks."""
    from ..ops.lora_linear import lora_linear

    x, weight, lora_A, lora_B, dy = make_tensors(M, k_in, n_out, r, dtype, device, adapter_dtype)
    lora_A, lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
    s = float(scaling)
    base, down, up = _peft_modules(weight, lora_A, lora_B)
    xg = x.detach().requires_grad_(True)
    params = (xg, lora_A, lora_B)
    skipped = {} if skipped is None else skipped

    def peft_forward(inp):
        # PEFT's LoRA Linear: the base layer in x's dtype, the adapter on x cast to the adapter's dtype, the sum
        # cast back to the base result's dtype
        result = base(inp)
        result = result + up(down(inp.to(down.weight.dtype))) * s
        return result.to(inp.dtype)

    def fused_fwd():
        return lora_linear(x, weight, lora_A, lora_B, s)

    def fused_fwd_bwd():
        return torch.autograd.grad(lora_linear(xg, weight, lora_A, lora_B, s), params, dy)

    fns = {
        "fwd": {"floor": _wrap("fwd", lambda: x @ weight.t()), "peft": _wrap("fwd", lambda: peft_forward(x))},
        "fwd+bwd": {"floor": _wrap("fwd+bwd", lambda: (x @ weight.t(), dy @ weight)),
                    "peft": _wrap("fwd+bwd", lambda: torch.autograd.grad(peft_forward(xg), params, dy))},
    }
    for name in implementations():
        if names is not None and name not in names:
            continue
        why = runnable(name, x)
        if why is not None:
            skipped[name] = why
            continue
        fns["fwd"][name] = _wrap("fwd", fused_fwd, name)
        fns["fwd+bwd"][name] = _wrap("fwd+bwd", fused_fwd_bwd, name)
    fns["fwd"]["default"] = _wrap("fwd", fused_fwd)
    fns["fwd+bwd"]["default"] = _wrap("fwd+bwd", fused_fwd_bwd)
    return fns


def reference(M, k_in, n_out, r, dtype, device, adapter_dtype=None, scaling=SCALING):
    """The fp32 forward and gradients of the same tensors: (y, (dx, dA, dB))."""
    x, weight, lora_A, lora_B, dy = (t.float() for t in make_tensors(M, k_in, n_out, r, dtype, device,
                                                                     adapter_dtype))
    xa = x @ lora_A.t()
    y = torch.addmm(x @ weight.t(), xa, lora_B.t(), alpha=scaling)
    g = dy @ lora_B
    dx = torch.addmm(dy @ weight, g, lora_A, alpha=scaling)
    return y, (dx, (g.t() @ x).mul_(scaling), (dy.t() @ xa).mul_(scaling))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def _resolve_spy(seen: list):
    """Record every answer of ``resolve`` that lora_linear's forward and backward ops ask for (an untimed check
    call only): what ran, whichever thread the backward ran on."""
    import importlib

    mod = importlib.import_module("plora_kernels.ops.lora_linear")  # the module: ops.lora_linear is the function
    real = getattr(mod, "resolve", None)
    if real is None:  # the ops no longer ask the resolver by that name: nothing to record
        yield
        return

    def spy(*args, **kwargs):
        name = real(*args, **kwargs)
        seen.append(name)
        return name

    mod.resolve = spy
    try:
        yield
    finally:
        mod.resolve = real


PIECES = {
    "piece: triton x@W.T": "the Triton GEMM alone, no low-rank term",
    "piece: triton x@W.T + s*xa@B.T": "the fused GEMM given xa (the forward minus its xa launch)",
    "piece: triton xa=x@A.T": "the forward's first launch, N = r",
    "piece: cuBLAS xa=x@A.T": "the same product by cuBLAS (A cast to x's dtype, as the torch implementation does)",
    "piece: triton-tma x@W.T": "the TMA/persistent GEMM alone",
    "piece: triton-tma x@W.T + s*xa@B.T": "the TMA/persistent fused GEMM given xa",
    "piece: triton dy pass (g, dB)": "the backward's skinny products g = dy@B, dB = s*dy.T@xa in one read of dy",
    "piece: cuBLAS g=dy@B, dB=dy.T@xa": "the same two products as two cuBLAS GEMMs (two reads of dy)",
}


def piece_fns(M, k_in, n_out, r, dtype, device, adapter_dtype=None, scaling=SCALING, runnable_impls=()) -> dict:
    """name -> forward callable for the PIECES whose kernel runs here (``runnable_impls``), on the same tensors."""
    from ..ops import reference
    from ..ops.triton.lora_dy_pass import lora_dy_pass
    from ..ops.triton.lora_matmul import lora_matmul

    x, weight, lora_A, lora_B, _ = make_tensors(M, k_in, n_out, r, dtype, device, adapter_dtype)
    xa = x @ lora_A.to(x.dtype).t()
    dy = torch.randn(M, n_out, device=device, dtype=dtype)
    out = {}
    for impl, tma in (("triton", False), ("triton-tma", True)):
        if impl not in runnable_impls:
            continue
        out.update({
            f"piece: {impl} x@W.T": lambda tma=tma: lora_matmul(x, weight.t(), tma=tma),
            f"piece: {impl} x@W.T + s*xa@B.T": lambda tma=tma: lora_matmul(
                x, weight.t(), lora_act=xa, lora_up=lora_B.t(), scaling=scaling, tma=tma),
        })
        if impl == "triton":
            out["piece: triton xa=x@A.T"] = lambda: lora_matmul(x, lora_A.t(), tma=False)
            out["piece: cuBLAS xa=x@A.T"] = lambda: x @ lora_A.to(x.dtype).t()
            out["piece: triton dy pass (g, dB)"] = lambda: lora_dy_pass(dy, lora_B, xa, scaling)
            out["piece: cuBLAS g=dy@B, dB=dy.T@xa"] = lambda: (
                dy @ lora_B.to(dy.dtype), reference.lora_grad_B(dy, xa, lora_B, scaling))
    return {name: _wrap("fwd", fn) for name, fn in out.items()}


# ------------------------------------------------------------------------------------------- one config
def _interpreted(row: dict, device: torch.device) -> bool:
    """Whether the row's code runs Triton in the interpreter (CPU tensors): one timed call then."""
    from .._backend import interpreting

    if device.type == "cuda" or not interpreting():
        return False
    ran = row.get("ran") or row.get("implementation") or row.get("resolved") or row["contender"]
    return "triton" in str(ran)


def _time(fn, device: torch.device, args, interpreted_ms: float | None = None) -> common.Timing:
    """do_bench on CUDA, the perf_counter loop on CPU; for a row the Triton interpreter ran, the time of its one
    (check) call: the interpreter's time says nothing about the kernel, and the smoke run must stay short."""
    if interpreted_ms is not None:
        return common.Timing(interpreted_ms, interpreted_ms, interpreted_ms,
                             "perf_counter (one call in the Triton interpreter)")
    return common.bench(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def run_config(M, k_in, n_out, r, dtype, adapter_dtype, device, args, sink: list) -> None:
    """Check, then time, every contender on one config; rows are appended to ``sink`` as they come."""
    skipped: dict[str, str] = {}
    fns = build_case(M, k_in, n_out, r, dtype, device, adapter_dtype, names=args.implementations, skipped=skipped)
    probe = torch.empty(M, 1, device=device, dtype=dtype)
    default_name, default_source = resolved_default(probe)
    interp = device.type != "cuda" and _interpreting()
    base = {"M": M, "in": k_in, "out": n_out, "r": r, "dtype": common.dtype_name(dtype),
            "adapter_dtype": common.dtype_name(adapter_dtype)}

    # agreement with the fp32 reference, and what resolve answered, before timing anything
    checks: dict[tuple[str, str], dict] = {}
    try:
        ref_y, ref_g = reference(M, k_in, n_out, r, dtype, device, adapter_dtype)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: time without the check
        ref_y = ref_g = None
        print(f"reference failed: {_err(exc)}", file=sys.stderr)
    for mode in args.modes:
        for name, fn in fns[mode].items():
            if name == "floor":
                continue
            seen: list[str] = []
            info: dict = {}
            try:
                t0 = time.perf_counter()
                with _resolve_spy(seen):
                    got = fn()
                info["_ms"] = (time.perf_counter() - t0) * 1e3
                if ref_y is not None:
                    info["rel_err"] = (_rel_err(got, ref_y) if mode == "fwd"
                                       else max(_rel_err(g, rg) for g, rg in zip(got, ref_g)))
                del got
            except Exception as exc:  # noqa: BLE001 - recorded on the row, which is then not timed
                info["error"] = _err(exc)
                common.free_memory(device)
            if seen:
                info["ran"] = seen[0] if len(set(seen)) == 1 else \
                    ", ".join(f"{part} {impl}" for part, impl in zip(("fwd", "bwd"), seen))
            checks[(mode, name)] = info
    del ref_y, ref_g
    common.free_memory(device)

    order = ["floor", "peft", *[n for n in implementations() if args.implementations is None
                                or n in args.implementations], "default"]
    for mode in args.modes:
        for name in order:
            row = dict(base, mode=mode, contender=name, label=name)
            if name in implementations():
                row["implementation"] = name
                row["label"] = f"{name} (interpreter)" if interp and name.startswith("triton") else name
            elif name == "default":
                row.update(resolved=default_name, resolved_by=default_source)
                shown = f"{default_name} (interpreter)" if interp and default_name != "torch" else default_name
                row["label"] = f"default ({shown})"
            row["flops"] = floor_flops(M, k_in, n_out, mode) if name == "floor" else lora_flops(M, k_in, n_out, r, mode)
            if name in skipped:
                sink.append(dict(row, skipped=skipped[name]))
                continue
            info = dict(checks.get((mode, name), {}))
            check_ms = info.pop("_ms", None)
            row.update(info)
            expect = row.get("implementation") or row.get("resolved")
            if expect and row.get("ran") and row["ran"] != expect:
                row["note"] = f"asked for {expect}, resolve answered {row['ran']}"
            if "error" not in row:
                try:
                    row.update(_time(fns[mode][name], device, args,
                                     check_ms if _interpreted(row, device) else None).as_dict())
                except Exception as exc:  # noqa: BLE001 - record, keep going with the other contenders
                    row["error"] = _err(exc)
                    common.free_memory(device)
            sink.append(row)
        derive(sink)

    if args.pieces and "fwd" in args.modes:
        runs = [n for n in ("triton", "triton-tma") if n in fns["fwd"]]
        pieces = piece_fns(M, k_in, n_out, r, dtype, device, adapter_dtype, runnable_impls=runs) if runs else {}
        for name, fn in pieces.items():
            row = dict(base, mode="fwd", contender=name, label=name)
            try:
                if interp and "triton" in name:  # one call: the interpreter's time says nothing about the kernel
                    t0 = time.perf_counter()
                    fn()
                    row.update(_time(fn, device, args, (time.perf_counter() - t0) * 1e3).as_dict())
                else:
                    row.update(_time(fn, device, args).as_dict())
            except Exception as exc:  # noqa: BLE001
                row["error"] = _err(exc)
            sink.append(row)
        derive(sink)
    del fns
    common.free_memory(device)


def _interpreting() -> bool:
    from .._backend import interpreting

    return interpreting()


# ------------------------------------------------------------------------------------------- derived values
def key(r: dict) -> tuple:
    """(M, in, out, r, dtype, adapter dtype): one config."""
    return (r["M"], r["in"], r["out"], r["r"], r["dtype"], r.get("adapter_dtype", r["dtype"]))


def derive(rows: list[dict]) -> None:
    """Fill in, in place, each row's ratios to the rest of its config and mode (idempotent): TFLOP/s,
    ``ratio_to_floor``, ``x_vs_peft`` (PEFT's time / the row's), and for the default row the fastest
    implementation (``best_implementation``) and ``ratio_to_best`` (the default's time / the fastest's)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["mode"], *key(r)), []).append(r)
    impls = set(implementations())
    for group in groups.values():
        by = {r["contender"]: r for r in group}
        floor_ms = (by.get("floor") or {}).get("median_ms")
        peft_ms = (by.get("peft") or {}).get("median_ms")
        timed = [r for r in group if r.get("implementation") in impls and r.get("median_ms")
                 and not r["contender"].startswith("piece: ")]
        best = min(timed, key=lambda r: r["median_ms"], default=None)
        for r in group:
            ms = r.get("median_ms")
            if not ms:
                continue
            if r.get("flops"):
                r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
            if floor_ms:
                r["ratio_to_floor"] = ms / floor_ms
            if peft_ms and r["contender"] not in ("floor", "peft") and not r["contender"].startswith("piece: "):
                r["x_vs_peft"] = peft_ms / ms
            if r["contender"] == "default" and best is not None:
                r["best_implementation"] = best["implementation"]
                r["ratio_to_best"] = ms / best["median_ms"]


def _target(tid, what, value, value_text, target, met, **extra) -> dict:
    """One target of the record: ``met`` is True, False, or None (not measured in this run)."""
    return {"id": tid, "what": what, "value": value, "value_text": value_text, "target": target, "met": met, **extra}


def _shape_text(k) -> str:
    return f"M={k[0]} {k[1]}->{k[2]} r={k[3]} {k[4]}" + (f" ({k[5]} A,B)" if len(k) > 5 else "")


def targets(rows: list[dict], target=(*TARGET_SHAPE, TARGET_RANK, TARGET_DTYPE)) -> list[dict]:
    """The targets of issue #13: at ``target`` (M, in, out, r, dtype), per adapter dtype, the default against the
    floor (fwd, fwd+bwd) and against PEFT (fwd+bwd); on every config of the run and per mode, the default against
    the fastest implementation."""
    out = []
    where = f"M={target[0]} {target[1]}->{target[2]} r={target[3]} {target[4]}"
    at = [r for r in rows if r["contender"] == "default" and key(r)[:5] == tuple(target)]
    for adt in common.unique(r.get("adapter_dtype", r["dtype"]) for r in at):
        by = {r["mode"]: r for r in at if r.get("adapter_dtype", r["dtype"]) == adt}
        for mode, goal in (("fwd", TARGET_FWD), ("fwd+bwd", TARGET_FWD_BWD)):
            r = by.get(mode)
            if r is None:
                continue
            v = r.get("ratio_to_floor")
            what = f"default ({r.get('resolved')}) {mode} / floor, {where}, {adt} A,B"
            if v is not None:
                out.append(_target(f"default_{mode}_vs_floor", what, v, f"{v:.3f}x", f"<= {goal:g}x", v <= goal))
            else:  # the default failed (False), or the floor was not measured (None)
                out.append(_target(f"default_{mode}_vs_floor", what, None,
                                   f"error: {r['error']}" if r.get("error") else "no floor measured",
                                   f"<= {goal:g}x", False if r.get("error") else None))
        r = by.get("fwd+bwd")
        if r is not None:
            x = r.get("x_vs_peft")
            out.append(_target("default_vs_peft", f"default ({r.get('resolved')}) fwd+bwd speed-up over peft, {where}, "
                               f"{adt} A,B", x, f"{common.fmt(x, '.2f')}x", f">= {TARGET_X_PEFT:g}x",
                               None if x is None else x >= TARGET_X_PEFT))
    for mode in MODES:
        defaults = [r for r in rows if r["contender"] == "default" and r["mode"] == mode and r.get("ratio_to_best")]
        if not defaults:
            continue
        slow = [r for r in defaults if r["ratio_to_best"] > 1 + BEST_TOLERANCE]
        worst = max(defaults, key=lambda r: r["ratio_to_best"])
        text = (f"{len(slow)} of {len(defaults)} configs slower" + (": " + "; ".join(
            f"{_shape_text(key(r))}: default {r['resolved']} {r['ratio_to_best']:.3f}x {r['best_implementation']}"
            for r in slow) if slow else f" (worst {worst['ratio_to_best']:.3f}x at {_shape_text(key(worst))})"))
        out.append(_target(f"default_is_fastest_{mode}", f"{mode}: the default never slower than the fastest "
                           "implementation, every config of the run", len(slow), text,
                           f"default <= {1 + BEST_TOLERANCE:g}x the fastest on every config", not slow,
                           violations=[{"M": r["M"], "in": r["in"], "out": r["out"], "r": r["r"], "dtype": r["dtype"],
                                        "adapter_dtype": r.get("adapter_dtype"), "default": r["resolved"],
                                        "best": r["best_implementation"], "ratio_to_best": r["ratio_to_best"]}
                                       for r in slow]))
    return out


# ------------------------------------------------------------------------------------------- output
COLUMNS = [
    ("mode", "mode", ""), ("M", "M", "d"), ("in", "in", "d"), ("out", "out", "d"), ("r", "r", "d"),
    ("dtype", "x,W", ""), ("adapter_dtype", "A,B", ""), ("label", "contender", ""), ("median_ms", "median ms", ".4f"),
    ("p20_ms", "p20", ".4f"), ("p80_ms", "p80", ".4f"), ("tflops", "TFLOP/s", ".1f"),
    ("ratio_to_floor", "x floor", ".3f"), ("x_vs_peft", "x peft", ".2f"), ("ratio_to_best", "x best", ".3f"),
    ("rel_err", "rel.err", ".1e"), ("status", "note", ""),
]


def display_rows(rows):
    out = []
    for r in rows:
        d = dict(r)
        d["status"] = (r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error") or r.get("note")
                       or (f"ran {r['ran']}" if r.get("ran") and r["ran"] not in (r.get("implementation"),
                                                                                  r.get("resolved")) else ""))
        out.append(d)
    return out


def print_rows(rows) -> None:
    common.print_table(display_rows(rows), COLUMNS)


def _plot(path, rows, title):
    panels = []
    main = [r for r in rows if not r["contender"].startswith("piece: ")]
    for mode in MODES:
        for dtype in common.unique(r["dtype"] for r in main if r["mode"] == mode):
            sub = [r for r in main if r["mode"] == mode and r["dtype"] == dtype]
            keys = common.unique(key(r) for r in sub)
            names = [c for c in common.unique(r["contender"] for r in sub) if c != "floor"]
            series = {}
            for name in names:
                vals = [next((r.get("ratio_to_floor") for r in sub if key(r) == k and r["contender"] == name), None)
                        for k in keys]
                if any(v is not None for v in vals):
                    series[name] = vals
            if not series:
                continue
            hlines = [(1.0, "floor"), ((TARGET_FWD if mode == "fwd" else TARGET_FWD_BWD),
                                       f"target {TARGET_FWD if mode == 'fwd' else TARGET_FWD_BWD:g}x (default)")]
            panels.append({"title": f"{mode}, x/W {dtype}: time / cuBLAS floor (lower is better)", "ylabel": "x floor",
                           "groups": [f"M={m} {i}->{o} r={r} {a} A,B" for m, i, o, r, _, a in keys],
                           "series": series, "hlines": hlines})
    return common.plot_grouped_bars(path, panels, title) if panels else None


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plora bench linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the target only: M=8192, 4096->4096, r=16, bf16, bf16 and fp32 adapters (~2 min on an "
                        "H200); on CPU one small shape")
    p.add_argument("--dtype", default=None,
                   help=f"dtypes of x and W, comma-separated (default {GPU_DTYPES}; --quick: bf16)")
    p.add_argument("--adapter-dtype", default=None,
                   help="dtype of A and B: 'same' as x, 'fp32' (PEFT's default, what PLoRALinear trains with), or "
                        "both (the default): same,fp32")
    p.add_argument("--shape", action="append", type=common.positive_ints, default=None, metavar="M,IN,OUT",
                   help="a shape to run instead of the defaults (repeatable)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (default)")
    p.add_argument("--implementations", default=None,
                   help="comma-separated subset of the resolver's lora_linear implementations to time (default: "
                        "all of them; the floor, peft and default rows always run)")
    p.add_argument("--pieces", action="store_true",
                   help="also time the fused kernels' parts (Triton GEMM alone, fused GEMM given xa, xa; the "
                        "backward's one pass over dy against two cuBLAS GEMMs)")
    common.add_common_args(p)
    return p


def _finish(args) -> None:
    args.dtypes = common.parse_dtypes(args.dtype or ("bf16" if args.quick else GPU_DTYPES))
    modes = [m.strip().lower() for m in (args.adapter_dtype or ",".join(ADAPTER_MODES)).split(",") if m.strip()]
    if not modes or any(m not in ADAPTER_MODES for m in modes):
        raise ValueError("--adapter-dtype takes 'same', 'fp32' or 'same,fp32'")
    args.adapter_modes = common.unique(modes)
    args.modes = common.unique(m.strip() for m in args.modes.split(",") if m.strip())
    if not args.modes or any(m not in MODES for m in args.modes):
        raise ValueError(f"--modes must be a comma-separated subset of {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in args.modes]
    if args.implementations is not None:
        names = common.unique(n.strip().lower() for n in args.implementations.split(",") if n.strip())
        bad = [n for n in names if n not in implementations()]
        if not names or bad:
            raise ValueError(f"--implementations must be a comma-separated subset of {', '.join(implementations())}"
                             f", got {args.implementations!r}")
        args.implementations = names
    args.rank_list = common.parse_ints(args.ranks) if args.ranks else None
    args.shapes = common.parse_shapes(args.shape, 3, "M,IN,OUT")


def _adapter_dtype(mode: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if mode == "fp32" else dtype


def configs_for(args, on_gpu: bool) -> list[tuple]:
    """(M, in, out, r, x dtype, adapter dtype) to run, the target first; duplicates (fp32 x with both adapter
    modes) dropped."""
    if args.shapes is not None:
        shapes = args.shapes
    elif not on_gpu:
        shapes = [CPU_SHAPE]
    elif args.quick:
        shapes = [TARGET_SHAPE]
    else:
        shapes = [(m, i, o) for i, o in GPU_FEATURES for m in GPU_MS]
    ranks = args.rank_list or ([TARGET_RANK] if args.quick else list(GPU_RANKS if on_gpu else CPU_RANKS))
    configs = [(*shape, r, d, _adapter_dtype(a, d)) for d in args.dtypes for shape in shapes for r in ranks
               for a in args.adapter_modes]
    target = (*TARGET_SHAPE, TARGET_RANK, common.DTYPES[TARGET_DTYPE])
    first = [c for c in configs if c[:5] == target]
    return common.unique(first + [c for c in configs if c[:5] != target])


def main(argv=None) -> int:
    try:
        args = common.parse_cli(build_parser(), list(sys.argv[1:] if argv is None else argv), _finish)
    except SystemExit as exc:  # a refused argument (status 2, reported by argparse) or --help
        return common.exit_code(exc)

    device, notes = common.pick_device_announced()
    on_gpu = device.type == "cuda"
    configs = configs_for(args, on_gpu)
    impls = [n for n in implementations() if args.implementations is None or n in args.implementations]
    notes.append(f"no bias; W frozen; fwd+bwd returns dx, dA, dB; scaling s = {SCALING:g}; x, W, dy in the x,W "
                 "dtype, A and B in the A,B dtype (lora_linear casts them to x's dtype for the products; PEFT casts "
                 "x to theirs); forward+backward with the backward on the calling thread "
                 "(torch.autograd.set_multithreading_enabled(False)), so that implementation(...) reaches it")
    if not on_gpu:
        notes.append("Triton rows on CPU run in the interpreter (TRITON_INTERPRET=1): one timed call, a smoke test "
                     "of the code path, not a timing; without it they are skipped")

    env = common.environment(device)
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  implementations: "
          f"{', '.join(impls)}  {len(configs)} configs", flush=True)
    stem = None if args.no_save else common.result_stem("linear", env, args.out)
    payload = {
        "benchmark": "linear", "schema": 2, "environment": env,
        "config": {"configs": [[m, i, o, r, common.dtype_name(d), common.dtype_name(a)]
                               for m, i, o, r, d, a in configs],
                   "modes": args.modes, "quick": args.quick, "scaling": SCALING, "warmup_ms": args.warmup_ms,
                   "rep_ms": args.rep_ms, "implementations": impls, "contenders": contenders(),
                   "pieces": PIECES if args.pieces else None,
                   "target": {"M": TARGET_SHAPE[0], "in": TARGET_SHAPE[1], "out": TARGET_SHAPE[2], "r": TARGET_RANK,
                              "dtype": TARGET_DTYPE, "fwd": TARGET_FWD, "fwd+bwd": TARGET_FWD_BWD,
                              "x_vs_peft": TARGET_X_PEFT, "best_tolerance": BEST_TOLERANCE},
                   "flops": {"fwd": "2*M*in*out*(1 + r/out + r/in)", "fwd+bwd": "4*M*in*out + 6*M*r*(in + out)",
                             "floor": "2*M*in*out (fwd), 4*M*in*out (fwd+bwd)"}},
        "notes": notes, "targets": [], "complete": False,
    }
    rows: list[dict] = []

    def save(png=None):
        if stem is None:
            return
        derive(rows)
        payload["targets"] = targets(rows) if on_gpu else []
        common.write_record(stem, payload, rows, png)

    with common.interruptible("plora bench linear", rows, notes) as run:
        for n, (M, k_in, n_out, r, dtype, adapter_dtype) in enumerate(configs, 1):
            start = len(rows)
            print(f"[{n}/{len(configs)}] M={M} {k_in}->{n_out} r={r} {common.dtype_name(dtype)} x,W, "
                  f"{common.dtype_name(adapter_dtype)} A,B", flush=True)
            run_config(M, k_in, n_out, r, dtype, adapter_dtype, device, args, rows)
            print_rows(rows[start:])
            print(flush=True)
            save()

    derive(rows)
    payload["targets"] = targets(rows) if on_gpu else []
    payload["complete"] = not run.interrupted
    print("== all results ==")
    print_rows(rows)
    common.print_targets(payload["targets"])
    for r in rows:
        if "error" in r:
            print(f"error: {r['mode']} M={r['M']} {r['in']}x{r['out']} r={r['r']} {r['dtype']}/{r['adapter_dtype']} "
                  f"{r['contender']}: {r['error']}")
    return common.finish_run(stem, payload, rows, lambda png: _plot(
        png, rows, f"lora_linear vs cuBLAS and PEFT - {env['device_name']}"), run.interrupted)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
