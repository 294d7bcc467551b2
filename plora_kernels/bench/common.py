"""Helpers shared by the benchmarks: timing, environment record, JSON/PNG output, tables.

Timing follows DESIGN §5: ``triton.testing.do_bench`` (median with the 20th/80th percentiles, a warm-up,
L2 flushed before every timed run) on CUDA, every contender in the same process. Without a GPU a
``time.perf_counter`` loop stands in, with the same warm-up/median rule; its numbers time the pure-torch
reference path on the CPU and say nothing about the kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

NO_GPU_NOTE = ("No CUDA GPU found: timing the pure-torch reference path on a small CPU shape. These are smoke "
               "timings of the reference code, not kernel performance.")


def parse_dtypes(text: str) -> list[torch.dtype]:
    """``"bf16,fp16"`` -> [torch.bfloat16, torch.float16]; raises ValueError naming the bad entry."""
    out = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32 (comma-separated)")
        if DTYPES[name] not in out:
            out.append(DTYPES[name])
    if not out:
        raise ValueError("no dtype given")
    return out


def parse_ints(text) -> list[int]:
    """``"8,16"`` (or an already parsed list) -> [8, 16]; raises ValueError unless every value is a positive int."""
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        try:
            values = [int(t) for t in str(text).split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


# ------------------------------------------------------------------------------------- argument checks
# argparse ``type=`` functions: a bad value is refused by argparse itself, naming the flag
# ("<prog>: error: argument --rep-ms: must be a positive number, got '-1'"), with exit status 2.
def positive_float(text: str) -> float:
    """A time budget in ms and the like: finite and > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count (steps, a rank, a size): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated counts (ranks, a shape): every one an integer >= 1."""
    try:
        return parse_ints(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("expected", "must be", 1)) from None


def parse_cli(parser: argparse.ArgumentParser, argv, finish: Callable[[argparse.Namespace], object] | None = None):
    """``parser.parse_args(argv)``, then ``finish(args)``, whose ValueError (a bad value or combination found
    after parsing) is reported as argparse reports its own: usage, ``<prog>: error: ...``, SystemExit(2)."""
    args = parser.parse_args(argv)
    if finish is not None:
        try:
            finish(args)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def exit_code(exc: SystemExit) -> int:
    """The status a benchmark's ``main`` returns for argparse's SystemExit (2: a refused argument; 0: --help)."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def add_common_args(p) -> None:
    """The flags every kernel benchmark takes: output folder, do_bench budgets, --no-save."""
    p.add_argument("--out", default=None, help="results folder (default: <repo>/benchmarks/results)")
    p.add_argument("--ranks", type=positive_ints, default=None,
                   help="comma-separated ranks (overrides the default set)")
    p.add_argument("--warmup-ms", type=positive_float, default=25.0,
                   help="do_bench warm-up budget per timing, ms (> 0; default 25)")
    p.add_argument("--rep-ms", type=positive_float, default=100.0,
                   help="do_bench repetition budget per timing, ms (> 0; default 100)")
    p.add_argument("--no-save", action="store_true", help="print the table only; write no JSON/PNG")


def pick_device_announced(extra_note: str = "") -> tuple[torch.device, list[str]]:
    """The benchmark device and the record's notes; without a GPU, says (and notes) that only the reference
    path is timed."""
    device = pick_device()
    notes = []
    if device.type != "cuda":
        print(NO_GPU_NOTE, flush=True)
        notes.append(NO_GPU_NOTE + extra_note)
    return device, notes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str  # "triton.testing.do_bench" or "perf_counter"

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu_bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float, min_reps: int = 5,
               max_reps: int = 10_000) -> Timing:
    fn()  # first call: lazy init, allocator, autotune
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or (time.perf_counter() - start) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = _quantiles(times, (0.5, 0.2, 0.8))
    return Timing(q[0], q[1], q[2], "perf_counter")


