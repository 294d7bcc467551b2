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

Every real-text corpus is split by file (a hash of the path) into train / validation / test. The learning rate
is tuned per method (and per ablation variant) on the validation split at the first seed; every seed is then
run at that learning rate and reported on the test split. "Loss removed" is ``L0 - L`` with ``L0`` the loss
before adaptation; the headline number is PLoRA's loss removed over LoRA's, paired by seed (same data order,
same initial adapter), with its spread over seeds.

Nothing is downloaded (``HF_HUB_OFFLINE=1``). The pretrained base models and the corpora are cached in
``$PLORA_STUDY_CACHE`` (default ``~/.cache/plora_kernels/study``). Records go to
``benchmarks/results/study-<timestamp>.{json,png,txt}`` (``--out``).

Run: ``python -m plora_kernels.study`` (the main comparison, ~7 min on 2 CPU cores), ``--suite ablations``
(why PLoRA loses with the old defaults: momentum, optimizer state, re-warm-up, A kept or re-drawn, unload
interval, rank), ``--suite all``; ``--smoke`` for a tiny configuration (tests).
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
# demo's 5-step re-warm-up). "recommended": what the study supports (see RECOMMENDED_NOTE and the README).
LEGACY_PLORA = {"every": 25, "momentum": 0.0, "optimizer_reset": "zero", "restart_warmup": 5, "a_init": "redraw"}
RECOMMENDED_PLORA = {"every": "auto", "momentum": 0.0, "optimizer_reset": "zero", "restart_warmup": 5,
                     "a_init": "redraw"}
VARIANT_KEYS = {"steps", "every", "momentum", "optimizer_reset", "restart_warmup", "a_init", "rank_mult", "lr", "label"}
A_INITS = ("redraw", "keep", "rescale")


