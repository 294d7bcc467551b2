"""``plora bench unload``: the unload's two passes, the public guarded call and the whole-model unload, against
device copy and PEFT's merges.

The engine (``ops.merge``) merges in two passes over W: an exact check pass (reads W, writes nothing) and, when
every merged value is finite, the writing pass (reads and writes W). ``unload_`` adds the argument checks, one
host read of the check's flag and the adapter reset, so its floor is 1.5 copies of W. The contenders (CONTENDERS
below, also written into the record): device copy, PEFT's ``W += ...`` and safe_merge, an fp32 addmm, the public
``unload_``, and each pass alone on the Triton kernel and on the CUDA C++ twin (where its library builds or
loads). All are timed in one process on the same random tensors (never zeros), with ``triton.testing.do_bench``
medians on CUDA.

Shapes: ``--quick`` runs the target, 8192x8192 r=16 bf16 W; a full run adds W 4096x4096, 4096x14336 and
8192x28672 with r in {8, 16, 64}, bf16 and fp16. The target (and every ``--quick`` or ``--shape`` run) runs
with factors in W's dtype and with fp32 factors (what training passes), reported side by side; the other shapes
with fp32 factors (``--factor-dtype`` sets both). On CPU a 64x128 W, where the Triton rows run in the
interpreter (TRITON_INTERPRET=1) or are skipped. Then the whole-model unload: ``unload_many_`` over the 112
targeted layers of the ``1b`` config of ``plora bench train`` (bf16 W, fp32 factors, r=16, stochastic
rounding; a 7-layer micro model on CPU), timed per call, with momentum 0.999 (B <- m B: the data stay random)
and 0 (what PLoRALinear trains with: B <- 0 and a fresh A). When a ``plora bench train`` record of the same
device, model size and rank exists (in ``--out`` or benchmarks/results), the model rows also give the unload as
a share of the fastest PLoRA training step; ``benchmarks/make_report.py`` joins one later otherwise.

Reported per row: the implementation that ran, the median (p20/p80), "% copy" (the copy row's time over the
row's), the floor in passes over W (copy and write 1, check 0.5, unload_ 1.5) and "% floor", the speed-up over
the peft and safe_merge rows, and on CUDA the peak extra memory. Targets at 8192x8192, r=16, bf16 W: ``unload_``
>= 55% of copy bandwidth, >= 1.5x faster than peft, >= 3x faster than safe_merge, no W-sized temporary; the
whole-model unload < 3% of a training step. The record is written after every config (``"complete": false``
until the end), and a run cut off by SIGINT/SIGTERM saves what it measured and exits with status 130.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
from pathlib import Path

import torch

from . import common

GPU_SHAPES = ((4096, 4096), (4096, 14336), (8192, 28672))
GPU_RANKS = (8, 16, 64)
TARGET_SHAPE, TARGET_RANK, TARGET_DTYPE = (8192, 8192), 16, "bf16"
CPU_SHAPE = (64, 128)  # small: the Triton contenders run in the interpreter there
MOMENTUM = 0.999
SCALING = 2.0
COEF = (1.0 - MOMENTUM) * SCALING  # what unload_ merges: every other contender merges the same coefficient
SEED = 1234
ROUNDINGS = ("nearest", "stochastic")
MODEL_MOMENTA = (MOMENTUM, 0.0)
MODEL_RANK, MODEL_ROUNDING = 16, "stochastic"
# the model sizes of ``plora bench train`` (train.SIZES) and, for the CPU smoke run, a smaller one: the reference
# path's stochastic rounding computes Philox in torch ops, ~1 s per call for the tiny config's 14 layers
MICRO = dict(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1)

TARGET_UNLOAD_PCT = 55.0        # unload_ (check + write + reset) as % of copy bandwidth; its floor is 66.7%
TARGET_X_PEFT = 1.5             # unload_ this many times faster than PEFT's W += ...
TARGET_X_SAFE = 3.0             # ... and than PEFT's safe_merge
TARGET_PEAK_OVER_W = 0.01       # "no W-sized temporary": peak extra memory at most 1% of |W|
TARGET_MODEL_PCT_STEP = 3.0     # the whole-model unload, % of one training step

CONTENDERS = {
    "copy": "dst.copy_(src) of a W-sized tensor (the device copy bandwidth of this run)",
    "peft": "PEFT-style W += (B @ A * s).to(W.dtype) (unguarded; materialises the update)",
    "peft safe_merge": "PEFT's safe_merge: t = W.clone(); t += (B @ A * s).to(W.dtype); torch.isfinite(t).all() "
                       "read on the host; W.copy_(t)",
    "addmm-fp32": "W.copy_(W.float().addmm_(B.float(), A.float(), alpha=s)) (one rounding, fp32 temporary)",
    "unload_ nearest": "plora_kernels.unload_(W, A, B, s, momentum=0.999, rounding='nearest'): the public guarded "
                       "call (argument checks, check pass, one host read, writing pass, B <- m B)",
    "unload_ stochastic": "plora_kernels.unload_(..., rounding='stochastic')",
    "triton write nearest": "the writing pass alone: ops.triton.unload.merge_group_([Merge(W, A, B, c, 'nearest', "
                            "seed)], write=True) (one layer, one launch, no check)",
    "triton write stochastic": "the writing pass alone, stochastic rounding",
    "triton check nearest": "the check pass alone: merge_group_(..., write=False) (every merged value computed "
                            "and tested, nothing written, the flag not read)",
    "triton check stochastic": "the check pass alone, stochastic rounding",
    "cuda write nearest": "the CUDA C++ twin's writing pass: ops.cuda_unload.merge_(W, A, B, c, 'nearest', seed, "
                          "write=True)",
    "cuda write stochastic": "the CUDA twin's writing pass, stochastic rounding",
    "cuda check nearest": "the CUDA twin's check pass: ops.cuda_unload.merge_(..., write=False)",
    "cuda check stochastic": "the CUDA twin's check pass, stochastic rounding",
}
MODEL_CONTENDERS = {
    f"model unload_many_ m={MOMENTUM:g}": "ops.unload.unload_many_ over every targeted layer of the model "
                                          f"(momentum {MOMENTUM:g}: B <- m B, the data stay random)",
    "model unload_many_ m=0": "the same with momentum 0, as PLoRALinear trains by default (B <- 0, a fresh A for "
                              "every layer in one launch; B is zero after the first call, which the kernels' "
                              "work does not depend on)",
}
BASELINES = ("copy", "peft", "peft safe_merge", "addmm-fp32")


def floor_passes(name: str) -> float | None:
    """The least traffic of contender ``name`` in passes over W (one pass = read and write W, a copy)."""
    if name == "copy" or " write " in f" {name} ":
        return 1.0
    if " check " in f" {name} ":
        return 0.5
    if name.startswith(("unload_", "model unload_many_")):
        return 1.5
    return None


@functools.lru_cache(maxsize=None)
def _cuda_twin():
    """(module, None) when the CUDA twin can run here, else (None, why not). Its library is built (nvcc, on first
    use) or loaded here, once per process, so that no timed call pays for it and a failed build is tried once."""
    try:
        from ..ops import cuda_unload
    except Exception as exc:  # noqa: BLE001 - missing module or a failed build/load
        return None, f"plora_kernels.ops.cuda_unload not importable ({type(exc).__name__}: {exc})"
    try:
        ok = bool(cuda_unload.available())
    except Exception as exc:  # noqa: BLE001
        return None, f"cuda_unload.available() raised {type(exc).__name__}: {exc}"
    if not ok:
        return None, "the CUDA twin's library is not available (no nvcc, no $PLORA_CSRC_LIB, no cached build)"
    try:
        cuda_unload.library()
    except Exception as exc:  # noqa: BLE001 - nvcc failed, or an ABI mismatch
        return None, f"the CUDA twin's library failed to build or load ({type(exc).__name__}: {exc})"[:400]
    return cuda_unload, None


def _triton_skip(weight: torch.Tensor) -> str | None:
    """Why the raw Triton passes cannot run on ``weight`` here, or None."""
    from .._backend import interpreting, triton_available

    if not triton_available():
        return "triton not importable"
    if not weight.is_cuda and not interpreting():
        return "needs a CUDA GPU (or TRITON_INTERPRET=1: the Triton interpreter on CPU tensors)"
    return None


def _triton_label(weight: torch.Tensor) -> str:
    return "triton" if weight.is_cuda else "triton (interpreter)"


def unload_impl(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, rounding: str) -> str:
    """What ``unload_``/``unload_many_`` run for these tensors: "triton", "triton (interpreter)", "cuda twin" or
    "torch reference" (ops.merge decides per layer; PLORA_BACKEND and PLORA_UNLOAD_KERNEL steer it)."""
    from ..ops import merge

    try:
        path = merge.merge_path(merge.Merge(weight, lora_A, lora_B, COEF, rounding))
    except Exception as exc:  # noqa: BLE001 - e.g. PLORA_BACKEND=triton where Triton cannot run
        return f"error: {exc}"[:200]
    return {"triton": _triton_label(weight), "cuda": "cuda twin", "torch": "torch reference"}.get(path, path)


def make_tensors(n_out, k_in, r, dtype, factor_dtype, device, seed=None):
    """Random W (out, in), A (r, in), B (out, r) as a trained layer would have them (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(n_out * 3 + k_in + r if seed is None else seed)
    weight = (torch.randn(n_out, k_in, device=device, generator=gen) * 0.02).to(dtype)
    lora_A = ((torch.rand(r, k_in, device=device, generator=gen) * 2 - 1) * k_in ** -0.5).to(factor_dtype)
    lora_B = (torch.randn(n_out, r, device=device, generator=gen) * 0.02).to(factor_dtype)
    return weight, lora_A, lora_B


def safe_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, s: float) -> None:
    """PEFT's ``merge(safe_merge=True)`` for a LoRA layer, writing back into W (PEFT rebinds ``.data`` instead)."""
    merged = weight.clone()
    merged += (lora_B @ lora_A * s).to(weight.dtype)
    if not bool(torch.isfinite(merged).all()):
        raise ValueError("NaNs detected in the merged weights")
    weight.copy_(merged)


