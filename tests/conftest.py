"""Shared fixtures (the helpers tests import are in helpers.py). Without CUDA the Triton kernels run in Triton's
interpreter on CPU tensors: the flag must be set before any kernel module is imported, so it is set here, at
collection time."""
import fcntl
import os
import subprocess

import pytest
import torch

import compile_matrix
from helpers import DEVICE, triton_runnable

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one pinned configuration per GEMM: an autotuning sweep per shape bucket costs more than the tests
    os.environ.setdefault("PLORA_AUTOTUNE", "0")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once on the pure-torch reference and once on the Triton kernels."""
    if request.param == "triton" and not triton_runnable():
        pytest.skip("Triton is not runnable here (no CUDA and TRITON_INTERPRET unset)")
    monkeypatch.setenv("PLORA_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _build_csrc_once() -> None:
    """On a GPU machine, build csrc/plora_unload.cu once per run, before the first test, into the cache every test
    process reads (ops.cuda_unload.cache_root(): $PLORA_CSRC_CACHE, which benchmarks/gpu_session.sh exports and
    fills before it starts pytest, else ~/.cache/plora_kernels).

    Why here and not in the test that first needs the library: under pytest-xdist every worker is a process of its
    own, so each would compile the same source inside its first test that uses the CUDA twin (tens of seconds,
    counted against that test's --timeout), up to -n compilers at once. Under an exclusive lock on a file in the
    cache, the first process builds and the others wait, then find the build cached (keyed by source, flags and
    nvcc) and return at once; with the script's prebuilt cache nobody compiles. A build error is not raised here:
    the tests that use the library report it (tests/test_csrc_unload.py fails on it). Without CUDA, or with
    $PLORA_CSRC_LIB (a prebuilt library) or no nvcc, nothing is built."""
    if not torch.cuda.is_available():
        return
    from plora_kernels.ops import cuda_unload

    if os.environ.get("PLORA_CSRC_LIB") or cuda_unload.nvcc_path() is None or not cuda_unload.SOURCE.is_file():
        return
    try:
        root = cuda_unload.cache_root()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            cuda_unload.build()
    except (OSError, RuntimeError, subprocess.SubprocessError):  # an unwritable cache, a failed compile: the tests say
        pass


def pytest_sessionstart(session):
    """In the xdist controller (or a plain run) and in every worker, before any test and outside every test's
    --timeout."""
    _build_csrc_once()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks under --dist loadgroup
def pytest_collection_modifyitems(config, items):
    """tests/test_csrc_unload.py builds the library into a fresh folder of its own (its module fixture), once per
    process that runs its tests: one xdist group keeps them on one worker under ``--dist loadgroup`` (what
    benchmarks/gpu_session.sh passes), so a run compiles it there once, not once per worker. Inert without xdist."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.path.name == "test_csrc_unload.py":
            item.add_marker(pytest.mark.xdist_group("csrc_unload"))


def pytest_collection_finish(session):
    """Start the compile matrix in the background if its tests will run: it takes minutes of CPU, and the rest of
    the suite leaves a core idle (tests/compile_matrix.py)."""
    compile_matrix.start_for(session.items)


def pytest_sessionfinish(session):
    compile_matrix.stop_all()
