"""csrc/plora_unload.cu, the CUDA C++ twin of the Triton unload merge (ABI 4).

Without a GPU the library's host entry point (the same __host__ __device__ element math in a CPU loop) is
tested bit for bit against the reference (``ops.reference.merge_value``) and against the Triton kernel run by
Triton's interpreter in a subprocess. With a GPU the kernel itself is tested against the host loop, against the
Triton kernel and through the public ``unload_`` with ``PLORA_UNLOAD_KERNEL=cuda``.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from plora_kernels.ops import cuda_unload as cu, reference, streams

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HALF = [torch.float16, torch.bfloat16]
_BUILD = {}
each_rounding = pytest.mark.parametrize("rounding", ["nearest", "stochastic"])


def gpu(test):
    """A test of the device kernel: marked gpu, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


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


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(_int_view(x.cpu()), _int_view(y.cpu()))


def _data(M, N, r, w_dtype, f_dtype, device="cpu", b_dtype=None):
    """Random W, A, B as a trained layer has them (never zeros)."""
    W = torch.randn(M, N, device=device).to(w_dtype)
    A = (torch.randn(r, N, device=device) * 0.3).to(f_dtype)
    B = (torch.randn(M, r, device=device) * 0.3).to(b_dtype or f_dtype)
    return W, A, B


def _flag(f: torch.Tensor) -> int:
    assert f.dtype == torch.int32 and tuple(f.shape) == (1,)
    return int(f.item())


def _host(W, A, B, coef, rounding, seed, row_offset=0):
    """The host loop's merge of a copy of W: (new W, flag of the check pass on the original)."""
    before = W.clone()
    flag = _flag(cu.merge_host_(W, A, B, coef, rounding, seed, write=False, row_offset=row_offset))
    assert _bits_equal(W, before)  # the check pass writes nothing
    new = W.clone()
    assert _flag(cu.merge_host_(new, A, B, coef, rounding, seed, write=True, row_offset=row_offset)) == 0
    return new, flag


# (a) build ---------------------------------------------------------------------------------------------------
def test_cu_compiles_with_nvcc():
    if cu.nvcc_path() is None:
        pytest.skip("nvcc not found")
    built = _build_once()
    if "error" in built:  # a compile error must fail the suite, never skip it
        pytest.fail(f"nvcc failed on csrc/plora_unload.cu:\n{built['error']}")
    path = built["path"]
    assert path.is_file() and path.stat().st_size > 0
    lib = cu.library()  # loads without a GPU driver: nothing touches CUDA until a launch
    assert lib.plora_unload_abi_version() == cu.ABI_VERSION == 4
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


# (b) the host loop against the reference, bit for bit -------------------------------------------------------
_CASES = [(w, f, rnd) for w in HALF for f in DTYPES[:3] for rnd in ("nearest", "stochastic")]
_CASES += [(torch.float32, f, "nearest") for f in DTYPES]


@pytest.mark.parametrize("w_dtype,f_dtype,rounding", _CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_host_matches_reference_bit_for_bit(w_dtype, f_dtype, rounding):
    _need_lib()
    for r in (1, 3, 8):
        W, A, B = _data(77, 129, r, w_dtype, f_dtype)
        coef = 0.37 * 2.0 / r
        new, flag = _host(W, A, B, coef, rounding, 1000 + r)
        want = reference.merge_value(W, A, B, coef, rounding, 1000 + r)
        assert _bits_equal(new, want), (r, (_int_view(new) != _int_view(want)).sum().item())
        assert flag == 0
        assert not _bits_equal(new, W)  # the merge did something


def _wide(M, N, w_dtype):
    """W tiny and B A spread over the whole range of W's format (fp16: subnormals up to past 65504; bf16: fp32
    subnormals up to past bf16's max), with inf and NaN already in W: every branch of the rounding."""
    lo, hi, w_exp = (-40, 18, -20) if w_dtype == torch.float16 else (-150, 128, -128)
    e = torch.randint(lo, hi, (M, 1)).double()
    B = (torch.sign(torch.randn(M, 1)) * (1 + torch.rand(M, 1)) * 2.0 ** e).float()
    A = 1 + torch.rand(1, N)
    W = (torch.randn(M, N).double() * 2.0**w_exp).to(w_dtype)
    W[0, 0], W[1, 1], W[2, 2] = float("nan"), float("inf"), -float("inf")
    return W, A, B


@pytest.mark.parametrize("w_dtype", HALF)
@each_rounding
def test_host_rounding_over_the_whole_range(w_dtype, rounding):
    """The bit-level RNE and the integer stochastic rounding are reference.round_to, bit for bit, from
    subnormals to overflow (NaN compared as NaN)."""
    _need_lib()
    W, A, B = _wide(400, 72, w_dtype)
    new, flag = _host(W, A, B, 1.0, rounding, 321)
    want = reference.merge_value(W, A, B, 1.0, rounding, 321)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(new), nan)
    assert _bits_equal(new[~nan], want[~nan])
    tiny = want.abs() < torch.finfo(w_dtype).tiny
    assert (tiny & (want != 0)).sum() > 50 and torch.isinf(want).sum() > 10  # subnormals and overflow were hit
    assert flag == 1


