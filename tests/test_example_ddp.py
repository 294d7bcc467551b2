"""The README's multi-GPU example runs as written: torchrun, 2 CPU processes over gloo, unloads, ranks in sync."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"


@pytest.mark.slow
def test_train_ddp_example_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           "--steps", "6", "--every", "2", "--dtype", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "world=2 backend=gloo" in out, out[-4000:]
    assert "6 steps, 3 unloads" in out, out[-4000:]
    assert "replicas bit-identical: yes" in out, out[-4000:]
