"""The compile matrix: every Triton kernel variant the resolver can launch, compiled for each GPU architecture we
support, on any machine (no GPU), with the checks a GPU would otherwise make at a user's first training step.

    python -m plora_kernels.ops.triton.matrix [--arch 80,89,90,100] [--jobs 2] [--json FILE]

A variant fails on: a compile error; shared memory above the architecture's per-block limit (``limits``); any
spill (``SPILL_BUDGET``); a 16-byte access the design relies on that the compiler did not emit (the merge's W and
A tiles on the CONTIG path); or, for a kernel whose launch picks its tile from an estimate of shared memory, a
compiled size above that estimate (the launch-time choice would then be unsound on some device). Where an
implementation cannot compile for an architecture or this Triton, the resolver refuses it (``_backend.REQUIREMENTS``)
and the matrix does not build it there. Exits 1 on any failure, after printing every one.

The variants are enumerated from the launchers' own choices (``unload.launch_meta``, ``lora_matmul.gemm_configs``,
``lora_matmul_tma.tma_configs``, ``lora_dy_pass.config``), so what is checked is what runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SPILL_BUDGET = 0  # spill stores + loads allowed in any production variant: none (a spill is local-memory traffic)
W_FACTORS = [("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32"),
             ("fp64", "fp64")]
MERGE_RANKS = (8, 16, 64, 256)  # the unrolled FMA path, one dot slice, the slice loop (r = 256 as r = 64)
FP64_RANKS = (4, 20)  # an fp64 W always sums in FMAs: unrolled below 16, a runtime loop above
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _dtype(name: str):
    import torch

    return getattr(torch, _TORCH_DTYPE[name])


def _tile_vectors(w: str, kw: dict) -> int:
    """The 16-byte accesses a thread needs for its part of W's tile on the CONTIG path: the design's vectors."""
    from . import aot

    meta = aot.merge_launch(**kw)
    return meta["BLOCK_M"] * meta["BLOCK_N"] * ITEMSIZE[w] // (32 * meta["num_warps"] * 16)


def _merge_specs(arch: int) -> list[dict]:
    """The merge over W dtype x factor dtype x rank path x rounding x pass, as ``merge_group_`` launches it. Ranks
    whose launches compile identically (the same constexprs: r = 64 and 256 both loop over 16-wide slices) are
    built once, their label naming every rank it stands for."""
    from . import aot

    specs, seen = [], {}
    for w, f in W_FACTORS:
        sixteen = ITEMSIZE[w] == 2
        for r in FP64_RANKS if w == "fp64" else MERGE_RANKS:
            for rounding in ("nearest", "stochastic") if sixteen else ("nearest",):
                for name, write, exact in (("write", True, False), ("exact", False, True), ("check", False, False)):
                    kw = dict(w=w, factors=f, r=r, rounding=rounding, write=write, exact=exact)
                    key = (w, f, tuple(sorted(aot.merge_launch(**kw).items())))
                    if key in seen:  # e.g. the quick check of either rounding: it rounds nothing
                        seen[key]["also"].append(f"r={r} {rounding}")
                        continue
                    vec = _tile_vectors(w, kw)
                    spec = dict(kernel="merge", arch=arch, label=f"W {w}, A,B {f}, r={r}, {rounding}, {name}", kw=kw,
                                vectors=dict(ptx_ld128=vec, ptx_st128=vec if write else 0), also=[])
                    seen[key] = spec
                    specs.append(spec)
        # a transposed W (no unit column stride): the strided path
        specs.append(dict(kernel="merge", arch=arch, label=f"W {w} transposed, A,B {f}, r=16, write",
                          kw=dict(w=w, factors=f, r=16 if w != "fp64" else 4, rounding="nearest", write=True,
                                  exact=False, contig=False), vectors={}))
    for spec in specs:
        if spec.get("also"):
            spec["label"] += f" (also {', '.join(spec['also'])})"
    for a in ("fp32", "bf16", "fp16", "fp64"):
        specs.append(dict(kernel="init", arch=arch, label=f"fresh lora_A {a}", kw=dict(a=a), vectors={}))
    return specs


def _gemm_specs(arch: int) -> list[dict]:
    """The portable GEMM's launches: each kind (aot.GEMM_KINDS) over the tiles its launch may pick, at the low-rank
    width 16 (r <= 16) and, for the kinds with a low-rank term, 64 (the widest: the most registers and shared
    memory); fp16 shares bf16's tiles and code but for the element type, so only its forward is built."""
    from . import aot, limits
    from .lora_matmul import gemm_configs

    specs = []
    for x, kinds in (("bf16", list(aot.GEMM_KINDS)), ("fp16", ["forward"]), ("fp32", list(aot.GEMM_KINDS))):
        for kind in kinds:
            spec = aot.GEMM_KINDS[kind]
            for block_r in (16, 64) if spec["lora"] and x != "fp16" else (16,):
                for m, n, k, stages, warps in gemm_configs(arch, _dtype(x), dropout=spec["drop"] != 0,
                                                           block_r=block_r):
                    specs.append(dict(kernel="gemm", arch=arch,
                                      label=f"{kind} {x} r<={block_r} {m}x{n}x{k} s{stages} w{warps}",
                                      kw=dict(x=x, adapters="fp32", kind=kind, block_r=block_r, block_m=m, block_n=n,
                                              block_k=k, num_stages=stages, num_warps=warps),
                                      estimate=limits.gemm_shared(m, n, k, stages, ITEMSIZE[x], block_r)))
    m, n, k, stages, warps = gemm_configs(arch, _dtype("bf16"), block_r=16)[0]
    specs.append(dict(kernel="gemm", arch=arch, label=f"forward bf16 {m}x{n}x{k}, 64-bit offsets",
                      kw=dict(x="bf16", kind="forward", block_m=m, block_n=n, block_k=k, num_stages=stages,
                              num_warps=warps, int64=True), int64=True))
    return specs


