"""The README's multi-GPU example runs as written: torchrun, 2 CPU processes over gloo, unloads, ranks in sync."""
from pathlib import Path

import pytest

from helpers import torchrun_2

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"


@pytest.mark.slow
def test_train_ddp_example_under_torchrun():
    out = torchrun_2(EXAMPLE, "--steps", "6", "--every", "2", "--dtype", "bf16")
    assert "world=2 backend=gloo" in out, out[-4000:]
    assert "6 steps, 3 unloads" in out, out[-4000:]
    assert "replicas bit-identical: yes" in out, out[-4000:]