def contender_fns(weight, lora_A, lora_B, skip=None, impls=None):
    """name -> zero-argument callable for every contender but "copy". Names that cannot run here go into
    ``skip`` (a dict) with the reason; ``impls`` (a dict) gets the implementation each name runs."""
    from ..ops.merge import Merge
    from ..ops.unload import unload_

    skip = {} if skip is None else skip
    impls = {} if impls is None else impls
    fns = {
        "peft": lambda: weight.add_((lora_B @ lora_A * COEF).to(weight.dtype)),
        "peft safe_merge": lambda: safe_merge_(weight, lora_A, lora_B, COEF),
        "addmm-fp32": lambda: weight.copy_(weight.float().addmm_(lora_B.float(), lora_A.float(), alpha=COEF)),
    }
    impls.update(dict.fromkeys(fns, "torch"))
    for rounding in ROUNDINGS:
        name = f"unload_ {rounding}"
        fns[name] = functools.partial(unload_, weight, lora_A, lora_B, SCALING, momentum=MOMENTUM, rounding=rounding)
        impls[name] = unload_impl(weight, lora_A, lora_B, rounding)

    why = _triton_skip(weight)
    if why is None:
        from ..ops.triton.unload import merge_group_
    twin, twin_why = _cuda_twin() if weight.is_cuda else (None, "needs a CUDA GPU")
    for kind in ("write", "check"):
        for rounding in ROUNDINGS:
            name = f"triton {kind} {rounding}"
            if why is not None:
                skip[name] = why
            else:
                fns[name] = functools.partial(merge_group_, [Merge(weight, lora_A, lora_B, COEF, rounding, SEED)],
                                              write=kind == "write")
                impls[name] = _triton_label(weight)
            name = f"cuda {kind} {rounding}"
            if twin is None:
                skip[name] = twin_why
            else:
                fns[name] = functools.partial(twin.merge_, weight, lora_A, lora_B, COEF, rounding, SEED,
                                              write=kind == "write")
                impls[name] = "cuda twin"
    return fns


