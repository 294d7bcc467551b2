"""The CUDA C++ twin of the Triton unload merge (csrc/plora_unload.cu), built with nvcc and loaded with ctypes.

torch's C++ extension builder is not used: it needs a CUDA torch (CUDA_HOME), which a CPU-only CI machine does
not have, while nvcc alone can build this file anywhere. The library is built on first use into a cache folder
keyed by the source, the flags and the nvcc version (``~/.cache/plora_kernels/unload-<key>/``, or under
``$PLORA_CSRC_CACHE``), so an edited source is always recompiled. ``$PLORA_CSRC_LIB`` names a prebuilt library to
use instead; without nvcc, a cached build of the current source is used if there is one.

``merge_`` is one layer's pass of the merge engine (``ops.merge``) on CUDA tensors: the check pass
(``write=False``) or the writing pass, with the values, the rounding and the random stream of the Triton kernel
``ops.triton.unload.merge_group_`` (its rank-1 path, r < 16) and of ``ops.reference.merge_value``.
``merge_host_`` runs the same element math on CPU tensors through the library's host entry point, which is how
machines without a GPU test it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import operator
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .formats import CSRC_ABI_VERSION, CSRC_DTYPE_CODES, ROUNDING_CODES

# the repository's csrc/ (a checkout or an editable install), else the copy setup.py ships in the package
_HERE = Path(__file__).resolve()
SOURCE = next((p for p in (_HERE.parents[2] / "csrc" / "plora_unload.cu",
                            _HERE.parents[1] / "_csrc" / "plora_unload.cu")
               if p.is_file()), _HERE.parents[2] / "csrc" / "plora_unload.cu")
LIB_NAME = "libplora_unload.so"
ABI_VERSION = CSRC_ABI_VERSION
ARCHS = ("80", "90")
FLAGS = (
    "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17",
    # no multiply-add contraction anywhere: the CPU loop and the GPU kernel must round identically
    "-fmad=false", "-Xcompiler", "-ffp-contract=off",
    *[f for arch in ARCHS for f in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")],
    "-gencode", f"arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}",  # PTX for newer GPUs
)

_DTYPE_CODE = CSRC_DTYPE_CODES
_ROUNDING = ROUNDING_CODES
_lock = threading.Lock()


def nvcc_path() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout


def cache_root() -> Path:
    env = os.environ.get("PLORA_CSRC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plora_kernels"


def _source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def _build_dir(nvcc: str) -> Path:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update("\0".join(FLAGS).encode())
    h.update(_nvcc_version(nvcc).encode())
    return cache_root() / f"unload-{h.hexdigest()[:16]}"


def _prebuilt() -> Path | None:
    """$PLORA_CSRC_LIB, else a cached build of the current source (whatever nvcc made it)."""
    env = os.environ.get("PLORA_CSRC_LIB")
    if env:
        return Path(env).expanduser() if Path(env).expanduser().is_file() else None
    if not SOURCE.is_file() or not cache_root().is_dir():
        return None
    want = _source_hash()
    for meta in sorted(cache_root().glob("unload-*/meta.json")):
        try:
            if json.loads(meta.read_text()).get("source_sha256") == want and (meta.parent / LIB_NAME).is_file():
                return meta.parent / LIB_NAME
        except (OSError, ValueError):
            continue
    return None


def available() -> bool:
    """Whether the library can be had here: nvcc and the source to build it, or a prebuilt one."""
    if os.environ.get("PLORA_CSRC_LIB"):
        return _prebuilt() is not None
    return (nvcc_path() is not None and SOURCE.is_file()) or _prebuilt() is not None


def build(verbose: bool = False) -> Path:
    """Compile csrc/plora_unload.cu into the cache (once per source/flags/nvcc) and return the library's path.

    Raises RuntimeError, with nvcc's command line and stderr, if the compile fails, and when there is no nvcc
    and no prebuilt library.
    """
    nvcc = nvcc_path()
    if os.environ.get("PLORA_CSRC_LIB") or nvcc is None:
        lib = _prebuilt()
        if lib is None:
            where = os.environ.get("PLORA_CSRC_LIB") or f"a cached build under {cache_root()}"
            raise RuntimeError(f"plora CUDA unload: no nvcc found (PATH, $CUDA_HOME, /usr/local/cuda) and no "
                               f"prebuilt library ({where})")
        return lib
    if not SOURCE.is_file():
        raise RuntimeError(f"plora CUDA unload: source not found at {SOURCE}")
    out_dir = _build_dir(nvcc)
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)  # concurrent builders: last wins
    os.close(fd)
    cmd = [nvcc, *FLAGS, "-o", tmp, str(SOURCE)]
    if verbose:
        print(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"plora CUDA unload: nvcc failed (exit {proc.returncode})\n$ {' '.join(cmd)}\n"
                           f"{proc.stderr}{proc.stdout}")
    if verbose and (proc.stderr or proc.stdout):
        print(proc.stderr + proc.stdout)
    os.replace(tmp, lib)
    (out_dir / "meta.json").write_text(json.dumps({
        "source": str(SOURCE), "source_sha256": _source_hash(), "flags": list(FLAGS),
        "nvcc_version": _nvcc_version(nvcc).strip().splitlines()[-1]}, indent=1))
    return lib


_I64, _U64, _INT, _F32, _P = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_COMMON = [_P, _INT, _P, _INT, _P, _INT, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _U64,
           ctypes.c_uint32, _INT, _INT]


@functools.cache
def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.plora_unload_abi_version.restype = _INT
    if lib.plora_unload_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version {lib.plora_unload_abi_version()}, expected {ABI_VERSION}")
    lib.plora_unload_launch.argtypes = [*_COMMON, _INT, _P]
    lib.plora_unload_launch.restype = _INT
    lib.plora_unload_host.argtypes = list(_COMMON)
    lib.plora_unload_host.restype = _INT
    lib.plora_rounding_bits_host.argtypes = [_U64, ctypes.c_uint32, ctypes.c_uint32, _I64, _P]
    lib.plora_rounding_bits_host.restype = _INT
    lib.plora_unload_error_string.argtypes = [_INT]
    lib.plora_unload_error_string.restype = ctypes.c_char_p
    return lib


def library() -> ctypes.CDLL:
    """The loaded library (built first if needed)."""
    with _lock:
        return _load(str(build()))


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"plora CUDA unload: {what} failed with code {code}: "
                           f"{lib.plora_unload_error_string(code).decode()}")


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _args(weight, lora_A, lora_B, coef, rounding, seed, write, row_offset, device_type):
    """The C arguments (all but the launcher's sm_count and stream) and the zeroed flag they point to."""
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D tensor, got "
                            f"{f'{t.dim()}-D' if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"the CUDA unload kernel takes fp16/bf16/fp32 tensors, got {name} of {t.dtype} "
                            "(fp64 merges run on the Triton kernel)")
        if t.device.type != device_type:
            raise ValueError(f"{name} must be on a {device_type} device, got {t.device}")
    if lora_A.device != weight.device or lora_B.device != weight.device:
        raise ValueError(f"weight, lora_A and lora_B must share a device, got {weight.device}, {lora_A.device}, "
                         f"{lora_B.device}")
    M, N = weight.shape
    R = lora_A.shape[0]
    if lora_A.shape[1] != N or tuple(lora_B.shape) != (M, R):
        raise ValueError(f"expected lora_A ({R}, {N}) and lora_B ({M}, {R}) for weight ({M}, {N}), got "
                         f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}")
    if rounding not in _ROUNDING:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if not isinstance(write, (bool, int)):
        raise TypeError(f"write must be a bool, got {type(write).__name__}")
    try:
        seed, row_offset = operator.index(seed), operator.index(row_offset)
    except TypeError:
        raise TypeError(f"seed and row_offset must be ints, got {type(seed).__name__} and "
                        f"{type(row_offset).__name__}") from None
    if not 0 <= row_offset < 2**32:
        raise ValueError(f"row_offset must be in [0, 2**32) (the stream's row counter), got {row_offset}")
    flag = torch.zeros(1, dtype=torch.int32, device=weight.device)
    return [
        weight.data_ptr(), _DTYPE_CODE[weight.dtype], lora_A.data_ptr(), _DTYPE_CODE[lora_A.dtype],
        lora_B.data_ptr(), _DTYPE_CODE[lora_B.dtype], flag.data_ptr(), M, N, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(coef),  # rounded to fp32 by ctypes, as the reference and the Triton kernel round it
        seed & 0xFFFFFFFFFFFFFFFF,  # the Philox key's two words, as ops.streams splits it
        row_offset,  # the stream counts the full weight's rows
        _ROUNDING[rounding], 1 if write else 0,
    ], flag


def merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, coef: float, rounding: str,
           seed: int, *, write: bool, row_offset: int = 0) -> torch.Tensor:
    """One pass of W <- round(W + coef B A) on CUDA tensors, on the current stream of W's device.

    ``write=False`` is the check pass: nothing is written, and the returned int32 tensor of shape (1,) on W's
    device holds 1 if some merged value is not finite in W's dtype (overflow, a non-finite value already in W,
    a non-finite factor), else 0. ``write=True`` merges in place and returns a zero flag. The values are those of
    ``ops.reference.merge_value`` and of the Triton kernel's rank-1 path: B A summed over k in order in fp32, one
    rounding (nearest-even, or stochastic with ``ops.streams.rounding_bits`` of ``seed``; none for fp32 W);
    ``row_offset``: W is rows [row_offset, ...) of a larger weight, whose random numbers those rows take.
    W, A and B are fp16/bf16/fp32 with any strides (fp64 raises TypeError: ops.merge sends it to Triton).
    """
    args, flag = _args(weight, lora_A, lora_B, coef, rounding, seed, write, row_offset, "cuda")
    lib = library()
    if weight.numel() == 0:
        return flag
    with torch.cuda.device(weight.device):
        stream = torch.cuda.current_stream(weight.device).cuda_stream
        _check(lib, lib.plora_unload_launch(*args, _sm_count(weight.device.index), stream), "kernel launch")
    return flag


def merge_host_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, coef: float, rounding: str,
                seed: int, *, write: bool, row_offset: int = 0) -> torch.Tensor:
    """:func:`merge_` on CPU tensors through the library's host loop (the kernel's element math; for tests)."""
    args, flag = _args(weight, lora_A, lora_B, coef, rounding, seed, write, row_offset, "cpu")
    lib = library()
    _check(lib, lib.plora_unload_host(*args), "host merge")
    return flag


def rounding_bits_host(seed: int, row: int, col0: int, n: int) -> torch.Tensor:
    """The 16 stochastic-rounding bits (int32 in [0, 2**16)) of columns col0 .. col0 + n - 1 of row ``row`` of a
    full weight, as the library computes them (host), for tests against ``ops.streams.rounding_bits``."""
    out = torch.full((n,), -1, dtype=torch.int32)
    lib = library()
    _check(lib, lib.plora_rounding_bits_host(int(seed) & 0xFFFFFFFFFFFFFFFF, row & 0xFFFFFFFF, col0 & 0xFFFFFFFF,
                                             n, out.data_ptr()), "rounding_bits_host")
    return out