def auto_every(total_steps: int) -> int:
    """The unload interval the study supports for a run of ``total_steps`` optimizer steps (placeholder)."""
    return max(1, total_steps // 4)


def resolve_every(every, total_steps: int) -> int:
    """``every`` as steps: an int >= 1 is steps, a float in (0, 1] a fraction of the run, "auto" the rule of
    :func:`auto_every`, 0 / None / "never" no unload (plain LoRA)."""
    if every in (None, 0, "never"):
        return total_steps + 1
    if every == "auto":
        return auto_every(total_steps)
    if isinstance(every, float) and 0.0 < every <= 1.0:
        return max(1, round(every * total_steps))
    if isinstance(every, int) and every >= 1:
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
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
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
    """Build the corpora and pretrain the base model (cached); returns the path of the asset file."""
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
    rank = int(job["rank"] * v.get("rank_mult", 1))
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
    sched = stage_cosine_schedule(optimizer, total_steps=steps, every=every, warmup=WARMUP,
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
    out = {k: job[k] for k in ("task", "method", "name", "rank", "lr", "seed", "phase")}
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
    """One configuration of the study: which (method, variant) pairs to train on which tasks and ranks."""
    name: str
    method: str
    variant: dict = field(default_factory=dict)
    tasks: tuple = ()
    ranks: tuple | None = None     # None: the task's ranks
    group: str = "main"


def main_configs(tasks) -> list[Config]:
    return [
        Config("LoRA", "lora", {}, tuple(tasks)),
        Config("PLoRA", "plora", dict(RECOMMENDED_PLORA), tuple(tasks)),
        Config("full FT", "full", {}, tuple(tasks), ranks=(0,)),
    ]


def ablation_configs(tasks) -> list[Config]:
    """Each varies one setting of the legacy PLoRA (m 0, fresh A, Adam zeroed, every 25 of 150, re-warm-up 5)."""
    tasks = tuple(tasks)
    L = LEGACY_PLORA
    out = [Config("LoRA", "lora", {}, tasks, group="ablation"),
           Config("PLoRA legacy", "plora", dict(L), tasks, group="ablation")]

    def add(group, name, **change):
        out.append(Config(name, "plora", {**L, **change}, tasks, group=group))

    for m in (0.1, 0.3, 0.5):
        add("momentum", f"m={m}", momentum=m, optimizer_reset="scale")
    for reset in ("scale", "keep"):
        add("optimizer", f"Adam state {reset}", optimizer_reset=reset)
    for m, reset in ((0.5, "zero"), (0.5, "keep")):
        add("optimizer", f"m={m}, Adam state {reset}", momentum=m, optimizer_reset=reset)
    for rw in (0, 20):
        add("rewarmup", f"re-warm-up {rw}", restart_warmup=rw)
    for a in ("keep", "rescale"):
        add("A", f"A {a}", a_init=a)
    for frac in (1 / 15, 1 / 3, 1 / 2, 3 / 4):
        add("every", f"every {frac:.2f} of the run", every=frac)
    out.append(Config("LoRA 2r", "lora", {"rank_mult": 2}, tasks, group="rank"))
    out.append(Config("PLoRA legacy 2r", "plora", {**L, "rank_mult": 2}, tasks, group="rank"))
    return out


def _lr_grid(task: str, method: str) -> tuple:
    return TASKS[task]["lr_full" if method == "full" else "lr_adapter"]


def _jobs_for(cfg: Config, task: str, rank: int, seeds, lrs, phase: str, assets) -> list[dict]:
    return [{"task": task, "method": cfg.method, "name": cfg.name, "variant": cfg.variant, "rank": rank,
             "lr": lr, "seed": s, "phase": phase, "assets": assets, "group": cfg.group}
            for lr in lrs for s in seeds]


def run_suite(configs: list[Config], seeds=(0, 1), jobs: int = 1, progress: bool = True, assets=None,
              steps_override: dict | None = None, tune: str = "first") -> list[dict]:
    """LR tuning on the validation split at the first seed (``tune="first"``) or on the mean over seeds
    (``"all"``), then every seed at the chosen LR. Returns every run's record."""
    seeds = tuple(seeds)
    units = []  # (cfg, task, rank)
    for cfg in configs:
        for task in cfg.tasks:
            for rank in (cfg.ranks or TASKS[task]["ranks"]):
                units.append((cfg, task, rank))
    tune_seeds = seeds if tune == "all" else seeds[:1]
    pending = {}
    records = []
    total = sum(len(_lr_grid(t, c.method)) * len(tune_seeds) + (len(seeds) - len(tune_seeds))
                for c, t, _ in units)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="study", unit="run", dynamic_ncols=True, file=sys.stderr)
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) if jobs > 1 else None

    def submit(job):
        if steps_override and job["task"] in steps_override:
            job["steps"] = steps_override[job["task"]]
        if pool is None:
            fut = cf.Future()
            fut.set_result(run_one(job))
            return fut
        return pool.submit(run_one, job)

    todo = {}
    for u in units:
        cfg, task, rank = u
        for job in _jobs_for(cfg, task, rank, tune_seeds, _lr_grid(task, cfg.method), "tune", assets):
            todo[submit(job)] = u
    grid_left = {u: len(_lr_grid(u[1], u[0].method)) * len(tune_seeds) for u in units}
    while todo:
        done, _ = cf.wait(list(todo), return_when=cf.FIRST_COMPLETED)
        for fut in done:
            u = todo.pop(fut)
            rec = fut.result()
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{rec['task']} {rec['name']} r={rec['rank']} lr={rec['lr']:g} "
                                    f"s{rec['seed']} test={rec['test']:.4f}", refresh=False)
            if rec["phase"] != "tune":
                continue
            grid_left[u] -= 1
            if grid_left[u] == 0:
                cfg, task, rank = u
                best = _best_lr([r for r in records if _unit_of(r) == _unit_key(u) and r["phase"] == "tune"])
                rest = [s for s in seeds if s not in tune_seeds]
                for job in _jobs_for(cfg, task, rank, rest, [best], "final", assets):
                    todo[submit(job)] = u
    if bar is not None:
        bar.close()
    if pool is not None:
        pool.shutdown()
    for u in units:
        best = _best_lr([r for r in records if _unit_of(r) == _unit_key(u) and r["phase"] == "tune"])
        for r in records:
            if _unit_of(r) == _unit_key(u) and r["lr"] == best and r["phase"] == "tune":
                r["chosen"] = True
            elif _unit_of(r) == _unit_key(u) and r["phase"] == "final":
                r["chosen"] = True
    return records


