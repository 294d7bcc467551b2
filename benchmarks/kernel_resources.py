"""What the compiler gives each Triton kernel variant on Hopper (sm_90), without a GPU: registers, spills, shared
memory, resident blocks per SM, atomics and fences, SASS instructions per element of the unload merge's tile
loop, 16-byte accesses, MMA/TMA instructions.

    python benchmarks/kernel_resources.py [--arch 90] [--no-gemm] [--save [--out DIR]]

Static facts, not timings: they explain a measured time or pick candidates for the next GPU session; only
`plora bench ...` on a GPU says what is fast. The merge variants are the production ones, compiled as
``merge_group_`` launches them (``ops.triton.aot``), both passes: ``check`` (nothing written, the non-finite
flag) and ``write``. tests/test_kernels_compile.py holds the budgets CI enforces on the same numbers. Prints a
table; with ``--save`` also writes a record ``kernels-sm90-<timestamp>.json`` to benchmarks/results/ that
benchmarks/make_report.py renders in its own section.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces the compiler
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GEMM launches' default (the merge disables fusion)

import torch  # noqa: E402

from plora_kernels.bench import common  # noqa: E402
from plora_kernels.ops.triton import aot  # noqa: E402
from plora_kernels.ops.triton.lora_matmul import gemm_configs  # noqa: E402
from plora_kernels.ops.triton.lora_matmul_tma import tma_configs  # noqa: E402

COLUMNS = [("kernel", "kernel", ""), ("variant", "variant", ""), ("registers", "regs", "d"),
           ("stack_bytes", "stack B", "d"), ("spills", "LDL+STL", "d"), ("shared_kib", "smem KiB", ".1f"),
           ("blocks_per_sm", "blocks/SM", "d"), ("blocks_limited_by", "limit", ""),
           ("sass_per_element", "SASS/elem", ".1f"), ("loop_instructions", "loop SASS", "d"),
           ("float_atomics", "float atom", "d"), ("int_atomics", "int atom", "d"), ("membar", "MEMBAR", "d"),
           ("bar_sync", "BAR", "d"), ("ldg128", "LDG.128", "d"), ("ldg", "LDG", "d"), ("stg128", "STG.128", "d"),
           ("hmma", "HMMA", "d"), ("hgmma", "HGMMA", "d"), ("tma_loads", "TMA", "d"),
           ("layout_conversions", "cvt", "d"), ("error", "error", "")]

# the production merge variants (W, factors, r, rounding), as tests/test_kernels_compile.py checks them
MERGE_VARIANTS = [("bf16", "fp32", 16, "nearest"), ("bf16", "fp32", 16, "stochastic"),  # PLoRALinear's default
                  ("bf16", "fp32", 8, "nearest"), ("bf16", "fp32", 8, "stochastic"),
                  ("bf16", "fp32", 64, "nearest"), ("bf16", "fp32", 64, "stochastic"),
                  ("bf16", "bf16", 16, "nearest"), ("bf16", "bf16", 16, "stochastic"),
                  ("fp16", "fp16", 16, "nearest"), ("fp16", "fp16", 16, "stochastic"),
                  ("fp32", "fp32", 16, "nearest"), ("fp64", "fp64", 4, "nearest")]


def _merge_label(w, factors, r, rounding) -> str:
    meta = aot.merge_launch(w=w, factors=factors, r=r, rounding=rounding)
    if not meta["DOT"]:
        product = f"{r} FMA steps"
    elif meta["FACTORS_FP32"]:
        product = f"fp32 dot, {meta['DOT_PRECISION']}"
    else:
        product = f"{factors} dot"
    rname = {0: "no rounding", 1: "nearest", 2: "stochastic"}[meta["ROUND"]]
    return (f"W {w}, A,B {factors}, r={r}, {rname} ({meta['BLOCK_M']}x{meta['BLOCK_N']} w{meta['num_warps']}, "
            f"{product})")


def _error_text(exc: BaseException) -> str:
    """One line: the exception, where (a CompilationError's "at line:col"), and the innermost cause's message."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    head = str(exc).splitlines()[0].strip() if str(exc).strip() else ""
    where = f" {head.rstrip(':')}" if head.startswith("at ") else ""
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(exc).__name__}{where}: {type(root).__name__}: {lines[-1] if lines else ''}"[:300]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = Hopper)")
    p.add_argument("--no-gemm", action="store_true", help="the unload kernels only")
    p.add_argument("--save", action="store_true", help="also write a JSON record (default: print only)")
    p.add_argument("--no-save", action="store_true", help=argparse.SUPPRESS)  # the former default's opt-out
    p.add_argument("--out", default=None, help="results folder for --save (default benchmarks/results)")
    args = p.parse_args(argv)

    rows = []

    def add(kernel_name, label, measure):
        row = {"kernel": kernel_name, "variant": label}
        try:
            got = measure()
            row.update({k: v for k, v in got.items() if k != "meta"}, shared_kib=got["shared_bytes"] / 1024)
            if got.get("spill_stores") is not None:
                row["spills"] = got["spill_stores"] + got["spill_loads"]
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a finding too
            row["error"] = _error_text(exc)
        rows.append(row)
        print(f"{kernel_name} {label}: " + (row.get("error") or ", ".join(
            f"{h} {common.fmt(row.get(k), spec)}" for k, h, spec in COLUMNS[2:-1])), flush=True)

    for w, factors, r, rounding in MERGE_VARIANTS:
        label = _merge_label(w, factors, r, rounding)
        # the order of an unload: the quick check, the write; the exact check runs only for a flagged group
        for write, exact, name in ((False, False, "check"), (True, False, "write"), (False, True, "exact check")):
            add("unload merge", f"{label}, {name} pass",
                lambda w=w, f=factors, r=r, rd=rounding, wr=write, ex=exact: aot.unload_resources(
                    w=w, factors=f, r=r, rounding=rd, write=wr, exact=ex, arch=args.arch))
    for a in ("fp32", "bf16"):
        add("unload init", f"fresh lora_A {a} (one {aot.INIT_TILE[0]}x{aot.INIT_TILE[1]} tile per program, "
                           f"w{aot.INIT_TILE[2]})", lambda a=a: aot.init_resources(a=a, arch=args.arch))
    if not args.no_gemm:
        # each GEMM kernel over its own autotune configs, with and without the low-rank seed
        # each GEMM kernel over the bf16 tiles its launch may pick on this architecture, with and without the
        # low-rank seed (tests/test_kernels_compile.py holds every dtype, kind and architecture to its limits)
        kernels = [("lora_matmul", gemm_configs(args.arch, torch.bfloat16), aot.compile_lora_matmul)]
        if args.arch >= 90:
            kernels.append(("lora_matmul_tma", tma_configs(args.arch, torch.bfloat16), aot.compile_lora_matmul_tma))
        for name, configs, compile_fn in kernels:
            for m, n, k, stages, warps in configs:
                for lora in (True, False):
                    label = f"{m}x{n}x{k} s{stages} w{warps} bf16 " + ("+LoRA" if lora else "base")
                    add(name, label, lambda fn=compile_fn, lora=lora, m=m, n=n, k=k, st=stages, wp=warps: aot.resources(
                        fn(lora=lora, block_m=m, block_n=n, block_k=k, num_stages=st, num_warps=wp, arch=args.arch),
                        wp))
    print()
    common.print_table(rows, COLUMNS)
    if not args.save or args.no_save:
        return 0
    env = common.environment(torch.device("cpu"))
    env["device_slug"] = f"sm{args.arch}"
    stem = common.result_stem("kernels", env, args.out)
    payload = {"benchmark": "kernels", "schema": 2, "environment": env,
               "config": {"arch": args.arch, "static": True},
               "notes": [f"compiled for sm_{args.arch} on a machine without a GPU (ops.triton.aot); registers and "
                         "stack from the cubin (cuobjdump); blocks/SM from registers (65536 per SM, 256 per warp "
                         "at a time), shared memory (228 KiB, 1 KiB reserved per block), 2048 threads and 32 "
                         "blocks; SASS/elem = instructions in one iteration of the merge's persistent tile loop "
                         "per element a thread handles in it (aot.tile_loop). Static facts, not timings."]}
    common.save_record(stem, payload, rows, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
