"""Helpers shared by the benchmarks: timing, environment record, JSON/PNG output, tables.

Timing follows docs/design.md §5: ``triton.testing.do_bench`` (median with the 20th/80th percentiles, a warm-up,
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
import types
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
def argument(text: str, convert: Callable[[str], object], ok: Callable[[object], bool], what: str):
    """``convert(text)`` if that succeeds and ``ok`` holds for it, else argparse's refusal: "must be <what>"."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A time budget in ms and the like: finite and > 0."""
    return argument(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def positive_int(text: str) -> int:
    """A count (steps, a rank, a size): an integer >= 1."""
    return argument(text, int, lambda v: v >= 1, "a positive integer")


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


def cpu_bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float, min_reps: int = 5,
              max_reps: int = 10_000) -> Timing:
    """:func:`bench` on the CPU: one untimed call, calls for ``warmup_ms``, then timed calls for ``rep_ms`` (at
    least ``min_reps``, at most ``max_reps``)."""
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
    q = quantiles(times, (0.5, 0.2, 0.8))
    return Timing(q[0], q[1], q[2], "perf_counter")


def quantiles(times: Sequence[float], qs: Iterable[float]) -> list[float]:
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
        return cpu_bench(fn, warmup_ms, rep_ms)
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
    with PeakMemory(device) as mem:
        result = fn()
    del result
    return mem.peak_bytes


def backend_label(t: torch.Tensor, op: str = "lora_linear", size: int | None = None) -> str:
    """The implementation the resolver picks for ``op`` on tensors like ``t`` (the name the ops run by), with
    " (interpreter)" for Triton on CPU tensors."""
    from .._backend import interpreting, resolve

    try:
        name = resolve(op, t, size=size)
    except Exception as exc:  # noqa: BLE001 - an implementation asked for that cannot run here
        return f"error: {exc}"
    return f"{name} (interpreter)" if name != "torch" and interpreting() and t.device.type == "cpu" else name


# ----------------------------------------------------------------------------------------- peak memory
class PeakMemory:
    """Peak memory of what runs between :meth:`start` and :meth:`stop` (or inside ``with``), above what was
    allocated at the start; ``peak_bytes`` holds it after the stop (None where nothing could be measured) and
    ``kind`` says how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, exact). On CPU torch keeps no allocator statistics.
    With ``profile_steps`` > 0 the first that many steps (each ended by :meth:`step_done`) run under
    ``torch.profiler`` with memory profiling, and the peak of the tensor bytes it saw allocated minus freed is
    reported. Otherwise, or where the profiler is unavailable, the growth of the process's peak RSS (VmHWM, reset
    through ``/proc/self/clear_refs``; coarse: pages, and memory the allocator kept from earlier work is reused
    without raising RSS, so it can under-count), or failing that of ``ru_maxrss`` (a coarse lower bound)."""

    def __init__(self, device: torch.device, profile_steps: int = 0):
        self.device, self.profile_steps = device, profile_steps
        self.peak_bytes: int | None = None
        self.kind: str | None = None
        self._base = None
        self._steps = 0
        self._prof = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def start(self) -> None:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "torch.cuda.max_memory_allocated above the start"
        elif self.profile_steps > 0 and self._start_profile():
            self.kind = f"peak tensor bytes allocated in the first {self.profile_steps} steps (torch.profiler)"
        else:
            self._start_rss()

    def step_done(self) -> None:
        """One step has ended: the profiler stops after ``profile_steps`` of them."""
        self._steps += 1
        if self._prof is not None and self._steps == self.profile_steps:
            self._finish_profile()

    def stop(self) -> int | None:
        """Read the peak (``peak_bytes``, also returned)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self._prof is not None:  # fewer steps than profile_steps
            self._finish_profile()
        elif self.kind is not None and self.kind.startswith("peak RSS"):
            peak = _proc_status_kib("VmHWM")
            self.peak_bytes = None if peak is None else max(0, peak - self._base) * 1024
        elif self.kind is not None and self.kind.startswith("ru_maxrss"):
            self.peak_bytes = max(0, _ru_maxrss_kib() - self._base) * 1024
        return self.peak_bytes

    def _start_profile(self) -> bool:
        try:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _quiet_stderr():  # kineto logs profiler_start/stop lines to fd 2
                self._prof.start()
        except Exception:  # noqa: BLE001 - profiler unavailable: the caller falls back to RSS
            self._prof = None
        return self._prof is not None

    def _finish_profile(self) -> None:
        prof, self._prof = self._prof, None
        with _quiet_stderr():
            prof.stop()
        try:
            # every allocation (+) and free (-) the profiler saw, in time order
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
            events.sort(key=lambda e: e.start_ns())
            live = peak = 0
            for e in events:
                live += e.nbytes()
                peak = max(peak, live)
            self.peak_bytes = peak
        except Exception:  # noqa: BLE001 - profiler internals changed: report nothing rather than guess
            self.peak_bytes, self.kind = None, "unavailable"

    def _start_rss(self) -> None:
        try:  # hand memory freed by earlier work back to the OS (glibc), so that reusing it counts as growth
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the measurement may under-count, as documented
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._base = _proc_status_kib("VmRSS") if _proc_status_kib("VmHWM") is not None else None
        except OSError:
            self._base = None
        if self._base is not None:
            self.kind = "peak RSS growth of the process (coarse)"
        else:
            self._base = _ru_maxrss_kib()
            self.kind = "ru_maxrss growth of the process (coarse lower bound)"


def _proc_status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ru_maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C-level logging) for a moment; a no-op where fd 2 cannot be swapped."""
    saved = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


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
def interruptible(prog: str, rows: list, notes: list):
    """Run the ``with`` body, SIGTERM (a time limit's kill) raising KeyboardInterrupt as SIGINT does. An interrupt
    ends the body quietly: it is noted in ``notes`` and said on stderr, and the yielded state's ``interrupted``
    turns True, so that the benchmark saves the rows measured so far (``"complete": false``) and exits 130."""
    state = types.SimpleNamespace(interrupted=False)

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: SIGINT only
        old = handler
    try:
        yield state
    except KeyboardInterrupt as exc:
        state.interrupted = True
        why = str(exc) or "SIGINT"
        notes.append(f"INTERRUPTED ({why}) after {len(rows)} rows: the run is incomplete")
        print(f"{prog}: interrupted ({why}); saving the {len(rows)} rows so far", file=sys.stderr, flush=True)
    finally:
        if old is not handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


def finish_run(stem: Path | None, payload: dict, rows: Sequence[dict], plot: Callable[[Path], Path | None],
               interrupted: bool) -> int:
    """The end of a kernel benchmark: unless ``stem`` is None (--no-save), the plot ``plot(png path)`` and the
    record, said where; the exit status: 130 when interrupted, 1 when a row failed, else 0."""
    if stem is not None:
        png = None
        with contextlib.suppress(Exception):  # a plot must not lose the record
            png = plot(stem.with_suffix(".png"))
        save_record(stem, payload, rows, png)
    if interrupted:
        return 130
    return 1 if any("error" in r for r in rows) else 0


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


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Render ``rows`` (dicts) with ``columns`` = [(key, header, format spec)] as aligned text."""
    head = [h for _, h, _ in columns]
    body = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(head)]
    numeric = [all(_looks_numeric(row[i]) for row in body) and body for i in range(len(head))]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(row) for row in body])


def markdown_table(head: Sequence[str], body: Sequence[Sequence]) -> str:
    """A markdown table of the header cells ``head`` and the rows of cells ``body`` ("|" in a cell escaped)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


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