def _unit_key(u) -> tuple:
    cfg, task, rank = u
    return (cfg.name, task, int(rank * cfg.variant.get("rank_mult", 1)) if cfg.method != "full" else 0)


def _unit_of(r) -> tuple:
    return (r["name"], r["task"], r["rank"] if r["method"] != "full" else 0)


def _best_lr(tune_records: list[dict]) -> float:
    by_lr = {}
    for r in tune_records:
        by_lr.setdefault(r["lr"], []).append(r["val"] if math.isfinite(r["val"]) else float("inf"))
    return min(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), lr))


def _worker_init():
    torch.set_num_threads(1)
    try:
        os.nice(0)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ summaries
def summarize(records: list[dict], initial: dict, configs: list[Config], seeds) -> dict:
    """Per (task, rank): every config's chosen-LR test loss per seed, loss removed, and ratio over LoRA."""
    chosen = [r for r in records if r.get("chosen")]
    out = {}
    for cfg in configs:
        for task in cfg.tasks:
            for rank in (cfg.ranks or TASKS[task]["ranks"]):
                rows = [r for r in chosen if r["name"] == cfg.name and r["task"] == task
                        and (cfg.method == "full" or r["rank"] == int(rank * cfg.variant.get("rank_mult", 1)))]
                if not rows:
                    continue
                by_seed = {r["seed"]: r for r in rows}
                entry = {"config": cfg.name, "group": cfg.group, "method": cfg.method, "variant": cfg.variant,
                         "lr": rows[0]["lr"], "every": rows[0]["every"], "per_seed": {}}
                for s, r in sorted(by_seed.items()):
                    l0 = initial[task][s]["test"]
                    entry["per_seed"][s] = {"test": r["test"], "removed": l0 - r["test"], "val": r["val"],
                                            "delta_rank": r["delta_rank"], "a_norm_ratio": r["a_norm_ratio"],
                                            "num_unloads": r["num_unloads"]}
                ranks = (TASKS[task]["ranks"] if cfg.method == "full" else (rank,))
                for rk in ranks:
                    out.setdefault(f"{task}/r{rk}", {})[cfg.name] = entry
    # ratios over LoRA at the same (task, rank), paired by seed
    for key, entries in out.items():
        lora = entries.get("LoRA")
        for entry in entries.values():
            ratios = []
            for s, v in entry["per_seed"].items():
                if lora and s in lora["per_seed"] and lora["per_seed"][s]["removed"] > 0:
                    ratios.append(v["removed"] / lora["per_seed"][s]["removed"])
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
    return {"mean": mean, "min": min(xs), "max": max(xs), "sd": sd, "n": len(xs)}


