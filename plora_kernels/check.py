"""plora check: run every op on every implementation this machine can run against the float64 reference.

The self-test for a new machine (``plora check [--device cpu|cuda|cuda:N] [--out DIR] [--quick]``). Rows are an op
on one implementation (``lora_linear`` forward, its backward, ``unload_``; the implementations are the resolver's,
``_backend.IMPLEMENTATIONS``, each forced with ``plora_kernels.implementation``); columns are checks:

- ``fp32``, ``fp16``, ``bf16``: small odd shapes (in = 129, out = 77, M = 37 and a 3-D x of 3 x 5 rows) at ranks 1,
  16 and 64, with fp32 adapters and adapters in x's dtype, with and without bias. ``lora_linear``: y and every
  gradient against float64 math on the same inputs, as max |err| / max |truth| within the dtype's tolerance
  (:data:`LINEAR_TOL`). ``unload_`` of a 77 x 129 weight (nearest and stochastic rounding, momentum 0 and 0.3): W
  within one rounding of the float64 merge, and the adapter reset as the rule says (design §1);
- ``bits r<16``: below rank 16 every implementation merges exactly as ``ops/reference.py`` does, bit for bit: W,
  the fresh lora_A and lora_B, from the seeds of the same generator (design §3);
- ``guard``: a merge that would write a non-finite value (NaN or inf in a factor or in W, an fp16 overflow, an fp32
  product that overflows) raises ValueError and leaves W, A, B and the generator bit-identical; a finite merge at
  the largest fp16 value is not refused (design §2);
- ``dropout``: ``lora_dropout`` > 0 gives the torch path's result after the same ``torch.manual_seed`` (the same
  mask), and the float64 truth with the mask of ``ops/streams.py``;
- ``2nd GPU``: the same on tensors of a GPU other than the current one (needs two).

A cell reads ``ok``, ``FAILED: <what>`` or ``n/a: <why>`` (an implementation that cannot run here; not a
failure). Every cell, with its cases, errors and times, goes to a JSON record (default
``plora_out/check-<device>-<UTC timestamp>.json``), and the exit status is 1 when a cell failed. On a CPU the
torch path is checked, and with ``TRITON_INTERPRET=1`` the Triton kernels too (in Triton's interpreter).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import textwrap
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# lora_linear: max |err| / max |float64 truth| per output. A 16-bit result goes through several roundings (x A^T,
# the adapters cast to x's dtype, the skinny products, the output): 2**-9 each in bf16, up to 1.1e-2 measured on
# the torch path over 100 input draws, so bf16 is held to 2e-2 (as the test suite does; Triton's interpreter, whose
# bf16 arithmetic is not IEEE (design §6), fits the same bound).
LINEAR_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CHECKS = ("fp32", "fp16", "bf16", "bits", "guard", "dropout", "gpu2")
HEADERS = {"bits": "bits r<16", "gpu2": "2nd GPU"}
APPLIES = {"lora_linear": ("fp32", "fp16", "bf16", "dropout", "gpu2"),
           "unload": ("fp32", "fp16", "bf16", "bits", "guard", "gpu2")}
ROWS = {"lora_linear": ("lora_linear fwd", "lora_linear bwd"), "unload": ("unload_",)}
IN, OUT, M, LEAD3 = 129, 77, 37, (3, 5)
RANKS, QUICK_RANKS = (1, 16, 64), (1, 16)
SCALING = 1.7
CELL_WIDTH = 44  # longer cell texts get a footnote with the whole text

LEGEND = (
    "lora_linear: y (fwd), dx, dA, dB (bwd) against float64 math, max|err| / max|truth| <= "
    + ", ".join(f"{DTYPE_NAMES[d]} {t:.0e}" for d, t in LINEAR_TOL.items())
    + f" (x {M} x {IN} and {LEAD3[0]} x {LEAD3[1]} x {IN} -> {OUT}, ranks 1/16/64)",
    "unload_: W within 1/2 ulp (nearest) or 1 ulp (stochastic) of W's dtype from the float64 merge, plus "
    "2^-21 (|W| + |c s| |B||A|) for the fp32 arithmetic; B, A reset exactly by the rule",
    "bits r<16: W, A, B bit for bit those of ops/reference.py with the seeds of the same generator",
    "guard: non-finite merges raise ValueError with W, A, B and the generator bit-identical; fp16's max merges",
    "dropout: p > 0 gives the torch path's result for the same torch.manual_seed, and float64 with "
    "ops/streams.py's mask, within the dtype's tolerance",
    "n/a is not a failure; '-' is not a check of that op",
)


@dataclass
class Cell:
    """One op x implementation x check: its status, the first error, and every case it ran."""
    row: str
    implementation: str
    check: str
    status: str = "ok"  # ok | FAILED | n/a
    error: str | None = None
    cases: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    seconds: float = 0.0

    def record(self, case: str, errors: dict, tol: float) -> None:
        """Errors (name -> value) of one case, each held to ``tol``; NaN fails."""
        self.cases.append({"case": case, "tolerance": tol, **{k: _num(v) for k, v in errors.items()}})
        for name, value in errors.items():
            if not value <= tol:
                self.fail(case, f"{name} rel. err {value:.1e} > {tol:.0e}")

    def fail(self, case: str, what: str, detail: str | None = None) -> None:
        self.failures.append({"case": case, "error": what, **({"traceback": detail} if detail else {})})

    def finish(self) -> None:
        if self.status == "n/a":
            return
        if self.failures:
            first = self.failures[0]
            more = f"; {len(self.failures) - 1} more" if len(self.failures) > 1 else ""
            self.status, self.error = "FAILED", f"{first['error']} ({first['case']}{more})"

    def text(self) -> str:
        return "ok" if self.status == "ok" else f"{self.status}: {self.error}"

    def as_dict(self) -> dict:
        out = {"op": self.row, "implementation": self.implementation, "check": self.check,
               "status": self.status, "error": self.error, "seconds": round(self.seconds, 3), "cases": self.cases}
        if self.failures:
            out["failures"] = self.failures
        return out


def _num(v):
    """A JSON-safe number: non-finite floats as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float64 (inf for a shape mismatch; NaN if got has a NaN)."""
    if got is None or tuple(got.shape) != tuple(want.shape):
        return math.inf
    if want.numel() == 0:
        return 0.0
    diff = (got.detach().double() - want.detach().double()).abs().max()
    return (diff / want.detach().double().abs().max().clamp_min(1e-30)).item()


def _rand(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit pattern as integers (so -0 != +0 and NaN payloads count)."""
    view = {torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16)
    return t.detach().contiguous().cpu().view(view)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _where(a: torch.Tensor, b: torch.Tensor) -> str:
    """The first element where a and b differ in bits, as '[i, j] got vs want'."""
    idx = (_bits(a) != _bits(b)).nonzero()
    if not len(idx):
        return ""
    i = tuple(idx[0].tolist())
    return f"[{', '.join(map(str, i))}] {a.detach().cpu()[i].item():.6g} vs {b.detach().cpu()[i].item():.6g}"