def _time(fn, device: torch.device, impl: str, args) -> common.Timing:
    """do_bench on CUDA; on CPU the perf_counter loop, and for the interpreter one timed call after one untimed
    (the interpreter's time says nothing about the kernel, and the smoke run must stay short)."""
    if device.type != "cuda" and impl.endswith("(interpreter)"):
        return common.cpu_bench(fn, 0.0, 0.0, min_reps=1)
    return common.bench(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)


def _timed_row(row: dict, fn, device, args) -> dict:
    try:
        t = _time(fn, device, row.get("impl", ""), args)
        row.update(t.as_dict())
        row["peak_extra_bytes"] = common.peak_extra_bytes(fn, device)
    except Exception as exc:  # noqa: BLE001 - record, keep going
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        common.free_memory(device)
    return row


def run_config(n_out, k_in, r, dtype, factor_dtype, device, args, sink: list) -> None:
    """Time every contender in ``args.names`` (copy always) on one W shape; rows are appended to ``sink`` as they
    come."""
    weight, lora_A, lora_B = make_tensors(n_out, k_in, r, dtype, factor_dtype, device)
    w_bytes = weight.numel() * weight.element_size()
    base = {"scope": "layer", "out": n_out, "in": k_in, "r": r, "dtype": common.dtype_name(dtype),
            "factor_dtype": common.dtype_name(factor_dtype), "bytes": 2 * w_bytes, "w_bytes": w_bytes}

    # device copy first, on its own W-sized pair, freed before the contenders run
    src = torch.empty_like(weight).copy_(weight)
    dst = torch.empty_like(weight)
    sink.append(_timed_row(dict(base, contender="copy", label="copy", impl="torch"),
                           functools.partial(dst.copy_, src), device, args))
    del src, dst
    common.free_memory(device)

    skip: dict[str, str] = {}
    impls: dict[str, str] = {}
    fns = contender_fns(weight, lora_A, lora_B, skip, impls)
    saved_B = lora_B.clone()  # unload_ scales B by m on every call: each other contender gets the original
    for name in CONTENDERS:
        if name == "copy" or name not in args.names:
            continue
        row = dict(base, contender=name, label=name)
        if name in skip:
            sink.append(dict(row, skipped=skip[name]))
            continue
        row["impl"] = impls[name]
        sink.append(_timed_row(row, fns[name], device, args))
        if name.startswith("unload_"):
            lora_B.copy_(saved_B)
        if not bool(torch.isfinite(weight).all()):  # timing must not blow W up
            row["note"] = "W became non-finite during timing"
    del weight, lora_A, lora_B, saved_B, fns
    common.free_memory(device)


