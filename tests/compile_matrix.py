"""The compile matrix (``python -m plora_kernels.ops.triton.matrix``) for the test session, once per Triton.

Compiling every kernel variant for four architectures takes minutes of CPU, so conftest.py starts each run in
the background as soon as collection shows tests/test_kernels_compile.py will run (one compile process each: the
rest of the suite uses one core, the runs share the other), and the tests collect the result when they get to it.

Two Tritons: the newest supported one is the test venv's; the oldest runs in a second venv named by
``PLORA_OLDEST_TRITON_PYTHON`` (its python: the CPU torch wheel plus ``triton==3.6.0``; ``.ci/run`` builds it).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLDEST_ENV = "PLORA_OLDEST_TRITON_PYTHON"
_runs: dict = {}


def python_for(which: str) -> str | None:
    return sys.executable if which == "newest" else os.environ.get(OLDEST_ENV) or None


class _Started:
    """A run started before this session (``.ci/run`` starts the oldest Triton's while the test venv installs):
    ``PLORA_<WHICH>_MATRIX_DIR`` names its folder, where it leaves ``matrix.json``, ``log.txt`` and, once it has
    ended, ``exit`` (its status). It is waited for, not restarted."""

    def __init__(self, folder: Path):
        self.folder, self.returncode = folder, None

    def poll(self):
        done = self.folder / "exit"
        if self.returncode is None and done.exists() and done.read_text().strip():
            self.returncode = int(done.read_text())
        return self.returncode

    def wait(self, timeout: float):
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"the compile matrix in {self.folder}", timeout)
            time.sleep(1)

    def kill(self):
        pass  # not ours to stop


def start(which: str, jobs: int = 1) -> None:
    """Start the matrix run for ``which`` ("newest" or "oldest") unless it runs already or has no python."""
    python = python_for(which)
    if which in _runs or python is None:
        return
    started = os.environ.get(f"PLORA_{which.upper()}_MATRIX_DIR")
    if started:
        _runs[which] = (_Started(Path(started)), Path(started), open(os.devnull, "w"))
        return
    out = Path(tempfile.mkdtemp(prefix=f"plora-matrix-{which}-"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces the compiler
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile for real, not from a cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log = open(out / "log.txt", "w")
    # the SASS (instruction budgets, read on sm_90) is held on the newest Triton only: the oldest skips the
    # disassembly, a third of its compile time
    sass = [] if which == "newest" else ["--sass-archs", "none"]
    proc = subprocess.Popen([python, "-m", "plora_kernels.ops.triton.matrix", "--jobs", str(jobs), *sass,
                             "--json", str(out / "matrix.json")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    _runs[which] = (proc, out, log)


def result(which: str, timeout: float = 1800) -> dict:
    """The run's JSON record (``triton``, ``archs``, ``variants`` with each one's result and violations)."""
    start(which, jobs=2)  # not started at collection (e.g. a single test selected): use both cores now
    proc, out, log = _runs[which]
    proc.wait(timeout=timeout)
    log.flush()
    path = out / "matrix.json"
    if not path.exists():
        log_file = out / "log.txt"
        tail = log_file.read_text()[-4000:] if log_file.exists() else "(no log)"
        raise RuntimeError(f"the compile matrix under {python_for(which)} wrote no record (exit {proc.returncode})"
                           f":\n{tail}")
    return json.loads(path.read_text())


def stop_all() -> None:
    """Stop runs the session no longer needs (an interrupted or deselected session)."""
    for proc, _, log in _runs.values():
        if proc.poll() is None:
            proc.kill()
        log.close()


def start_for(items) -> None:
    """conftest's collection hook: start both runs (one compile process each) if a matrix test was collected.
    Not in a pytest-xdist worker: each would start its own; there the tests start what they need when they run."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if any(item.nodeid.startswith("tests/test_kernels_compile.py") and "[" in item.nodeid and
           ("newest" in item.nodeid or "oldest" in item.nodeid) for item in items):
        for which in ("newest", "oldest"):
            start(which, jobs=1)