def _quantiles(times: Sequence[float], qs: Iterable[float]) -> list[float]:
    """Linear-interpolation quantiles (as torch.quantile, which do_bench uses)."""
    xs = sorted(times)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def bench(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0,
          rep_ms: float = 100.0) -> Timing:
    """Median time of ``fn`` in ms (with p20/p80). CUDA: triton.testing.do_bench after one explicit warm-up
    call (which also runs any autotuning); CPU: a perf_counter loop with the same warm-up rule."""
    if device.type != "cuda":
        return _cpu_bench(fn, warmup_ms, rep_ms)
    import triton.testing

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize(device)
    q = triton.testing.do_bench(fn, warmup=max(1, round(warmup_ms)), rep=max(1, round(rep_ms)),
                                quantiles=[0.5, 0.2, 0.8])
    q = [float(v) for v in (q if isinstance(q, (list, tuple)) else [q, q, q])]
    return Timing(q[0], q[1], q[2], "triton.testing.do_bench")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes ``fn`` allocates on top of what is already allocated, at its peak (CUDA only; None on CPU).

    Measured on a single call outside any timing loop (do_bench allocates its own L2-flush buffer)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return int(peak)


def backend_label(t: torch.Tensor, op: str = "lora_linear", size: int | None = None) -> str:
    """The implementation the resolver picks for ``op`` on tensors like ``t`` (the name the ops run by), with
    " (interpreter)" for Triton on CPU tensors."""
    from .._backend import interpreting, resolve

    try:
        name = resolve(op, t, size=size)
    except Exception as exc:  # noqa: BLE001 - an implementation asked for that cannot run here
        return f"error: {exc}"
    return f"{name} (interpreter)" if name != "torch" and interpreting() and t.device.type == "cpu" else name


# ---------------------------------------------------------------------------------------- environment
def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), or None for a plain install."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() and (root / "plora_kernels").is_dir() else None