def _tma_specs(arch: int) -> list[dict]:
    from .lora_matmul_tma import tma_configs, tma_shared

    specs = []
    for x in ("bf16", "fp32"):
        # forward (B = W^T read as W's tiles, with bias) and dx (B = W row-major); fp32 only as W^T (see
        # lora_matmul_tma.supported); the forward also at the widest low-rank tiles
        for kind, b_nk, bias, block_r in (("forward", True, True, 16), ("forward", True, True, 64),
                                          ("dx", False, False, 16)):
            if x == "fp32" and (not b_nk or block_r > 16):  # see lora_matmul_tma.supported and lora_matmul
                continue
            for m, n, k, stages, warps in tma_configs(arch, _dtype(x), block_r=block_r):
                specs.append(dict(kernel="tma", arch=arch,
                                  label=f"{kind} {x} r<={block_r} {m}x{n}x{k} s{stages} w{warps}",
                                  kw=dict(x=x, adapters="fp32", lora=True, bias=bias, b_nk=b_nk, block_r=block_r,
                                          block_m=m, block_n=n, block_k=k, num_stages=stages, num_warps=warps),
                                  estimate=tma_shared(m, n, k, stages, ITEMSIZE[x], block_r)))
    return specs


def _ws_specs(arch: int) -> list[dict]:
    # forward (B = W^T, UP = lora_B^T, bias) and dx (B = W, UP = lora_A); an fp32 dx takes the portable kernel
    out = []
    for x, kind, kw in (("bf16", "forward", dict(bias=True, b_nk=True, up_nk=True)),
                        ("bf16", "dx", dict(bias=False, b_nk=False, up_nk=False)),
                        ("fp16", "forward", dict(bias=True, b_nk=True, up_nk=True)),
                        ("fp32", "forward", dict(bias=True, b_nk=True, up_nk=True))):
        out.append(dict(kernel="ws", arch=arch, label=f"{kind} {x}", kw=dict(x=x, lora=True, **kw)))
    return out


