"""csrc/plora_unload.cu, the CUDA C++ twin of the Triton unload merge.

Without a GPU the library's host entry point (the same __host__ __device__ element math in a CPU loop) is
tested against the reference and, bit for bit, against the Triton kernel run by Triton's interpreter in a
subprocess. With a GPU the kernel itself is tested against both and against the host loop.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from plora_kernels.ops import cuda_unload as cu
from plora_kernels.ops import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_BUILD = {}


@pytest.fixture(scope="module", autouse=True)
def _fresh_cache(tmp_path_factory):
    """Build into a fresh folder so this run really compiles the source (and leaves the user's cache alone)."""
    with pytest.MonkeyPatch.context() as mp:
        if cu.nvcc_path() is not None and not os.environ.get("PLORA_CSRC_LIB"):
            mp.setenv("PLORA_CSRC_CACHE", str(tmp_path_factory.mktemp("csrc_cache")))
        yield


def _build_once():
    if not _BUILD:
        t0 = time.perf_counter()
        try:
            _BUILD["path"] = cu.build()
        except RuntimeError as exc:
            _BUILD["error"] = exc
        _BUILD["seconds"] = time.perf_counter() - t0
    return _BUILD


def _need_lib():
    if not cu.available():
        pytest.skip("no nvcc and no prebuilt csrc library")
    built = _build_once()
    if "error" in built:
        pytest.fail(f"csrc/plora_unload.cu did not build:\n{built['error']}")


def _key(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern mapped to a monotone integer, so |key(x) - key(y)| counts ulps (and +0 == -0)."""
    ib, bits = (torch.int32, 32) if t.dtype == torch.float32 else (torch.int16, 16)
    b = t.view(ib).to(torch.int64)
    return torch.where(b < 0, -(b & ((1 << (bits - 1)) - 1)), b)


def _ulps(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (_key(x) - _key(y)).abs()


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    ib = torch.int32 if x.dtype == torch.float32 else torch.int16
    return torch.equal(x.contiguous().view(ib), y.contiguous().view(ib))


def _data(M, N, r, w_dtype, f_dtype, device="cpu"):
    W = torch.randn(M, N, device=device).to(w_dtype)
    A = (torch.randn(r, N, device=device) * 0.3).to(f_dtype)
    B = (torch.randn(M, r, device=device) * 0.3).to(f_dtype)
    return W, A, B


# (a) ---------------------------------------------------------------------------------------------------------
def test_cu_compiles_with_nvcc():
    if cu.nvcc_path() is None:
        pytest.skip("nvcc not found")
    built = _build_once()
    if "error" in built:  # a compile error must fail the suite, never skip it
        pytest.fail(f"nvcc failed on csrc/plora_unload.cu:\n{built['error']}")
    path = built["path"]
    assert path.is_file() and path.stat().st_size > 0
    lib = cu.library()  # loads without a GPU driver: nothing touches CUDA until a launch
    assert lib.plora_unload_abi_version() == cu.ABI_VERSION
    assert cu.build() == path  # cached: same source, flags and nvcc


def test_build_error_is_reported(tmp_path, monkeypatch):
    if cu.nvcc_path() is None:
        pytest.skip("nvcc not found")
    bad = tmp_path / "bad.cu"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cu, "SOURCE", bad)
    monkeypatch.setenv("PLORA_CSRC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="nvcc failed") as info:
        cu.build()
    assert "bad.cu" in str(info.value)  # nvcc's own message comes along


# (b) ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("factors", ["fp32", "16bit"])
def test_host_nearest_matches_reference(w_dtype, r, factors):
    _need_lib()
    f_dtype = torch.float32 if factors == "fp32" else (w_dtype if w_dtype != torch.float32 else torch.bfloat16)
    W, A, B = _data(77, 129, r, w_dtype, f_dtype)
    coef = 0.9 * 2.0 / r
    new = W.clone()
    stats = cu.merge_host_(new, A, B, coef, "nearest", 0, write=True)
    want = reference.unload_value(W, A, B, coef, 0.0, "nearest")
    if w_dtype == torch.float32:
        # no rounding step: only the fp32 sum order differs (the reference uses a BLAS matmul), so the results
        # agree to a few fp32 ulps of the terms (more ulps of the result only where W and the update cancel)
        terms = W.double().abs() + coef * (B.double().abs() @ A.double().abs())
        assert ((new.double() - want.double()).abs() <= 2.0**-21 * terms).all()
    else:
        # one rounding of nearly the same fp32 value: equal but for rare near-ties, which move by one ulp
        d = _ulps(new, want)
        assert d.max().item() <= 1
        assert (d > 0).float().mean().item() <= 2e-3
    assert stats.item() == new.float().abs().max().item()


def test_host_strided_factors_and_weight():
    _need_lib()
    W, A, B = _data(40, 72, 5, torch.bfloat16, torch.float32)
    At = A.t().contiguous().t()  # column-major A
    Bt = B.t().contiguous().t()
    big = torch.randn(40, 100).to(torch.bfloat16)
    Wv = big[:, 7:79]  # W as a view with a row stride of 100
    Wv.copy_(W)
    Wt = W.t().contiguous().t()  # W with stride (1, 40): the host loop handles any strides
    frame = big.clone()
    cu.merge_host_(Wv, At, Bt, 0.7, "stochastic", 99, write=True)
    cu.merge_host_(Wt, A, B, 0.7, "stochastic", 99, write=True)
    ref = W.clone()
    cu.merge_host_(ref, A, B, 0.7, "stochastic", 99, write=True)
    assert _bits_equal(Wv, ref) and _bits_equal(Wt, ref)
    assert not _bits_equal(ref, W)
    # nothing outside the view moved
    assert _bits_equal(big[:, :7], frame[:, :7]) and _bits_equal(big[:, 79:], frame[:, 79:])


def _philox4x32_10(seed: int, c0: int, c1: int) -> list[int]:
    """Philox4x32-10 (Salmon et al. 2011; Triton's constants), counter (c0, c1, 0, 0), in plain Python ints."""
    m = 0xFFFFFFFF
    c = [c0 & m, c1 & m, 0, 0]
    k0, k1 = seed & m, (seed >> 32) & m
    for _ in range(10):
        p0, p2 = c[0], c[2]
        c = [((0xCD9E8D57 * p2) >> 32) ^ c[1] ^ k0, (0xCD9E8D57 * p2) & m,
             ((0xD2511F53 * p0) >> 32) ^ c[3] ^ k1, (0xD2511F53 * p0) & m]
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c


def test_host_uniforms_are_16_bits_of_philox_per_element():
    """Element (row, j) takes half j % 2 of word (j % 8) // 2 of Philox(counter (j // 8, row)): 8 per call."""
    _need_lib()
    seed, row = 2**33 + 7, 2**32 - 1  # a seed with high bits; the largest row
    got = cu.sr_uniform_host(seed, row, 5, 19)  # columns 5 .. 23: three groups, partial at both ends
    want = []
    for j in range(5, 24):
        word = _philox4x32_10(seed, j // 8, row)[(j % 8) // 2]
        want.append((((word >> (16 * (j % 2))) & 0xFFFF) + 0.5) / 65536)
    assert got.tolist() == want
    assert ((got > 0) & (got < 1)).all()


# (c) ---------------------------------------------------------------------------------------------------------
_TRITON_SCRIPT = textwrap.dedent("""
    import sys, torch
    from plora_kernels.ops.triton.unload import merge_
    cases = torch.load(sys.argv[1])
    out = []
    for c in cases:
        W = c["W"].clone()
        stats = merge_(W, c["A"], c["B"], c["coef"], c["rounding"], c["seed"], write=c["write"])
        out.append({"W": W, "stats": stats})
    torch.save(out, sys.argv[2])
""")


def _triton_interpreted(cases, tmp_path):
    pytest.importorskip("triton")
    src, dst = tmp_path / "cases.pt", tmp_path / "out.pt"
    torch.save(cases, src)
    env = dict(os.environ, TRITON_INTERPRET="1", PLORA_BACKEND="triton")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(src), str(dst)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(dst)


def test_host_matches_triton_interpreter_bit_for_bit(tmp_path):
    _need_lib()
    cases = []
    # ranks below 16 take the Triton kernel's rank-1 path, whose fp32 sum runs k = 0..r-1 like ours;
    # 16-bit factors are added at r = 16 and 64 too (the interpreter's dot agrees there on this data)
    specs = [(w, f, r, rnd) for w in (torch.float16, torch.bfloat16) for f in ("fp32", "16bit")
             for r in (1, 3, 8) for rnd in ("stochastic", "nearest")]
    specs += [(w, "16bit", r, "stochastic") for w in (torch.float16, torch.bfloat16) for r in (16, 64)]
    specs += [(torch.float32, "fp32", 3, "stochastic")]
    for seed, (w_dtype, factors, r, rnd) in enumerate(specs):
        f_dtype = torch.float32 if factors == "fp32" else w_dtype
        W, A, B = _data(77, 129, r, w_dtype, f_dtype)
        cases.append({"W": W, "A": A, "B": B, "coef": 0.37 * 2.0 / r, "rounding": rnd, "seed": 1000 + 7919 * seed,
                      "write": True})
    # a strided W (row stride 150) and a transposed A
    W, A, B = _data(50, 130, 5, torch.float16, torch.float32)
    big = torch.randn(50, 150).to(torch.float16)
    big[:, 3:133] = W
    cases.append({"W": big[:, 3:133], "A": A.t().contiguous().t(), "B": B, "coef": 0.5, "rounding": "stochastic",
                  "seed": 2**31 - 2, "write": True})
    got = _triton_interpreted(cases, tmp_path)
    for c, g in zip(cases, got):
        mine = c["W"].clone()
        stats = cu.merge_host_(mine, c["A"], c["B"], c["coef"], c["rounding"], c["seed"], write=True)
        label = f"{c['W'].dtype} r={c['A'].shape[0]} {c['A'].dtype} {c['rounding']}"
        assert _bits_equal(mine, g["W"]), label
        assert stats.item() == g["stats"].item(), label
        assert not _bits_equal(mine, c["W"]), label  # the merge did something


def test_stochastic_seed_reproducible_and_unbiased():
    _need_lib()
    W, A, B = _data(64, 128, 4, torch.bfloat16, torch.float32)
    A.mul_(0.01)  # updates far below one ulp
    outs = []
    for seed in range(32):
        new = W.clone()
        cu.merge_host_(new, A, B, 1.0, "stochastic", seed, write=True)
        outs.append(new.double())
    again = W.clone()
    cu.merge_host_(again, A, B, 1.0, "stochastic", 5, write=True)
    assert torch.equal(again.double(), outs[5])
    assert not torch.equal(outs[0], outs[1])
    exact = W.double() + (B.double() @ A.double())
    mean_err = (torch.stack(outs).mean(0) - exact).abs().mean()
    nearest_err = (reference.unload_value(W, A, B, 1.0).double() - exact).abs().mean()
    assert mean_err < 0.35 * nearest_err


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16])
def test_row_shards_round_as_the_full_weight(w_dtype):
    """A row shard with its row_offset takes the full weight's random numbers (FSDP2's sharded unload)."""
    _need_lib()
    W, A, B = _data(37, 70, 3, w_dtype, torch.float32)
    full = W.clone()
    cu.merge_host_(full, A, B, 0.9, "stochastic", 77, write=True)
    for start, stop in ((0, 13), (13, 26), (26, 37)):
        shard = W[start:stop].clone()
        cu.merge_host_(shard, A, B[start:stop], 0.9, "stochastic", 77, write=True, row_offset=start)
        assert _bits_equal(shard, full[start:stop]), (start, stop)
    shard = W[13:26].clone()
    cu.merge_host_(shard, A, B[13:26], 0.9, "stochastic", 77, write=True)  # without the offset: other numbers
    assert not _bits_equal(shard, full[13:26])


# (d) ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dry_run_writes_nothing_and_flags_overflow(w_dtype, rounding):
    _need_lib()
    W, A, B = _data(33, 70, 4, w_dtype, torch.float32)
    before = W.clone()
    # a dry run of a safe merge: W untouched, stats = max |new W| of the real run
    dry = cu.merge_host_(W, A, B, 0.5, rounding, 11, write=False)
    assert _bits_equal(W, before)
    real = W.clone()
    stats = cu.merge_host_(real, A, B, 0.5, rounding, 11, write=True)
    assert dry.item() == stats.item() == real.float().abs().max().item()
    # overflow in one element: +inf reported, nothing written
    big = torch.finfo(w_dtype).max
    W[5, 9] = big
    B[5].fill_(1.0)
    A[:, 9].fill_(1.0)
    before = W.clone()
    dry = cu.merge_host_(W, A, B, big / 8, rounding, 11, write=False)
    assert dry.item() == float("inf")
    assert _bits_equal(W, before)
    # a NaN already in W is reported as non-finite as well
    W[0, 0] = float("nan")
    assert cu.merge_host_(W, A * 0, B * 0, 1.0, rounding, 0, write=False).item() == float("inf")


def test_fp16_rounds_to_inf_at_the_edge():
    _need_lib()
    W = torch.full((2, 8), 65504.0, dtype=torch.float16)
    A = torch.ones(1, 8)
    B = torch.tensor([[8.0], [16.0]])  # 65512 rounds down to 65504; 65520 is a tie: to even, 65536 = inf
    stats = cu.merge_host_(W.clone(), A, B, 1.0, "nearest", 0, write=False)
    new = W.clone()
    cu.merge_host_(new, A, B, 1.0, "nearest", 0, write=True)
    assert (new[0] == 65504).all() and torch.isinf(new[1]).all()
    assert stats.item() == float("inf")


def test_bad_arguments():
    _need_lib()
    W, A, B = _data(8, 16, 2, torch.float16, torch.float32)
    with pytest.raises(ValueError, match="lora_B"):
        cu.merge_host_(W, A, B[:4], 1.0, "nearest", 0, write=True)
    with pytest.raises(TypeError, match="float64"):
        cu.merge_host_(W, A.double(), B, 1.0, "nearest", 0, write=True)
    with pytest.raises(ValueError, match="rounding"):
        cu.merge_host_(W, A, B, 1.0, "up", 0, write=True)
    with pytest.raises(ValueError, match="cuda"):
        cu.merge_(W, A, B, 1.0, "nearest", 0, write=True)


# (e) ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cuda_twin_matches_triton_reference_and_host(w_dtype, rounding):
    _need_lib()
    from plora_kernels.ops.triton.unload import merge_ as triton_merge_

    W, A, B = _data(1024, 1536, 16, w_dtype, torch.float32, device="cuda")
    coef = 0.37
    mine = W.clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.max_memory_allocated()
    stats = cu.merge_(mine, A, B, coef, rounding, 4242, write=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**20  # the 4-byte stats only: no W-sized temporary

    # the GPU kernel is the host loop's arithmetic exactly
    host = W.cpu()
    host_stats = cu.merge_host_(host, A.cpu(), B.cpu(), coef, rounding, 4242, write=True)
    assert _bits_equal(mine.cpu(), host)
    assert stats.item() == host_stats.item() == mine.float().abs().max().item()

    # Triton on the GPU contracts multiply-adds into FMAs: fp32 values differ in the last bit now and then
    theirs = W.clone()
    triton_stats = triton_merge_(theirs, A, B, coef, rounding, 4242, write=True)
    if w_dtype == torch.float32:
        terms = W.double().abs() + coef * (B.double().abs() @ A.double().abs())
        assert ((mine.double() - theirs.double()).abs() <= 2.0**-21 * terms).all()
    else:
        d = _ulps(mine, theirs)
        assert d.max().item() <= 1 and (d > 0).float().mean().item() <= 1e-3
        assert abs(stats.item() - triton_stats.item()) <= 2 ** (-7) * stats.item()
        if rounding == "nearest":
            d = _ulps(mine, reference.unload_value(W, A, B, coef, 0.0, "nearest"))
            assert d.max().item() <= 1 and (d > 0).float().mean().item() <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.float32])
def test_cuda_twin_ragged_misaligned_strided(w_dtype):
    _need_lib()
    W, A, B = _data(203, 333, 20, w_dtype, torch.bfloat16, device="cuda")
    big = torch.randn(203, 340, device="cuda").to(w_dtype)
    view = big[:, 1:334]  # rows start off the 16-byte grid, N is ragged: the scalar path
    view.copy_(W)
    frame = big.clone()
    for dry in (True, False):
        stats = cu.merge_(view, A.t().contiguous().t(), B, 0.8, "stochastic", 3, write=not dry)
        host = W.cpu()
        host_stats = cu.merge_host_(host, A.cpu(), B.cpu(), 0.8, "stochastic", 3, write=not dry)
        assert stats.item() == host_stats.item()
    assert _bits_equal(view.cpu(), host)
    assert _bits_equal(big[:, :1], frame[:, :1]) and _bits_equal(big[:, 334:], frame[:, 334:])
    Wt = W.t().contiguous().t()  # stride (1, 203) along N: the scalar path again
    cu.merge_(Wt, A, B, 0.8, "stochastic", 3, write=True)
    assert _bits_equal(Wt.cpu(), host)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_twin_dry_run_overflow():
    _need_lib()
    W, A, B = _data(256, 512, 8, torch.float16, torch.float32, device="cuda")
    W[100, 200] = 65504.0
    B[100].fill_(1.0)
    A[:, 200].fill_(1.0)
    before = W.clone()
    assert cu.merge_(W, A, B, 1000.0, "nearest", 0, write=False).item() == float("inf")
    assert _bits_equal(W, before)


def test_unload_kernel_choice_is_validated(monkeypatch):
    from plora_kernels import _backend

    monkeypatch.setenv("PLORA_UNLOAD_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="PLORA_UNLOAD_KERNEL"):
        _backend.requested_unload_kernel()
    monkeypatch.setenv("PLORA_UNLOAD_KERNEL", "cuda")
    assert _backend.requested_unload_kernel() == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_unload_through_the_cuda_twin_equals_triton(monkeypatch, rounding):
    """PLORA_UNLOAD_KERNEL=cuda routes plora_kernels.unload_ through csrc/ with the same result, bit for bit."""
    _need_lib()
    import plora_kernels as pk

    W, A, B = _data(300, 520, 16, torch.bfloat16, torch.float32, device="cuda")
    outs = []
    for kernel in ("triton", "cuda"):
        monkeypatch.setenv("PLORA_UNLOAD_KERNEL", kernel)
        w, a, b = W.clone(), A.clone(), B.clone()
        pk.unload_(w, a, b, 2.0, momentum=0.1, rounding=rounding, generator=torch.Generator("cuda").manual_seed(3))
        outs.append((w, a, b))
    for x, y in zip(*outs):
        assert _bits_equal(x, y)
