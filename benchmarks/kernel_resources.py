"""What the compiler gives each Triton kernel variant on Hopper (sm_90), without a GPU: registers, spills,
shared memory, 16-byte accesses, MMA/TMA instructions and the warps per SM they allow.

    python benchmarks/kernel_resources.py [--arch 90] [--no-save]

Static facts, not timings: they explain a measured time or pick candidates for the next GPU session (the
unload kernel's tile was chosen this way, see benchmarks/NOTES.md); only `plora bench ...` on a GPU says
what is fast. Writes a record ``kernels-sm90-<timestamp>.json`` to benchmarks/results/ that
benchmarks/make_report.py renders in its own section.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces the compiler
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from plora_kernels.bench import common  # noqa: E402
from plora_kernels.bench.unload import SWEEP  # noqa: E402
from plora_kernels.ops.triton import aot  # noqa: E402
from plora_kernels.ops.triton.lora_matmul import _configs  # noqa: E402
from plora_kernels.ops.triton.lora_matmul_tma import _configs as tma_configs  # noqa: E402
from plora_kernels.ops.triton.unload import _blocks  # noqa: E402

COLUMNS = [("kernel", "kernel", ""), ("variant", "variant", ""), ("registers", "regs", "d"),
           ("stack_bytes", "stack B", "d"), ("shared_kib", "smem KiB", ".1f"), ("warps_per_sm", "warps/SM", "d"),
           ("ldg128", "LDG.128", "d"), ("stg128", "STG.128", "d"), ("hgmma", "HGMMA", "d"),
           ("tma_loads", "TMA", "d"), ("layout_conversions", "cvt", "d"), ("error", "error", "")]


def _unload_variants():
    """(label, compile kwargs): production tiles per (r, factor dtype, rounding), then the --sweep tiles."""
    out = []
    for r in (8, 16, 64):
        bm, bn, warps = _blocks(r, 2)  # bf16 W; the GPU tiles: TRITON_INTERPRET was removed at import
        for factors in ("bf16", "fp32"):
            for rounding, rname in ((1, "nearest"), (2, "stochastic")):
                out.append((f"production r={r} W bf16, A,B {factors} {rname} ({bm}x{bn} w{warps})",
                            dict(r=r, factors=factors, rounding=rounding, block_m=bm, block_n=bn, num_warps=warps)))
    for r in (8, 16, 64):
        bm, bn, warps = _blocks(r, 4)
        out.append((f"production r={r} W fp32, A,B fp32 ({bm}x{bn} w{warps})",
                    dict(w="fp32", r=r, factors="fp32", rounding=0, block_m=bm, block_n=bn, num_warps=warps)))
    bm, bn, warps = _blocks(16, 2)
    for label, knobs in SWEEP:
        if label == "default" or "n_rounds" in knobs:
            continue
        kw = dict(r=16, factors="bf16", rounding=2, block_m=knobs.get("block_m", bm),
                  block_n=knobs.get("block_n", bn), num_warps=knobs.get("num_warps", warps),
                  small_r=knobs.get("small_r"), stats=knobs.get("stats", True), delta=knobs.get("delta", True))
        out.append((f"sweep r=16 A,B bf16 stochastic [{label}]", kw))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = Hopper)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)

    rows = []

    def add(kernel_name, label, build, warps):
        row = {"kernel": kernel_name, "variant": label}
        try:
            got = aot.resources(build(), warps)
            row.update(got, shared_kib=got["shared_bytes"] / 1024)
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a finding too
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        print(f"{kernel_name} {label}: " + (row.get("error") or ", ".join(
            f"{h} {common.fmt(row.get(k), spec)}" for k, h, spec in COLUMNS[2:-1])), flush=True)

    for label, kw in _unload_variants():
        add("unload", label, lambda kw=kw: aot.compile_unload(arch=args.arch, **kw), kw["num_warps"])
    # each GEMM kernel over its own autotune configs, with and without the low-rank seed
    for name, configs, compile_fn in (("lora_matmul", _configs(), aot.compile_lora_matmul),
                                      ("lora_matmul_tma", tma_configs(), aot.compile_lora_matmul_tma)):
        for cfg in configs:
            m, n, k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
            for lora in (True, False):
                label = f"{m}x{n}x{k} s{cfg.num_stages} w{cfg.num_warps} bf16 " + ("+LoRA" if lora else "base")
                add(name, label, lambda fn=compile_fn, lora=lora, cfg=cfg, m=m, n=n, k=k: fn(
                    lora=lora, block_m=m, block_n=n, block_k=k, num_stages=cfg.num_stages,
                    num_warps=cfg.num_warps, arch=args.arch), cfg.num_warps)
    print()
    common.print_table(rows, COLUMNS)
    if args.no_save:
        return 0
    env = common.environment(torch.device("cpu"))
    env["device_slug"] = f"sm{args.arch}"
    stem = common.result_stem("kernels", env, args.out)
    payload = {"benchmark": "kernels", "schema": 1, "environment": env,
               "config": {"arch": args.arch, "static": True},
               "notes": [f"compiled for sm_{args.arch} on a machine without a GPU (ops.triton.aot); registers and "
                         "stack from the cubin (cuobjdump), warps/SM estimated from registers, shared memory and "
                         "the 64-warp limit. Static facts, not timings."]}
    common.save_record(stem, payload, rows, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
