"""``plora study``: when does PeriodicLoRA beat LoRA? A re-runnable method study with ablations.

LoRA, PLoRA and full fine-tuning are compared at equal rank, steps and schedule shape (AdamW, linear warm-up,
cosine decay to 5%; PLoRA adds its short re-warm-up after each unload) on

* ``demo``: the task of ``plora demo`` (a tiny random Llama teacher; the student carries a dense full-rank
  perturbation of every targeted weight, so the ideal update is full-rank; loss = KL(teacher || student));
* real-text tasks, built only from text already on this machine: a small byte-level Llama is pretrained on
  English prose (the docstrings of half of Python's standard library) and then adapted to another corpus:
  ``pycode`` (the Python source of the other half of the standard library), ``cheaders`` (the C/C++ headers
  shipped with torch: c10, ATen, ...) and, optionally, ``pkgdocs`` (the Markdown/RST descriptions in the
  METADATA of the installed packages). Loss = next-byte cross-entropy (nats per byte).

Every real-text corpus is split by file (a hash of the path) into train / validation / test. In the main suite
the learning rate is tuned per method, task and rank on the validation split at the first seed (a 3-point grid);
every seed is then run at that learning rate and reported on the test split. The ablation lines share one LR
(1e-2, LoRA's choice on 3 of the 4 real-text blocks), so each differs from its block's LoRA in one setting.
"Loss removed" is ``L0 - L`` with ``L0`` the loss before adaptation; the headline number is PLoRA's loss
removed over LoRA's, paired by seed (same data order, same initial adapter), with its spread over seeds.

Nothing is downloaded (``HF_HUB_OFFLINE=1``). The pretrained base models and the corpora are cached in
``$PLORA_STUDY_CACHE`` (default ``~/.cache/plora_kernels/study``). Records go to
``benchmarks/results/study-<timestamp>.{json,png,txt}`` (``--out``).

Run: ``plora study`` or ``python -m plora_kernels.study`` (the main comparison: 36 training runs after
de-duplication; measured on 2 idle cores, 2026-11-30: 4 min 1 s with an empty cache, corpora and base model
built included, 4 min 8 s with a warm one; 17-22 minutes on a shared machine at a load average of 5-7),
``--suite ablations`` (why PLoRA lost with the old defaults: momentum, optimizer state, re-warm-up, A kept or
re-drawn, unload interval, rank, run length, the demo's task; ~3x the main suite),
``--suite length`` (the run-length lines only), ``--suite all``; ``--smoke`` for a tiny configuration (tests);
``--rebuild RECORD.json`` to recompute a record's tables and PNG from its runs.

Findings (records in benchmarks/results/study-*.json; README "When PLoRA helps"): every unload costs the adapter
a restart (B is zeroed) worth 1-2.5% of LoRA's loss removed in a 150-step run, and the extra rank pays that back
only over runs with several stages of 80+ steps. Hence :func:`auto_every`.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .train.unloader import AUTO_MAX_STAGES, AUTO_MIN_STAGE, AUTO_MIN_STAGES, OPTIMIZER_RESETS, auto_every

# ------------------------------------------------------------------------------------------------ settings
# The byte-level Llama of the real-text tasks: the demo's architecture (demo.MODEL_CONFIG) with a longer context.
TEXT_MODEL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 128, "initializer_range": 0.02,
    "tie_word_embeddings": False, "use_cache": False,
}
# The demo's teacher/student model (a copy of plora_kernels.demo.MODEL_CONFIG, kept here so the study's task
# does not move when the demo's code is edited).
DEMO_MODEL = {**TEXT_MODEL, "initializer_range": 0.1}

PRETRAIN = {"steps": 600, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup": 30, "seed": 1234}

# Task settings. steps, batch and sequence length follow the cases they model: the demo's own settings
# (800 steps, batch 16 x 32 random tokens) and the real-text adaptation (150 steps).
TASKS = {
    "demo": {"kind": "synthetic", "steps": 800, "batch_size": 16, "seq_len": 32, "perturb": 0.3,
             "lr_adapter": (5e-3, 1e-2, 2e-2), "lr_full": (1e-3, 3e-3, 1e-2), "ranks": (4,),
             "about": "plora demo's task: distil a random tiny Llama into a copy whose targeted weights carry a "
                      "dense full-rank perturbation (ideal update: full rank)"},
    "pycode": {"kind": "text", "steps": 150, "batch_size": 16, "seq_len": 64,
               "lr_adapter": (3e-3, 1e-2, 3e-2), "lr_full": (1e-3, 3e-3, 1e-2), "ranks": (4, 8),
               "about": "prose-pretrained byte Llama adapted to Python source (the other half of the stdlib)"},
    "cheaders": {"kind": "text", "steps": 150, "batch_size": 16, "seq_len": 64,
                 "lr_adapter": (3e-3, 1e-2, 3e-2), "lr_full": (1e-3, 3e-3, 1e-2), "ranks": (4, 8),
                 "about": "prose-pretrained byte Llama adapted to C++ (torch's c10/ATen/... headers)"},
    "pkgdocs": {"kind": "text", "steps": 150, "batch_size": 16, "seq_len": 64,
                "lr_adapter": (3e-3, 1e-2, 3e-2), "lr_full": (1e-3, 3e-3, 1e-2), "ranks": (4, 8),
                "about": "prose-pretrained byte Llama adapted to package READMEs (Markdown/RST in METADATA)"},
}
DEFAULT_TASKS = ("demo", "pycode", "cheaders")
WARMUP = 10            # LR warm-up steps at the start, every method
MIN_LR_RATIO = 0.05    # the cosine's floor, every method
EVAL_WINDOWS = {"val": 32, "test": 128}
CORPUS_BYTES = 3_000_000  # at most this many bytes read per corpus

# PLoRA settings. "legacy": the package's defaults before this study (m = 0, fresh A, Adam state zeroed, the
# demo's 5-step re-warm-up) with the middle interval (25 of 150 steps). "recommended": the same with the
# unload interval from the study's rule (:func:`auto_every`); everything else is unchanged, because no other
# setting helped once the stages are long enough (see the ablations).
LEGACY_PLORA = {"every": 25, "momentum": 0.0, "optimizer_reset": "zero", "restart_warmup": 5, "a_init": "redraw"}
RECOMMENDED_PLORA = {"every": "auto", "momentum": 0.0, "optimizer_reset": "zero", "restart_warmup": 5,
                     "a_init": "redraw"}
VARIANT_KEYS = {"steps", "every", "momentum", "optimizer_reset", "restart_warmup", "a_init", "rank_mult"}
A_INITS = ("redraw", "keep", "rescale")

# The rule for ``every`` that this study's evidence supports lives in the library, as
# :func:`plora_kernels.train.auto_every` (its docstring gives the numbers); the study records its parameters.
MIN_STAGE = AUTO_MIN_STAGE
MIN_STAGES = AUTO_MIN_STAGES
MAX_STAGES = AUTO_MAX_STAGES


def resolve_every(every, total_steps: int) -> int:
    """``every`` as steps: an int >= 1 is steps, a float in (0, 1] a fraction of the run, "auto" the rule of
    :func:`auto_every`, 0 / None / "never" no unload (plain LoRA)."""
    if every in (None, 0, "never"):
        return total_steps + 1
    if every == "auto":
        return auto_every(total_steps)
    if isinstance(every, float) and 0.0 < every <= 1.0:
        return max(1, round(every * total_steps))
    if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return every
    raise ValueError(f"every must be an int >= 1, a fraction in (0, 1], 'auto' or 'never', got {every!r}")


# -------------------------------------------------------------------------------------------------- corpora
def _cache_dir() -> Path:
    d = Path(os.environ.get("PLORA_STUDY_CACHE", Path.home() / ".cache" / "plora_kernels" / "study"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _h(text: str) -> int:
    return zlib.crc32(text.encode())


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "idlelib",
            "turtledemo", "ensurepip"}
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if skip.intersection(rel.split("/")[:-1]):
            continue
        out.append((rel, p))
    return out


def _read(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 80:
                out.append(doc)
    return out


def _split_of(rel: str) -> str:
    b = _h("split:" + rel) % 10
    return "test" if b == 0 else "val" if b == 1 else "train"


def _take(docs: list[tuple[str, str]], limit: int) -> dict[str, list[str]]:
    """Documents (key, text) in a deterministic pseudo-random order, split by key, up to ``limit`` bytes."""
    splits = {"train": [], "val": [], "test": []}
    total = 0
    for key, text in sorted(docs, key=lambda kv: _h(kv[0])):
        if total >= limit:
            break
        splits[_split_of(key)].append(text)
        total += len(text.encode("utf-8", "replace"))
    return splits


def _corpus_prose() -> dict[str, list[str]]:
    docs = []
    for rel, p in _stdlib_files():
        if _h("half:" + rel) % 2:
            continue
        src = _read(p)
        if src:
            docs.extend((f"{rel}#{i}", d) for i, d in enumerate(_docstrings(src)))
    return _take(docs, CORPUS_BYTES)


def _corpus_pycode() -> dict[str, list[str]]:
    docs = []
    for rel, p in _stdlib_files():
        if not _h("half:" + rel) % 2:
            continue
        src = _read(p)
        if src:
            docs.append((rel, src))
    return _take(docs, CORPUS_BYTES)


def _corpus_cheaders() -> dict[str, list[str]]:
    root = Path(torch.__file__).parent / "include"
    docs = []
    for sub in ("c10", "ATen", "torch"):
        for p in sorted((root / sub).rglob("*.h")):
            rel = p.relative_to(root).as_posix()
            if rel.startswith("ATen/ops/"):  # thousands of near-identical generated operator headers
                continue
            docs.append((rel, p))
    docs = sorted(docs, key=lambda kv: _h(kv[0]))[:3000]
    return _take([(rel, t) for rel, p in docs if (t := _read(p))], CORPUS_BYTES)


def _corpus_pkgdocs() -> dict[str, list[str]]:
    from importlib import metadata

    docs = []
    for dist in metadata.distributions():
        text = dist.read_text("METADATA") or ""
        head, _, body = text.partition("\n\n")
        if len(body) > 500:
            docs.append((str(dist.metadata["Name"]).lower(), body))
    return _take(docs, CORPUS_BYTES)


CORPORA = {"prose": _corpus_prose, "pycode": _corpus_pycode, "cheaders": _corpus_cheaders, "pkgdocs": _corpus_pkgdocs}


def _to_bytes(texts: list[str]) -> torch.Tensor:
    data = "\n\n".join(texts).encode("utf-8", "replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


# --------------------------------------------------------------------------------------------------- models
def _build_llama(config: dict, seed: int) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(**config)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def _targeted_names(model: nn.Module) -> list[str]:
    """Every nn.Linear but the LM head (apply_plora's default targets)."""
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def _windows(data: torch.Tensor, n: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq_len, (n,), generator=g)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def _pretrain(prose: dict[str, torch.Tensor], progress: bool) -> dict:
    cfg = PRETRAIN
    model = _build_llama(TEXT_MODEL, cfg["seed"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    from .train import stage_cosine_schedule

    sched = stage_cosine_schedule(opt, cfg["steps"], cfg["steps"] + 1, warmup=cfg["warmup"], min_lr_ratio=0.1)
    g = torch.Generator().manual_seed(cfg["seed"])
    bar = _bar(cfg["steps"], "pretrain base (prose)", progress)
    for _ in range(cfg["steps"]):
        x = _windows(prose["train"], cfg["batch_size"], cfg["seq_len"], g)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=sys.stderr)


def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_text_assets(tasks: list[str], progress: bool = True, use_cache: bool = True) -> str:
    """Build the corpora (every real-text task's, whichever ``tasks`` asks for, so that one cached file serves
    every suite) and pretrain the base model (cached); returns the path of the asset file."""
    tasks = sorted({*tasks, *(t for t, spec in TASKS.items() if spec["kind"] == "text")})
    key = _fingerprint({"v": 1, "model": TEXT_MODEL, "pretrain": PRETRAIN, "bytes": CORPUS_BYTES,
                        "tasks": sorted(tasks), "torch": torch.__version__.split("+")[0],
                        "python": platform.python_version()})
    path = _cache_dir() / f"text-assets-{key}.pt"
    if use_cache and path.is_file():
        return str(path)
    with torch.random.fork_rng(devices=[]):
        corpora = {}
        for name in ["prose", *tasks]:
            splits = CORPORA[name]()
            corpora[name] = {s: _to_bytes(texts) for s, texts in splits.items()}
            for s, t in corpora[name].items():
                if len(t) < 4 * PRETRAIN["seq_len"]:
                    raise RuntimeError(f"corpus {name!r} has too little text in its {s} split ({len(t)} bytes)")
        base = _pretrain(corpora["prose"], progress)
        evals = {}
        for name in ["prose", *tasks]:
            g = torch.Generator().manual_seed(_h("eval:" + name))
            evals[name] = {s: _windows(corpora[name][s], n, TASKS.get(name, PRETRAIN)["seq_len"], g)
                           for s, n in EVAL_WINDOWS.items()}
    sizes = {n: {s: len(t) for s, t in c.items()} for n, c in corpora.items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"base": base, "train": {n: c["train"] for n, c in corpora.items()}, "eval": evals,
                "sizes": sizes}, tmp)
    os.replace(tmp, path)
    return str(path)


# ---------------------------------------------------------------------------------------------------- tasks
class _Task:
    """One task at one seed: a fresh model to adapt, train batches, loss, val/test sets."""

    def fresh_model(self) -> nn.Module: ...

    def batch(self, step: int): ...

    def loss(self, model, batch) -> torch.Tensor: ...

    def evaluate(self, model, split: str) -> float:
        with torch.no_grad():
            xs = self.eval_sets[split]
            return sum(float(self.loss(model, x)) for x in xs) / len(xs)


class _TextTask(_Task):
    def __init__(self, name: str, assets: dict, seed: int, steps: int):
        spec = TASKS[name]
        self.base, self.train = assets["base"], assets["train"][name]
        g = torch.Generator().manual_seed(10_000 + seed)
        self.batches = [_windows(self.train, spec["batch_size"], spec["seq_len"], g) for _ in range(steps)]
        self.eval_sets = {s: list(w.split(32)) for s, w in assets["eval"][name].items()}

    def fresh_model(self):
        model = _build_llama(TEXT_MODEL, 0)
        model.load_state_dict(self.base)
        return model

    def batch(self, step):
        return self.batches[step]

    def loss(self, model, x):
        logits = model(input_ids=x).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


class _DemoTask(_Task):
    """plora demo's task (see plora_kernels/demo.py), with separate validation and test batches."""

    def __init__(self, seed: int, steps: int):
        spec = TASKS["demo"]
        self.seed = seed
        self.teacher = _build_llama(DEMO_MODEL, seed)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        student = _build_llama(DEMO_MODEL, seed)
        names = _targeted_names(student)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name in names:
                w = student.get_submodule(name).weight
                d = torch.randn(w.shape, generator=g)
                d *= spec["perturb"] * w.norm() / d.norm()
                w.add_(d)
        self.student = {k: v.detach().clone() for k, v in student.state_dict().items()}
        g = torch.Generator().manual_seed(seed + 2)
        self.batches = [torch.randint(0, 256, (spec["batch_size"], spec["seq_len"]), generator=g)
                        for _ in range(steps)]
        g = torch.Generator().manual_seed(seed + 3)
        self.eval_sets = {}
        for split, n in (("val", 4), ("test", 8)):
            xs = [torch.randint(0, 256, (32, spec["seq_len"]), generator=g) for _ in range(n)]
            with torch.no_grad():
                self.eval_sets[split] = [(x, self.teacher(input_ids=x).logits) for x in xs]
        self._targets = {}

    def fresh_model(self):
        model = _build_llama(DEMO_MODEL, self.seed)
        model.load_state_dict(self.student)
        return model

    def batch(self, step):
        x = self.batches[step]
        with torch.no_grad():
            return x, self.teacher(input_ids=x).logits

    def loss(self, model, batch):
        x, t = batch
        s = F.log_softmax(model(input_ids=x).logits.float(), dim=-1)
        return F.kl_div(s.flatten(0, -2), F.log_softmax(t.float(), dim=-1).flatten(0, -2), log_target=True,
                        reduction="batchmean")


# ------------------------------------------------------------------------------------------------- training
def _make_unloader(model, optimizer, every: int, optimizer_reset: str, seed: int, a_init: str):
    """PeriodicUnloader, plus what the library lacks: keeping A at momentum 0 (``a_init="keep"``: W += s B A,
    B = 0, A kept, so the function is unchanged and the next stage starts in the learned row space) and a fresh
    A rescaled to the old A's Frobenius norm (``"rescale"``). Records the old A's norm over a fresh draw's."""
    from .train import PeriodicUnloader

    class StudyUnloader(PeriodicUnloader):
        a_norm_ratio: list

        @torch.no_grad()
        def unload(self):
            old = [layer.lora_A.detach().clone() for layer in self.layers]
            super().unload()
            ratios = []
            for layer, a in zip(self.layers, old):
                fresh_norm = float(layer.lora_A.norm()) if layer.momentum == 0 else \
                    (layer.lora_A.shape[1] ** -0.5) * math.sqrt(layer.lora_A.numel() / 3)
                ratios.append(float(a.norm()) / max(fresh_norm, 1e-30))
                if layer.momentum == 0 and a_init == "keep":
                    layer.lora_A.copy_(a)
                elif layer.momentum == 0 and a_init == "rescale":
                    layer.lora_A.mul_(a.norm() / layer.lora_A.norm().clamp_min(1e-30))
            self.a_norm_ratio.append(sum(ratios) / len(ratios))

    u = StudyUnloader(model, optimizer, every, optimizer_reset=optimizer_reset, seed=seed)
    u.a_norm_ratio = []
    return u


def _delta_rank(model, names, start, tol=1e-2) -> float:
    from .nn import PLoRALinear

    ranks = []
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            w = m.weight.detach().float().clone()
            if isinstance(m, PLoRALinear):
                w += m.scaling * (m.lora_B.float() @ m.lora_A.float())
            d = (w - start[name]).double()
            if not bool(torch.isfinite(d).all()):
                return float("nan")
            s = torch.linalg.svdvals(d)
            ranks.append(0 if float(s[0]) == 0 else int((s > tol * s[0]).sum()))
    return sum(ranks) / len(ranks)


_TASK_CACHE: dict = {}
_ASSETS: dict = {}


def _get_task(task: str, seed: int, assets_path: str | None, steps: int | None = None) -> _Task:
    steps = steps or TASKS[task]["steps"]
    key = (task, seed, steps)
    if key not in _TASK_CACHE:
        if len(_TASK_CACHE) > 8:
            _TASK_CACHE.clear()
        if TASKS[task]["kind"] == "synthetic":
            _TASK_CACHE[key] = _DemoTask(seed, steps)
        else:
            if assets_path not in _ASSETS:
                _ASSETS[assets_path] = torch.load(assets_path, weights_only=True)
            _TASK_CACHE[key] = _TextTask(task, _ASSETS[assets_path], seed, steps)
    return _TASK_CACHE[key]


def run_one(job: dict) -> dict:
    """Train one (task, method, variant, rank, lr, seed); returns val/test losses and diagnostics."""
    from . import apply_plora, stage_cosine_schedule

    t0 = time.perf_counter()
    torch.set_num_threads(job.get("threads", 1))
    steps = job.get("steps") or TASKS[job["task"]]["steps"]
    task = _get_task(job["task"], job["seed"], job.get("assets"), steps)
    v = job["variant"]
    method = job["method"]
    rank = job["rank"]
    model = task.fresh_model()
    names = _targeted_names(model)
    with torch.no_grad():
        start = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job["seed"] * 7919 + 17)  # the same initial adapter for LoRA and PLoRA
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(False)
            for n in names:
                model.get_submodule(n).weight.requires_grad_(True)
        else:
            apply_plora(model, target_modules=None, r=rank, alpha=2 * rank,
                        momentum=v.get("momentum", 0.0) if method == "plora" else 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0)
    every = resolve_every(v.get("every"), steps) if method == "plora" else steps + 1
    restart = v.get("restart_warmup", 0) if method == "plora" else 0
    sched = stage_cosine_schedule(optimizer, total_steps=steps, every=every, warmup=min(WARMUP, steps // 4),
                                  restart_warmup=restart, min_lr_ratio=MIN_LR_RATIO)
    unloader = None
    if method == "plora" and every <= steps:
        unloader = _make_unloader(model, optimizer, every, v.get("optimizer_reset", "zero"), job["seed"],
                                  v.get("a_init", "redraw"))
    model.train()
    losses = []
    for step in range(steps):
        loss = task.loss(model, task.batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        if unloader is not None:
            unloader.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    model.eval()
    diverged = not all(map(math.isfinite, losses))
    out = {k: job.get(k) for k in ("task", "method", "name", "rank", "lr", "seed", "phase")}
    out.update({
        "rank": rank,
        "every": every if method == "plora" else None,
        "val": float("nan") if diverged else task.evaluate(model, "val"),
        "test": float("nan") if diverged else task.evaluate(model, "test"),
        "train_curve": [round(x, 5) for x in losses[:: max(1, steps // 150)]],
        "delta_rank": float("nan") if diverged else _delta_rank(model, names, start),
        "num_unloads": unloader.num_unloads if unloader else 0,
        "a_norm_ratio": (sum(unloader.a_norm_ratio) / len(unloader.a_norm_ratio))
        if unloader and unloader.a_norm_ratio else None,
        "wall_s": time.perf_counter() - t0,
    })
    return out


def initial_losses(task: str, seed: int, assets: str | None) -> dict:
    t = _get_task(task, seed, assets)
    m = t.fresh_model()
    return {"val": t.evaluate(m, "val"), "test": t.evaluate(m, "test")}


# ----------------------------------------------------------------------------------------------- the suites
@dataclass(eq=False)
class Config:
    """One line of a table: a method (and PLoRA variant) trained on some tasks. ``steps``/``lrs`` override the
    task's (a fixed ``lrs`` of one value means no tuning); ``block`` names the table the line goes into."""
    name: str
    method: str
    variant: dict = field(default_factory=dict)
    tasks: tuple = ()
    ranks: tuple | None = None     # None: the task's ranks
    group: str = "main"
    steps: int | None = None
    lrs: tuple | None = None
    block: str = ""


def main_configs(tasks) -> list[Config]:
    tasks = tuple(tasks)
    return [Config("LoRA", "lora", {}, tasks),
            Config("PLoRA", "plora", dict(RECOMMENDED_PLORA), tasks),
            Config("full FT", "full", {}, tasks, ranks=(0,))]


def length_configs(text_tasks, lengths=(300, 600), lr: float = 1e-2) -> list[Config]:
    """The run's length: LoRA, PLoRA with the rule (auto), and fixed intervals of 80 and 200 steps, at rank 4."""
    out = []
    for steps in lengths:
        blk = f"{steps} steps, lr {lr:g}"
        for name, method, v in (("LoRA", "lora", {}),
                                ("PLoRA auto", "plora", dict(RECOMMENDED_PLORA)),
                                ("PLoRA every 80", "plora", {**RECOMMENDED_PLORA, "every": 80}),
                                ("PLoRA every 200", "plora", {**RECOMMENDED_PLORA, "every": 200})):
            out.append(Config(name, method, v, tuple(text_tasks), (4,), "length", steps=steps, lrs=(lr,), block=blk))
    return out


def ablation_configs(text_tasks, with_demo: bool = True, long_steps=(300, 600), lr: float = 1e-2) -> list[Config]:
    """Each line varies one setting of the legacy PLoRA (m 0, fresh A, Adam zeroed, unload every 25 of 150
    steps, 5-step re-warm-up), at rank 4 on the real-text tasks; then the run's length (``long_steps``) and,
    on the demo's task, what matters there. One LR for every line (``lr``: LoRA's choice on 3 of the 4 real-text
    blocks of the main suite), so that a line differs from its block's LoRA in one setting only."""
    tasks, L, r4, lrs = tuple(text_tasks), LEGACY_PLORA, (4,), (lr,)
    blk = f"lr {lr:g}"
    out = [Config("LoRA", "lora", {}, tasks, r4, "ablation", lrs=lrs, block=blk),
           Config("PLoRA legacy (every 25)", "plora", dict(L), tasks, r4, "ablation", lrs=lrs, block=blk)]

    def add(group, name, **change):
        out.append(Config(name, "plora", {**L, **change}, tasks, r4, group, lrs=lrs, block=blk))

    for m in (0.1, 0.3, 0.5):
        add("momentum", f"m={m} (Adam scale)", momentum=m, optimizer_reset="scale")
    for reset in ("scale", "keep"):
        add("optimizer", f"m=0, Adam {reset}", optimizer_reset=reset)
    add("optimizer", "m=0.5, Adam keep", momentum=0.5, optimizer_reset="keep")
    for rw in (0, 20):
        add("rewarmup", f"re-warm-up {rw}", restart_warmup=rw)
    add("A", "m=0, A keep", a_init="keep")
    add("A", "m=0, A keep, Adam keep", a_init="keep", optimizer_reset="keep")
    for every in (10, 50, 75, 100):
        add("every", f"every {every} (of 150)", every=every)
    out.append(Config("LoRA 2r", "lora", {"rank_mult": 2}, tasks, r4, "rank", lrs=lrs, block=blk))
    out += length_configs(tasks, long_steps, lr)
    if with_demo:
        for name, method, v in (("LoRA", "lora", {}),
                                ("PLoRA auto", "plora", dict(RECOMMENDED_PLORA)),
                                ("PLoRA auto, A keep", "plora", {**RECOMMENDED_PLORA, "a_init": "keep"}),
                                ("PLoRA auto, m=0.5", "plora", {**RECOMMENDED_PLORA, "momentum": 0.5,
                                                                 "optimizer_reset": "scale"}),
                                ("PLoRA every 25", "plora", {**RECOMMENDED_PLORA, "every": 25})):
            out.append(Config(name, method, v, ("demo",), r4, "demo", lrs=lrs, block=blk))
    return out


def _steps_of(cfg: Config, task: str, override: dict) -> int:
    return cfg.steps or override.get(task) or TASKS[task]["steps"]


def _lrs_of(cfg: Config, task: str) -> tuple:
    return cfg.lrs or TASKS[task]["lr_full" if cfg.method == "full" else "lr_adapter"]


def _rank_of(cfg: Config, rank: int) -> int:
    return 0 if cfg.method == "full" else int(rank * cfg.variant.get("rank_mult", 1))


def _canonical(job: dict) -> tuple:
    """Jobs that train the same thing share one run: PLoRA that never unloads (auto in a short run) is LoRA."""
    v, method = job["variant"], job["method"]
    if method == "plora" and resolve_every(v.get("every"), job["steps"]) > job["steps"]:
        method = "lora"
    if method in ("lora", "full"):
        v = {}  # job["rank"] is the adapter's rank already
    return (job["task"], job["steps"], method, json.dumps(v, sort_keys=True), job["rank"], job["lr"],
            job["seed"])


def run_suite(configs: list[Config], seeds=(0, 1), jobs: int = 1, progress: bool = True, assets=None,
              steps_override: dict | None = None, tune: str = "first") -> list[dict]:
    """Tune the LR on the validation split (at the first seed, or the mean over seeds with ``tune="all"``),
    then run every other seed at the chosen LR. Returns every run's record; the chosen ones have chosen=True."""
    seeds, override = tuple(seeds), steps_override or {}
    tune_seeds = seeds if tune == "all" else seeds[:1]
    units = [(cfg, task, rank) for cfg in configs for task in cfg.tasks for rank in (cfg.ranks or TASKS[task]["ranks"])]
    records, memo, waiting, ready = [], {}, {}, []
    uid = {id(u): i for i, u in enumerate(units)}

    def job_for(u, lr, seed, phase):
        cfg, task, rank = u
        return {"task": task, "method": cfg.method, "name": cfg.name, "variant": cfg.variant,
                "rank": _rank_of(cfg, rank), "lr": lr, "seed": seed, "phase": phase, "assets": assets,
                "group": cfg.group, "block": cfg.block, "steps": _steps_of(cfg, task, override), "unit": uid[id(u)]}

    total = sum(len(_lrs_of(c, t)) * len(tune_seeds) + len(seeds) - len(tune_seeds) for c, t, _ in units)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="study", unit="run", dynamic_ncols=True, file=sys.stderr)
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                  initializer=_worker_init) if jobs > 1 else None

    def submit(job):
        key = _canonical(job)
        if key in memo:
            fut = memo[key]
            if fut.done():
                ready.append((fut, job))
            else:
                waiting[fut].append(job)
            return
        if pool is None:
            fut = cf.Future()
            fut.set_result(run_one(job))
            memo[key] = fut
            ready.append((fut, job))
            return
        fut = pool.submit(run_one, job)
        memo[key], waiting[fut] = fut, [job]

    tune_left = {}
    for u in units:
        lrs = _lrs_of(u[0], u[1])
        tune_left[uid[id(u)]] = len(lrs) * len(tune_seeds)
        for lr in lrs:
            for s in tune_seeds:
                submit(job_for(u, lr, s, "tune"))

    def accept(fut, job):
        first = fut.result()
        rec = {**first, **{k: job[k] for k in ("name", "method", "phase", "group", "block", "unit")}}
        if first["name"] != job["name"] or first["phase"] != job["phase"]:
            rec["same_run_as"] = f"{first['name']} ({first['phase']})"  # identical training, run once
        records.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{rec['task']} {rec['name']} r={rec['rank']} lr={rec['lr']:g} s{rec['seed']}",
                                refresh=False)
        if rec["phase"] == "tune":
            tune_left[rec["unit"]] -= 1
            if tune_left[rec["unit"]] == 0:
                u = units[rec["unit"]]
                best = _best_lr([r for r in records if r["unit"] == rec["unit"] and r["phase"] == "tune"])
                for s in seeds:
                    if s not in tune_seeds:
                        submit(job_for(u, best, s, "final"))

    while ready or waiting:
        while ready:
            accept(*ready.pop(0))
        if waiting:
            done, _ = cf.wait(list(waiting), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                for job in waiting.pop(fut):
                    ready.append((fut, job))
    if bar is not None:
        bar.close()
    if pool is not None:
        pool.shutdown()
    for i in range(len(units)):
        mine = [r for r in records if r["unit"] == i]
        best = _best_lr([r for r in mine if r["phase"] == "tune"])
        for r in mine:
            r["chosen"] = r["phase"] == "final" or r["lr"] == best
    return records


def _best_lr(tune_records: list[dict]) -> float:
    by_lr = {}
    for r in tune_records:
        by_lr.setdefault(r["lr"], []).append(r["val"] if math.isfinite(r["val"]) else float("inf"))
    return min(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), lr))


def _worker_init():
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ summaries
def _block_key(task: str, rank: int, cfg: Config, steps: int) -> str:
    extra = cfg.block
    if extra.startswith(f"{steps} steps"):
        extra = extra[len(f"{steps} steps"):].lstrip(", ")
    return f"{task} r={rank} ({steps} steps" + (f", {extra}" if extra else "") + ")"


def summarize(records: list[dict], initial: dict, configs: list[Config], steps_override=None) -> dict:
    """Per table block (task, rank, steps, LR policy): every line's chosen-LR test loss per seed, the loss it
    removed (L0 - L), and that over LoRA's in the same block, paired by seed."""
    override = steps_override or {}
    out = {}
    for i, (cfg, task, rank) in enumerate((c, t, r) for c in configs for t in c.tasks
                                          for r in (c.ranks or TASKS[t]["ranks"])):
        rows = [r for r in records if r["unit"] == i and r.get("chosen")]
        if not rows:
            continue
        steps = _steps_of(cfg, task, override)
        entry = {"config": cfg.name, "group": cfg.group, "method": cfg.method, "variant": cfg.variant,
                 "lr": rows[0]["lr"], "every": rows[0]["every"], "rank": rows[0]["rank"], "steps": steps,
                 "lr_grid": list(_lrs_of(cfg, task)), "per_seed": {}}
        grid = sorted(_lrs_of(cfg, task))
        entry["lr_at_edge"] = len(grid) > 1 and entry["lr"] in (grid[0], grid[-1])
        for r in sorted(rows, key=lambda r: r["seed"]):
            l0 = initial[task][r["seed"]]["test"]
            entry["per_seed"][r["seed"]] = {"test": r["test"], "val": r["val"], "removed": l0 - r["test"],
                                            "delta_rank": r["delta_rank"], "a_norm_ratio": r["a_norm_ratio"],
                                            "num_unloads": r["num_unloads"]}
        for rk in (TASKS[task]["ranks"] if cfg.method == "full" else (rank,)):
            out.setdefault(_block_key(task, rk, cfg, steps), {})[cfg.name] = dict(entry)  # own ratios per block
    for entries in out.values():
        lora = entries.get("LoRA")
        for entry in entries.values():
            ratios = [v["removed"] / lora["per_seed"][s]["removed"] for s, v in entry["per_seed"].items()
                      if lora and s in lora["per_seed"] and lora["per_seed"][s]["removed"] > 0]
            entry["ratio_vs_lora"] = _stats(ratios)
            entry["removed"] = _stats([v["removed"] for v in entry["per_seed"].values()])
            entry["test"] = _stats([v["test"] for v in entry["per_seed"].values()])
    return out


def _stats(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "min": min(xs), "max": max(xs), "sd": sd, "n": len(xs), "values": xs}


def format_tables(summary: dict, initial: dict) -> str:
    lines = ["loss removed = L0 - L on the test split (L0: before adaptation); x LoRA = that over LoRA's in the "
             "same block, paired by seed: mean [min, max] over seeds; test loss: mean ± sd over seeds; "
             "lr: chosen on the validation split (* = at the edge of the grid); rank dW: numerical rank of the "
             "total update (mean over layers); |A|/|A0|: norm of A at an unload over a fresh draw's"]
    for key, entries in summary.items():
        task = key.split(" ")[0]
        l0 = sum(v["test"] for v in initial[task].values()) / len(initial[task])
        lines.append(f"\n{key}   L0 = {l0:.4f}")
        header = (f"  {'':<26} {'lr':>8} {'every':>5} {'test loss':>16} {'loss removed':>16} "
                  f"{'x LoRA [min, max]':>21} {'rank dW':>7} {'|A|/|A0|':>8}")
        lines += [header, "  " + "-" * (len(header) - 2)]
        for name, e in entries.items():
            t, rm, ra = e["test"], e["removed"], e["ratio_vs_lora"]
            dr = [v["delta_rank"] for v in e["per_seed"].values()]
            an = [v["a_norm_ratio"] for v in e["per_seed"].values() if v["a_norm_ratio"] is not None]
            every = e["every"] if e["every"] is not None and e["every"] <= e["steps"] else "-"
            ratio = f"{ra['mean']:>6.3f}x [{ra['min']:.3f}, {ra['max']:.3f}]" if ra else f"{'n/a':>21}"
            lines.append(
                f"  {name:<26} {e['lr']:>7g}{'*' if e['lr_at_edge'] else ' '} {every:>5} "
                f"{t['mean']:>8.4f} ±{t['sd']:<6.4f} {rm['mean']:>8.4f} ±{rm['sd']:<6.4f} {ratio} "
                f"{sum(dr) / len(dr):>7.1f} " + (f"{sum(an) / len(an):>8.2f}" if an else f"{'-':>8}"))
    return "\n".join(lines)


def _plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = []  # (block, name, ratios)
    for key, entries in summary.items():
        for name, e in entries.items():
            if name != "LoRA" and e["ratio_vs_lora"]:
                rows.append((key, name, e["ratio_vs_lora"]))
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * len(rows) + 1.2)), dpi=110)
    blocks = list(dict.fromkeys(b for b, _, _ in rows))
    cmap = plt.get_cmap("tab10")
    for i, (block, name, st) in enumerate(rows):
        y = len(rows) - i
        color = cmap(blocks.index(block) % 10)
        ax.barh(y, st["mean"] - 1.0, left=1.0, color=color, alpha=0.55, height=0.7)
        ax.plot([st["min"], st["max"]], [y, y], color="k", lw=1)
        ax.scatter(st["values"], [y] * len(st["values"]), color="k", s=9, zorder=3)
        ax.text(max(st["max"], 1.0) + 0.01, y, f"{st['mean']:.2f}x", va="center", fontsize=6.5)
    ax.set_yticks([len(rows) - i for i in range(len(rows))])
    ax.set_yticklabels([f"{b}: {n}" for b, n, _ in rows], fontsize=6.5)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_xlabel("loss removed / LoRA's in the same block (bar: mean; dots: seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rebuild_report(json_path: str) -> dict:
    """Recompute the summary, table and PNG of a saved record from its runs (no training); rewrites the
    record's .json/.txt/.png in place and returns the record."""
    rec = json.loads(Path(json_path).read_text())
    global TASKS
    saved = TASKS
    try:
        TASKS = {**TASKS, **{t: {**TASKS.get(t, {}), **{k: (tuple(v) if isinstance(v, list) else v)
                                                        for k, v in spec.items() if k != "initial"}}
                             for t, spec in rec["tasks"].items()}}
        configs = [Config(c["name"], c["method"], c["variant"], tuple(c["tasks"]), None, c["group"], c["steps"],
                          tuple(c["lrs"]) if c["lrs"] else None, c["block"]) for c in rec["configs"]]
        ranks = {c["name"] + "|" + c["block"]: c.get("ranks") for c in rec["configs"]}
        for c in configs:
            r = ranks.get(c.name + "|" + c.block)
            c.ranks = tuple(r) if r else ((0,) if c.method == "full" else
                                          (4,) if c.group not in ("main", "custom") else None)
        initial = {t: {int(s): v for s, v in spec["initial"].items()} for t, spec in rec["tasks"].items()}
        runs = rec["runs"]
        summary = summarize(runs, initial, configs)
    finally:
        TASKS = saved
    rec["summary"], rec["table"] = summary, format_tables(summary, initial)
    base = str(json_path)[:-len(".json")]
    Path(json_path).write_text(json.dumps(rec, indent=1, default=str))
    Path(f"{base}.txt").write_text(rec["table"] + "\n")
    _plot(summary, f"{base}.png", f"plora study --suite {rec['suite']}: PLoRA's loss removed over LoRA's")
    return rec


# ------------------------------------------------------------------------------------------------------ CLI
# Every flag is checked before any work: a bad value is refused by argparse itself (``type=`` functions below,
# "plora study: error: argument --steps: ...", exit status 2), and what needs more than one flag or the file
# system (--out, a variant's rank_mult against the ranks) by :func:`check_args`, reported the same way by
# :func:`main`. ``plora demo`` and ``plora bench`` answer bad flags alike.
class FlagError(ValueError):
    """A bad ``plora study`` flag found after parsing: ``flag`` is the flag (``--out``), ``detail`` the reason."""

    def __init__(self, flag: str, detail: str):
        super().__init__(f"argument {flag}: {detail}")
        self.flag, self.detail = flag, detail


def _argparse_type(parse):
    """An argparse ``type=`` function from a parser that raises ValueError: argparse reports its message."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__.lstrip("_")  # argparse names the type in some messages
    return convert


def _int_of(text: str, what: str, minimum: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{what + ' ' if what else ''}must be an integer >= {minimum}, got {str(text).strip()!r}")
    return value


def _items(text: str, what: str) -> list[str]:
    """The comma-separated items of ``text`` (stripped): at least one, none empty, no repeats."""
    items = [t.strip() for t in str(text).split(",")]
    if not str(text).strip() or any(not t for t in items):
        raise ValueError(f"must be a comma-separated list of {what}, got {text!r}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise ValueError(f"lists {', '.join(repeated)} more than once: {text!r}")
    return items


def _positive_count(text: str) -> int:
    return _int_of(text, "", 1)


def _seed_list(text: str) -> tuple:
    return tuple(_int_of(s, "a seed", 0) for s in _items(text, "seeds (integers >= 0)"))


def _rank_list(text: str) -> tuple:
    return tuple(_int_of(r, "a rank", 1) for r in _items(text, "ranks (integers >= 1)"))


def _task_list(text: str) -> tuple:
    tasks = tuple(_items(text, f"tasks (known: {', '.join(TASKS)})"))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    return tasks


def _steps_map(text: str) -> dict:
    out = {}
    for item in _items(text, "TASK=STEPS items (e.g. demo=200,pycode=60)"):
        task, eq, steps = item.partition("=")
        task = task.strip()
        if not eq:
            raise ValueError(f"{item!r} is not TASK=STEPS (e.g. demo=200,pycode=60)")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in {item!r}; known: {', '.join(TASKS)}")
        if task in out:
            raise ValueError(f"task {task!r} is given twice")
        out[task] = _int_of(steps, f"the steps of {task!r}", 1)
    return out


def _variant_value(key: str, val: str):
    """A --variant value, checked as the run will use it (ValueError naming the key otherwise)."""
    val = val.strip()
    if key in ("optimizer_reset", "a_init"):
        allowed = OPTIMIZER_RESETS if key == "optimizer_reset" else A_INITS
        if val not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {val!r}")
        return val
    if key == "every":
        if val in ("auto", "never"):
            return val
        try:
            every = float(val) if "." in val else int(val)
        except ValueError:
            every = None
        if every is None or isinstance(every, float) and not 0.0 < every <= 1.0 or isinstance(every, int) and every < 0:
            raise ValueError(f"every must be an int >= 1 (steps), a fraction in (0, 1] of the run, 0, 'auto' or "
                             f"'never', got {val!r}")
        return every
    if key in ("restart_warmup", "steps"):
        return _int_of(val, key, 0 if key == "restart_warmup" else 1)
    try:
        number = float(val)
    except ValueError:
        number = math.nan
    if key == "momentum" and not (math.isfinite(number) and 0.0 <= number < 1.0):
        raise ValueError(f"momentum must be a number in [0, 1), got {val!r}")
    if key == "rank_mult" and not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"rank_mult must be a positive number, got {val!r}")
    return number


RESERVED_NAMES = ("LoRA", "PLoRA", "full FT")  # the main suite's lines (and the LoRA line a variant's steps add)


def _parse_variant(text: str) -> Config:
    """``NAME[:key=value,...]`` as a PLoRA :class:`Config` (unset keys: the recommended settings). ValueError
    for an empty or reserved name, an unknown or repeated key, or a bad value (naming the key)."""
    if isinstance(text, Config):
        return text
    name, _, body = str(text).partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"must be NAME:key=value,... with a non-empty NAME, got {text!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"the name {name!r} is taken by a line of the study ({', '.join(RESERVED_NAMES)}); "
                         "choose another")
    v = {}
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        k, eq, val = item.partition("=")
        k = k.strip()
        if k not in VARIANT_KEYS:
            raise ValueError(f"unknown variant key {k!r}; known: {sorted(VARIANT_KEYS)}")
        if not eq:
            raise ValueError(f"{item!r} is not key=value")
        if k in v:
            raise ValueError(f"variant key {k!r} is given twice")
        v[k] = _variant_value(k, val)
    steps = v.pop("steps", None)
    method = "lora" if v.get("every") == "never" else "plora"
    return Config(name, method, {**RECOMMENDED_PLORA, **v}, (), group="custom", steps=steps)


def _record_file(text: str) -> str:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{text!r} is not a file (a study-*.json record)")
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read {text!r} as a JSON record: {exc}") from None
    if not isinstance(rec, dict) or not {"runs", "configs", "tasks"} <= set(rec):
        raise ValueError(f"{text!r} is not a plora study record (no runs/configs/tasks)")
    if not os.access(path.parent, os.W_OK) or not os.access(path, os.W_OK):
        raise ValueError(f"{text!r} cannot be rewritten (the record's .json/.txt/.png are rewritten in place)")
    return str(path)


def check_out_dir(out) -> Path:
    """Make the records' folder (with its parents) and check that a file can be written in it; ValueError
    otherwise. Run before any work: an unwritable folder would otherwise lose every result at the end."""
    import tempfile

    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ValueError(f"must be a directory path, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".plora_write_check_"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write records to {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _effective_ranks(args, task: str) -> tuple:
    """The adapter ranks ``task`` runs at under ``args`` (as :func:`_run_study` sets them)."""
    if args.ranks and TASKS[task]["kind"] == "text":
        return tuple(args.ranks)
    return (2,) if args.smoke else tuple(TASKS[task]["ranks"])


def check_args(args) -> argparse.Namespace:
    """Every flag of ``args`` checked (and parsed, where a caller built the namespace with strings), before any
    work; returns a parsed copy. Raises :class:`FlagError` (a ValueError naming the flag); :func:`main`
    reports it as argparse does (exit status 2). Creates the ``--out`` folder."""
    args = argparse.Namespace(**vars(args))
    parsers = {"seeds": _seed_list, "tasks": _task_list, "ranks": _rank_list, "steps": _steps_map,
               "jobs": _positive_count}
    for key, parse in parsers.items():
        value = getattr(args, key, None)
        if isinstance(value, str) or (key == "jobs" and value is not None):
            try:
                setattr(args, key, parse(value))
            except ValueError as exc:
                raise FlagError("--" + key, str(exc)) from None
    variants = []
    for text in getattr(args, "variant", None) or []:
        try:
            variants.append(_parse_variant(text))
        except ValueError as exc:
            raise FlagError("--variant", str(exc)) from None
    args.variant = variants
    names = [c.name for c in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FlagError("--variant", f"the name {repeated[0]!r} is used by more than one variant")
    main_tasks = args.tasks or (("demo", "pycode") if args.smoke else DEFAULT_TASKS)
    for c in variants:
        mult = c.variant.get("rank_mult", 1)
        for task in main_tasks:
            low = [r for r in _effective_ranks(args, task) if int(r * mult) < 1]
            if low:
                raise FlagError("--variant", f"{c.name}: rank_mult={mult:g} makes the rank {low[0]} of task "
                                             f"{task!r} int({low[0]} * {mult:g}) = 0; use a larger rank_mult")
    if args.suite == "length" and not any(TASKS[t]["kind"] == "text" for t in main_tasks):
        raise FlagError("--tasks", f"--suite length runs the real-text tasks only, and {','.join(main_tasks)} "
                                   "has none")
    if not getattr(args, "rebuild", None):
        try:
            check_out_dir(args.out)
        except ValueError as exc:
            raise FlagError("--out", str(exc)) from None
    return args


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--suite", choices=("main", "ablations", "length", "all"), default="main",
                        help="main: LoRA vs PLoRA (recommended settings) vs full FT; ablations: why the legacy "
                             "PLoRA loses (momentum, Adam state, re-warm-up, A, interval, rank, run length); "
                             "length: the run-length lines only; all: main and ablations (default main)")
    parser.add_argument("--tasks", type=_argparse_type(_task_list), default=None,
                        help=f"comma-separated subset of {','.join(TASKS)} (default {','.join(DEFAULT_TASKS)}; "
                             "the ablations use the real-text ones, and the demo's if listed)")
    parser.add_argument("--seeds", type=_argparse_type(_seed_list), default="0,1",
                        help="comma-separated seeds, integers >= 0 (default 0,1)")
    parser.add_argument("--ranks", type=_argparse_type(_rank_list), default=None,
                        help="ranks of the real-text tasks in the main suite (default 4,8)")
    parser.add_argument("--jobs", type=_argparse_type(_positive_count), default=min(2, os.cpu_count() or 1),
                        help="worker processes (>= 1), one thread each (default min(2, CPUs))")
    parser.add_argument("--tune", choices=("first", "all"), default="first",
                        help="choose the LR on the first seed's validation loss (default) or the mean over seeds")
    parser.add_argument("--variant", type=_argparse_type(_parse_variant), action="append", default=[],
                        help="an extra PLoRA line NAME:key=value,... (keys: every, momentum, optimizer_reset, "
                             "restart_warmup, a_init, rank_mult, steps; unset keys: the recommended settings); may "
                             "repeat")
    parser.add_argument("--steps", type=_argparse_type(_steps_map), default=None,
                        help="override steps per task, e.g. demo=200,pycode=60")
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration (seconds), for tests")
    parser.add_argument("--out", default="benchmarks/results",
                        help="folder of the records (default benchmarks/results)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild the corpora and the pretrained base")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--rebuild", metavar="JSON", type=_argparse_type(_record_file), default=None,
                        help="recompute the summary, table and PNG of a saved record from its runs, no training")
    return parser


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="plora study", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    if args.rebuild:
        print(rebuild_report(args.rebuild)["table"])
        return 0
    try:
        args = check_args(args)
    except FlagError as exc:  # usage and "plora study: error: argument --flag: ...", exit status 2
        parser.error(str(exc))
    run_study(args)
    return 0


def run_study(args) -> dict:
    """Run the suite ``args`` asks for (see :func:`add_arguments`); write the records; return them. Every flag is
    checked first (:func:`check_args`: a :class:`FlagError` before any work)."""
    global PRETRAIN, TASKS
    args = check_args(args)
    saved = PRETRAIN, TASKS
    try:
        return _run_study(args)
    finally:
        PRETRAIN, TASKS = saved


def _run_study(args) -> dict:
    global PRETRAIN, TASKS
    wall0 = time.perf_counter()
    torch.set_num_threads(1)
    seeds, tasks, override = tuple(args.seeds), args.tasks, dict(args.steps or {})
    long_steps = (300, 600)
    if args.smoke:
        tasks = tasks or ("demo", "pycode")
        PRETRAIN = {**PRETRAIN, "steps": 10, "warmup": 2}
        TASKS = {t: {**spec, "lr_adapter": spec["lr_adapter"][:2], "lr_full": spec["lr_full"][1:2], "ranks": (2,),
                     "steps": 8} for t, spec in TASKS.items()}
        long_steps = (12,)
    if args.ranks:
        TASKS = {t: {**spec, "ranks": tuple(args.ranks)} if spec["kind"] == "text"
                 else spec for t, spec in TASKS.items()}
    main_tasks = tasks or DEFAULT_TASKS
    text_tasks = tuple(t for t in main_tasks if TASKS[t]["kind"] == "text")
    configs = []
    if args.suite in ("main", "all"):
        configs += main_configs(main_tasks)
    if args.suite in ("ablations", "all"):
        configs += ablation_configs(text_tasks, with_demo="demo" in main_tasks, long_steps=long_steps)
    if args.suite == "length":
        configs += length_configs(text_tasks, long_steps)
    for c in args.variant:
        configs.append(Config(c.name, c.method, c.variant, main_tasks, group="custom", steps=c.steps,
                              block=f"{c.steps} steps" if c.steps else ""))
        if c.steps and not any(x.name == "LoRA" and x.steps == c.steps for x in configs):
            configs.append(Config("LoRA", "lora", {}, main_tasks, group="custom", steps=c.steps,
                                  block=f"{c.steps} steps"))
    used = sorted({t for c in configs for t in c.tasks})
    progress = not args.no_progress
    text_used = [t for t in used if TASKS[t]["kind"] == "text"]
    assets = prepare_text_assets(text_used, progress, use_cache=not args.no_cache) if text_used else None
    initial = {t: {s: initial_losses(t, s, assets) for s in seeds} for t in used}
    records = run_suite(configs, seeds, jobs=args.jobs, progress=progress, assets=assets,
                        steps_override=override, tune=args.tune)
    summary = summarize(records, initial, configs, override)
    table = format_tables(summary, initial)
    wall = time.perf_counter() - wall0
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"study-{stamp}"
    result = {
        "suite": args.suite, "argv": list(sys.argv[1:]), "seeds": list(seeds), "tune": args.tune,
        "tasks": {t: {**TASKS[t], "initial": initial[t]} for t in used},
        "text_model": TEXT_MODEL, "demo_model": DEMO_MODEL, "pretrain": PRETRAIN, "warmup": WARMUP,
        "min_lr_ratio": MIN_LR_RATIO, "eval_windows": EVAL_WINDOWS,
        "legacy_plora": LEGACY_PLORA, "recommended_plora": RECOMMENDED_PLORA,
        "auto_every": {"min_stage": MIN_STAGE, "min_stages": MIN_STAGES, "max_stages": MAX_STAGES,
                       "examples": {n: auto_every(n) for n in (150, 300, 399, 400, 600, 800, 2000, 10000)}},
        "configs": [{"name": c.name, "method": c.method, "variant": c.variant, "group": c.group,
                     "tasks": list(c.tasks), "steps": c.steps, "lrs": c.lrs, "block": c.block,
                     "ranks": list(c.ranks) if c.ranks else None} for c in configs],
        "summary": summary, "runs": records, "table": table, "wall_s": wall,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "jobs": args.jobs, "machine": platform.machine(),
                        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    if assets:
        result["corpus_bytes"] = torch.load(assets, weights_only=True)["sizes"]
    Path(f"{base}.json").write_text(json.dumps(result, indent=1, default=str))
    Path(f"{base}.txt").write_text(table + "\n")
    _plot(summary, f"{base}.png", f"plora study --suite {args.suite}: PLoRA's loss removed over LoRA's")
    print(table)
    print(f"\nwrote {base}.json, {base}.png, {base}.txt; wall time {wall:.0f} s")
    result["files"] = {"json": f"{base}.json", "png": f"{base}.png", "txt": f"{base}.txt"}
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
