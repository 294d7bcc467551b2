"""``plora bench linear``: the fused LoRA linear against cuBLAS and the usual unfused forms.

Forward and forward+backward for M in {1024, 8192, 32768}, (in, out) in {(4096, 4096), (4096, 14336)},
r in {8, 16, 64}. Contenders, all timed in the same process on the same tensors:

  floor     cuBLAS base GEMM: ``x @ W.T`` (forward); ``x @ W.T`` and ``dy @ W`` (forward+backward)
  peft      PEFT-style unfused layer: ``base(x) + lora_B(lora_A(x)) * s`` with nn.Linear modules, autograd
  addmm     cuBLAS ``addmm_`` style: ``y = x @ W.T; y.addmm_(x @ A.T, B.T, alpha=s)`` and a hand-written
            backward of the same kind (``dx = dy @ W; dx.addmm_(dy @ B, A, alpha=s)``)
  ours      ``plora_kernels.lora_linear``

``--pieces`` (GPU, Triton) adds forward rows that time the fused forward's parts on their own: the Triton
GEMM without the low-rank term (against the floor it says how far the GEMM itself is from cuBLAS), the
fused GEMM given a precomputed xa, and xa = x @ A.T by Triton and by cuBLAS.

Every tensor (x, W, A, B, dy) is in ``--dtype`` (bf16 by default) for every contender: we do not use
PEFT's fp32-adapter default here, so that all contenders do the same arithmetic. No bias, no dropout, W frozen;
forward+backward produces dx, dA and dB (no dW). FLOPs: forward 2·M·in·out·(1 + r/out + r/in);
forward+backward 4·M·in·out + 6·M·r·(in + out); the floor rows count only their GEMMs (2·M·in·out, 4·M·in·out).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from . import common

GPU_MS = (1024, 8192, 32768)
GPU_FEATURES = ((4096, 4096), (4096, 14336))
GPU_RANKS = (8, 16, 64)
QUICK_SHAPE = (8192, 4096, 4096)
QUICK_RANK = 16
CPU_SHAPE = (256, 512, 512)  # M, in, out: the reference path on a small shape
TARGET = {"M": 8192, "in": 4096, "out": 4096, "r": 16, "dtype": "bf16", "fwd": 1.05, "fwd+bwd": 1.08}

CONTENDERS = {
    "floor": "cuBLAS base GEMM: x@W.T (fwd); x@W.T + dy@W (fwd+bwd)",
    "peft": "PEFT-style unfused: nn.Linear base(x) + lora_B(lora_A(x))*s, autograd backward",
    "addmm": "cuBLAS addmm_ style: y=x@W.T; y.addmm_(x@A.T, B.T, alpha=s); hand-written backward with addmm_",
    "ours": "plora_kernels.lora_linear",
}
MODES = ("fwd", "fwd+bwd")


def lora_flops(M: int, k_in: int, n_out: int, r: int, mode: str) -> float:
    if mode == "fwd":
        return 2.0 * M * k_in * n_out * (1 + r / n_out + r / k_in)
    return 4.0 * M * k_in * n_out + 6.0 * M * r * (k_in + n_out)


def floor_flops(M: int, k_in: int, n_out: int, mode: str) -> float:
    return (2.0 if mode == "fwd" else 4.0) * M * k_in * n_out


class _AddmmLoRA(torch.autograd.Function):
    """The cuBLAS + addmm_ formulation (as Unsloth-style kernels do it), forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling):
        xa = x @ lora_A.t()
        y = x @ weight.t()
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        g = dy @ lora_B
        dx = dy @ weight
        dx.addmm_(g, lora_A, alpha=s)
        grad_A = (g.t() @ x).mul_(s)
        grad_B = (dy.t() @ xa).mul_(s)
        return dx, None, grad_A, grad_B, None


