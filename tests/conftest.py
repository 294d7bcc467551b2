"""Shared fixtures (the helpers tests import are in helpers.py). Without CUDA the Triton kernels run in Triton's
interpreter on CPU tensors: the flag must be set before any kernel module is imported, so it is set here, at
collection time."""
import os

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


def pytest_collection_finish(session):
    """Start the compile matrix in the background if its tests will run: it takes minutes of CPU, and the rest of
    the suite leaves a core idle (tests/compile_matrix.py)."""
    compile_matrix.start_for(session.items)


def pytest_sessionfinish(session):
    compile_matrix.stop_all()
