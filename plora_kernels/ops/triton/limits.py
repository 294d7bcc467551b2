"""What a GPU architecture allows a kernel, in one table: the launchers pick configurations that fit the device
they run on, and the compile matrix (``ops.triton.aot``) proves on a CPU that every pick compiles and fits.

A configuration over the per-block shared-memory limit is not a slow kernel but a launch error at the user's first
training step ("out of resource: shared memory"), and where the limit is lowest (sm_86, sm_89, sm_120: 99 KiB)
the Hopper-sized tiles do not fit at all. Hence the launchers never pin a tile without asking :func:`fits`.
"""
from __future__ import annotations

import functools

import torch

# the opt-in maximum of dynamic shared memory per block (CUDA programming guide, "compute capabilities"), bytes
SHARED_PER_BLOCK = {
    80: 166_912, 87: 166_912,  # A100, Orin
    86: 101_376, 89: 101_376, 120: 101_376,  # RTX 30xx/A10/A40, RTX 40xx/L4/L40S, RTX 50xx
    90: 232_448, 100: 232_448, 103: 232_448,  # H100/H200, B200/GB200, B300
}
SMALLEST_SHARED = min(SHARED_PER_BLOCK.values())
# the data-centre GPUs with wgmma/tcgen05 and 227 KiB per block, where Hopper-sized tiles pay; every other
# architecture (sm_8x, and sm_120's consumer Blackwell) takes the Ampere-sized tiles
BIG_TILE_ARCHS = (90, 100, 103)
# the architectures the compile matrix builds for: the oldest supported (A100), the tightest shared memory
# (sm_89), Hopper and Blackwell
MATRIX_ARCHS = (80, 89, 90, 100)


def shared_per_block(arch: int) -> int:
    """The per-block shared-memory limit of ``arch`` (e.g. 90); an unknown one gets the smallest we know."""
    return SHARED_PER_BLOCK.get(arch, SMALLEST_SHARED)


def arch_of(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device (90 for sm_90); 0 for anything else (the interpreter's CPU)."""
    if device.type != "cuda":
        return 0
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@functools.cache
def _device_shared(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 0) or shared_per_block(_capability(index))


def device_shared(device: torch.device) -> int | None:
    """The shared memory one block may use on ``device`` (the driver's answer), None off a GPU (no limit)."""
    if device.type != "cuda":
        return None
    return _device_shared(device.index if device.index is not None else torch.cuda.current_device())


SLACK = 1024  # barriers and small scratch Triton adds to a kernel's own buffers (seen: 16 B on sm_100)


def gemm_shared(block_m: int, block_n: int, block_k: int, stages: int, itemsize: int, block_r: int = 16) -> int:
    """An upper bound of a pipelined GEMM tile's shared memory: ``stages`` buffers of the K loop's operands (Hopper
    keeps that many; Ampere's cp.async pipeline one fewer, but a dropout mask's layout change can use the spare),
    the low-rank tiles twice (loaded, then converted for the dot) and :data:`SLACK`. The compile matrix checks
    the bound against every compiled configuration: the launch-time choice by it is only sound if it holds."""
    return (stages * (block_m * block_k + block_k * block_n) * itemsize + 2 * (block_m + block_n) * block_r * itemsize
            + SLACK)


def fits(shared_bytes: int, arch: int, limit: int | None = None) -> bool:
    """Whether ``shared_bytes`` fit one block on ``arch`` (or under ``limit``, the device's own answer)."""
    return shared_bytes <= (limit if limit is not None else shared_per_block(arch))
