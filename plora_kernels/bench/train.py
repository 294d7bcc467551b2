"""``plora bench train``: one training step of a Llama-style model, full fine-tuning vs LoRA vs PLoRA.

A ``LlamaForCausalLM`` is built from a config (random weights, nothing downloaded) and one training step,
forward + backward + ``AdamW.step()`` on random tokens, is timed for each contender, all in the same process on
the same initial weights and batch:

  full          full fine-tuning: every parameter trainable
  peft          PEFT LoRA (``get_peft_model``, unfused ``base(x) + lora_B(lora_A(x)) * s``); skipped without peft
  plora-torch   PLoRALinear on the pure-torch reference path (``PLORA_BACKEND=torch``)
  plora-triton  PLoRALinear on the Triton kernels (``PLORA_BACKEND=triton``); CUDA only

LoRA contenders adapt the attention and MLP projections (q, k, v, o, gate, up, down) at rank ``--r`` with
``alpha = 2r``; adapters are fp32 on a 16-bit base for both (PEFT's default and PLoRALinear's). Reported: step
time (median, p20, p80 over ``--iters`` steps after ``--warmup``), tokens/s, peak memory, and for PLoRA rows
the cost of one ``unload_all_`` amortised over a stage: ``unload_ms / every / step_ms`` for every = 1, 10, 100.

Sizes: ``tiny`` (CPU default), ``small``, ``1b`` (GPU default: hidden 2048, 16 layers, intermediate 5632,
32 heads with 4 KV heads, seq 2048); any field can be overridden with its flag.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time

import torch

from . import common

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = {
    "tiny": dict(hidden=128, layers=2, intermediate=344, heads=4, kv_heads=4, vocab=1024, seq=128, batch=2),
    "small": dict(hidden=768, layers=6, intermediate=2048, heads=12, kv_heads=4, vocab=32000, seq=1024, batch=4),
    "1b": dict(hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=4, vocab=32000, seq=2048, batch=4),
}
SIZE_FIELDS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch")

CONTENDERS = {
    "full": "full fine-tuning (all parameters trainable)",
    "peft": "PEFT LoRA (get_peft_model, unfused layers)",
    "plora-torch": "PLoRALinear, pure-torch reference path (PLORA_BACKEND=torch)",
    "plora-triton": "PLoRALinear, Triton kernels (PLORA_BACKEND=triton)",
}
BACKEND_OF = {"plora-torch": "torch", "plora-triton": "triton"}
UNLOAD_EVERY = (1, 10, 100)

COLUMNS = [
    ("contender", "contender", ""), ("status", "status", ""), ("trainable_params", "trainable", ","),
    ("median_ms", "step ms", ".2f"), ("p20_ms", "p20", ".2f"), ("p80_ms", "p80", ".2f"),
    ("tokens_per_s", "tokens/s", ",.0f"), ("peak_mib", "peak MiB", ",.0f"), ("first_loss", "loss@0", ".4f"),
    ("unload_ms", "unload ms", ".3f"),
] + [(f"unload_pct_every_{k}", f"unload% @{k}", ".2f") for k in UNLOAD_EVERY]


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def forced_backend(name: str | None):
    """Set PLORA_BACKEND for the duration (the ops read it on every call), restoring the previous value."""
    if name is None:
        yield
        return
    old = os.environ.get("PLORA_BACKEND")
    os.environ["PLORA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PLORA_BACKEND", None)
        else:
            os.environ["PLORA_BACKEND"] = old


def time_steps(fn, device: torch.device, warmup: int, iters: int) -> common.Timing:
    """Median/p20/p80 in ms of ``iters`` calls after ``warmup`` calls, each call synchronised.

    A training step is long (ms to s) and changes the weights, so a fixed count of whole steps is timed rather
    than :func:`common.bench`'s time budget (whose do_bench also flushes L2 between calls, which is noise here)."""
    for _ in range(warmup):
        fn()
    common.synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    q = common.quantiles(times, (0.5, 0.2, 0.8))
    return common.Timing(q[0], q[1], q[2], "perf_counter, synchronised per step")


def llama_config(size: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                       intermediate_size=size["intermediate"], num_attention_heads=size["heads"],
                       num_key_value_heads=size["kv_heads"], vocab_size=size["vocab"],
                       max_position_embeddings=max(size["seq"], 128), use_cache=False, tie_word_embeddings=False)


