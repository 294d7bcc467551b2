"""What the launchers choose per GPU without a GPU: every architecture gets tiles that fit its shared memory (by
the bound the compile matrix checks against the compiled kernels), a pinned launch (PLORA_AUTOTUNE=0) gets the
first that fits, and where nothing fits the launch says so or falls back (never a launch that cannot run)."""
import types

import pytest
import torch

pytest.importorskip("triton")

from plora_kernels.ops.triton import limits, lora_dy_pass, lora_matmul, lora_matmul_tma, tiles  # noqa: E402

ARCHS = list(limits.MATRIX_ARCHS) + [86, 120]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("block_r", [16, 32, 64])
def test_every_architecture_gets_gemm_tiles_that_fit(arch, dtype, dropout, block_r):
    tiles = lora_matmul.gemm_configs(arch, dtype, dropout=dropout, block_r=block_r)
    assert tiles, (arch, dtype, dropout, block_r)
    for m, n, k, stages, _ in tiles:
        assert limits.gemm_shared(m, n, k, stages, dtype.itemsize, block_r) <= limits.shared_per_block(arch)
    pinned = lora_matmul.gemm_configs(arch, dtype, dropout=dropout, block_r=block_r, tuning=False)
    assert pinned == tiles[:1]


def test_the_smallest_shared_memory_loses_the_big_tiles():
    big = lora_matmul.gemm_configs(90, torch.bfloat16, block_r=16)
    small = lora_matmul.gemm_configs(89, torch.bfloat16, block_r=16)
    assert (128, 256, 64, 3, 8) in big and all(m * n < 128 * 256 for m, n, *_ in small)
    # the device's own figure wins over the table: a device reporting less keeps less
    assert lora_matmul.gemm_configs(90, torch.bfloat16, block_r=16, limit=100_000) != big


def test_autotune_pruning_asks_the_launch_device(monkeypatch):
    monkeypatch.setattr(limits, "arch_of", lambda device: 89)
    monkeypatch.setattr(limits, "device_shared", lambda device: limits.SHARED_PER_BLOCK[89])
    monkeypatch.setenv("PLORA_AUTOTUNE", "1")
    configs = [tiles.tile_config(c) for c in lora_matmul.HOPPER_16 + lora_matmul.AMPERE_16]
    a = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    kept = lora_matmul.prune(configs, {"a_ptr": a}, DROP=0, BLOCK_R=64)
    assert kept and all(tiles.tile_shape(c) in lora_matmul.gemm_configs(89, torch.bfloat16, block_r=64)
                        for c in kept)
    monkeypatch.setenv("PLORA_AUTOTUNE", "0")  # pinned: exactly the first that fits
    assert len(lora_matmul.prune(configs, {"a_ptr": a}, DROP=0, BLOCK_R=64)) == 1
    with pytest.raises(RuntimeError, match="no tile fits"):  # nothing of the list fits: said, not launched
        lora_matmul.prune(configs[:1], {"a_ptr": a}, DROP=0, BLOCK_R=64)


@pytest.mark.parametrize("arch", [90, 100])
def test_tma_tiles_fit_and_fp32_takes_them_only_at_low_rank(arch):
    for dtype in (torch.bfloat16, torch.float32):
        for m, n, k, stages, _ in lora_matmul_tma.tma_configs(arch, dtype, block_r=16):
            assert lora_matmul_tma.tma_shared(m, n, k, stages, dtype.itemsize, 16) <= limits.shared_per_block(arch)
    assert lora_matmul_tma.tma_configs(arch, torch.bfloat16, block_r=64)


@pytest.mark.parametrize("arch", ARCHS)
def test_dy_pass_fits_or_falls_back(arch):
    for dtype in (torch.bfloat16, torch.float16):
        for r in (1, 16, 33, 64):
            m, n, _, stages = lora_dy_pass.config(arch, dtype, r)
            block_r = max(16, 1 << (r - 1).bit_length())
            assert lora_dy_pass.dy_pass_shared(m, n, stages, block_r, 2) <= limits.shared_per_block(arch)
    assert lora_dy_pass.config(arch, torch.float32, 16) is not None
    assert lora_dy_pass.config(arch, torch.float32, 17) is None  # fp32 dy spills from r = 32: two GEMMs
    assert lora_dy_pass.config(arch, torch.bfloat16, lora_dy_pass.MAX_RANK + 1) is None