def _dy_pass_specs(arch: int) -> list[dict]:
    from .lora_dy_pass import config, dy_pass_shared

    specs = []
    for dy, adapters, r in [(d, "fp32", r) for d in ("bf16", "fp16", "fp32") for r in (16, 32, 64)] + [
            ("bf16", "bf16", 64)]:
        tile = config(arch, _dtype(dy), r)
        if tile is None:  # the launch takes the two GEMMs there
            continue
        m, n, warps, stages = tile
        specs.append(dict(kernel="dy_pass", arch=arch, label=f"dy {dy}, lora_B {adapters}, r={r}: {m}x{n} s{stages}",
                          kw=dict(dy=dy, adapters=adapters, r=r),
                          estimate=dy_pass_shared(m, n, stages, max(16, r), ITEMSIZE[dy])))
    return specs


def _runnable(name: str, arch: int) -> bool:
    """Whether the resolver lets implementation ``name`` run on ``arch`` with this Triton."""
    from ..._backend import REQUIREMENTS, triton_version

    oldest, archs, _ = REQUIREMENTS[name]
    return triton_version() >= oldest and arch in archs


def specs(archs) -> list[dict]:
    """Every variant the resolver can launch on each of ``archs``."""
    out = []
    for arch in archs:
        out += _merge_specs(arch) + _gemm_specs(arch) + _dy_pass_specs(arch)
        if _runnable("triton-tma", arch):
            out += _tma_specs(arch)
        if _runnable("triton-ws", arch):
            out += _ws_specs(arch)
    return out


SASS_ARCHS = (90,)  # where the SASS is read too by default (the merge's budgets): disassembly costs ~0.35 s a kernel


def compile_one(spec: dict) -> dict:
    """What the compiler gave one variant (``aot.resources``; the SASS only on SASS_ARCHS), or {"error": ...}."""
    from . import aot

    kw, arch = dict(spec["kw"]), spec["arch"]
    sass = spec.get("sass", arch in SASS_ARCHS)
    t0 = time.perf_counter()
    try:
        kind = spec["kernel"]
        if kind == "merge":
            got = aot.unload_resources(**kw, arch=arch, sass=sass)
        elif kind == "init":
            got = aot.init_resources(**kw, arch=arch, sass=sass)
        elif kind == "gemm":
            kernel = aot.compile_lora_matmul(**kw, arch=arch)
            got = aot.resources(kernel, sass=sass)
            got["ttir_i64_offsets"] = aot.i64_offsets(kernel)
        elif kind == "tma":
            got = aot.resources(aot.compile_lora_matmul_tma(**kw, arch=arch), sass=sass)
        elif kind == "ws":
            got = aot.lora_matmul_ws_resources(**kw, arch=arch, sass=sass)
        else:
            got = aot.resources(aot.compile_lora_dy_pass(**kw, arch=arch), sass=sass)
        out = {k: v for k, v in got.items() if k not in ("meta", "inner_loops")}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out
    except Exception as exc:  # noqa: BLE001 - reported per variant
        return {"error": f"{type(exc).__name__}: {exc}"[-1500:]}