def _module_version(name: str) -> str | None:
    try:
        mod = __import__(name)
    except Exception:  # noqa: BLE001 - a broken install is reported as missing
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment(device: torch.device) -> dict:
    """Everything a result needs to be read later: device, versions, commit, relevant env vars."""
    import plora_kernels

    env: dict = {
        "device_type": device.type,
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plora_kernels": plora_kernels.__version__,
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("PLORA_BACKEND", "PLORA_LINEAR_KERNEL", "PLORA_UNLOAD_KERNEL",
                                               "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                if os.environ.get(k) is not None},
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env.update({
            "device_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        })
    else:
        env["device_name"] = f"CPU ({env['cpu']}, {env['cpu_count']} logical cores)"
    root = repo_root()
    if root is not None:
        env["git_commit"] = _git(["rev-parse", "HEAD"], root)
        status = _git(["status", "--porcelain", "--untracked-files=no"], root)
        env["git_dirty"] = None if status is None else bool(status)
    env["device_slug"] = device_slug(env)
    return env


def device_slug(env: dict) -> str:
    if env.get("device_type") != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", str(env.get("device_name", "cuda")).lower()).strip("-")
    return slug or "cuda"


# ------------------------------------------------------------------------------------------- output
def default_out_dir() -> Path:
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "benchmarks" / "results"


def result_stem(name: str, env: dict, out_dir: str | os.PathLike | None) -> Path:
    """``<out>/<name>-<device-slug>-<UTC timestamp>`` (no suffix), made unique within the directory."""
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    stamp = env["timestamp_utc"].replace("-", "").replace(":", "")  # 20250101T120000Z
    stem = out / f"{name}-{env['device_slug']}-{stamp}"
    n = 1
    while stem.with_suffix(".json").exists():
        n += 1
        stem = out / f"{name}-{env['device_slug']}-{stamp}-{n}"
    return stem


def write_json(path: Path, payload: dict) -> Path:
    def default(o):
        if isinstance(o, torch.dtype):
            return dtype_name(o)
        if isinstance(o, (Path, torch.device)):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    path = Path(path)
    path.write_text(json.dumps(payload, indent=1, default=default, allow_nan=False) + "\n")
    return path


def write_record(stem: Path, payload: dict, rows: Sequence[dict], png: Path | None = None) -> Path:
    """Write ``payload`` plus the result rows (NaN/inf as null) and the plot's name to ``stem``.json, quietly: the
    benchmarks call it after every config, so that a run cut off keeps what it measured."""
    payload = {**payload, "results": [{k: clean_float(v) for k, v in r.items()} for r in rows],
               "plot": png.name if png is not None else None}
    return write_json(stem.with_suffix(".json"), payload)


def save_record(stem: Path, payload: dict, rows: Sequence[dict], png: Path | None) -> Path:
    """:func:`write_record`, and say where."""
    path = write_record(stem, payload, rows, png)
    print(f"wrote {path}" + (f" and {png}" if png is not None else ""), flush=True)
    return path


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a time limit's kill) raises KeyboardInterrupt, as SIGINT does, so that a benchmark's loop can save
    the rows so far (``"complete": false``) before it exits."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_shapes(texts: Sequence | None, arity: int, form: str) -> list[tuple[int, ...]] | None:
    """Repeated ``--shape`` flags, e.g. ``["8192,4096,4096"]`` (or lists already parsed by :func:`positive_ints`)
    -> [(8192, 4096, 4096)]; None when absent."""
    if not texts:
        return None
    shapes = [tuple(parse_ints(t)) for t in texts]
    if any(len(s) != arity for s in shapes):
        raise ValueError(f"--shape takes {form}")
    return shapes


def clean_float(v):
    """NaN/inf are not JSON: store them as None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# -------------------------------------------------------------------------------------------- tables
def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]], *, markdown: bool = False) -> str:
    """Render ``rows`` (dicts) with ``columns`` = [(key, header, format spec)] as aligned text or markdown."""
    head = [h for _, h, _ in columns]
    body = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(head)]
    numeric = [all(_looks_numeric(row[i]) for row in body) and body for i in range(len(head))]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(row) for row in body])


def _looks_numeric(s: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?[%x]?|-", s))


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]], file=None) -> None:
    print(format_table(rows, columns), file=file or sys.stdout, flush=True)


# ------------------------------------------------------------------------------------------- plotting
def plot_grouped_bars(path: Path, panels: Sequence[dict], title: str) -> Path | None:
    """One PNG with a grouped bar chart per panel. A panel: {"title", "ylabel", "groups": [labels],
    "series": {name: [value or None per group]}, "hlines": [(y, label)]}. Returns None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)", file=sys.stderr)
        return None
    n_groups = max((len(p["groups"]) for p in panels), default=1)
    width_in = min(4 + 0.55 * n_groups * max(1, max((len(p["series"]) for p in panels), default=1)) / 2, 40)
    fig = Figure(figsize=(max(7.0, width_in), 3.6 * len(panels) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        groups, series = panel["groups"], panel["series"]
        k = max(1, len(series))
        bar_w = 0.8 / k
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (k - 1) / 2) * bar_w for g in range(len(groups))]
            ys = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
            ax.bar(xs, ys, width=bar_w, label=name)
        for j, (y, label) in enumerate(panel.get("hlines", [])):
            ax.axhline(y, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(label, (0.0 if j % 2 == 0 else 1.0, y), xycoords=("axes fraction", "data"),
                        ha="left" if j % 2 == 0 else "right", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=35 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center",
                           fontsize=7)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncols=min(k, 4))
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def unique(seq) -> list:
    """The items of ``seq`` without repeats, in first-seen order (works for unhashable items)."""
    out = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


def print_targets(targets: list[dict]) -> None:
    """One line per target of a record: what, the value, the target, and MET / NOT MET / not measured."""
    for t in targets:
        met = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        print(f"target: {t['what']}: {t['value_text']} ({t['target']}) -> {met}")