def _peft_modules(weight: torch.Tensor, lora_A: nn.Parameter, lora_B: nn.Parameter):
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    kw = dict(bias=False, device="meta")
    base, down, up = nn.Linear(in_f, out_f, **kw), nn.Linear(in_f, r, **kw), nn.Linear(r, out_f, **kw)
    base.weight = nn.Parameter(weight, requires_grad=False)
    down.weight = lora_A
    up.weight = lora_B
    return base, down, up


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_tensors(M, k_in, n_out, r, dtype, device):
    """Random x, W, A, B, dy for one shape (seeded by the shape, so every contender and part sees the same)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(M * 7 + k_in * 3 + n_out + r)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32, generator=gen) * scale).to(dtype)

    x = randn(M, k_in)
    weight = randn(n_out, k_in, scale=k_in ** -0.5)
    lora_A = ((torch.rand(r, k_in, device=device, generator=gen) * 2 - 1) * k_in ** -0.5).to(dtype)
    lora_B = randn(n_out, r, scale=0.02)  # non-zero: a trained adapter, not a fresh one
    return x, weight, lora_A, lora_B, randn(M, n_out)


def build_case(M, k_in, n_out, r, dtype, device, scaling=2.0):
    """Random tensors for one shape and every contender as a zero-argument callable:
    ``{"fwd": {name: fn}, "fwd+bwd": {name: fn}}``. Forward callables are meant to run under no_grad."""
    from ..ops.lora_linear import lora_linear

    x, weight, lora_A, lora_B, dy = make_tensors(M, k_in, n_out, r, dtype, device)
    lora_A, lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
    s = float(scaling)
    base, down, up = _peft_modules(weight, lora_A, lora_B)
    xg = x.detach().requires_grad_(True)
    params = (xg, lora_A, lora_B)

    def peft_forward(inp):
        return base(inp) + up(down(inp)) * s

    def addmm_forward(inp):
        y = inp @ weight.t()
        return y.addmm_(inp @ lora_A.t(), lora_B.t(), alpha=s)

    return {
        "fwd": {
            "floor": lambda: x @ weight.t(),
            "peft": lambda: peft_forward(x),
            "addmm": lambda: addmm_forward(x),
            "ours": lambda: lora_linear(x, weight, lora_A, lora_B, s),
        },
        "fwd+bwd": {
            "floor": lambda: (x @ weight.t(), dy @ weight),
            "peft": lambda: torch.autograd.grad(peft_forward(xg), params, dy),
            "addmm": lambda: torch.autograd.grad(_AddmmLoRA.apply(xg, weight, lora_A, lora_B, s), params, dy),
            "ours": lambda: torch.autograd.grad(lora_linear(xg, weight, lora_A, lora_B, s), params, dy),
        },
    }


PIECES = {
    "piece: triton x@W.T": "the Triton GEMM alone, no low-rank term (HAS_LORA off)",
    "piece: triton x@W.T + s*xa@B.T": "the fused GEMM given xa (the forward minus its xa launch)",
    "piece: triton xa=x@A.T": "the forward's first launch, N = r",
    "piece: cuBLAS xa=x@A.T": "the same product by cuBLAS",
    "piece: triton-tma x@W.T": "the TMA/persistent GEMM alone (PLORA_LINEAR_KERNEL=triton-tma)",
    "piece: triton-tma x@W.T + s*xa@B.T": "the TMA/persistent fused GEMM given xa",
}


def piece_fns(M, k_in, n_out, r, dtype, device, scaling=2.0) -> dict:
    """name -> callable for PIECES, on the tensors build_case makes for this shape."""
    from ..ops.triton.lora_matmul import lora_matmul

    x, weight, lora_A, lora_B, _ = make_tensors(M, k_in, n_out, r, dtype, device)
    xa = x @ lora_A.t()
    return {
        "piece: triton x@W.T": lambda: lora_matmul(x, weight.t(), tma=False),
        "piece: triton x@W.T + s*xa@B.T": lambda: lora_matmul(x, weight.t(), lora_s=xa, lora_l=lora_B.t(),
                                                              scaling=scaling, tma=False),
        "piece: triton xa=x@A.T": lambda: lora_matmul(x, lora_A.t(), tma=False),
        "piece: cuBLAS xa=x@A.T": lambda: x @ lora_A.t(),
        "piece: triton-tma x@W.T": lambda: lora_matmul(x, weight.t(), tma=True),
        "piece: triton-tma x@W.T + s*xa@B.T": lambda: lora_matmul(x, weight.t(), lora_s=xa, lora_l=lora_B.t(),
                                                                  scaling=scaling, tma=True),
    }


def _run_config(M, k_in, n_out, r, dtype, device, args, backend_label):
    """Time every contender on one (M, in, out, r); returns the result rows."""
    fns = build_case(M, k_in, n_out, r, dtype, device)

    # agreement check (forward and gradients) against the addmm formulation before timing anything
    checks = {}
    try:
        with torch.no_grad():
            ref = fns["fwd"]["addmm"]()
            for name in ("peft", "ours"):
                checks[f"fwd:{name}"] = _rel_err(fns["fwd"][name](), ref)
        ref_g = fns["fwd+bwd"]["addmm"]()
        for name in ("peft", "ours"):
            got = fns["fwd+bwd"][name]()
            checks[f"fwd+bwd:{name}"] = max(_rel_err(g, rg) for g, rg in zip(got, ref_g))
        del ref, ref_g, got
    except Exception as exc:  # noqa: BLE001 - a failure is recorded with the contender's rows below
        checks["error"] = f"{type(exc).__name__}: {exc}"

    rows = []
    for mode in args.modes:
        floor_ms = None
        for name in CONTENDERS:
            row = {"mode": mode, "M": M, "in": k_in, "out": n_out, "r": r, "dtype": common.dtype_name(dtype),
                   "contender": name, "label": name if name != "ours" else f"ours ({backend_label})"}
            flops = floor_flops(M, k_in, n_out, mode) if name == "floor" else lora_flops(M, k_in, n_out, r, mode)
            row["flops"] = flops
            if name != "floor":
                row["rel_err_vs_addmm"] = checks.get(f"{mode}:{name}") if name != "addmm" else 0.0
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        t = common.bench(fns[mode][name], device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
                else:
                    t = common.bench(fns[mode][name], device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            except Exception as exc:  # noqa: BLE001 - record, keep going with the other contenders
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                common.free_memory(device)
                continue
            row.update(t.as_dict())
            row["tflops"] = flops / (t.median_ms * 1e-3) / 1e12
            if name == "floor":
                floor_ms = t.median_ms
            row["ratio_to_floor"] = t.median_ms / floor_ms if floor_ms else None
            rows.append(row)
    floor = next((row for row in rows if row["mode"] == "fwd" and row["contender"] == "floor"), None)
    if getattr(args, "pieces", False) and backend_label.startswith("triton") and floor and floor.get("median_ms"):
        for name, fn in piece_fns(M, k_in, n_out, r, dtype, device).items():
            row = {"mode": "fwd", "M": M, "in": k_in, "out": n_out, "r": r, "dtype": common.dtype_name(dtype),
                   "contender": name, "label": name}
            try:
                with torch.no_grad():
                    t = common.bench(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
                row.update(t.as_dict(), ratio_to_floor=t.median_ms / floor["median_ms"])
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
    if "error" in checks:
        for row in rows:
            row.setdefault("note", f"agreement check failed: {checks['error']}"[:300])
    del fns
    common.free_memory(device)
    return rows


COLUMNS = [
    ("mode", "mode", ""), ("M", "M", "d"), ("in", "in", "d"), ("out", "out", "d"), ("r", "r", "d"),
    ("label", "contender", ""), ("median_ms", "median ms", ".4f"), ("p20_ms", "p20", ".4f"),
    ("p80_ms", "p80", ".4f"), ("tflops", "TFLOP/s", ".1f"), ("ratio_to_floor", "x floor", ".3f"),
    ("rel_err_vs_addmm", "rel.err", ".1e"),
]


def _targets(rows, on_gpu):
    out = []
    for mode in MODES:
        hit = [r for r in rows if r["mode"] == mode and r["contender"] == "ours" and r["M"] == TARGET["M"]
               and r["in"] == TARGET["in"] and r["out"] == TARGET["out"] and r["r"] == TARGET["r"]
               and r["dtype"] == TARGET["dtype"] and r.get("ratio_to_floor") is not None]
        if hit and on_gpu:
            ratio = hit[0]["ratio_to_floor"]
            out.append({"what": f"{mode} ours / floor at M=8192 in=out=4096 r=16 bf16", "value": ratio,
                        "target": f"<= {TARGET[mode]}", "met": ratio <= TARGET[mode]})
    return out


def _plot(path, rows, title):
    panels = []
    for mode in MODES:
        sub = [r for r in rows if r["mode"] == mode]
        if not sub:
            continue
        keys = []
        for r in sub:
            k = (r["M"], r["in"], r["out"], r["r"])
            if k not in keys:
                keys.append(k)
        series = {}
        for name in CONTENDERS:
            if name == "floor":
                continue
            vals = []
            for k in keys:
                hit = [r for r in sub if (r["M"], r["in"], r["out"], r["r"]) == k and r["contender"] == name]
                vals.append(hit[0].get("ratio_to_floor") if hit else None)
            label = next((r["label"] for r in sub if r["contender"] == name), name)
            series[label] = vals
        hlines = [(1.0, "floor")]
        if mode in TARGET:
            hlines.append((TARGET[mode], f"target {TARGET[mode]}x"))
        panels.append({"title": f"{mode}: time / floor (lower is better)", "ylabel": "x floor",
                       "groups": [f"M={m} {i}x{o} r={r}" for m, i, o, r in keys], "series": series,
                       "hlines": hlines})
    return common.plot_grouped_bars(path, panels, title) if panels else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plora bench linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one shape: M=8192, in=out=4096, r=16 on a GPU (the DESIGN target); on CPU one rank")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32; used for every tensor")
    p.add_argument("--shape", action="append", default=None, metavar="M,IN,OUT",
                   help="a shape to run instead of the defaults (repeatable)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (default)")
    p.add_argument("--pieces", action="store_true",
                   help="also time the fused forward's parts (Triton GEMM alone, fused GEMM given xa, xa)")
    common.add_common_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        dtype = common.parse_dtypes(args.dtype)
        if len(dtype) != 1:
            raise ValueError("--dtype takes one dtype")
        dtype = dtype[0]
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not args.modes or any(m not in MODES for m in args.modes):
            raise ValueError(f"--modes must be a comma-separated subset of {MODES}")
        ranks = common.parse_ints(args.ranks) if args.ranks else None
        shapes = common.parse_shapes(args.shape, 3, "M,IN,OUT")
    except ValueError as exc:
        print(f"plora bench linear: {exc}", file=sys.stderr)
        return 2

    device, notes = common.pick_device_announced()
    on_gpu = device.type == "cuda"
    if shapes is None:
        if on_gpu:
            shapes = [QUICK_SHAPE] if args.quick else [(m, i, o) for i, o in GPU_FEATURES for m in GPU_MS]
        else:
            shapes = [CPU_SHAPE]
    if ranks is None:
        ranks = [QUICK_RANK] if args.quick else list(GPU_RANKS)
    notes.append(f"every tensor in {common.dtype_name(dtype)} for every contender (not PEFT's fp32-adapter "
                 "default); no bias; W frozen; fwd+bwd returns dx, dA, dB; scaling s = 2.0")

    env = common.environment(device)
    probe = torch.empty(1, device=device, dtype=dtype)
    backend_label = common.backend_label(probe)
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"dtype {common.dtype_name(dtype)}  ours runs: {backend_label}", flush=True)

    rows = []
    for M, k_in, n_out in shapes:
        for r in ranks:
            got = _run_config(M, k_in, n_out, r, dtype, device, args, backend_label)
            common.print_table(got, COLUMNS)
            print(flush=True)
            rows.extend(got)

    targets = _targets(rows, on_gpu)
    errors = [r for r in rows if "error" in r]
    print("== all results ==")
    common.print_table(rows, COLUMNS)
    for t in targets:
        print(f"target: {t['what']}: {t['value']:.3f} (target {t['target']}) -> {'MET' if t['met'] else 'NOT MET'}")
    for r in errors:
        print(f"error: {r['mode']} M={r['M']} {r['in']}x{r['out']} r={r['r']} {r['contender']}: {r['error']}")

    if args.no_save:
        return 1 if errors else 0
    stem = common.result_stem("linear", env, args.out)
    png = _plot(stem.with_suffix(".png"), rows, f"lora_linear vs cuBLAS - {env['device_name']} - "
                                                f"{common.dtype_name(dtype)}")
    payload = {
        "benchmark": "linear", "schema": 1, "environment": env,
        "config": {"shapes": [list(s) for s in shapes], "ranks": ranks, "dtype": common.dtype_name(dtype),
                   "modes": args.modes, "quick": args.quick, "scaling": 2.0, "warmup_ms": args.warmup_ms,
                   "rep_ms": args.rep_ms, "ours_backend": backend_label, "contenders": CONTENDERS, "pieces": PIECES if args.pieces else None,
                   "flops": {"fwd": "2*M*in*out*(1 + r/out + r/in)", "fwd+bwd": "4*M*in*out + 6*M*r*(in + out)",
                             "floor": "2*M*in*out (fwd), 4*M*in*out (fwd+bwd)"}},
        "notes": notes, "targets": targets,
    }
    common.save_record(stem, payload, rows, png)
    return 1 if errors else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