def violations(spec: dict, got: dict) -> list[str]:
    """Why a compiled variant is not fit to launch (empty when it is)."""
    from . import limits

    if "error" in got:
        return [f"does not compile: {got['error'].strip().splitlines()[-1][:300]}"]
    out = []
    limit = limits.shared_per_block(spec["arch"])
    if got["shared_bytes"] > limit:
        out.append(f"shared memory {got['shared_bytes']} B > the {limit} B one block may use on sm_{spec['arch']}")
    if got.get("registers") is None:
        out.append("no resource usage read (cuobjdump missing)")
        return out
    if got.get("spill_store_bytes") is not None:  # ptxas's own count, in bytes
        spilled = got["spill_store_bytes"] + got["spill_load_bytes"]
        what = f"{got['spill_store_bytes']} B stored, {got['spill_load_bytes']} B loaded"
    elif got.get("spill_stores") is not None:  # a cached kernel (no ptxas log): the SASS's STL/LDL instructions
        spilled = got["spill_stores"] + got["spill_loads"]
        what = f"{got['spill_stores']} STL, {got['spill_loads']} LDL"
    else:
        return out + ["no spill count: ptxas did not run (a cached kernel) and the SASS was not read"]
    if spilled > SPILL_BUDGET:
        out.append(f"spills: {what}")
    for what, least in spec.get("vectors", {}).items():
        if got.get(what, 0) < least:
            out.append(f"16-byte accesses lost: {what} = {got.get(what)} (designed: >= {least})")
    if "estimate" in spec and got["shared_bytes"] > spec["estimate"]:
        out.append(f"shared memory {got['shared_bytes']} B above the launch's estimate {spec['estimate']} B")
    if spec.get("int64") and not got.get("ttir_i64_offsets"):
        out.append("64-bit offsets requested but the TTIR multiplies offsets in i32")
    return out


def run(archs, jobs: int = 2, progress=None, sass_archs=SASS_ARCHS) -> list[dict]:
    """Compile every variant for ``archs`` in ``jobs`` processes (reading the SASS too on ``sass_archs``); each
    spec gets ``result`` and ``violations``."""
    todo = specs(archs)
    for spec in todo:
        spec["sass"] = spec["arch"] in sass_archs
    with ProcessPoolExecutor(jobs) as pool:
        for i, (spec, got) in enumerate(zip(todo, pool.map(compile_one, todo, chunksize=4))):
            spec["result"] = got
            spec["violations"] = violations(spec, got)
            if progress:
                progress(i + 1, len(todo), spec)
    return todo


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces the compiler
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GEMM launches' default; the merge passes False
    from . import limits

    parser = argparse.ArgumentParser(prog="python -m plora_kernels.ops.triton.matrix",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, limits.MATRIX_ARCHS)),
                        help="comma-separated architectures, e.g. 80,89,90,100 (the default)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--json", default=None, help="write every variant's result here")
    parser.add_argument("--sass-archs", default=",".join(map(str, SASS_ARCHS)),
                        help="where to disassemble the cubin too (instruction budgets; ~0.35 s a kernel): "
                             "comma-separated architectures, or 'none' (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch takes comma-separated integers such as 80,90, got {args.arch!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        sass_archs = () if args.sass_archs in ("", "none") else tuple(int(a) for a in args.sass_archs.split(","))
    except ValueError:
        parser.error(f"--sass-archs takes comma-separated integers or 'none', got {args.sass_archs!r}")
    import triton

    t0 = time.time()

    def progress(i, n, spec):
        if i % 25 == 0 or i == n:
            print(f"  {i}/{n} compiled ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    done = run(archs, args.jobs, progress, sass_archs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__, "archs": archs, "seconds": round(time.time() - t0, 1),
                       "variants": done}, fh, indent=1)
    print(f"Triton {triton.__version__}: {len(done)} variants for sm_{', sm_'.join(map(str, archs))} in "
          f"{time.time() - t0:.0f} s")
    print(f"{'kernel':<8} " + " ".join(f"{'sm_' + str(a):>14}" for a in archs))
    for kernel in dict.fromkeys(s["kernel"] for s in done):
        cells = []
        for a in archs:
            mine = [s for s in done if s["kernel"] == kernel and s["arch"] == a]
            bad = sum(1 for s in mine if s["violations"])
            cells.append(f"{len(mine) - bad}/{len(mine)} ok" if mine else "not launched")
        print(f"{kernel:<8} " + " ".join(f"{c:>14}" for c in cells))
    failed = [s for s in done if s["violations"]]
    for s in failed:
        print(f"FAILED sm_{s['arch']} {s['kernel']} {s['label']}: " + "; ".join(s["violations"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
