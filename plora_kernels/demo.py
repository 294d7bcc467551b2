"""``plora demo``: LoRA vs PeriodicLoRA vs full fine-tuning on a task whose ideal update is high-rank.

The task. A tiny random Llama is the *teacher*. The *student* is the teacher with every targeted Linear weight
``W`` replaced by ``W + D``, where ``D`` is a dense Gaussian (full-rank) matrix. The student is trained to
match the teacher's logits (KL divergence, teacher || student) on random token batches. The exact solution is
``dW = -D`` in every layer: a full-rank update, which a rank-r LoRA adapter cannot express but a sequence of
rank-r PLoRA stages (each merged into W and restarted) can build up.

The three methods start from the same student weights and see the same batches in the same order:

* ``lora``:  rank-r adapters on every targeted layer, never unloaded (plain LoRA);
* ``plora``: the same adapters, unloaded into W every ``every`` steps (:class:`PeriodicUnloader`);
* ``full``:  every targeted Linear weight trained directly (embeddings, norms and LM head stay frozen, as for
  the adapters, so all three change exactly the same matrices).

Nothing is downloaded: the models are built from a config with ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .bench.common import PeakMemory

METHODS = ("lora", "plora", "full")
LABELS = {"lora": "LoRA", "plora": "PLoRA", "full": "full FT"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The built-in default: on 2 CPU cores it must finish within 3 minutes, and PLoRA must clearly beat LoRA at
# equal rank. The same machine's speed varied 3.5x between sessions: 1200 steps took 51 s on one day and 181 s
# on another, so the default is 800 steps, 120 s on the slow day. At 800 steps (seed 0) with every="auto" (80,
# the study's rule) PLoRA removed 1.56x as much of the initial loss as LoRA (75% vs 48%; full FT 99.7%); with
# the earlier fixed every=60 it was 1.58x, and at 1200 steps 1.70x, 1.67x and 1.74x for seeds 0, 1 and 2.
DEFAULTS = {
    "rank": 4,
    "alpha": None,          # None: alpha = 2 * rank (scaling 2)
    "steps": 800,
    "every": "auto",        # PLoRA's unload interval: "auto" = plora_kernels.auto_every(steps), 80 at 800 steps
    "momentum": 0.0,
    "lr": 1e-2,             # adapters (LoRA and PLoRA)
    "full_lr": 3e-3,        # full fine-tuning
    "restart_warmup": 5,    # PLoRA: steps of LR re-warmup after each unload
    "warmup": 10,
    "batch_size": 16,
    "seq_len": 32,
    "perturb": 0.3,         # |D|_F / |W|_F per targeted layer
    "rank_tol": 1e-2,       # numerical rank: singular values above rank_tol * the largest
    "dtype": "float32",
    "device": "auto",
    "out": "./plora_out",
    "seed": 0,
}

MODEL_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "use_cache": False,
}


# --------------------------------------------------------------------------------------------- models & data
def _build_model(seed: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plora demo needs transformers: pip install 'plora_kernels[demo]'") from exc
    config = LlamaConfig(**MODEL_CONFIG)
    config._attn_implementation = "eager"  # deterministic, no SDPA backend differences between runs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def _targeted_names(model: nn.Module) -> list[str]:
    """Every nn.Linear but the LM head: apply_plora's default targets."""
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]