# ------------------------------------------------------------------------------------------------ lora_linear
@dataclass
class LinearCase:
    lead: tuple
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    bias: bool
    p: float = 0.0

    def label(self) -> str:
        ad = DTYPE_NAMES[self.adapter_dtype]
        x = " x ".join(map(str, (*self.lead, IN)))
        return (f"{DTYPE_NAMES[self.dtype]} x ({x}) -> {OUT}, r={self.r}, {ad} adapters"
                + (", bias" if self.bias else "") + (f", dropout {self.p}" if self.p else ""))


def linear_cases(dtype: torch.dtype, quick: bool) -> list[LinearCase]:
    """Ranks 1, 16 (3-D x, adapters in x's dtype, bias) and 64 (--quick: 1 and 16)."""
    cases = [LinearCase((M,), 1, dtype, torch.float32, False),
             LinearCase(LEAD3, 16, dtype, dtype, True),
             LinearCase((M,), 64, dtype, torch.float32, True)]
    return [c for c in cases if c.r in (QUICK_RANKS if quick else RANKS)]


def _linear_inputs(case: LinearCase, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)  # the same inputs on every machine
    x = _rand(g, *case.lead, IN).to(device, case.dtype)
    W = _rand(g, OUT, IN, scale=IN ** -0.5).to(device, case.dtype)
    A = _rand(g, case.r, IN, scale=IN ** -0.5).to(device, case.adapter_dtype)
    B = _rand(g, OUT, case.r, scale=case.r ** -0.5).to(device, case.adapter_dtype)  # never zero: B = 0 hides bugs
    b = _rand(g, OUT).to(device, case.dtype) if case.bias else None
    dy = _rand(g, *case.lead, OUT).to(device, case.dtype)
    return x, W, A, B, b, dy


def _dropout_seed(device: torch.device, manual: int) -> int:
    """The seed lora_linear draws right after torch.manual_seed(manual) on ``device``."""
    from .ops import streams

    torch.manual_seed(manual)
    gen = None if device.type == "cpu" else torch.cuda.default_generators[device.index or 0]
    return streams.draw_seed(gen)