def format_tables(summary: dict, initial: dict, groups=None) -> str:
    lines = []
    for key, entries in summary.items():
        task, rank = key.split("/")
        l0 = sum(v["test"] for v in initial[task].values()) / len(initial[task])
        lines.append(f"\n{task} {rank}  (L0 test = {l0:.4f}; {TASKS[task]['steps']} steps)")
        header = f"  {'config':<28} {'lr':>7} {'every':>5} {'test loss':>17} {'loss removed':>17} " \
                 f"{'x LoRA [min, max]':>20} {'rank dW':>7} {'|A|/|A0|':>8}"
        lines.append(header)
        lines.append("  " + "-" * (len(header) - 2))
        for name, e in entries.items():
            if groups and e["group"] not in groups and name != "LoRA":
                continue
            t, rm, ra = e["test"], e["removed"], e["ratio_vs_lora"]
            dr = [v["delta_rank"] for v in e["per_seed"].values()]
            an = [v["a_norm_ratio"] for v in e["per_seed"].values() if v["a_norm_ratio"] is not None]
            lines.append(
                f"  {name:<28} {e['lr']:>7g} {e['every'] if e['every'] is not None else '-':>5} "
                f"{t['mean']:>9.4f} ±{t['sd']:<6.4f} {rm['mean']:>9.4f} ±{rm['sd']:<6.4f} "
                + (f"{ra['mean']:>6.2f}x [{ra['min']:.2f}, {ra['max']:.2f}]" if ra else f"{'n/a':>20}")
                + f" {sum(dr) / len(dr):>7.1f} " + (f"{sum(an) / len(an):>8.2f}" if an else f"{'-':>8}"))
    return "\n".join(lines)


def _plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys = list(summary)
    names = []
    for e in summary.values():
        for n in e:
            if n not in names and n != "LoRA":
                names.append(n)
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(keys) * max(1, len(names))), 4.5), dpi=110)
    width = 0.8 / max(1, len(names))
    cmap = plt.get_cmap("tab20")
    for j, n in enumerate(names):
        for i, k in enumerate(keys):
            e = summary[k].get(n)
            if not e or not e["ratio_vs_lora"]:
                continue
            lora = summary[k]["LoRA"]
            ys = [v["removed"] / lora["per_seed"][s]["removed"] for s, v in e["per_seed"].items()
                  if s in lora["per_seed"] and lora["per_seed"][s]["removed"] > 0]
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, e["ratio_vs_lora"]["mean"], width * 0.9, color=cmap(j % 20), label=n if i == 0 else None)
            ax.scatter([x] * len(ys), ys, color="k", s=8, zorder=3)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=0)
    ax.set_ylabel("loss removed / LoRA's (same rank, seed)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--suite", choices=("main", "ablations", "all"), default="main",
                        help="main: LoRA vs PLoRA (recommended settings) vs full FT; ablations: why the legacy "
                             "PLoRA loses; all: both (default main)")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated subset of {','.join(TASKS)} (default {','.join(DEFAULT_TASKS)}; "
                             "ablations: the real-text ones)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--ranks", default=None, help="override the ranks of the real-text tasks, e.g. 4,8")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (one thread each; default min(2, CPUs))")
    parser.add_argument("--tune", choices=("first", "all"), default="first",
                        help="tune the LR on the first seed's validation loss (default) or on the mean over seeds")
    parser.add_argument("--variant", action="append", default=[],
                        help="extra PLoRA variant NAME:key=value,... (keys: every, momentum, optimizer_reset, "
                             "restart_warmup, a_init, rank_mult, lr); may repeat")
    parser.add_argument("--only-variants", action="store_true", help="run LoRA and the --variant configs only")
    parser.add_argument("--steps", default=None, help="override steps per task, e.g. demo=200,pycode=60")
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration (seconds), for tests")
    parser.add_argument("--out", default="benchmarks/results", help="folder of the records (default benchmarks/results)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild the corpora and the pretrained base")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _parse_variant(text: str) -> Config:
    name, _, body = text.partition(":")
    v = {}
    for item in filter(None, body.split(",")):
        k, _, val = item.partition("=")
        k = k.strip()
        if k not in VARIANT_KEYS:
            raise ValueError(f"unknown variant key {k!r}; known: {sorted(VARIANT_KEYS)}")
        if k in ("optimizer_reset", "a_init", "label"):
            v[k] = val
        elif k == "every":
            v[k] = val if val in ("auto", "never") else (float(val) if "." in val else int(val))
        elif k in ("restart_warmup",):
            v[k] = int(val)
        else:
            v[k] = float(val)
    method = "lora" if v.get("every") == "never" else "plora"
    return Config(name.strip(), method, {**RECOMMENDED_PLORA, **v}, (), group="custom")


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="plora study", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    run_study(args)
    return 0


