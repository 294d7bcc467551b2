"""What both smoke-benchmark files need: the GPU and interpreter skips, and a GPU-synchronised call."""
import pytest
import torch

from plora_kernels._backend import interpreting

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_interpreter = pytest.mark.skipif(not interpreting(),
                                       reason="set TRITON_INTERPRET=1 to run the Triton kernels on CPU")


def cuda_synced(fn):
    """Each call waits for the GPU: pytest-benchmark times wall clock."""
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