# ------------------------------------------------------------------------------------------- whole model
def model_layers(size: str) -> list[tuple[str, int, int]]:
    """(name, out, in) of every layer ``plora bench train`` adapts in the ``size`` config (a LlamaForCausalLM:
    head_dim = hidden / heads, k and v project to kv_heads * head_dim)."""
    from .train import SIZES, TARGET_MODULES

    s = MICRO if size == "micro" else SIZES[size]
    hidden, inter = s["hidden"], s["intermediate"]
    kv = s["kv_heads"] * (hidden // s["heads"])
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [(f"layers.{i}.{m}", *shapes[m]) for i in range(s["layers"]) for m in TARGET_MODULES]


def model_tensors(size: str, dtype, device) -> tuple[list[tuple[str, int, int]], list[tuple]]:
    """The layers of :func:`model_layers` and a random (W, A, B) for each: W in ``dtype``, the factors in fp32 on
    a 16-bit W (what PLoRALinear trains with), r = MODEL_RANK."""
    layers = model_layers(size)
    factor_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return layers, [make_tensors(o, i, MODEL_RANK, dtype, factor_dtype, device, seed=k)
                    for k, (_, o, i) in enumerate(layers)]


def model_specs(layers, tensors, momentum: float) -> list:
    """One ``UnloadSpec`` per layer, as ``unload_all_`` builds them (no generator: torch's default one)."""
    from ..ops.unload import UnloadSpec

    return [UnloadSpec(w, a, b, SCALING, momentum, MODEL_ROUNDING, None, label)
            for (label, _, _), (w, a, b) in zip(layers, tensors, strict=True)]


def run_model(size: str, dtype, device, args, sink: list) -> None:
    """Time ``unload_many_`` over every targeted layer of the model, once per momentum of MODEL_MOMENTA."""
    from ..ops.unload import unload_many_

    layers, tensors = model_tensors(size, dtype, device)
    w_bytes = sum(w.numel() * w.element_size() for w, _, _ in tensors)
    shapes = collections.Counter((o, i) for _, o, i in layers)
    base = {"scope": "model", "model": size, "layers": len(layers),
            "shapes": [[o, i, n] for (o, i), n in shapes.items()], "r": MODEL_RANK, "dtype": common.dtype_name(dtype),
            "factor_dtype": common.dtype_name(tensors[0][1].dtype), "rounding": MODEL_ROUNDING, "w_bytes": w_bytes,
            "bytes": 2 * w_bytes}
    impl = unload_impl(*tensors[0], MODEL_ROUNDING)
    for momentum, name in zip(MODEL_MOMENTA, MODEL_CONTENDERS, strict=True):
        row = dict(base, contender=name, label=name, momentum=momentum, impl=impl)
        sink.append(_timed_row(row, functools.partial(unload_many_, model_specs(layers, tensors, momentum)), device,
                               args))
    del tensors
    common.free_memory(device)


def find_train_step(env: dict, size: str, r: int, dtype: str, dirs) -> dict | None:
    """:func:`train_step` of the ``plora bench train`` records in the folders ``dirs`` (None: none)."""
    records = []
    for d in dirs:
        if d is None or not Path(d).is_dir():
            continue
        for path in sorted(Path(d).glob("train-*.json")):
            try:
                records.append((path.name, json.loads(path.read_text())))
            except (OSError, ValueError):
                continue
    return train_step(records, env, size, r, dtype)


def train_step(records, env: dict, size: str, r: int, dtype: str) -> dict | None:
    """Of ``records`` ((file name, record) pairs), the newest ``plora bench train`` record made on the device of
    ``env`` for this model size, rank and dtype: its fastest PLoRA step (the smallest denominator, so the largest
    share) as {"record", "timestamp_utc", "step_ms", "contender"}; None when there is none."""
    best = None
    for name, rec in records:
        try:
            e, cfg = rec["environment"], rec.get("config", {})
            if ((e.get("device_type"), e.get("device_name"), cfg.get("size"), cfg.get("r"), cfg.get("dtype"))
                    != (env.get("device_type"), env.get("device_name"), size, r, dtype)):
                continue
            steps = [(row["median_ms"], row["contender"]) for row in rec["results"]
                     if str(row.get("contender", "")).startswith("plora") and row.get("status") == "ok"
                     and row.get("median_ms")]
        except (AttributeError, KeyError, TypeError):
            continue
        if steps:
            ms, who = min(steps)
            found = {"record": name, "timestamp_utc": e.get("timestamp_utc", ""), "step_ms": ms, "contender": who}
            if best is None or found["timestamp_utc"] > best["timestamp_utc"]:
                best = found
    return best


def join_train_step(record: dict, train: dict) -> None:
    """Give an unload record made without a training step to compare with the step ``train`` (:func:`train_step`'s
    answer), in place: its config's ``train_step``, its model rows' share of a step and their targets."""
    record.setdefault("config", {})["train_step"] = train
    derive(record["results"], train)
    rows = {r["contender"]: r for r in record["results"] if r.get("scope") == "model"}
    record["targets"] = [model_target(rows[t["contender"]], train)
                         if t.get("id") == "model_pct_of_step" and t.get("contender") in rows else t
                         for t in record.get("targets", [])]


# ------------------------------------------------------------------------------------------- derived values
def _copy_row(rows, key=None):
    """The copy row of config ``key`` (out, in, r, dtype, factor dtype); without a key, the largest W's."""
    copies = [r for r in rows if r["contender"] == "copy" and r.get("median_ms")]
    if key is not None:
        copies = [r for r in copies if _key(r) == key]
    return max(copies, key=lambda r: r["w_bytes"], default=None)


def _key(r) -> tuple:
    return (r["out"], r["in"], r["r"], r["dtype"], r["factor_dtype"])


def derive(rows: list[dict], train: dict | None) -> None:
    """Fill in, in place, what each row's numbers mean against the rest of the run (idempotent): a layer row
    against the copy, peft and safe_merge rows of its config, a model row against the copy of the target config
    (else of the largest W) and the training step ``train``."""
    layer = [r for r in rows if r.get("scope", "layer") == "layer"]
    configs: dict = {}
    for r in layer:
        configs.setdefault(_key(r), {})[r["contender"]] = r
    model_copy = _copy_row(layer, (*TARGET_SHAPE, TARGET_RANK, TARGET_DTYPE, "bf16")) or _copy_row(layer)
    for r in rows:
        ms = r.get("median_ms")
        if not ms:
            continue
        model = r.get("scope") == "model"
        config = {} if model else configs[_key(r)]
        copy = model_copy if model else config.get("copy")
        r["gbps"] = r["bytes"] / (ms * 1e-3) / 1e9
        passes = floor_passes(r["contender"])
        if passes is not None:
            r["passes"] = passes
        if copy is not None and copy.get("median_ms"):
            copy_bw = copy["bytes"] / copy["median_ms"]  # bytes per ms
            if model:
                r["copy_gbps"] = copy_bw * 1e3 / 1e9
            else:
                r["pct_copy"] = 100.0 * copy["median_ms"] / ms
            if passes is not None:
                r["floor_ms"] = passes * r["bytes"] / copy_bw
                r["pct_floor"] = 100.0 * r["floor_ms"] / ms
        if r["contender"] not in BASELINES:
            for field, baseline in (("x_vs_peft", "peft"), ("x_vs_safe_merge", "peft safe_merge")):
                if (config.get(baseline) or {}).get("median_ms"):
                    r[field] = config[baseline]["median_ms"] / ms
        if model and train is not None:
            r["step_ms"] = train["step_ms"]
            r["pct_of_step"] = 100.0 * ms / train["step_ms"]
        if r.get("peak_extra_bytes") is not None:
            r["peak_extra_over_w"] = r["peak_extra_bytes"] / r["w_bytes"]


def _target(tid, what, value, value_text, target, met, **extra) -> dict:
    """One target of the record: ``met`` is True, False, or None (not measured in this run)."""
    return {"id": tid, "what": what, "value": value, "value_text": value_text, "target": target, "met": met, **extra}


def targets(rows: list[dict], train: dict | None, key=(*TARGET_SHAPE, TARGET_RANK, TARGET_DTYPE)) -> list[dict]:
    """The targets of issue #12 for the rows of config ``key`` (out, in, r, W dtype) and the model rows."""
    out = []
    at = [r for r in rows if r.get("scope", "layer") == "layer" and _key(r)[:4] == tuple(key)]
    shape = f"{key[0]}x{key[1]} r={key[2]} {key[3]} W"
    pct_goal = f">= {TARGET_UNLOAD_PCT:g}% (floor 66.7%: check + write = 1.5 passes)"
    peaks = []
    for fdt in common.unique(r["factor_dtype"] for r in at):
        by = {r["contender"]: r for r in at if r["factor_dtype"] == fdt}
        for rounding in ROUNDINGS:
            r = by.get(f"unload_ {rounding}")
            if r is None or r.get("skipped"):
                continue
            where = f"unload_ {rounding}, {shape}, {fdt} factors"
            if r.get("median_ms") is None:
                out.append(_target("unload_pct_copy", f"{where}: % of copy bandwidth", None,
                                   f"error: {r.get('error')}", pct_goal, False))
                continue
            pct = r.get("pct_copy")
            out.append(_target("unload_pct_copy", f"{where}: % of copy bandwidth", pct, f"{common.fmt(pct, '.1f')}%",
                               pct_goal, None if pct is None else pct >= TARGET_UNLOAD_PCT))
            for field, label, goal in (("x_vs_peft", "peft", TARGET_X_PEFT),
                                       ("x_vs_safe_merge", "peft safe_merge", TARGET_X_SAFE)):
                x = r.get(field)
                out.append(_target(field, f"{where}: speed-up over {label}", x, f"{common.fmt(x, '.2f')}x",
                                   f">= {goal:g}x", None if x is None else x >= goal))
            if r.get("peak_extra_bytes") is not None:
                peaks.append((r["peak_extra_bytes"], r["w_bytes"], f"{rounding}, {fdt} factors"))
    if peaks:
        peak, w_bytes, which = max(peaks)
        out.append(_target("unload_peak_extra", f"unload_ peak extra memory, {shape} (the largest of {len(peaks)}: "
                           f"{which})", peak, f"{_size(peak)} ({100.0 * peak / w_bytes:.3f}% of |W|)",
                           f"no W-sized temporary (<= {100 * TARGET_PEAK_OVER_W:g}% of |W| = "
                           f"{_size(TARGET_PEAK_OVER_W * w_bytes)})", peak <= TARGET_PEAK_OVER_W * w_bytes))
    for r in rows:
        if r.get("scope") == "model":
            out.append(model_target(r, train))
    return out


def model_target(r: dict, train: dict | None) -> dict:
    """The whole-model target of model row ``r``: its time per call as a share of the training step of ``train``
    (:func:`train_step`'s answer; None: not measured, and benchmarks/make_report.py joins a later record)."""
    what = (f"{r['contender']} ({r['model']}: {r['layers']} layers, {r['w_bytes'] / 1e9:.2f} GB of {r['dtype']} W, "
            f"{r['factor_dtype']} factors, r={r['r']}, {r['rounding']}): share of a training step")
    goal = f"< {TARGET_MODEL_PCT_STEP:g}% of a step"
    extra = {"contender": r["contender"], "median_ms": r.get("median_ms")}
    ms = r.get("median_ms")
    if ms is None:
        return _target("model_pct_of_step", what, None, f"error: {r.get('error')}", goal, False, **extra)
    if train is None:
        return _target("model_pct_of_step", what, None, f"{ms:.3f} ms per call; no train record of this device, "
                       "model and rank to compare with", goal, None, **extra)
    pct = 100.0 * ms / train["step_ms"]
    joined = "; joined by make_report" if train.get("joined") else ""
    return _target("model_pct_of_step", what, pct, f"{pct:.2f}% ({ms:.3f} ms of a {train['step_ms']:.1f} ms "
                   f"{train['contender']} step, {train['record']}{joined})", goal, pct < TARGET_MODEL_PCT_STEP,
                   train_step=train, **extra)


# ------------------------------------------------------------------------------------------- output
def _size(n) -> str:
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


COLUMNS = [
    ("shape", "W (out x in)", ""), ("r", "r", "d"), ("dtype", "W", ""), ("factor_dtype", "A,B", ""),
    ("contender", "contender", ""), ("impl", "impl", ""), ("median_ms", "median ms", ".4f"),
    ("p20_ms", "p20", ".4f"), ("p80_ms", "p80", ".4f"), ("pct_copy", "% copy", ".1f"), ("passes", "floor", "g"),
    ("pct_floor", "% floor", ".1f"), ("x_vs_peft", "x peft", ".2f"), ("x_vs_safe_merge", "x safe", ".2f"),
    ("peak_mib", "peak extra MiB", ".2f"), ("status", "note", ""),
]
MODEL_COLUMNS = [
    ("contender", "contender", ""), ("model", "model", ""), ("layers", "layers", "d"), ("w_gb", "W GB", ".2f"),
    ("factor_dtype", "A,B", ""), ("impl", "impl", ""), ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"),
    ("p80_ms", "p80", ".3f"), ("floor_ms", "floor ms", ".3f"), ("pct_floor", "% floor", ".1f"),
    ("pct_of_step", "% of step", ".2f"), ("peak_mib", "peak extra MiB", ".2f"), ("status", "note", ""),
]


def display_rows(rows):
    out = []
    for r in rows:
        d = dict(r)
        if r.get("scope", "layer") == "layer":
            d["shape"] = f"{r['out']}x{r['in']}"
        d["w_gb"] = r["w_bytes"] / 1e9
        d["peak_mib"] = None if r.get("peak_extra_bytes") is None else r["peak_extra_bytes"] / 2**20
        d["status"] = r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error") or r.get("note") or ""
        out.append(d)
    return out


def print_rows(rows) -> None:
    layer = [r for r in rows if r.get("scope", "layer") == "layer"]
    model = [r for r in rows if r.get("scope") == "model"]
    if layer:
        common.print_table(display_rows(layer), COLUMNS)
    if model:
        common.print_table(display_rows(model), MODEL_COLUMNS)


def _plot(path, rows, title, on_gpu):
    layer = [r for r in rows if r.get("scope", "layer") == "layer"]
    keys = common.unique(_key(r) for r in layer)
    groups = [f"{o}x{i} r={r} {d}" + ("" if d == f else f"/{f}") for o, i, r, d, f in keys]

    def series(field):
        out = {}
        for name in CONTENDERS:
            if name == "copy":
                continue
            vals = [next((r.get(field) for r in layer if _key(r) == k and r["contender"] == name), None)
                    for k in keys]
            if any(v is not None for v in vals):
                out[name] = vals
        return out

    panels = [{"title": "merge rate as % of device copy bandwidth (higher is better)", "ylabel": "% of copy",
               "groups": groups, "series": series("pct_copy"),
               "hlines": [(100.0, "copy"), (TARGET_UNLOAD_PCT, f"unload_ target {TARGET_UNLOAD_PCT:g}%")]}]
    if on_gpu:
        panels.append({"title": "peak extra memory / |W| bytes (lower is better)", "ylabel": "x |W| bytes",
                       "groups": groups, "series": series("peak_extra_over_w"), "hlines": [(1.0, "one W")]})
    model = [r for r in rows if r.get("scope") == "model" and r.get("median_ms")]
    if model:
        panel = {"title": f"whole-model unload_many_ ({model[0]['model']}, {model[0]['layers']} layers), ms per call",
                 "ylabel": "ms", "groups": [r["contender"].removeprefix("model ") for r in model],
                 "series": {"measured": [r["median_ms"] for r in model],
                            "floor (1.5 passes at copy bandwidth)": [r.get("floor_ms") for r in model]}}
        step = model[0].get("step_ms")
        if step:
            panel["hlines"] = [(TARGET_MODEL_PCT_STEP / 100 * step, f"{TARGET_MODEL_PCT_STEP:g}% of a step")]
        panels.append(panel)
    panels = [p for p in panels if p["series"]]
    if not panels:
        return None
    return common.plot_grouped_bars(path, panels, title)


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plora bench unload", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the target only: 8192x8192 r=16 bf16 W with bf16 and fp32 factors, and the whole-model "
                        "unload (on CPU a small shape and a micro model)")
    p.add_argument("--dtype", default=None, help="W dtypes, comma-separated (default bf16,fp16; --quick: bf16)")
    p.add_argument("--factor-dtype", default=None,
                   help="dtype of A and B: 'same' as W, 'fp32' (what training passes) or 'same,fp32'. Default: "
                        "both on the target config, --quick and --shape runs; fp32 on the other full-run shapes")
    p.add_argument("--shape", action="append", type=common.positive_ints, default=None, metavar="OUT,IN",
                   help="a W shape to run instead of the defaults (repeatable)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated subset of the per-layer contenders to time (copy always runs; '-' may "
                        "stand for a space): " + ", ".join(c for c in CONTENDERS if c != "copy"))
    p.add_argument("--model", default=None,
                   help="model size whose targeted layers the whole-model unload_many_ rows merge: a 'plora bench "
                        "train' size (tiny, small, 1b), micro (7 layers of at most 64x32), or none to skip them "
                        "(default: 1b on a GPU, micro on CPU)")
    common.add_common_args(p)
    return p