def run_study(args) -> dict:
    wall0 = time.perf_counter()
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    steps_override = {}
    if args.steps:
        for item in args.steps.split(","):
            k, _, v = item.partition("=")
            steps_override[k] = int(v)
    if args.smoke:
        tasks = tasks or ("demo", "pycode")
        steps_override = {**{t: 12 for t in tasks}, **steps_override}
        PRETRAIN["steps"] = 20
        for t in tasks:
            TASKS[t] = {**TASKS[t], "lr_adapter": TASKS[t]["lr_adapter"][1:2], "lr_full": TASKS[t]["lr_full"][1:2],
                        "ranks": (2,), "steps": 12}
    for t in tasks or ():
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    if args.ranks:
        for t in TASKS:
            if TASKS[t]["kind"] == "text":
                TASKS[t] = {**TASKS[t], "ranks": tuple(int(r) for r in args.ranks.split(","))}
    configs = []
    main_tasks = tasks or DEFAULT_TASKS
    text_tasks = tuple(t for t in (tasks or DEFAULT_TASKS) if TASKS[t]["kind"] == "text")
    extra = [_parse_variant(s) for s in args.variant]
    if args.only_variants:
        configs = [Config("LoRA", "lora", {}, main_tasks)] + [
            Config(c.name, c.method, c.variant, main_tasks, group="custom") for c in extra]
    else:
        if args.suite in ("main", "all"):
            configs += main_configs(main_tasks)
        if args.suite in ("ablations", "all"):
            abl = ablation_configs(text_tasks)
            names = {c.name for c in configs}
            configs += [c for c in abl if c.name not in names]
        configs += [Config(c.name, c.method, c.variant, main_tasks, group="custom") for c in extra]
    used_tasks = sorted({t for c in configs for t in c.tasks})
    text_used = [t for t in used_tasks if TASKS[t]["kind"] == "text"]
    progress = not args.no_progress
    assets = prepare_text_assets(text_used, progress, use_cache=not args.no_cache) if text_used else None
    initial = {t: {s: initial_losses(t, s, assets) for s in seeds} for t in used_tasks}
    records = run_suite(configs, seeds, jobs=max(1, args.jobs), progress=progress, assets=assets,
                        steps_override=steps_override, tune=args.tune)
    summary = summarize(records, initial, configs, seeds)
    table = format_tables(summary, initial)
    wall = time.perf_counter() - wall0
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"study-{stamp}"
    result = {
        "suite": args.suite, "argv": sys.argv[1:], "seeds": seeds, "tune": args.tune,
        "tasks": {t: {**{k: v for k, v in TASKS[t].items()}, "initial": initial[t]} for t in used_tasks},
        "text_model": TEXT_MODEL, "pretrain": PRETRAIN, "warmup": WARMUP, "min_lr_ratio": MIN_LR_RATIO,
        "legacy_plora": LEGACY_PLORA, "recommended_plora": RECOMMENDED_PLORA,
        "configs": [{"name": c.name, "method": c.method, "variant": c.variant, "group": c.group} for c in configs],
        "summary": summary, "runs": records, "table": table, "wall_s": wall,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "jobs": args.jobs, "machine": platform.machine()},
    }
    if assets:
        result["corpus_bytes"] = torch.load(assets, weights_only=True)["sizes"]
    Path(f"{base}.json").write_text(json.dumps(result, indent=1, default=str))
    Path(f"{base}.txt").write_text(table + "\n")
    _plot(summary, f"{base}.png", f"PLoRA study ({args.suite}): loss removed relative to LoRA, dots = seeds")
    print(table)
    print(f"\nwrote {base}.json, .png, .txt; wall time {wall:.0f} s")
    result["files"] = {"json": f"{base}.json", "png": f"{base}.png", "txt": f"{base}.txt"}
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