def _run_linear(impl: str, case: LinearCase, device: torch.device, seed: int):
    """lora_linear on ``impl`` (forward and backward) and the float64 truth: {output: (got, want)}."""
    from .ops import lora_linear, streams

    x, W, A, B, b, dy = _linear_inputs(case, device, seed)
    for t in (x, A, B):
        t.requires_grad_()
    keep = None
    if case.p:
        mask_seed = _dropout_seed(device, seed)
        keep = streams.dropout_keep(mask_seed, torch.arange(math.prod(case.lead), device=device),
                                    torch.arange(IN, device=device), case.p)
        torch.manual_seed(seed)
    with _backend.implementation(lora_linear=impl):
        y = lora_linear(x, W, A, B, SCALING, b, lora_dropout=case.p)
        y.backward(dy)
    if y.shape != (*case.lead, OUT) or y.dtype != case.dtype or y.device != device:
        raise AssertionError(f"y is {tuple(y.shape)} {y.dtype} on {y.device}, expected {(*case.lead, OUT)} "
                             f"{case.dtype} on {device}")
    if A.grad is None or A.grad.dtype != case.adapter_dtype or B.grad is None or B.grad.dtype != case.adapter_dtype:
        raise AssertionError("the adapters' gradients are missing or not in the adapters' dtype")
    x64, W64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, A, B))
    x2 = x64.reshape(-1, IN)
    xd = x2 if keep is None else x2 * keep.double() / (1.0 - case.p)
    y64 = x2 @ W64.T + SCALING * (xd @ A64.T) @ B64.T
    if b is not None:
        y64 = y64 + b.double()
    y64 = y64.reshape(*case.lead, OUT)
    y64.backward(dy.double())
    return {"y": (y, y64), "dx": (x.grad, x64.grad), "dA": (A.grad, A64.grad), "dB": (B.grad, B64.grad)}


def _linear_pair(cells: dict[str, Cell], impl: str, case: LinearCase, device: torch.device, seed: int,
                 against_torch: bool = False, tol: float | None = None) -> None:
    """One case into the fwd cell (y) and the bwd cell (dx, dA, dB); with ``against_torch``, also the torch path's
    result for the same seed (the dropout mask) for a non-torch implementation."""
    fwd, bwd = cells["lora_linear fwd"], cells["lora_linear bwd"]
    tol = LINEAR_TOL[case.dtype] if tol is None else tol
    label = case.label() + ("" if device == _check_device else f" on {device}")
    try:
        out = _run_linear(impl, case, device, seed)
        mine = None
        if against_torch and impl != "torch":
            mine = _run_linear("torch", case, device, seed)
    except Exception as exc:  # noqa: BLE001 - a cell reports what went wrong, it does not stop the check
        for cell in (fwd, bwd):
            cell.fail(label, _short(exc), traceback.format_exc())
        return
    fwd.record(label, {"y": rel_err(*out["y"])}, tol)
    bwd.record(label, {k: rel_err(*out[k]) for k in ("dx", "dA", "dB")}, tol)
    if mine is not None:  # the same mask: the same result as the torch path, to the dtype's tolerance
        fwd.record(label + " vs the torch path", {"y": rel_err(out["y"][0], mine["y"][0])}, tol)
        bwd.record(label + " vs the torch path", {k: rel_err(out[k][0], mine[k][0]) for k in ("dx", "dA", "dB")},
                   tol)


def _check_linear(cells, impl, check, device, quick):
    if check in DTYPES:
        for n, case in enumerate(linear_cases(DTYPES[check], quick)):
            _linear_pair(cells, impl, case, device, seed=100 * n + CHECKS.index(check))
    elif check == "dropout":
        cases = [LinearCase((M,), 16, torch.float32, torch.float32, True, p=0.3),
                 LinearCase(LEAD3, 3, torch.float16, torch.float32, False, p=0.1)]
        for n, case in enumerate(cases[:1] if quick else cases):
            _linear_pair(cells, impl, case, device, seed=500 + n, against_torch=True)
    elif check == "gpu2":
        other = _other_gpu(device)
        with torch.cuda.device(device):  # the current device stays the checked one; the tensors are elsewhere
            for n, case in enumerate([LinearCase(LEAD3, 16, torch.bfloat16, torch.float32, True),
                                      LinearCase((M,), 1, torch.float32, torch.float32, False, p=0.2)]):
                _linear_pair(cells, impl, case, other, seed=700 + n, against_torch=case.p > 0)