def _crafted_fp32(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values that hit every branch of a conversion into ``dtype``: random bit patterns over the whole
    range (fp32 subnormals included), exact ties and their neighbours (fp16: every subnormal tie), the largest
    finite, inf, NaNs whose payload a stochastic carry would push into the sign bit, and both zeros."""
    g = torch.Generator().manual_seed(7)
    rand = torch.randint(0, 2**31, (6000,), generator=g, dtype=torch.int64)
    if dtype == torch.float16:  # mostly fp16's range: exponents 2^-26 .. 2^17
        rand = (rand & 0x807FFFFF) | (torch.randint(101, 145, (6000,), generator=g) << 23)
        ties = torch.cat([(torch.arange(1024, dtype=torch.float64) + 0.5) * 2.0**-24,  # subnormal ties
                          (1024 + torch.randint(0, 1024, (400,), generator=g) + 0.5).double()
                          * 2.0 ** torch.randint(-24, 6, (400,), generator=g).double(),
                          torch.tensor([65504.0, 65519.0, 65520.0, 65536.0, 2.0**-25, 2.0**-14])]).float()
    else:
        ties = ((torch.randint(0, 2**15, (2000,), generator=g) << 16) | 0x8000).to(torch.int32).view(torch.float32)
    tied = ties.view(torch.int32).to(torch.int64)
    edges = torch.tensor([0x7F7FFFFF, 0x00000001, 0x7F800000, 0x7FFFFFFF, 0x7FFF0001, 0x7F800001])
    bits = torch.cat([rand, tied, tied + 1, tied - 1, edges])
    signs = torch.randint(0, 2, bits.shape, generator=g) << 31
    values = ((bits | signs) - ((signs >> 31) << 32)).to(torch.int32).view(torch.float32)
    return torch.cat([values, torch.tensor([0.0, -0.0])])


@pytest.mark.parametrize("w_dtype", HALF)
@each_rounding
def test_host_conversions_match_torch(w_dtype, rounding):
    """v = -0 + (+0 + 1 * a[j]) is a[j] itself but for a zero, which gives +0 (the kernels and the reference sum
    B A from +0): the host loop's rounding of crafted fp32 values is reference.round_to (torch's RNE, or
    round_stochastic), bit for bit; and every fp16/bf16 pattern read as a factor is exact."""
    _need_lib()
    values = _crafted_fp32(w_dtype)
    W = torch.full((1, values.numel()), -0.0, dtype=w_dtype)
    A, B = values[None, :], torch.ones(1, 1)
    new, _ = _host(W, A, B, 1.0, rounding, 8)
    want = reference.merge_value(W, A, B, 1.0, rounding, 8)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(new), nan) and _bits_equal(new[~nan], want[~nan])
    # every 16-bit pattern as lora_A into an fp32 W: the load is exact (NaN compared as NaN)
    patterns = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(w_dtype)[None, :]
    patterns = patterns[patterns != 0][None, :]  # compared with a itself: a zero factor would give +0
    W32 = torch.full((1, patterns.numel()), -0.0)
    new, _ = _host(W32, patterns, torch.ones(1, 1, dtype=w_dtype), 1.0, "nearest", 0)
    want = patterns.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(new), nan) and _bits_equal(new[~nan], want[~nan])


def test_host_strided_weight_and_factors():
    """Any strides: a row-strided view of W (nothing outside it moves), a transposed W, transposed factors."""
    _need_lib()
    W, A, B = _data(40, 72, 5, torch.bfloat16, torch.float32)
    want = reference.merge_value(W, A, B, 0.7, "stochastic", 99)
    big = torch.randn(40, 100).to(torch.bfloat16)
    view = big[:, 7:79]
    view.copy_(W)
    frame = big.clone()
    At, Bt = A.t().contiguous().t(), B.t().contiguous().t()  # column-major factors
    assert _flag(cu.merge_host_(view, At, Bt, 0.7, "stochastic", 99, write=True)) == 0
    assert _bits_equal(view, want)
    assert _bits_equal(big[:, :7], frame[:, :7]) and _bits_equal(big[:, 79:], frame[:, 79:])
    Wt = W.t().contiguous().t()  # stride (1, 40)
    cu.merge_host_(Wt, A, B.to(torch.float16), 0.7, "stochastic", 99, write=True)
    assert _bits_equal(Wt, reference.merge_value(W, A, B.to(torch.float16), 0.7, "stochastic", 99))


@pytest.mark.parametrize("w_dtype", HALF)
def test_row_shards_round_as_the_full_weight(w_dtype):
    """A row shard with its row_offset takes the full weight's random numbers (FSDP2's sharded unload)."""
    _need_lib()
    W, A, B = _data(37, 70, 3, w_dtype, torch.float32)
    full, _ = _host(W, A, B, 0.9, "stochastic", 77)
    assert _bits_equal(full, reference.merge_value(W, A, B, 0.9, "stochastic", 77))
    for start, stop in ((0, 13), (13, 26), (26, 37)):
        shard, _ = _host(W[start:stop].clone(), A, B[start:stop], 0.9, "stochastic", 77, row_offset=start)
        assert _bits_equal(shard, full[start:stop]), (start, stop)
    shard, _ = _host(W[13:26].clone(), A, B[13:26], 0.9, "stochastic", 77)  # without the offset: other numbers
    assert not _bits_equal(shard, full[13:26])


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


def test_rounding_bits_are_the_stream_of_ops_streams():
    """Element (row, j) takes half j % 2 of word (j % 8) // 2 of Philox(counter (j // 8, row)): 8 per call."""
    _need_lib()
    for seed, row in ((2**33 + 7, 2**32 - 1), (streams.seed_for(5, 1, 2), 12345), (-3, 0)):
        got = cu.rounding_bits_host(seed, row, 5, 19)  # columns 5 .. 23: three groups, partial at both ends
        assert got.dtype == torch.int32 and ((got >= 0) & (got < 2**16)).all()
        want = streams.rounding_bits(seed & 0xFFFFFFFFFFFFFFFF, torch.tensor([row]), torch.arange(5, 24))[0]
        assert torch.equal(got.long(), want)
        plain = [(_philox4x32_10(seed, j // 8, row)[(j % 8) // 2] >> (16 * (j % 2))) & 0xFFFF for j in range(5, 24)]
        assert got.tolist() == plain


# (c) the host loop against the Triton kernel under the interpreter ------------------------------------------
_TRITON_SCRIPT = textwrap.dedent("""
    import sys, torch
    from plora_kernels.ops.merge import Merge
    from plora_kernels.ops.triton.unload import merge_group_
    cases = torch.load(sys.argv[1])
    out = []
    for c in cases:
        W = c["W"]  # the case's own tensor (its strides are the point); the parent keeps the original
        m = Merge(W, c["A"], c["B"], c["coef"], c["rounding"], c["seed"], c["row_offset"])
        flag = merge_group_([m], write=c["write"])
        out.append({"W": W.clone(), "flag": int(flag.item())})
    torch.save(out, sys.argv[2])
""")


def _clone_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with t's strides (clone() makes a strided view contiguous)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _triton_interpreted(cases, tmp_path):
    pytest.importorskip("triton")
    src, dst = tmp_path / "cases.pt", tmp_path / "out.pt"
    torch.save(cases, src)
    env = dict(os.environ, TRITON_INTERPRET="1", PLORA_BACKEND="triton")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(src), str(dst)], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(dst)


def test_host_matches_triton_interpreter_bit_for_bit(tmp_path):
    """r < 16 is the Triton kernel's rank-1 path, whose fp32 sum runs k = 0..r-1 like ours."""
    _need_lib()
    cases = []

    def add(W, A, B, coef, rounding, seed, row_offset=0, write=True):
        cases.append({"W": W, "A": A, "B": B, "coef": coef, "rounding": rounding, "seed": seed,
                      "row_offset": row_offset, "write": write})

    specs = [(w, f, r, rnd) for w in HALF for f in ("fp32", "16bit") for r in (1, 3, 8)
             for rnd in ("stochastic", "nearest")]
    specs += [(torch.float32, f, r, "nearest") for f in ("fp32", "16bit") for r in (1, 8)]
    for n, (w_dtype, factors, r, rnd) in enumerate(specs):
        f_dtype = torch.float32 if factors == "fp32" else (w_dtype if w_dtype != torch.float32 else torch.bfloat16)
        add(*_data(77, 129, r, w_dtype, f_dtype), 0.37 * 2.0 / r, rnd, 1000 + 7919 * n)
    # contiguous, 16-byte aligned rows of a multiple of 16 bytes: the Triton kernel's vector path
    aligned = [(torch.float16, torch.float16, 64, 128, 3, "stochastic"),
               (torch.bfloat16, torch.float32, 48, 256, 8, "nearest"),
               (torch.bfloat16, torch.bfloat16, 40, 64, 2, "stochastic"),
               (torch.float32, torch.float32, 32, 64, 2, "nearest")]
    for n, (w_dtype, f_dtype, M, N, r, rnd) in enumerate(aligned):
        add(*_data(M, N, r, w_dtype, f_dtype), 0.37 * 2.0 / r, rnd, 31 + n)
    # a strided W (row stride 150, rows off the 16-byte grid), a transposed A, mixed factors, a row shard
    W, A, B = _data(50, 130, 5, torch.float16, torch.float32, b_dtype=torch.bfloat16)
    big = torch.randn(50, 150).to(torch.float16)
    big[:, 3:133] = W
    add(big[:, 3:133], A.t().contiguous().t(), B, 0.5, "stochastic", 2**31 - 2, row_offset=1000)
    # signed zeros: W = -0 where B A's products are zeros of either sign (the kernels sum from +0)
    W, A, B = _data(16, 64, 2, torch.float32, torch.float32)
    W[:, :8], A[:, :4], A[:, 4:8] = -0.0, -0.0, 0.0
    add(W, A, B, 0.5, "nearest", 0)
    # the check pass: a safe merge (0), an overflow and a NaN factor (1); nothing written
    W, A, B = _data(40, 70, 4, torch.bfloat16, torch.float32)
    add(W, A, B, 0.5, "stochastic", 5, write=False)
    W, A, B = _data(40, 70, 4, torch.float16, torch.float32)
    W[7, 9], B[7], A[:, 9] = 65000.0, 30.0, 30.0
    add(W, A, B, 1.0, "nearest", 5, write=False)
    W, A, B = _data(40, 70, 4, torch.bfloat16, torch.float16)
    B[3, 1] = float("nan")
    add(W, A, B, 1.0, "stochastic", 5, write=False)

    got = _triton_interpreted(cases, tmp_path)
    for c, g in zip(cases, got):
        label = f"{c['W'].dtype} r={c['A'].shape[0]} {c['A'].dtype} {c['rounding']} write={c['write']}"
        mine = _clone_strided(c["W"])
        assert mine.stride() == c["W"].stride()
        flag = _flag(cu.merge_host_(mine, c["A"], c["B"], c["coef"], c["rounding"], c["seed"], write=c["write"],
                                    row_offset=c["row_offset"]))
        assert _bits_equal(mine, g["W"]), label
        assert flag == g["flag"], label
        assert _bits_equal(mine, c["W"]) != c["write"], label  # written iff the writing pass
    assert [g["flag"] for g in got[-3:]] == [0, 1, 1]


# (d) the check pass, the edge of fp16, the stream's statistics, bad arguments --------------------------------
@pytest.mark.parametrize("w_dtype", HALF)
@each_rounding
def test_check_pass_writes_nothing_and_flags_non_finite(w_dtype, rounding):
    _need_lib()
    W, A, B = _data(33, 70, 4, w_dtype, torch.float32)
    before = W.clone()
    assert _flag(cu.merge_host_(W, A, B, 0.5, rounding, 11, write=False)) == 0
    assert _bits_equal(W, before)
    big = torch.finfo(w_dtype).max
    W[5, 9] = big
    B[5].fill_(1.0)
    A[:, 9].fill_(1.0)
    cases = {"overflow": (W, A, B, big / 8)}
    Wn = before.clone()
    Wn[0, 0] = float("nan")
    cases["NaN in W"] = (Wn, A * 0, B * 0, 1.0)
    Ai = A.clone()
    Ai[2, 3] = float("inf")
    cases["inf in lora_A"] = (before.clone(), Ai, B, 0.5)
    Bn = B.clone()
    Bn[30, 0] = float("nan")
    cases["NaN in lora_B"] = (before.clone(), A, Bn, 0.5)
    for name, (w, a, b, coef) in cases.items():
        frozen = [t.clone() for t in (w, a, b)]
        assert _flag(cu.merge_host_(w, a, b, coef, rounding, 11, write=False)) == 1, name
        assert all(_bits_equal(x, y) for x, y in zip((w, a, b), frozen)), name
    # the writing pass reports nothing, whatever it writes
    assert _flag(cu.merge_host_(W, A, B, big / 8, rounding, 11, write=True)) == 0
    assert not torch.isfinite(W).all()


def test_fp16_rounds_to_inf_at_the_edge():
    _need_lib()
    W = torch.full((2, 8), 65504.0, dtype=torch.float16)
    A = torch.ones(1, 8)
    B = torch.tensor([[8.0], [16.0]])  # 65512 rounds down to 65504; 65520 is a tie: to even, 65536 = inf
    new, flag = _host(W, A, B, 1.0, "nearest", 0)
    assert (new[0] == 65504).all() and torch.isinf(new[1]).all()
    assert flag == 1
    assert _flag(cu.merge_host_(W[:1].clone(), A, B[:1], 1.0, "nearest", 0, write=False)) == 0
    # stochastic: 65512, a quarter of fp16's step of 32 above 65504, goes up to inf a quarter of the time;
    # 65500 never does
    B = torch.tensor([[8.0], [-4.0]])
    new, flag = _host(torch.full((2, 4096), 65504.0, dtype=torch.float16), torch.ones(1, 4096), B, 1.0,
                      "stochastic", 3)
    frac_inf = torch.isinf(new[0]).float().mean().item()
    assert 0.2 < frac_inf < 0.3 and torch.isfinite(new[1]).all() and flag == 1
    assert set(new[0][torch.isfinite(new[0])].tolist()) == {65504.0}


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
    nearest_err = (reference.merge_value(W, A, B, 1.0).double() - exact).abs().mean()
    assert mean_err < 0.35 * nearest_err


def test_bad_arguments():
    _need_lib()
    W, A, B = _data(8, 16, 2, torch.float16, torch.float32)
    with pytest.raises(ValueError, match="lora_B"):
        cu.merge_host_(W, A, B[:4], 1.0, "nearest", 0, write=True)
    with pytest.raises(TypeError, match="lora_A of torch.float64"):
        cu.merge_host_(W, A.double(), B, 1.0, "nearest", 0, write=True)
    with pytest.raises(TypeError, match="weight of torch.float64"):
        cu.merge_host_(W.double(), A, B, 1.0, "nearest", 0, write=True)
    with pytest.raises(TypeError, match="weight must be a 2-D"):
        cu.merge_host_(W[0], A, B, 1.0, "nearest", 0, write=True)
    with pytest.raises(ValueError, match="rounding"):
        cu.merge_host_(W, A, B, 1.0, "up", 0, write=True)
    with pytest.raises(ValueError, match="row_offset"):
        cu.merge_host_(W, A, B, 1.0, "nearest", 0, write=True, row_offset=-1)
    with pytest.raises(TypeError, match="seed"):
        cu.merge_host_(W, A, B, 1.0, "nearest", 0.5, write=True)
    with pytest.raises(TypeError, match="write"):
        cu.merge_host_(W, A, B, 1.0, "nearest", 0, write=None)
    with pytest.raises(ValueError, match="cuda"):
        cu.merge_(W, A, B, 1.0, "nearest", 0, write=True)
    before = W.clone()
    with pytest.raises(TypeError):  # write is keyword-only: no positional pass by mistake
        cu.merge_host_(W, A, B, 1.0, "nearest", 0, True)
    assert _bits_equal(W, before)


def test_unload_kernel_choice_is_validated(monkeypatch):
    from plora_kernels import _backend

    monkeypatch.setenv("PLORA_UNLOAD_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="PLORA_UNLOAD_KERNEL"):
        _backend.requested_unload_kernel()
    monkeypatch.setenv("PLORA_UNLOAD_KERNEL", "cuda")
    assert _backend.requested_unload_kernel() == "cuda"


# (e) the device kernel (GPU only) ----------------------------------------------------------------------------
def _device_and_host(W, A, B, coef, rounding, seed, row_offset=0):
    """The kernel's check and writing passes on W (in place), and the host loop's on CPU copies: (host result,
    device flag, host flag, device bytes the two kernel passes allocated)."""
    before = W.clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flag = cu.merge_(W, A, B, coef, rounding, seed, write=False, row_offset=row_offset)
    torch.cuda.synchronize()
    assert _bits_equal(W, before)
    assert _flag(cu.merge_(W, A, B, coef, rounding, seed, write=True, row_offset=row_offset)) == 0
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated() - base
    host, host_flag = _host(before.cpu(), A.cpu(), B.cpu(), coef, rounding, seed, row_offset)
    return host, _flag(flag), host_flag, allocated


@gpu
@pytest.mark.parametrize("w_dtype", DTYPES)
@each_rounding
@pytest.mark.parametrize("factors", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_cuda_kernel_matches_host(w_dtype, rounding, factors):
    """More tiles than the grid (the grid-stride loop), a ragged last column tile, r above one KC chunk."""
    _need_lib()
    for r in (8, 20):
        W, A, B = _data(2048, 1800, r, w_dtype, factors[0], device="cuda", b_dtype=factors[1])
        mine = W.clone()
        host, flag, host_flag, allocated = _device_and_host(mine, A, B, 0.37, rounding, 4242 + r)
        assert allocated < 2**20  # the flags only: no W-sized temporary
        assert _bits_equal(mine, host), r
        assert flag == host_flag == 0
        assert not _bits_equal(mine, W)


@gpu
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_cuda_kernel_ragged_misaligned_strided(w_dtype):
    _need_lib()
    W, A, B = _data(203, 333, 5, w_dtype, torch.bfloat16, device="cuda")
    big = torch.randn(203, 340, device="cuda").to(w_dtype)
    view = big[:, 1:334]  # rows start off the 16-byte grid, N is ragged: the scalar path
    view.copy_(W)
    frame = big.clone()
    host, flag, host_flag, _ = _device_and_host(view, A.t().contiguous().t(), B, 0.8, "stochastic", 3, row_offset=17)
    assert _bits_equal(view, host) and flag == host_flag == 0
    assert _bits_equal(big[:, :1], frame[:, :1]) and _bits_equal(big[:, 334:], frame[:, 334:])
    Wt = W.t().contiguous().t()  # stride (1, 203) along N: the scalar path again
    cu.merge_(Wt, A, B, 0.8, "stochastic", 3, write=True, row_offset=17)
    assert _bits_equal(Wt, host)
    for start, stop in ((0, 100), (100, 203)):  # row shards of the contiguous W: the full weight's rows
        shard = W[start:stop].clone()
        cu.merge_(shard, A, B[start:stop], 0.8, "stochastic", 3, write=True, row_offset=17 + start)
        assert _bits_equal(shard, host[start:stop]), (start, stop)


@gpu
@pytest.mark.parametrize("w_dtype", HALF)
@each_rounding
def test_cuda_kernel_check_pass_flags(w_dtype, rounding):
    _need_lib()
    W, A, B = _data(1000, 1536, 8, w_dtype, torch.float32, device="cuda")
    big = torch.finfo(w_dtype).max
    cases = {}
    w = W.clone()
    w[900, 1500], B[900], A[:, 1500] = big, 1.0, 1.0  # in the last tiles
    cases["overflow"] = (w, A, B, big / 8)
    w = W.clone()
    w[5, 7] = float("nan")
    cases["NaN in W"] = (w, A, B, 0.5)
    a = A.clone()
    a[3, 1000] = float("inf")
    cases["inf in lora_A"] = (W.clone(), a, B, 0.5)
    for name, (w, a, b, coef) in cases.items():
        before = w.clone()
        assert _flag(cu.merge_(w, a, b, coef, rounding, 1, write=False)) == 1, name
        assert _bits_equal(w, before), name
        host = _flag(cu.merge_host_(w.cpu(), a.cpu(), b.cpu(), coef, rounding, 1, write=False))
        assert host == 1, name


@gpu
@pytest.mark.parametrize("w_dtype", DTYPES)
@each_rounding
def test_cuda_kernel_matches_triton_kernel(w_dtype, rounding):
    """Bit for bit with the Triton kernel on its rank-1 path (r < 16; launched without FMA contraction)."""
    _need_lib()
    from plora_kernels.ops.merge import Merge
    from plora_kernels.ops.triton.unload import merge_group_

    for r, factors in ((1, torch.float32), (3, torch.bfloat16), (8, torch.float32), (8, torch.float16)):
        W, A, B = _data(1000, 1544, r, w_dtype, factors, device="cuda")
        mine, theirs = W.clone(), W.clone()
        cu.merge_(mine, A, B, 0.37, rounding, 77 + r, write=True, row_offset=3)
        merge_group_([Merge(theirs, A, B, 0.37, rounding, 77 + r, 3)], write=True)
        assert _bits_equal(mine, theirs), (r, factors)
        assert not _bits_equal(mine, W)


@gpu
@each_rounding
def test_unload_through_the_cuda_twin_equals_triton(monkeypatch, rounding):
    """PLORA_UNLOAD_KERNEL=cuda routes plora_kernels.unload_ through csrc/ with the same result, bit for bit,
    and refuses the same overflow leaving W, A and B as they were."""
    _need_lib()
    import plora_kernels as pk

    W, A, B = _data(300, 520, 8, torch.bfloat16, torch.float32, device="cuda")
    outs = []
    for kernel in ("triton", "cuda"):
        monkeypatch.setenv("PLORA_UNLOAD_KERNEL", kernel)
        w, a, b = W.clone(), A.clone(), B.clone()
        pk.unload_(w, a, b, 2.0, momentum=0.1, rounding=rounding, generator=torch.Generator("cuda").manual_seed(3))
        outs.append((w, a, b))
    for x, y in zip(*outs):
        assert _bits_equal(x, y)
    assert not _bits_equal(outs[1][0], W)

    monkeypatch.setenv("PLORA_UNLOAD_KERNEL", "cuda")
    w, a, b = W.to(torch.float16), A.clone(), B.clone()
    w[7, 9], b[7], a[:, 9] = 65000.0, 30.0, 30.0
    frozen = [t.clone() for t in (w, a, b)]
    with pytest.raises(ValueError, match="non-finite"):
        pk.unload_(w, a, b, 1.0, momentum=0.0, rounding=rounding)
    assert all(_bits_equal(x, y) for x, y in zip((w, a, b), frozen))