@torch.no_grad()
def _perturb_(model: nn.Module, names: list[str], scale: float, seed: int) -> None:
    """W <- W + D with D dense Gaussian, |D|_F = scale * |W|_F: a full-rank change in every targeted layer."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        w = model.get_submodule(name).weight
        d = torch.randn(w.shape, generator=g, dtype=torch.float32)
        d *= scale * w.float().norm().cpu() / d.norm()
        w.copy_((w.float() + d.to(w.device)).to(w.dtype))


def _batches(seed: int, steps: int, batch_size: int, seq_len: int, vocab: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device) for _ in range(steps)]


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, in fp32."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    total = sum(float(_kl(model(input_ids=x).logits, t)) for x, t in zip(inputs, targets))
    return total / len(inputs)


# ------------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def _effective_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """fp32 W (+ s B A for an adapter layer, without rounding into W's dtype), per targeted layer."""
    from .nn import PLoRALinear

    out = {}
    for name in names:
        m = model.get_submodule(name)
        w = m.weight.detach().float().clone()
        if isinstance(m, PLoRALinear):
            w += m.scaling * (m.lora_B.detach().float() @ m.lora_A.detach().float())
        out[name] = w.cpu()
    return out


def _numerical_rank(delta: torch.Tensor, tol: float) -> float:
    if not bool(torch.isfinite(delta).all()):
        return float("nan")  # the run diverged
    s = torch.linalg.svdvals(delta.double())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > tol * s[0]).sum())


# --------------------------------------------------------------------------------------------------- training
def _train_one(method: str, student_state: dict, teacher: nn.Module, names: list[str], batches,
               eval_inputs, eval_targets, cfg: dict, dtype, device, progress: bool) -> dict:
    from . import PeriodicUnloader, apply_plora, stage_cosine_schedule

    model = _build_model(cfg["seed"], dtype, device)
    model.load_state_dict(student_state)
    start = _effective_weights(model, names)
    steps = cfg["steps"]

    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(cfg["seed"] + 17)  # same adapter init for LoRA and PLoRA
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(False)
            for name in names:
                model.get_submodule(name).weight.requires_grad_(True)
            lr, restart_warmup = cfg["full_lr"], 0
        else:
            apply_plora(model, target_modules=None, r=cfg["rank"], alpha=cfg["alpha"], momentum=cfg["momentum"])
            lr, restart_warmup = cfg["lr"], (cfg["restart_warmup"] if method == "plora" else 0)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    model.train()
    losses, step_times = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{LABELS[method]:>7}", unit="step", leave=True, dynamic_ncols=True,
                   file=sys.stderr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with PeakMemory(device, profile_steps=3) as mem:
        # full FT of a 16-bit model keeps fp32 master weights (standard mixed precision: pure fp16 AdamW
        # overflows, pure bf16 AdamW loses updates below half an ulp); the adapters are fp32 already
        master = None
        if method == "full" and dtype in (torch.float16, torch.bfloat16):
            master = [p.detach().float().clone().requires_grad_(True) for p in params]
        optimizer = torch.optim.AdamW(master or params, lr=lr, weight_decay=0.0)
        every = cfg["every"] if method == "plora" else steps + 1  # LoRA: one stage, no unload
        scheduler = stage_cosine_schedule(optimizer, total_steps=steps, every=every, warmup=min(cfg["warmup"], steps),
                                          restart_warmup=restart_warmup, min_lr_ratio=0.05)
        unloader = PeriodicUnloader(model, optimizer, cfg["every"], seed=cfg["seed"]) if method == "plora" else None
        for step in range(steps):
            with torch.no_grad():  # the teacher's targets, outside the timed step
                target = teacher(input_ids=batches[step]).logits
            sync()
            t0 = time.perf_counter()
            loss = _kl(model(input_ids=batches[step]).logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if master is not None:
                for m, p in zip(master, params):
                    m.grad, p.grad = p.grad.float(), None
            optimizer.step()
            if master is not None:
                with torch.no_grad():
                    for m, p in zip(master, params):
                        p.copy_(m)  # round to nearest into the model's dtype
            scheduler.step()
            if unloader is not None:
                unloader.step()
            sync()
            step_times.append(time.perf_counter() - t0)
            mem.step_done()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()

    model.eval()
    final = _evaluate(model, eval_inputs, eval_targets)
    end = _effective_weights(model, names)
    ranks = {n: _numerical_rank(end[n] - start[n], cfg["rank_tol"]) for n in names}
    timed = step_times[min(5, steps - 1):] or step_times
    return {
        "method": method,
        "label": LABELS[method],
        "final_loss": final,
        "train_losses": losses,
        "delta_rank_mean": sum(ranks.values()) / len(ranks),
        "delta_rank_per_layer": ranks,
        "step_ms": 1e3 * sum(timed) / len(timed),
        "peak_mem_bytes": mem.peak_bytes,
        "peak_mem_kind": mem.kind,
        "trainable_params": trainable,
        "lr": lr,
        "num_unloads": unloader.num_unloads if unloader is not None else 0,
        "_end": end,
    }


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be 'cpu', 'cuda' or 'auto', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "is 'cuda' but torch.cuda.is_available() is False")
    return torch.device(name)


