"""``plora bench unload``: the in-place unload (merge B A into W) against the usual ways and device copy.

W shapes (out x in) 4096x4096, 4096x14336, 8192x28672 with r in {8, 16, 64}, bf16 and fp16, plus the
target row 8192x8192 r=16 bf16. Contenders, timed in one process on the same tensors:

  copy               ``dst.copy_(src)`` of a W-sized tensor: the bandwidth an in-place pass can hope for
  peft               PEFT-style ``W += (B @ A * s).to(W.dtype)`` (materialises the full update)
  addmm-fp32         ``t = W.float(); t.addmm_(B.float(), A.float(), alpha=s); W.copy_(t)`` (one rounding,
                     a W-sized fp32 temporary)
  unload_ nearest    ``plora_kernels.unload_`` (the public call: argument checks, finiteness of the factors,
  unload_ stochastic the overflow bound, the merge kernel and the factor reset), momentum m = 0.999
  merge_ nearest     the raw Triton merge kernel alone, ``ops.triton.unload.merge_(..., write=True)``
  merge_ stochastic
  cuda nearest       the CUDA C++ twin ``ops.cuda_unload.merge_`` where it is built and available
  cuda stochastic

``--sweep`` adds ablation rows for the raw Triton merge ("sweep ..."), each one knob of
``ops.triton.unload.merge_(tuning=...)`` away from production: other tiles, the rank-1-update path instead of
the dot, no max|W| report, fewer Philox rounds (0 rounds: the RNG's cost), no low-rank product (the pass
over W alone). One GPU call then says where the merge's time goes.

Bytes moved = 2·|W|·itemsize (W read once, written once; the factors are negligible). "% copy" is the copy
row's time over the contender's time. Peak extra memory is ``torch.cuda.max_memory_allocated`` during one
call minus what was allocated before it (steady state; for unload_ also the first call on a weight, which
reads W once to learn max|W|). Timing an in-place op repeatedly changes W: W, A and B start random (never
zeros) and the update per call is small, so every value stays finite.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import common

GPU_SHAPES = ((4096, 4096), (4096, 14336), (8192, 28672))
GPU_RANKS = (8, 16, 64)
TARGET_SHAPE, TARGET_RANK = (8192, 8192), 16
CPU_SHAPE = (512, 1024)
MOMENTUM = 0.999
SCALING = 2.0
COEF = (1.0 - MOMENTUM) * SCALING  # what unload_ merges: the raw kernels get the same coefficient
SEED = 1234
TARGET_PCT = 85.0

CONTENDERS = {
    "copy": "dst.copy_(src) of a W-sized tensor (device copy bandwidth)",
    "peft": "PEFT-style W += (B @ A * s).to(W.dtype)",
    "addmm-fp32": "t = W.float(); t.addmm_(B.float(), A.float(), alpha=s); W.copy_(t)",
    "unload_ nearest": "plora_kernels.unload_(W, A, B, s, momentum=0.999, rounding='nearest') (public call)",
    "unload_ stochastic": "plora_kernels.unload_(..., rounding='stochastic') (public call)",
    "merge_ nearest": "raw Triton kernel ops.triton.unload.merge_(W, A, B, coef, 'nearest', seed, write=True)",
    "merge_ stochastic": "raw Triton kernel, stochastic rounding",
    "cuda nearest": "CUDA C++ twin ops.cuda_unload.merge_(..., 'nearest', write=True)",
    "cuda stochastic": "CUDA C++ twin, stochastic rounding",
}


def _cuda_twin():
    """(module, None) when the CUDA twin can run here, else (None, why not)."""
    try:
        from ..ops import cuda_unload
    except Exception as exc:  # noqa: BLE001 - missing module or a failed build/load
        return None, f"plora_kernels.ops.cuda_unload not importable ({type(exc).__name__}: {exc})"
    try:
        ok = bool(cuda_unload.available())
    except Exception as exc:  # noqa: BLE001
        return None, f"cuda_unload.available() raised {type(exc).__name__}: {exc}"
    return (cuda_unload, None) if ok else (None, "cuda_unload.available() is False")


def make_tensors(n_out, k_in, r, dtype, factor_dtype, device):
    """Random W (out, in), A (r, in), B (out, r) as a trained layer would have them (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(n_out * 3 + k_in + r)
    weight = (torch.randn(n_out, k_in, device=device, generator=gen) * 0.02).to(dtype)
    lora_A = ((torch.rand(r, k_in, device=device, generator=gen) * 2 - 1) * k_in ** -0.5).to(factor_dtype)
    lora_B = (torch.randn(n_out, r, device=device, generator=gen) * 0.02).to(factor_dtype)
    return weight, lora_A, lora_B


# (label, knobs) for --sweep; "stochastic only" rows vary the random stream's cost
SWEEP = (
    ("default", {}),
    ("64x256 w8 (default until 2026-11-26)", {"block_m": 64, "block_n": 256, "num_warps": 8}),
    ("64x256 w16", {"block_m": 64, "block_n": 256, "num_warps": 16}),
    ("32x256 w16", {"block_m": 32, "block_n": 256, "num_warps": 16}),
    ("64x128 w16", {"block_m": 64, "block_n": 128, "num_warps": 16}),
    ("32x128 w8", {"block_m": 32, "block_n": 128, "num_warps": 8}),
    ("16x256 w8", {"block_m": 16, "block_n": 256, "num_warps": 8}),
    ("fma", {"small_r": True}),
    ("dot", {"small_r": False}),
    ("no stats", {"stats": False}),
    ("no delta", {"delta": False}),
    ("no delta, no stats", {"delta": False, "stats": False}),
)
SWEEP_STOCHASTIC = (("philox 7 rounds", {"n_rounds": 7}), ("philox 0 rounds", {"n_rounds": 0}))


def sweep_fns(weight, lora_A, lora_B) -> dict:
    """label -> callable: the raw Triton merge with each ablation of SWEEP, nearest and stochastic."""
    from ..ops.triton.unload import merge_

    fns = {}
    for rounding in ("nearest", "stochastic"):
        extra = SWEEP_STOCHASTIC if rounding == "stochastic" else ()
        for label, knobs in SWEEP + extra:
            fns[f"sweep {rounding} [{label}]"] = (
                lambda rounding=rounding, knobs=knobs: merge_(weight, lora_A, lora_B, COEF, rounding, SEED,
                                                              write=True, tuning=knobs))
    return fns


def contender_fns(weight, lora_A, lora_B, skip=None):
    """name -> zero-argument callable for every contender but "copy"; names that cannot run here go into
    ``skip`` (a dict) with the reason."""
    from ..ops.unload import unload_

    skip = {} if skip is None else skip
    on_gpu = weight.device.type == "cuda"

    fns = {
        "peft": lambda: weight.add_((lora_B @ lora_A * SCALING).to(weight.dtype)),
        "addmm-fp32": lambda: weight.copy_(weight.float().addmm_(lora_B.float(), lora_A.float(), alpha=SCALING)),
        "unload_ nearest": lambda: unload_(weight, lora_A, lora_B, SCALING, momentum=MOMENTUM, rounding="nearest"),
        "unload_ stochastic": lambda: unload_(weight, lora_A, lora_B, SCALING, momentum=MOMENTUM,
                                              rounding="stochastic"),
    }
    if on_gpu and common.backend_label(weight) == "triton":
        from ..ops.triton.unload import merge_

        fns["merge_ nearest"] = lambda: merge_(weight, lora_A, lora_B, COEF, "nearest", SEED, write=True)
        fns["merge_ stochastic"] = lambda: merge_(weight, lora_A, lora_B, COEF, "stochastic", SEED, write=True)
    else:
        why = "needs a CUDA GPU" if not on_gpu else f"Triton not in use ({common.backend_label(weight)})"
        skip["merge_ nearest"] = skip["merge_ stochastic"] = why
    twin, why = _cuda_twin() if on_gpu else (None, "needs a CUDA GPU")
    if twin is not None:
        fns["cuda nearest"] = lambda: twin.merge_(weight, lora_A, lora_B, COEF, "nearest", SEED, write=True)
        fns["cuda stochastic"] = lambda: twin.merge_(weight, lora_A, lora_B, COEF, "stochastic", SEED, write=True)
    else:
        skip["cuda nearest"] = skip["cuda stochastic"] = why
    return fns


def _run_config(n_out, k_in, r, dtype, factor_dtype, device, args):
    on_gpu = device.type == "cuda"
    weight, lora_A, lora_B = make_tensors(n_out, k_in, r, dtype, factor_dtype, device)
    w_bytes = weight.numel() * weight.element_size()
    moved = 2 * w_bytes
    base = {"out": n_out, "in": k_in, "r": r, "dtype": common.dtype_name(dtype),
            "factor_dtype": common.dtype_name(factor_dtype), "bytes": moved, "w_bytes": w_bytes}
    rows = []

    def timed(name, fn, label=None):
        row = dict(base, contender=name, label=label or name)
        try:
            t = common.bench(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            row.update(t.as_dict())
            row["gbps"] = moved / (t.median_ms * 1e-3) / 1e9
            row["peak_extra_bytes"] = common.peak_extra_bytes(fn, device)
        except Exception as exc:  # noqa: BLE001 - record, keep going
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            common.free_memory(device)
        rows.append(row)
        return row

    # device copy first, on its own W-sized pair, freed before the contenders run
    src = torch.empty_like(weight).copy_(weight)
    dst = torch.empty_like(weight)
    copy_row = timed("copy", lambda: dst.copy_(src))
    del src, dst
    common.free_memory(device)

    skip: dict[str, str] = {}
    fns = contender_fns(weight, lora_A, lora_B, skip)
    label = common.backend_label(weight)
    for name in CONTENDERS:
        if name == "copy":
            continue
        if name in skip:
            rows.append(dict(base, contender=name, label=name, skipped=skip[name]))
            continue
        row = timed(name, fns[name], f"{name} ({label})" if name.startswith("unload_") else None)
        if name.startswith("unload_") and on_gpu and "error" not in row:
            # the first unload of a weight (or after any other write to it) reads W once for max|W|
            weight.mul_(1.0)  # bumps W's version: the recorded max|W| no longer applies
            row["peak_extra_first_bytes"] = common.peak_extra_bytes(fns[name], device)
        if not bool(torch.isfinite(weight.float().abs().max())):  # paranoia: timing must not blow W up
            row["note"] = "W became non-finite during timing"
    if args.sweep and "merge_ nearest" in fns:
        for name, fn in sweep_fns(weight, lora_A, lora_B).items():
            timed(name, fn)
    copy_ms = copy_row.get("median_ms")
    for row in rows:
        if row.get("median_ms") and copy_ms:
            row["pct_copy"] = 100.0 * copy_ms / row["median_ms"]
        if row.get("peak_extra_bytes") is not None:
            row["peak_extra_over_w"] = row["peak_extra_bytes"] / w_bytes
    del weight, lora_A, lora_B, fns
    common.free_memory(device)
    return rows


def _mib(v):
    return None if v is None else v / 2**20


COLUMNS = [
    ("shape", "W (out x in)", ""), ("r", "r", "d"), ("dtype", "W", ""), ("factor_dtype", "A,B", ""),
    ("label", "contender", ""), ("median_ms", "median ms", ".4f"), ("p20_ms", "p20", ".4f"),
    ("p80_ms", "p80", ".4f"), ("gbps", "GB/s", ".1f"), ("pct_copy", "% copy", ".1f"),
    ("peak_mib", "peak extra MiB", ".2f"), ("first_mib", "first call MiB", ".2f"), ("status", "note", ""),
]


def display_rows(rows):
    out = []
    for r in rows:
        d = dict(r)
        d["shape"] = f"{r['out']}x{r['in']}"
        d["peak_mib"] = _mib(r.get("peak_extra_bytes"))
        d["first_mib"] = _mib(r.get("peak_extra_first_bytes"))
        d["status"] = r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error") or r.get("note") or ""
        out.append(d)
    return out


def _targets(rows, on_gpu):
    if not on_gpu:
        return []
    out = []
    for r in rows:
        if ((r["out"], r["in"]) == TARGET_SHAPE and r["r"] == TARGET_RANK and r["dtype"] == "bf16"
                and r["contender"] in ("unload_ nearest", "unload_ stochastic", "merge_ nearest",
                                       "merge_ stochastic", "cuda nearest", "cuda stochastic")
                and r.get("pct_copy") is not None):
            no_temp = r.get("peak_extra_bytes") is not None and r["peak_extra_bytes"] < 0.5 * r["w_bytes"]
            out.append({"what": f"{r['contender']} at 8192x8192 r=16 bf16 (factors {r['factor_dtype']})",
                        "value": r["pct_copy"], "target": f">= {TARGET_PCT}% of copy bandwidth, no W-sized temporary",
                        "peak_extra_bytes": r.get("peak_extra_bytes"),
                        "met": r["pct_copy"] >= TARGET_PCT and no_temp})
    return out


def _plot(path, rows, title, on_gpu):
    keys = []
    for r in rows:
        k = (r["out"], r["in"], r["r"], r["dtype"], r["factor_dtype"])
        if k not in keys:
            keys.append(k)
    groups = [f"{o}x{i} r={r} {d}" + ("" if d == f else f"/{f}") for o, i, r, d, f in keys]

    def series(key):
        out = {}
        for name in CONTENDERS:
            if name == "copy":
                continue
            vals = []
            for k in keys:
                hit = [r for r in rows if (r["out"], r["in"], r["r"], r["dtype"], r["factor_dtype"]) == k
                       and r["contender"] == name]
                vals.append(hit[0].get(key) if hit else None)
            if any(v is not None for v in vals):
                out[name] = vals
        return out

    panels = [{"title": "bandwidth as % of device copy (higher is better)", "ylabel": "% of copy",
               "groups": groups, "series": series("pct_copy"),
               "hlines": [(100.0, "copy"), (TARGET_PCT, f"target {TARGET_PCT:.0f}%")]}]
    if on_gpu:
        panels.append({"title": "peak extra memory / |W| bytes (lower is better)", "ylabel": "x |W| bytes",
                       "groups": groups, "series": series("peak_extra_over_w"), "hlines": [(1.0, "one W")]})
    return common.plot_grouped_bars(path, panels, title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plora bench unload", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one shape: 8192x8192 r=16 bf16 on a GPU (the DESIGN target); on CPU a small one")
    p.add_argument("--dtype", default=None, help="W dtypes, comma-separated (default bf16,fp16; --quick: bf16)")
    p.add_argument("--factor-dtype", default="same",
                   help="dtype of A and B: 'same' as W (default), 'fp32' (PEFT's default), or 'same,fp32'")
    p.add_argument("--sweep", action="store_true",
                   help="add ablation rows of the raw Triton merge (tiles, FMA path, no stats, Philox rounds; GPU)")
    p.add_argument("--shape", action="append", default=None, metavar="OUT,IN",
                   help="a W shape to run instead of the defaults (repeatable)")
    common.add_common_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        dtypes = common.parse_dtypes(args.dtype or ("bf16" if args.quick else "bf16,fp16"))
        factor_modes = [f.strip().lower() for f in args.factor_dtype.split(",") if f.strip()]
        if not factor_modes or any(f not in ("same", "fp32") for f in factor_modes):
            raise ValueError("--factor-dtype takes 'same', 'fp32' or 'same,fp32'")
        ranks = common.parse_ints(args.ranks) if args.ranks else None
        shapes = common.parse_shapes(args.shape, 2, "OUT,IN")
    except ValueError as exc:
        print(f"plora bench unload: {exc}", file=sys.stderr)
        return 2

    device, notes = common.pick_device_announced(" Peak memory is only measured on CUDA.")
    on_gpu = device.type == "cuda"
    # (out, in, r, W dtype) configurations
    if shapes is None and on_gpu and not args.quick:
        configs = [(o, i, r, d) for d in dtypes for (o, i) in GPU_SHAPES for r in (ranks or GPU_RANKS)]
        if torch.bfloat16 in dtypes and not args.ranks:
            configs.append((*TARGET_SHAPE, TARGET_RANK, torch.bfloat16))
    else:
        if shapes is None:
            shapes = [TARGET_SHAPE if on_gpu else CPU_SHAPE]
        rks = ranks or ([TARGET_RANK] if args.quick else list(GPU_RANKS))
        configs = [(o, i, r, d) for d in dtypes for (o, i) in shapes for r in rks]
    notes.append(f"scaling s = {SCALING}; unload_ uses momentum {MOMENTUM} (W += (1-m) s B A, B <- m B) so "
                 "repeated calls stay finite; the raw merge_ rows use the same coefficient (1-m) s")

    env = common.environment(device)
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}", flush=True)
    rows = []
    for n_out, k_in, r, dtype in configs:
        for fmode in factor_modes:
            fdt = dtype if fmode == "same" else torch.float32
            got = _run_config(n_out, k_in, r, dtype, fdt, device, args)
            common.print_table(display_rows(got), COLUMNS)
            print(flush=True)
            rows.extend(got)

    targets = _targets(rows, on_gpu)
    errors = [r for r in rows if "error" in r]
    print("== all results ==")
    common.print_table(display_rows(rows), COLUMNS)
    for t in targets:
        print(f"target: {t['what']}: {t['value']:.1f}% of copy, peak extra "
              f"{common.fmt(_mib(t['peak_extra_bytes']), '.2f')} MiB ({t['target']}) -> "
              f"{'MET' if t['met'] else 'NOT MET'}")

    if args.no_save:
        return 1 if errors else 0
    stem = common.result_stem("unload", env, args.out)
    png = _plot(stem.with_suffix(".png"), rows, f"unload_ vs PEFT merge and device copy - {env['device_name']}",
                on_gpu)
    payload = {
        "benchmark": "unload", "schema": 1, "environment": env,
        "config": {"configs": [[o, i, r, common.dtype_name(d)] for o, i, r, d in configs],
                   "factor_dtype": factor_modes, "quick": args.quick, "sweep": args.sweep, "scaling": SCALING, "momentum": MOMENTUM,
                   "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "contenders": CONTENDERS,
                   "bytes": "2*|W|*itemsize", "ours_backend": common.backend_label(torch.empty(1, device=device))},
        "notes": notes, "targets": targets,
    }
    common.save_record(stem, payload, rows, png)
    return 1 if errors else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