# ------------------------------------------------------------------------------------------------ unload
def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |v| (v in float64)."""
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    emin = int(math.log2(torch.finfo(dtype).tiny))
    e = torch.frexp(v)[1] - 1
    e = torch.where(v == 0, emin, e).clamp_min(emin)
    return torch.ldexp(torch.ones_like(v), e - mant)


def _factors(g: torch.Generator, rows: int, cols: int, r: int, w_dtype, f_dtype, device, b_dtype=None):
    """W, A, B as a trained layer has them (never zeros)."""
    W = _rand(g, rows, cols).to(device, w_dtype)
    A = _rand(g, r, cols, scale=0.3).to(device, f_dtype)
    B = _rand(g, rows, r, scale=0.3).to(device, b_dtype or f_dtype)
    return W, A, B


def _unload(impl, W, A, B, s, momentum, rounding, gen):
    from .ops import unload_

    with _backend.implementation(unload=impl):
        unload_(W, A, B, s, momentum=momentum, rounding=rounding, generator=gen)


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _unload_value_case(cell: Cell, impl: str, w_dtype, r: int, f_dtype, momentum: float, rounding: str,
                       device: torch.device, seed: int) -> None:
    """unload_ of a 77 x 129 W against the float64 merge, and the adapter reset."""
    label = (f"{DTYPE_NAMES[w_dtype]} W {OUT} x {IN}, r={r}, {DTYPE_NAMES[f_dtype]} factors, m={momentum}, "
             f"{rounding}")
    try:
        W, A, B = _factors(torch.Generator().manual_seed(seed), OUT, IN, r, w_dtype, f_dtype, device)
        s = 2.0 / r
        W1, A1, B1 = W.clone(), A.clone(), B.clone()
        _unload(impl, W1, A1, B1, s, momentum, rounding, _gen(device, seed))
        c = (1.0 - momentum) * s
        exact = W.double() + c * (B.double() @ A.double())
        half = 0.5 if rounding == "nearest" or w_dtype == torch.float32 else 1.0
        bound = (half * _ulp(exact, w_dtype) * (1 + 1e-6)
                 + 2.0 ** -21 * (W.double().abs() + abs(c) * (B.double().abs() @ A.double().abs())))
        off = ((W1.double() - exact).abs() / bound)
        worst = off.max().item() if torch.isfinite(off).all() else math.inf
        cell.cases.append({"case": label, "W_error_in_bounds": _num(worst)})
        if not worst <= 1.0:
            i = tuple((~(off <= 1.0)).nonzero()[0].tolist())
            cell.fail(label, f"W{list(i)} = {W1[i].item():.6g}, float64 merge {exact[i].item():.6g} (off by "
                             f"{worst:.3g} x the bound)")
        if momentum == 0.0:
            bound_a = 1.0 / math.sqrt(IN)
            if not torch.equal(B1, torch.zeros_like(B1)):
                cell.fail(label, "lora_B not zeroed (momentum 0)")
            if not (A1.abs().max().item() <= bound_a and A1.double().std().item() > bound_a / 3
                    and not torch.equal(A1, A)):
                cell.fail(label, "lora_A is not a fresh draw in U(-1/sqrt(in), 1/sqrt(in))")
        else:
            if not _same_bits(A1, A):
                cell.fail(label, f"lora_A changed (momentum {momentum} keeps it)")
            if not _same_bits(B1, B * momentum):
                cell.fail(label, f"lora_B is not momentum * lora_B: {_where(B1, B * momentum)}")
    except Exception as exc:  # noqa: BLE001
        cell.fail(label, _short(exc), traceback.format_exc())


def _expected(W, A, B, s, momentum, rounding, gen):
    """The reference's unload (W, A, B after it) with the seeds ``gen`` gives, computed by ops/reference.py."""
    from .ops import reference
    from .ops.merge import draw_seeds

    round_seed, init_seed = draw_seeds(W, rounding, momentum, gen)
    W_exp = reference.merge_value(W, A, B, (1.0 - momentum) * s, rounding, round_seed)
    A_exp, B_exp = A.clone(), B.clone()
    reference.reset_factors_([A_exp], [B_exp], [momentum], [init_seed])
    return W_exp, A_exp, B_exp


def bit_cases(quick: bool) -> list[tuple]:
    """(W dtype, factor dtype, r, rounding, momentum) below rank 16: 16-bit W with fp32 and 16-bit factors, both
    roundings (--quick: one), and fp32 W."""
    half = (torch.float16, torch.bfloat16)
    cases, n = [], 0
    for w in half:
        for f in (torch.float32, w):
            for rounding in (("stochastic",) if quick else ("stochastic", "nearest")):
                cases.append((w, f, (1, 3, 8, 15)[n % 4], rounding, 0.3 if n == 2 else 0.0))
                n += 1
    cases += [(torch.float32, torch.float32, 1, "nearest", 0.0), (torch.float32, torch.bfloat16, 8, "nearest", 0.3)]
    return cases[:-1] if quick else cases