class ConfigError(ValueError):
    """A bad :func:`run_demo` argument: ``key`` is its keyword (``plora demo`` reports it as the flag ``--key``)."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key} {detail}")
        self.key, self.detail = key, detail

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def _positive_int(cfg: dict, key: str, maximum: int | None = None, what: str = "") -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(key, f"must be a positive int, got {v!r}")
    if maximum is not None and v > maximum:
        raise ConfigError(key, f"must be at most {maximum}{what}, got {v}")


def _real(cfg: dict, key: str, low: float, high: float | None = None, low_open: bool = True,
          high_open: bool = False) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, f"must be a number, got {v!r}")
    ok = math.isfinite(v) and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        upper = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        interval = f"{'(' if low_open else '['}{low:g}, {upper}"
        raise ConfigError(key, f"must be a finite number in {interval}, got {v}")


def check_out_dir(out) -> Path:
    """Make the output directory (with its parents) and check that a file can be written in it, before any
    training: an unwritable ``out`` would otherwise lose every result at the end."""
    import tempfile

    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ConfigError("out", f"must be a directory path, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError("out", f"{str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".plora_write_check_"):
            pass
    except OSError as exc:
        raise ConfigError("out", f"cannot write results to {str(path)!r}: {exc.strerror or exc}") from None
    return path


def check_config(methods=METHODS, save: bool = True, **kwargs) -> tuple[dict, tuple[str, ...]]:
    """Every :func:`run_demo` argument checked, before anything runs: (the full config, the methods).

    Raises TypeError for an unknown keyword and :class:`ConfigError` (a ValueError naming the keyword) for a bad
    value; with ``save``, also when the output directory cannot be written or matplotlib is missing."""
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"run_demo got unknown arguments {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise ConfigError("methods", f"must be a non-empty subset of {METHODS} without repeats, got {methods!r}")
    cfg = {**DEFAULTS, **{k: v for k, v in kwargs.items() if v is not None}}
    hidden = min(MODEL_CONFIG["hidden_size"], MODEL_CONFIG["intermediate_size"])
    _positive_int(cfg, "rank", hidden, " (the smallest targeted layer dimension: a larger rank adds nothing)")
    for key in ("steps", "batch_size"):
        _positive_int(cfg, key)
    _positive_int(cfg, "seq_len", MODEL_CONFIG["max_position_embeddings"], " (the model's max_position_embeddings)")
    from .train.unloader import AUTO_MIN_STEPS, auto_every, is_auto

    if is_auto(cfg["every"]):

        if "plora" in methods and auto_every(cfg["steps"]) > cfg["steps"]:
            raise ConfigError("every", f"is 'auto', which does not unload in a run of fewer than {AUTO_MIN_STEPS} "
                                       f"steps (plora study: plain LoRA does as well there), so PLoRA would be LoRA "
                                       f"at steps={cfg['steps']}; pass steps >= {AUTO_MIN_STEPS} or an int every")
        cfg["every"] = auto_every(cfg["steps"])
    elif isinstance(cfg["every"], bool) or not isinstance(cfg["every"], int) or cfg["every"] < 1:
        raise ConfigError("every", f"must be a positive int or 'auto', got {cfg['every']!r}")
    if "plora" in methods and cfg["every"] > cfg["steps"]:
        raise ConfigError("every", f"must be at most steps={cfg['steps']} (PLoRA would never unload: that is LoRA), "
                                   f"got {cfg['every']}")
    for key in ("warmup", "restart_warmup"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(key, f"must be a non-negative int, got {v!r}")
    if cfg["alpha"] is None:
        cfg["alpha"] = 2 * cfg["rank"]
    _real(cfg, "alpha", 0.0)
    _real(cfg, "momentum", 0.0, 1.0, low_open=False, high_open=True)
    for key in ("lr", "full_lr", "perturb"):
        _real(cfg, key, 0.0)
    _real(cfg, "rank_tol", 0.0, 1.0, high_open=True)
    if cfg["dtype"] not in DTYPES:
        raise ConfigError("dtype", f"must be one of {tuple(DTYPES)}, got {cfg['dtype']!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ConfigError("seed", f"must be a non-negative int, got {cfg['seed']!r}")
    _resolve_device(cfg["device"])
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ImportError("plora demo needs transformers: pip install 'plora_kernels[demo]'")
    if save:
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("plora demo needs matplotlib to save its plot: pip install 'plora_kernels[demo]' (or "
                              "run_demo(save=False))")
        check_out_dir(cfg["out"])
    return cfg, methods


def run_demo(**kwargs) -> dict:
    """Train LoRA, PLoRA and full FT on the high-rank distillation task; returns the results as a dict.

    Keyword arguments: any key of :data:`DEFAULTS` (rank, steps, every, momentum, lr, full_lr, dtype, device,
    out, seed, ...), plus ``methods`` (subset of ("lora", "plora", "full")), ``progress`` (tqdm bars, default
    True), ``save`` (write results.json, loss_curves.png and table.txt into ``out``; default True) and
    ``verbose`` (print the table; default True). All are checked (:func:`check_config`) before anything runs:
    TypeError for an unknown keyword, :class:`ConfigError` (a ValueError naming the keyword) for a bad value, an
    unwritable ``out`` included.

    The result has "config", "methods" (per method: final_loss, gap_closed, gap_closed_vs_full,
    delta_rank_mean, step_ms, peak_mem_bytes, trainable_params, train_losses, ...), "initial_loss",
    "plora_over_lora" (ratio of the fractions of the initial loss removed), "table" and, when saved, "files".
    """
    progress = bool(kwargs.pop("progress", True))
    save = bool(kwargs.pop("save", True))
    verbose = bool(kwargs.pop("verbose", True))
    # every argument, the output directory included, is checked before anything is built or trained
    cfg, methods = check_config(save=save, **kwargs)
    dtype = DTYPES[cfg["dtype"]]
    device = _resolve_device(cfg["device"])
    cfg["device"] = str(device)
    wall0 = time.perf_counter()

    teacher = _build_model(cfg["seed"], dtype, device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    names = _targeted_names(teacher)
    student = _build_model(cfg["seed"], dtype, device)
    _perturb_(student, names, cfg["perturb"], cfg["seed"] + 1)
    student_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    teacher_w = _effective_weights(teacher, names)
    student_w = _effective_weights(student, names)
    vocab = MODEL_CONFIG["vocab_size"]
    batches = _batches(cfg["seed"] + 2, cfg["steps"], cfg["batch_size"], cfg["seq_len"], vocab, device)
    eval_inputs = _batches(cfg["seed"] + 3, 8, 32, cfg["seq_len"], vocab, device)
    with torch.no_grad():
        eval_targets = [teacher(input_ids=x).logits.detach() for x in eval_inputs]
        initial = _evaluate(student, eval_inputs, eval_targets)
    del student

    results = {}
    for method in methods:
        r = _train_one(method, student_state, teacher, names, batches, eval_inputs, eval_targets, cfg,
                       dtype, device, progress)
        end = r.pop("_end")
        # |W_end - W_teacher|_F / |W_start - W_teacher|_F over all targeted layers: 1 = no closer to the
        # teacher's weights. The loss can fall without it (the function has weight symmetries).
        num = math.sqrt(sum(float((end[n] - teacher_w[n]).pow(2).sum()) for n in names))
        den = math.sqrt(sum(float((student_w[n] - teacher_w[n]).pow(2).sum()) for n in names))
        r["weight_dist_to_teacher"] = num / den
        r["gap_closed"] = (initial - r["final_loss"]) / initial if initial > 0 else float("nan")
        results[method] = r
    if "full" in results:
        full_drop = initial - results["full"]["final_loss"]
        for r in results.values():
            r["gap_closed_vs_full"] = (initial - r["final_loss"]) / full_drop if full_drop > 0 else float("nan")
    ratio = None
    if "lora" in results and "plora" in results and results["lora"]["gap_closed"] > 0:
        ratio = results["plora"]["gap_closed"] / results["lora"]["gap_closed"]

    summary = {
        "config": cfg,
        "model_config": MODEL_CONFIG,
        "targeted_layers": names,
        "initial_loss": initial,
        "methods": results,
        "plora_over_lora": ratio,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    summary["table"] = format_table(summary)
    summary["wall_s"] = time.perf_counter() - wall0
    if save:
        summary["files"] = _save(summary, Path(cfg["out"]))
    if verbose:
        print(summary["table"])
        if save:
            print(f"\nwrote {', '.join(summary['files'].values())}")
        print(f"demo wall time {summary['wall_s']:.1f} s")
    return summary


# ------------------------------------------------------------------------------------------------- reporting
def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    if n < 1024**2:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def format_table(summary: dict) -> str:
    cfg, results = summary["config"], summary["methods"]
    header = ["method", "final loss", "loss removed", "vs full FT", "rank(dW)", "step ms", "peak mem",
              "trainable"]
    rows = []
    for r in results.values():
        vs_full = r.get("gap_closed_vs_full")
        rows.append([
            r["label"] + (f" r={cfg['rank']}" if r["method"] != "full" else ""),
            f"{r['final_loss']:.4g}",
            f"{100 * r['gap_closed']:.1f}%",
            "n/a" if vs_full is None else f"{100 * vs_full:.1f}%",
            f"{r['delta_rank_mean']:.1f}",
            f"{r['step_ms']:.1f}",
            _fmt_bytes(r["peak_mem_bytes"]),
            f"{r['trainable_params']:,}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    out = [
        f"PLoRA demo: distil a tiny Llama teacher into a student whose {len(summary['targeted_layers'])} Linear "
        f"weights carry a full-rank perturbation",
        f"device={cfg['device']} dtype={cfg['dtype']} steps={cfg['steps']} rank={cfg['rank']} alpha={cfg['alpha']} "
        f"every={cfg['every']} momentum={cfg['momentum']} lr={cfg['lr']} full_lr={cfg['full_lr']} seed={cfg['seed']}",
        rule, line(header), rule, *(line(row) for row in rows), rule,
        f"initial loss L0 = {summary['initial_loss']:.4f} (KL teacher||student per token on a fixed eval set; "
        "the teacher itself scores 0)",
        "loss removed = (L0 - L) / L0, the fraction of the initial loss removed; "
        "vs full FT = (L0 - L) / (L0 - L_full FT)",
        f"rank(dW) = mean over targeted layers of #singular values of W_end - W_start above "
        f"{cfg['rank_tol']:g} x the largest (adapters counted merged)",
        "step ms = mean wall time per optimizer step after 5 warm-up steps (PLoRA's includes its unloads)",
        f"peak mem = {next(iter(results.values()))['peak_mem_kind']}, above the frozen model; "
        "trainable = parameters the optimizer updates",
    ]
    if summary.get("plora_over_lora") is not None:
        out.append(f"PLoRA / LoRA (loss removed) = {summary['plora_over_lora']:.2f}x at equal rank r={cfg['rank']}")
    return "\n".join(out)


def _save(summary: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "results.json"), "png": str(out / "loss_curves.png"), "table": str(out / "table.txt")}
    Path(files["table"]).write_text(summary["table"] + "\n")
    _plot(summary, files["png"])
    with open(files["json"], "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "files"}, f, indent=1, default=str)
    return files


def _plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cfg = summary["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"lora": "tab:orange", "plora": "tab:blue", "full": "tab:green"}
    for r in summary["methods"].values():
        losses = r["train_losses"]
        k = max(1, len(losses) // 50)  # light moving average for readability
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        label = f"{r['label']}" + (f" r={cfg['rank']}" if r["method"] != "full" else "")
        ax.plot(range(1, len(losses) + 1), smooth, label=f"{label} (final {r['final_loss']:.3g})",
                color=colors[r["method"]], lw=1.6)
    if "plora" in summary["methods"]:
        for s in range(cfg["every"], cfg["steps"] + 1, cfg["every"]):
            ax.axvline(s, color="tab:blue", alpha=0.08, lw=0.8)
    ax.axhline(summary["initial_loss"], color="gray", ls=":", lw=1, label="initial loss")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(teacher || student) per token")
    ax.set_title(f"LoRA vs PLoRA (unload every {cfg['every']}) vs full FT, {cfg['dtype']}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ CLI
def _every_flag(text: str):
    """``--every``: "auto" or a positive int (argparse reports anything else as a usage error naming the flag)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DEFAULTS
    parser.add_argument("--rank", type=int, default=d["rank"], help=f"adapter rank r (default {d['rank']})")
    parser.add_argument("--alpha", type=float, default=d["alpha"], help="LoRA alpha (default 2 * rank)")
    parser.add_argument("--steps", type=int, default=d["steps"],
                        help=f"optimizer steps per method (default {d['steps']})")
    parser.add_argument("--every", type=_every_flag, default=d["every"],
                        help="PLoRA unload interval in steps, or 'auto': max(80, steps // 10), the rule of plora "
                             f"study (needs steps >= 400) (default {d['every']})")
    parser.add_argument("--momentum", type=float, default=d["momentum"],
                        help=f"PLoRA unload momentum in [0, 1) (default {d['momentum']})")
    parser.add_argument("--lr", type=float, default=d["lr"], help=f"AdamW LR of the adapters (default {d['lr']})")
    parser.add_argument("--full-lr", type=float, default=d["full_lr"],
                        help=f"AdamW LR of full fine-tuning (default {d['full_lr']})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=d["dtype"], help="model weight dtype")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d["device"])
    parser.add_argument("--out", default=d["out"], help=f"output directory (default {d['out']})")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of lora,plora,full")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def _kwargs_from_args(args: argparse.Namespace) -> dict:
    return dict(rank=args.rank, alpha=args.alpha, steps=args.steps, every=args.every, momentum=args.momentum,
                lr=args.lr, full_lr=args.full_lr, dtype=args.dtype, device=args.device, out=args.out,
                seed=args.seed, methods=args.methods, progress=not args.no_progress)


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """Run the demo from parsed flags. Every flag (and the output directory) is checked first; with ``parser``, a
    bad one is reported as argparse reports its own (usage, ``plora demo: error: argument --flag: ...``, exit
    status 2), else it raises :class:`ConfigError`."""
    kwargs = _kwargs_from_args(args)
    try:
        check_config(**{k: v for k, v in kwargs.items() if k != "progress"})
    except ConfigError as exc:
        if parser is None:
            raise
        parser.error(f"argument {exc.flag}: {exc.detail}")
    return run_demo(**kwargs)


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="plora demo", description=__doc__.split("\n")[0]))
    run_from_args(parser.parse_args(argv), parser)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