def build_model(name: str, config, device: torch.device, dtype: torch.dtype, r: int, alpha: float,
                lora_dropout: float = 0.0):
    """The model for one contender, with the same initial weights for all (seeded), and its trainable params;
    ``lora_dropout`` on every adapter (PEFT's and ours alike)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: building a 1b model on the CPU first takes long
        model = LlamaForCausalLM(config)
    model.to(dtype)
    if name == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGET_MODULES,
                                                 lora_dropout=lora_dropout, bias="none"))
    elif name in BACKEND_OF:
        from ..nn.patching import apply_plora

        apply_plora(model, target_modules=TARGET_MODULES, r=r, alpha=alpha, lora_dropout=lora_dropout)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def skip_reason(name: str, device: torch.device) -> str | None:
    if name == "peft":
        try:
            import peft  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means the contender cannot run
            return f"peft not importable ({type(exc).__name__}: {exc})"[:200]
    if name == "plora-triton":
        from .._backend import triton_available

        if device.type != "cuda":
            return "needs a CUDA device"
        if not triton_available():
            return "triton not importable"
    return None


def run_contender(name: str, config, size: dict, device, dtype, args) -> dict:
    """Build, time a training step and (for PLoRA) an unload; returns the result row."""
    row = {"contender": name, "label": CONTENDERS[name]}
    reason = skip_reason(name, device)
    if reason is not None:
        row.update(status="skipped", note=reason)
        return row
    tokens = size["batch"] * size["seq"]
    model = opt = None
    try:
        with forced_backend(BACKEND_OF.get(name)):
            mem = common.PeakMemory(device)
            mem.start()
            model, params = build_model(name, config, device, dtype, args.r, args.alpha, args.lora_dropout)
            opt = torch.optim.AdamW(params, lr=1e-4)
            gen = torch.Generator(device="cpu").manual_seed(1)
            ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen).to(device)

            def step():
                opt.zero_grad(set_to_none=True)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                return loss

            row["first_loss"] = step().item()  # before any update: the same for every contender
            t = time_steps(step, device, max(0, args.warmup - 1), args.iters)
            peak = mem.stop()
            row.update(status="ok", trainable_params=sum(p.numel() for p in params), **t.as_dict(),
                       tokens_per_s=tokens / (t.median_ms * 1e-3),
                       peak_mib=None if peak is None else peak / 2**20)
            if name in BACKEND_OF:
                row.update(_unload_cost(model, device, t.median_ms, args))
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: record it and go on with the others
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        model = opt = None  # drops the step closure's references too, so the memory can be freed
        gc.collect()
        common.free_memory(device)
    return row


def _unload_cost(model, device, step_ms: float, args) -> dict:
    from ..nn.patching import unload_all_

    # unloads change W and reset the adapters; the model is not trained further, so that is harmless here
    t = time_steps(lambda: unload_all_(model), device, 1, max(3, args.iters))
    out = {"unload_ms": t.median_ms}
    for every in UNLOAD_EVERY:
        out[f"unload_pct_every_{every}"] = 100.0 * t.median_ms / every / step_ms
    return out


def _plot(path, rows, size_label: str, title: str):
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    panels = [
        {"title": "step time (lower is better)", "ylabel": "ms", "groups": [size_label],
         "series": {r["contender"]: [r["median_ms"]] for r in ok}},
        {"title": "throughput (higher is better)", "ylabel": "tokens/s", "groups": [size_label],
         "series": {r["contender"]: [r["tokens_per_s"]] for r in ok}},
    ]
    if any(r.get("peak_mib") is not None for r in ok):
        panels.append({"title": "peak memory (lower is better)", "ylabel": "MiB", "groups": [size_label],
                       "series": {r["contender"]: [r.get("peak_mib")] for r in ok}})
    plora = [r for r in ok if "unload_ms" in r]
    if plora:
        panels.append({"title": "unload cost per step, % of a step (lower is better)", "ylabel": "%",
                       "groups": [f"every={k}" for k in UNLOAD_EVERY],
                       "series": {r["contender"]: [r[f"unload_pct_every_{k}"] for k in UNLOAD_EVERY] for r in plora}})
    return common.plot_grouped_bars(path, panels, title)


# --------------------------------------------------------------------------------------------------- CLI
def _dropout_arg(text: str) -> float:
    return common.argument(text, float, lambda p: 0.0 <= p < 1.0, "a number in [0, 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plora bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="model preset (default: tiny on CPU, 1b on a GPU)")
    for field in SIZE_FIELDS:
        p.add_argument(f"--{field.replace('_', '-')}", type=common.positive_int, default=None,
                       help=f"override the preset's {field}")
    p.add_argument("--r", type=common.positive_int, default=16, help="adapter rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--lora-dropout", type=_dropout_arg, default=0.0,
                   help="dropout on the adapters' input, for every contender with adapters (default 0)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--iters", type=common.positive_int, default=None,
                   help="timed steps (default: 10 on a GPU, 5 on CPU)")
    p.add_argument("--warmup", type=common.positive_int, default=2, help="untimed steps first (>= 1; default 2)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    p.add_argument("--out", default=None, help="results folder (default: <repo>/benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print the table only; write no JSON/PNG")
    return p


def _parse(argv):
    """(args, device, dtype, size, size label, contenders); a bad value is refused argparse's way (usage,
    'plora bench train: error: ...', exit status 2): counts by their ``type=``, the rest by ``_finish``."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        return _finish(args)
    except ValueError as exc:
        p.error(str(exc))