def _bits_case(cell: Cell, impl: str, w_dtype, f_dtype, r, rounding, momentum, device, seed) -> None:
    label = (f"{DTYPE_NAMES[w_dtype]} W {OUT} x {IN}, r={r}, {DTYPE_NAMES[f_dtype]} factors, m={momentum}, "
             f"{rounding}")
    try:
        W, A, B = _factors(torch.Generator().manual_seed(seed), OUT, IN, r, w_dtype, f_dtype, device)
        s = 2.0 / r
        gen, gen_ref = _gen(device, seed), _gen(device, seed)
        want = _expected(W, A, B, s, momentum, rounding, gen_ref)
        got = (W.clone(), A.clone(), B.clone())
        _unload(impl, *got, s, momentum, rounding, gen)
        wrong = [f"{name} {_where(g, w)}" for name, g, w in zip(("W", "lora_A", "lora_B"), got, want)
                 if not _same_bits(g, w)]
        n_diff = int((_bits(got[0]) != _bits(want[0])).sum()) if got[0].shape == want[0].shape else -1
        cell.cases.append({"case": label, "W_elements_differing": n_diff, "bit_identical": not wrong})
        if wrong:
            cell.fail(label, f"not bit-identical to the reference: {'; '.join(wrong)}"
                             + (f" ({n_diff} of W's {W.numel()} differ)" if n_diff > 0 else ""))
        elif not torch.equal(gen.get_state(), gen_ref.get_state()):
            cell.fail(label, "the generator was not consumed as the reference consumes it")
    except Exception as exc:  # noqa: BLE001
        cell.fail(label, _short(exc), traceback.format_exc())


def guard_cases(quick: bool) -> list[tuple]:
    """(what, W dtype, rounding); a None W dtype case is the finite merge that must pass."""
    whats = [("NaN in lora_A", torch.float16), ("inf in lora_B", torch.float16), ("fp16 overflow", torch.float16),
             ("NaN in W", torch.float16), ("fp32 product overflow", torch.bfloat16),
             ("fp32 product overflow", torch.float32)]
    cases = []
    for n, (what, w) in enumerate(whats):
        roundings = ("stochastic", "nearest") if not quick else (("stochastic", "nearest")[n % 2],)
        cases += [(what, w, rounding) for rounding in roundings]
    return cases + [("finite merge at fp16's largest value", torch.float16, "nearest")]


def _guard_case(cell: Cell, impl: str, what: str, w_dtype, rounding: str, device, seed: int) -> None:
    label = f"{what}, {DTYPE_NAMES[w_dtype]} W, {rounding}"
    try:
        W, A, B = _factors(torch.Generator().manual_seed(seed), 40, 70, 4, w_dtype, torch.float32, device)
        if what == "NaN in lora_A":
            A[1, 3] = float("nan")
        elif what == "inf in lora_B":
            B[5, 0] = float("inf")
        elif what == "fp16 overflow":  # 65000 + 4 * 30 * 30 > 65504 with finite factors
            W[7, 9], B[7], A[:, 9] = 65000.0, 30.0, 30.0
        elif what == "NaN in W":
            W[0, 0] = float("nan")
        elif what == "fp32 product overflow":  # B A = 4 * 1e20 * 1e20: inf in fp32
            A.mul_(1e-3)
            B.mul_(1e-3)
            A[:, 5], B[3, :] = 1e20, 1e20
        else:  # the largest finite fp16 value plus a tiny update: finite, must merge
            W[2, 3] = 65504.0
            A.mul_(1e-2)
            B.mul_(1e-2)
            _unload(impl, W, A, B, 1.0, 0.0, rounding, _gen(device, seed))
            ok = bool(torch.isfinite(W).all()) and W[2, 3].item() == 65504.0
            cell.cases.append({"case": label, "merged": ok})
            if not ok:
                cell.fail(label, "a finite merge at fp16's largest value did not merge as expected")
            return
        saved = [t.clone() for t in (W, A, B)]
        gen = _gen(device, seed)
        state = gen.get_state()
        try:
            with warnings.catch_warnings():  # Triton's interpreter (numpy) warns of the overflow it computes
                warnings.simplefilter("ignore", RuntimeWarning)
                _unload(impl, W, A, B, 1.0, 0.0, rounding, gen)
        except ValueError as exc:
            refused = str(exc)
        else:
            refused = None
        changed = [name for name, t, s in zip(("W", "lora_A", "lora_B"), (W, A, B), saved) if not _same_bits(t, s)]
        cell.cases.append({"case": label, "refused": refused, "changed": changed})
        if refused is None:
            bad = int((~torch.isfinite(W)).sum())
            cell.fail(label, f"no ValueError; W now holds {bad} non-finite value(s)")
        elif "left unchanged" not in refused:
            cell.fail(label, f"ValueError without 'left unchanged': {refused[:80]}")
        if changed:
            cell.fail(label, f"{', '.join(changed)} changed by a refused unload")
        if not torch.equal(gen.get_state(), state):
            cell.fail(label, "a refused unload consumed random numbers")
    except Exception as exc:  # noqa: BLE001
        cell.fail(label, _short(exc), traceback.format_exc())


