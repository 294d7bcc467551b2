"""pytest-benchmark smoke benchmarks. Files here are named ``bench_*.py``; this hook collects them.

Run ``pytest benchmarks/ --benchmark-disable -q`` for a fast CPU smoke run (each case runs once), or
``pytest benchmarks/`` for pytest-benchmark timings. CPU cases time the pure-torch reference on small
shapes (and our Triton kernels in the interpreter only when TRITON_INTERPRET is already set in the
environment; this conftest never sets it). GPU cases run the target shapes of docs/design.md §5 and skip
without CUDA.
The numbers that go into BENCHMARKS.md come from ``plora bench {linear,unload}``, not from here.
"""
import pytest
import torch


def pytest_collect_file(file_path, parent):
    # an explicitly named file is already collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

