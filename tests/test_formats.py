"""One source for the unload's format constants and ABI codes (ops/formats.py): the CUDA source agrees with it."""
import re
from pathlib import Path

import torch

from plora_kernels.ops import cuda_unload, formats

CU = (Path(__file__).resolve().parents[1] / "csrc" / "plora_unload.cu").read_text()


def _enum(names):
    return {name: int(re.search(rf"\b{name}\s*=\s*(\d+)", CU).group(1)) for name in names}


def test_csrc_abi_version_and_codes_match():
    assert int(re.search(r"plora_unload_abi_version\(void\)\s*\{\s*return\s+(\d+);", CU).group(1)) == \
        formats.CSRC_ABI_VERSION == cuda_unload.ABI_VERSION
    assert _enum(["DT_F32", "DT_F16", "DT_BF16"]) == {
        "DT_F32": formats.CSRC_DTYPE_CODES[torch.float32], "DT_F16": formats.CSRC_DTYPE_CODES[torch.float16],
        "DT_BF16": formats.CSRC_DTYPE_CODES[torch.bfloat16]}
    assert _enum(["ROUND_NONE", "ROUND_NEAREST", "ROUND_STOCHASTIC"]) == {
        "ROUND_NONE": formats.ROUND_NONE, "ROUND_NEAREST": formats.ROUND_NEAREST,
        "ROUND_STOCHASTIC": formats.ROUND_STOCHASTIC}


def test_csrc_format_constants_match():
    # fp16's grid floor (biased exponent of 2**-14) and the exponent masks of both 16-bit formats
    assert f"{formats.FP16_MIN_BIASED_EXP}u" in CU
    for dtype, mask in formats.EXPONENT_MASK16.items():
        assert f"0x{mask:X}u" in CU, dtype


def test_python_constants_are_the_formats_own():
    assert formats.max_finite(torch.float16) == 65504.0
    assert formats.max_finite(torch.bfloat16) == torch.finfo(torch.bfloat16).max
    for dtype, mant in formats.MANTISSA_BITS.items():
        assert torch.finfo(dtype).eps == 2.0**-mant
        bits = torch.tensor(float("inf"), dtype=dtype).view(torch.int16).item()
        assert bits == formats.EXPONENT_MASK16[dtype]
    assert 2.0 ** (formats.FP16_MIN_BIASED_EXP - 127) == torch.finfo(torch.float16).tiny
