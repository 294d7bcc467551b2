"""Every numeric format constant and ABI code of the unload, in one place.

The reference (ops/reference.py), the Triton kernels (ops/triton/unload.py), the ctypes loader of the CUDA twin
(ops/cuda_unload.py) and the ahead-of-time compiler (ops/triton/aot.py) import these; csrc/plora_unload.cu
spells them in C++, and tests/test_formats.py checks that it agrees.
"""
from __future__ import annotations

import torch

# rounding-mode codes: the Triton kernel's ROUND constexpr and the C ABI's `rounding` argument
ROUND_NONE, ROUND_NEAREST, ROUND_STOCHASTIC = 0, 1, 2
ROUNDING_CODES = {"nearest": ROUND_NEAREST, "stochastic": ROUND_STOCHASTIC}

# the C ABI of csrc/plora_unload.cu: its version and its dtype codes
CSRC_ABI_VERSION = 4
CSRC_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# mantissa bits of the 16-bit formats W is rounded into
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
# fp16's smallest normal exponent, -14, biased as fp32 biases it: below it fp16's grid step stays 2**-24
FP16_MIN_BIASED_EXP = 127 - 14
# the exponent bits of a 16-bit format, as a mask of its raw bits (all set: inf or NaN)
EXPONENT_MASK16 = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def max_finite(dtype: torch.dtype) -> float:
    """The largest finite value of ``dtype`` (what a merged value may not exceed in magnitude)."""
    return torch.finfo(dtype).max


def rounding_mode(w_dtype: torch.dtype, rounding: str) -> int:
    """The rounding code of a merge into ``w_dtype``: none for fp32/fp64 W, which store the value itself."""
    if w_dtype in (torch.float32, torch.float64):
        return ROUND_NONE
    return ROUNDING_CODES[rounding]