def _check_unload(cells, impl, check, device, quick):
    cell = cells["unload_"]
    if check in DTYPES:
        w = DTYPES[check]
        cases = [(1, torch.float32, 0.0, "nearest"), (16, w, 0.3, "stochastic"), (64, torch.float32, 0.0, "stochastic")]
        for n, (r, f, m, rounding) in enumerate(c for c in cases if c[0] in (QUICK_RANKS if quick else RANKS)):
            _unload_value_case(cell, impl, w, r, f, m, rounding, device, seed=300 + 10 * n + CHECKS.index(check))
    elif check == "bits":
        for n, case in enumerate(bit_cases(quick)):
            _bits_case(cell, impl, *case, device, seed=900 + n)
    elif check == "guard":
        for n, case in enumerate(guard_cases(quick)):
            _guard_case(cell, impl, *case, device, seed=1300 + n)
    elif check == "gpu2":
        other = _other_gpu(device)
        with torch.cuda.device(device):
            _bits_case(cell, impl, torch.bfloat16, torch.float32, 8, "stochastic", 0.0, other, seed=1700)
            _unload_value_case(cell, impl, torch.float16, 64, torch.float32, 0.0, "nearest", other, seed=1701)
            _guard_case(cell, impl, "fp16 overflow", torch.float16, "stochastic", other, seed=1702)


# ------------------------------------------------------------------------------------------------ the grid
_check_device: torch.device | None = None  # the device being checked (labels name any other)


def _other_gpu(device: torch.device) -> torch.device:
    return torch.device("cuda", next(i for i in range(torch.cuda.device_count()) if i != device.index))