def _finish(args) -> None:
    """Checks and derived fields after parsing; ValueError for a bad value (parse_cli reports it)."""
    from .train import SIZES

    args.dtypes = common.parse_dtypes(args.dtype or ("bf16" if args.quick else "bf16,fp16"))
    if args.factor_dtype is not None:
        modes = [f.strip().lower() for f in args.factor_dtype.split(",") if f.strip()]
        if not modes or any(f not in ("same", "fp32") for f in modes):
            raise ValueError("--factor-dtype takes 'same', 'fp32' or 'same,fp32'")
        args.factor_modes = common.unique(modes)
    else:
        args.factor_modes = None
    args.rank_list = common.parse_ints(args.ranks) if args.ranks else None
    args.shapes = common.parse_shapes(args.shape, 2, "OUT,IN")
    # "-" may stand for a space (one shell word: --contenders unload_-stochastic,triton-write-stochastic)
    names = [c.strip() if c.strip() in CONTENDERS else c.strip().replace("-", " ")
             for c in (args.contenders or "").split(",") if c.strip()]
    bad = [c for c in names if c not in CONTENDERS]
    if bad:
        raise ValueError(f"unknown contender(s) {bad}; choose from {', '.join(CONTENDERS)}")
    args.names = set(names or CONTENDERS) | {"copy"}
    if args.model is not None and args.model not in ("none", "micro", *SIZES):
        raise ValueError(f"--model takes one of {', '.join(SIZES)}, micro or none, got {args.model!r}")