def _finish(args):
    device = common.pick_device()
    on_gpu = device.type == "cuda"
    size_name = args.size or ("1b" if on_gpu else "tiny")
    size = dict(SIZES[size_name])
    overridden = []
    for field in SIZE_FIELDS:
        value = getattr(args, field)
        if value is not None:  # positive: checked by its type
            size[field], overridden = value, overridden + [field]
    if size["hidden"] % size["heads"] or size["heads"] % size["kv_heads"]:
        raise ValueError(f"--hidden ({size['hidden']}) must be a multiple of --heads ({size['heads']}) and --heads "
                         f"of --kv-heads ({size['kv_heads']})")
    args.alpha = float(2 * args.r if args.alpha is None else args.alpha)
    if not math.isfinite(args.alpha):
        raise ValueError(f"--alpha must be finite, got {args.alpha}")
    dtypes = common.parse_dtypes(args.dtype or ("bf16" if on_gpu else "fp32"))
    if len(dtypes) != 1:
        raise ValueError("--dtype takes one dtype")
    args.iters = args.iters if args.iters is not None else (10 if on_gpu else 5)
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not names or any(c not in CONTENDERS for c in names):
        raise ValueError(f"--contenders must be a comma-separated subset of {', '.join(CONTENDERS)}, "
                         f"got {args.contenders!r}")
    label = size_name + ("*" if overridden else "")
    return args, device, dtypes[0], size, label, names


def main(argv=None) -> int:
    try:
        args, device, dtype, size, size_label, names = _parse(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # a refused argument (status 2, reported by argparse) or --help
        return common.exit_code(exc)
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"plora bench train: needs transformers ({exc}); pip install 'plora_kernels[bench]'", file=sys.stderr)
        return 2
    notes = []
    if device.type != "cuda":
        notes.append("No CUDA GPU found: a small model on the CPU; the PLoRA row times the pure-torch reference "
                     "path, and peak memory is the growth of the process's peak RSS (allocator reuse can hide "
                     "some). These are smoke timings, not kernel performance.")
    notes.append(f"pure {common.dtype_name(dtype)} weights, AdamW(lr=1e-4) over the trainable parameters; LoRA "
                 "adapters in fp32 when the base is 16-bit (PEFT's and PLoRALinear's default); no dropout; "
                 f"LoRA targets {TARGET_MODULES}, alpha = {args.alpha:g}")
    notes.append("unload%@k = unload_all_ time / k / step time: the per-step cost of unloading every k steps. "
                 "PLoRALinear's default rounding applies (stochastic on 16-bit weights).")
    config = llama_config(size)
    env = common.environment(device)
    tokens = size["batch"] * size["seq"]
    print(f"device: {env['device_name']}  torch {env['torch']}  dtype {common.dtype_name(dtype)}  model {size_label}: "
          + ", ".join(f"{k}={size[k]}" for k in SIZE_FIELDS) + f"  r={args.r}  tokens/step={tokens}", flush=True)

    rows = []
    for name in names:
        row = run_contender(name, config, size, device, dtype, args)
        rows.append(row)
        status = row.get("status")
        detail = f"{row['median_ms']:.2f} ms/step" if status == "ok" else row.get("note") or row.get("error")
        print(f"  {name}: {status} ({detail})", flush=True)
    common.print_table(rows, COLUMNS)
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            print(f"{r['status']}: {r['contender']}: {r.get('note') or r.get('error')}")
    errors = [r for r in rows if r.get("status") == "error"]
    if args.no_save:
        return 1 if errors else 0

    stem = common.result_stem("train", env, args.out)
    png = _plot(stem.with_suffix(".png"), rows, size_label,
                f"one training step - {env['device_name']} - {common.dtype_name(dtype)} - {size_label} r={args.r}")
    payload = {
        "benchmark": "train", "schema": 1, "environment": env,
        "config": {"size": size_label, **size, "r": args.r, "alpha": args.alpha, "lora_dropout": args.lora_dropout,
                   "dtype": common.dtype_name(dtype), "iters": args.iters, "warmup": args.warmup,
                   "tokens_per_step": tokens,
                   "target_modules": TARGET_MODULES, "unload_every": list(UNLOAD_EVERY), "contenders": CONTENDERS,
                   "timer": "perf_counter, synchronised per step", "optimizer": "torch.optim.AdamW(lr=1e-4)"},
        "notes": notes,
    }
    common.save_record(stem, payload, rows, png)
    return 1 if errors else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