def _gpu2_refusal(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs --device cuda and 2 GPUs"
    n = torch.cuda.device_count()
    return None if n >= 2 else f"needs 2 GPUs, this machine has {n}"


def _row_refusal(op: str, impl: str, device: torch.device) -> str | None:
    """Why ``impl`` of ``op`` cannot run on ``device`` here (the resolver's reason), or None."""
    why = _backend.refusals(device).get(f"{op}: {impl}")
    if why is None and op == "unload" and impl == "cuda":
        from .ops import cuda_unload

        if not cuda_unload.available():
            why = ("the csrc/ CUDA kernel needs nvcc (PATH, $CUDA_HOME, /usr/local/cuda) or a prebuilt library "
                   "($PLORA_CSRC_LIB)")
    return why


def _csrc_build() -> str | None:
    """Build the csrc/ library (once, cached by ops.cuda_unload); its error, or None."""
    from .ops import cuda_unload

    try:
        cuda_unload.library()
    except Exception as exc:  # noqa: BLE001
        return _short(exc)
    return None


@dataclass
class Task:
    op: str
    implementation: str
    check: str
    refusal: str | None = None

    def name(self) -> str:
        op = "unload_" if self.op == "unload" else self.op
        return f"{op} {self.implementation} {HEADERS.get(self.check, self.check)}"


def _matches(only: dict[str, set] | None, op: str, impl: str, check: str) -> bool:
    if not only:
        return True
    return all(not want or value in want for value, want in
               ((op, only.get("op")), (impl, only.get("implementation")), (check, only.get("check"))))


def parse_only(text: str | None) -> dict[str, set] | None:
    """``--only``: comma-separated op names (lora_linear, unload), implementations and checks; names of one kind
    are alternatives, kinds combine (``--only triton,guard``: the guard on the Triton implementations)."""
    if not text:
        return None
    kinds = {"op": set(_backend.IMPLEMENTATIONS), "check": set(CHECKS),
             "implementation": {i for names in _backend.IMPLEMENTATIONS.values() for i in names}}
    aliases = {"unload_": "unload", "bits r<16": "bits", "2nd-gpu": "gpu2"}
    out: dict[str, set] = {}
    for token in (t.strip().lower() for t in text.split(",")):
        if not token:
            continue
        token = aliases.get(token, token)
        kind = next((k for k, names in kinds.items() if token in names), None)
        if kind is None:
            valid = sorted(set().union(*kinds.values()))
            raise ValueError(f"argument --only: unknown name {token!r}; use ops, implementations or checks: "
                             f"{', '.join(valid)}")
        out.setdefault(kind, set()).add(token)
    return out


def plan(device: torch.device, only: dict | None = None) -> list[Task]:
    """Every op x implementation x check to run or to mark n/a, in table order."""
    tasks = []
    for op, impls in _backend.IMPLEMENTATIONS.items():
        for impl in impls:
            refusal = _row_refusal(op, impl, device)
            for check in APPLIES[op]:
                if _matches(only, op, impl, check):
                    why = refusal or (_gpu2_refusal(device) if check == "gpu2" else None)
                    tasks.append(Task(op, impl, check, why))
    return tasks


def _progress(total: int, enabled: bool):
    """A tqdm bar on a terminal; elsewhere (logs, pipes) one line per check on stderr."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="plora check", unit="check", leave=False, dynamic_ncols=True,
                        file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return None


def run_checks(device: torch.device, *, quick: bool = False, only: dict | None = None,
               progress: bool = True) -> list[Cell]:
    """Run the grid on ``device``; returns every cell (n/a ones included), in table order."""
    global _check_device
    _check_device = device
    tasks = plan(device, only)
    bar = _progress(len(tasks), progress)
    cells: list[Cell] = []
    csrc_error: list = []
    for k, task in enumerate(tasks, 1):
        t0 = time.perf_counter()
        row_cells = {row: Cell(row, task.implementation, task.check) for row in ROWS[task.op]}
        if task.refusal is not None:
            for cell in row_cells.values():
                cell.status, cell.error = "n/a", task.refusal
        else:
            if task.op == "unload" and task.implementation == "cuda" and not csrc_error:
                csrc_error.append(_csrc_build())
            if csrc_error and csrc_error[0] and task.op == "unload" and task.implementation == "cuda":
                row_cells["unload_"].fail("building csrc/plora_unload.cu", csrc_error[0])
            else:
                run = _check_linear if task.op == "lora_linear" else _check_unload
                try:
                    run(row_cells, task.implementation, task.check, device, quick)
                except Exception as exc:  # noqa: BLE001 - a bug of the check itself still yields a row
                    for cell in row_cells.values():
                        cell.fail("setup", _short(exc), traceback.format_exc())
        dt = time.perf_counter() - t0
        for cell in row_cells.values():
            cell.seconds = dt / len(row_cells)
            cell.finish()
            cells.append(cell)
        status = "FAILED" if any(c.status == "FAILED" for c in row_cells.values()) else \
            ("n/a" if task.refusal else "ok")
        if bar is not None:
            bar.update(1)
        elif progress and task.refusal is None:
            print(f"plora check [{k}/{len(tasks)}] {task.name()}: {status} ({dt:.1f} s)", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    return cells


# ------------------------------------------------------------------------------------------------ output
def format_table(cells: list[Cell]) -> list[str]:
    """The table: rows op / implementation, columns the checks; a row that cannot run here is one n/a with its
    reason; cell texts longer than CELL_WIDTH get a footnote with the whole text."""
    checks = [c for c in CHECKS if any(cell.check == c for cell in cells)]
    rows: dict[tuple, dict[str, Cell]] = {}
    for cell in cells:
        rows.setdefault((cell.row, cell.implementation), {})[cell.check] = cell
    notes: list[str] = []

    def show(cell: Cell | None) -> str:
        if cell is None:
            return "-"
        text = cell.text()
        if len(text) <= CELL_WIDTH:
            return text
        if text not in notes:
            notes.append(text)
        tag = f" [{notes.index(text) + 1}]"
        return text[:CELL_WIDTH - len(tag) - 3] + "..." + tag

    table, spans = [], {}
    for (row, impl), by_check in rows.items():
        present = list(by_check.values())
        reasons = {c.error for c in present}
        if all(c.status == "n/a" for c in present) and len(reasons) == 1 and len(present) > 1:
            spans[(row, impl)] = f"n/a: {reasons.pop()}"  # the whole row: the implementation cannot run here
            table.append([row, impl])
        else:
            table.append([row, impl, *(show(by_check.get(c)) for c in checks)])
    head = ["op", "implementation", *(HEADERS.get(c, c) for c in checks)]
    widths = [max(len(r[i]) for r in [head, *table] if i < len(r)) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for r in table:
        line = "  ".join(v.ljust(w) for v, w in zip(r, widths))
        if len(r) == 2:
            line += "  " + spans[(r[0], r[1])]
        lines.append(line.rstrip())
    lines += [f"[{n}] {text}" for n, text in enumerate(notes, 1)]
    return lines


def _versions() -> dict:
    import platform

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported as missing
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor})"
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def record_path(out_dir: Path, device: torch.device, stamp: str) -> Path:
    slug = str(device).replace(":", "")
    path = out_dir / f"check-{slug}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = out_dir / f"check-{slug}-{stamp}-{n}.json"
    return path


def parse_device(text: str) -> torch.device:
    """--device: cpu, cuda (the current GPU) or cuda:N, refused when no such device is visible."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"argument --device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"argument --device: expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"argument --device: {text}: no CUDA device is visible here (torch.cuda.is_available() is "
                         "False); use --device cpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"argument --device: {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda (the current GPU) or cuda:N (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--out", default="plora_out",
                        help="folder of the JSON record check-<device>-<UTC timestamp>.json (default plora_out)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases: ranks 1 and 16, one rounding per bit-identity and guard case")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="comma-separated ops (lora_linear, unload), implementations (torch, triton, ...) or "
                             "checks (fp32, fp16, bf16, bits, guard, dropout, gpu2): run only the cells that match")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return parser


def _writable(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".plora-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"argument --out: cannot write to {out!r}: {exc.strerror or exc}") from None
    return path


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the check from parsed flags: print the table, write the record, return the exit status (1 when a cell
    failed). A bad flag is reported as argparse reports its own (exit status 2) when ``parser`` is given."""
    try:
        device = parse_device(args.device)
        only = parse_only(args.only)
        if not plan(device, only):
            raise ValueError(f"argument --only: {args.only!r} matches no cell (no op has all of those checks)")
        out_dir = _writable(args.out)
    except ValueError as exc:
        if parser is None:
            raise
        parser.error(str(exc))
    now = _dt.datetime.now(_dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    # one pinned tile configuration per GEMM, as the GPU test run does: a check runs each shape once, and an
    # autotuning sweep per shape would cost more than the check (a user's setting is kept)
    pinned = "PLORA_AUTOTUNE" not in os.environ
    if pinned:
        os.environ["PLORA_AUTOTUNE"] = "0"
    t0 = time.perf_counter()
    try:
        cells = run_checks(device, quick=args.quick, only=only, progress=not args.no_progress)
    finally:
        if pinned:
            os.environ.pop("PLORA_AUTOTUNE", None)
    seconds = time.perf_counter() - t0
    versions = _versions()
    counts = {s: sum(c.status == s for c in cells) for s in ("ok", "FAILED", "n/a")}
    name = device_name(device)
    settings = _backend.settings()
    print(f"plora check on {device}: {name}; torch {versions['torch']}, triton {versions['triton'] or 'not installed'}"
          f"; TRITON_INTERPRET {'on' if _backend.interpreting() else 'off'}{'; --quick' if args.quick else ''}")
    for line in format_table(cells):
        print(line)
    print("tolerances and rules:")
    for line in LEGEND:
        print(textwrap.fill(line, 118, initial_indent="  ", subsequent_indent="    "))
    path = record_path(out_dir, device, stamp)
    record = {
        "command": "plora check", "schema": 1, "timestamp_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device), "device_name": name, **versions,
        "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "interpreting": _backend.interpreting(), "quick": bool(args.quick), "only": args.only,
        "settings": {**settings, **({"PLORA_AUTOTUNE": "0 (pinned by plora check)"} if pinned else {})},
        "tolerances": {"lora_linear": {DTYPE_NAMES[d]: t for d, t in LINEAR_TOL.items()}, "rules": list(LEGEND)},
        "ok": counts["FAILED"] == 0, "counts": counts, "seconds": round(seconds, 2),
        "cells": [c.as_dict() for c in cells],
    }
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"{counts['ok']} ok, {counts['FAILED']} FAILED, {counts['n/a']} n/a in {seconds:.1f} s; record: {path}")
    return 1 if counts["FAILED"] else 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="plora check", description=__doc__.split("\n")[0]))
    return run_from_args(parser.parse_args(argv), parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main", "run_checks", "run_from_args", "add_arguments", "format_table", "Cell", "LINEAR_TOL", "CHECKS"]