def configs_for(args, on_gpu: bool) -> list[tuple]:
    """(out, in, r, W dtype, factor modes) to run."""
    both = args.factor_modes or ["same", "fp32"]
    if args.shapes is None and on_gpu and not args.quick:
        rest = args.factor_modes or ["fp32"]
        configs = [(o, i, r, d, rest) for d in args.dtypes for (o, i) in GPU_SHAPES
                   for r in (args.rank_list or GPU_RANKS)]
        if torch.bfloat16 in args.dtypes and not args.rank_list:
            configs.append((*TARGET_SHAPE, TARGET_RANK, torch.bfloat16, both))
        return configs
    shapes = args.shapes or [TARGET_SHAPE if on_gpu else CPU_SHAPE]
    ranks = args.rank_list or ([TARGET_RANK] if args.quick else list(GPU_RANKS))
    return [(o, i, r, d, both) for d in args.dtypes for (o, i) in shapes for r in ranks]


def main(argv=None) -> int:
    try:
        args = common.parse_cli(build_parser(), list(sys.argv[1:] if argv is None else argv), _finish)
    except SystemExit as exc:  # a refused argument (status 2, reported by argparse) or --help
        return common.exit_code(exc)

    device, notes = common.pick_device_announced(" Peak memory is only measured on CUDA.")
    on_gpu = device.type == "cuda"
    configs = configs_for(args, on_gpu)
    model = args.model or ("1b" if on_gpu else "micro")
    model = None if model == "none" else model
    notes.append(f"every contender merges c = (1 - m) s = {COEF:g} (unload_: momentum m = {MOMENTUM}, s = {SCALING}; "
                 "B <- m B, restored after each unload_ row) so that repeated calls keep W finite; random W, A, B, "
                 "never zeros")
    if not on_gpu:
        notes.append("Triton rows on CPU run in the interpreter (TRITON_INTERPRET=1): one timed call, a smoke test of "
                     "the code path, not a timing")

    env = common.environment(device)
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}", flush=True)
    model_dtype = torch.bfloat16 if on_gpu else args.dtypes[0]
    train = None
    if model is not None:
        train = find_train_step(env, model, MODEL_RANK, common.dtype_name(model_dtype),
                                [args.out, common.default_out_dir()])
        if train is not None:
            print(f"training step to compare the whole-model unload with: {train['step_ms']:.2f} ms "
                  f"({train['contender']}, {train['record']})", flush=True)

    stem = None if args.no_save else common.result_stem("unload", env, args.out)
    payload = {
        "benchmark": "unload", "schema": 2, "environment": env,
        "config": {"configs": [[o, i, r, common.dtype_name(d), f] for o, i, r, d, f in configs],
                   "quick": args.quick, "scaling": SCALING, "momentum": MOMENTUM, "coef": COEF,
                   "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "contenders": CONTENDERS,
                   "timed": [c for c in CONTENDERS if c in args.names],
                   "model": model, "model_contenders": MODEL_CONTENDERS if model else {}, "train_step": train,
                   "bytes": "2*|W|*itemsize (one read and one write of W: a copy)",
                   "ours_backend": common.backend_label(torch.empty(1, device=device), "unload")},
        "notes": notes, "targets": [], "complete": False,
    }
    rows: list[dict] = []

    def run(fn, *fn_args) -> None:
        """Time one config (or the model), print its rows, save the record so far."""
        start = len(rows)
        fn(*fn_args, device, args, rows)
        derive(rows, train)
        print_rows(rows[start:])
        print(flush=True)
        if stem is not None:
            common.write_record(stem, payload, rows)

    with common.interruptible("plora bench unload", rows, notes) as state:
        for n_out, k_in, r, dtype, modes in configs:
            for mode in modes:
                run(run_config, n_out, k_in, r, dtype, dtype if mode == "same" else torch.float32)
        if model is not None:
            run(run_model, model, model_dtype)

    derive(rows, train)
    payload["targets"] = targets(rows, train) if on_gpu else []
    payload["complete"] = not state.interrupted
    print("== all results ==")
    print_rows(rows)
    common.print_targets(payload["targets"])
    return common.finish_run(stem, payload, rows, lambda png: _plot(
        png, rows, f"unload: passes, unload_ and PEFT's merges vs device copy - {env['device_name']}", on_gpu),
        state.interrupted)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
