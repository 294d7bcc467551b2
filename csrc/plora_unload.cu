// plora_unload.cu — the CUDA C++ twin of the Triton unload merge (plora_kernels/ops/triton/unload.py,
// `_merge_kernel`), one layer per launch.
//
//   W <- round(W + coef * B @ A)     W: (M, N) fp16/bf16/fp32, A: (R, N), B: (M, R) fp16/bf16/fp32 (any strides)
//
// computed in fp32 and rounded ONCE into W's dtype, in place, with no W-sized temporary. The element math is
// in __host__ __device__ functions shared by the GPU kernel and a plain CPU loop (plora_unload_host), so a
// machine without a GPU can test the exact arithmetic the kernel does.
//
// Semantics (those of ops.reference.merge_value and of the Triton kernel on its rank-1 path, r < 16):
//   delta  = 0 + sum_{k = 0..R-1} fl32(float(B[i,k]) * float(A[k,j]))   k in increasing order, every product
//                                                                       and sum rounded (no FMA contraction)
//   v      = fl32(float(W[i,j]) + fl32(coef * delta))                   coef rounded to fp32 first
//   (the sum starts from +0 as the Triton kernel's does; merge_value starts from the first product, so the two
//   differ only in the sign of an exact zero where W is -0 and every product is -0)
//   fp32 W: no rounding. fp16 / bf16 W:
//     nearest    : round-to-nearest-even (the hardware conversion on the device, an exact bit-level RNE on
//                  the host);
//     stochastic : ops.reference.round_stochastic in integer arithmetic on v's bits with 16 random bits per
//                  element (bf16: (|v| bits + (bits16 ^ 0xFFFF)) & 0xFFFF0000; fp16: the same carry on a grid
//                  scaled to 2^16 steps, subnormals included).
//   The 16 bits of element (i, j) are ops.streams.rounding_bits: half j % 2 of word (j % 8) / 2 of
//   Philox4x32-10 with key (seed lo, seed hi) and counter (j / 8, i, 0, 0); i counts rows of the full weight
//   (a row shard passes its first row as row_offset). One Philox call serves 8 elements: a 16-byte vector of
//   a 16-bit W is exactly one group.
//   write == 0 (the check pass): nothing is stored; *flag |= 1 if any merged value (after the rounding) is not
//   finite in W's dtype (overflow, a NaN or inf already in W, a non-finite factor). write == 1: W is stored
//   and the flag is not touched.
//
// Build: nvcc -shared -Xcompiler -fPIC -O3 -fmad=false -Xcompiler -ffp-contract=off
//        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 ... (see csrc/README.md).
// The code does not rely on those two contraction flags (device math goes through __fmul_rn/__fadd_rn);
// they make sure the host compiler cannot fuse the CPU loop's multiply-adds either.

#include <atomic>
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define PLORA_HD __host__ __device__ __forceinline__

namespace plora {

// dtype codes of the ABI
enum : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
// rounding codes of the ABI (the Triton module's ROUND_* constants)
enum : int { ROUND_NONE = 0, ROUND_NEAREST = 1, ROUND_STOCHASTIC = 2 };
// error codes (negative; positive values are cudaError_t)
enum : int { OK = 0, E_DTYPE = -1, E_ROUNDING = -2, E_SIZE = -3, E_NULL = -4 };

// ---------------------------------------------------------------------------------------------------------
// fp32 primitives that are never contracted into FMAs and are bit-identical on host and device
PLORA_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PLORA_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PLORA_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint32_t>(__float_as_int(x));
#else
  uint32_t i;
  __builtin_memcpy(&i, &x, 4);
  return i;
#endif
}
PLORA_HD float bits_float(uint32_t i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(static_cast<int>(i));
#else
  float x;
  __builtin_memcpy(&x, &i, 4);
  return x;
#endif
}
PLORA_HD uint32_t umulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Philox4x32-10 as ops.streams.philox and triton's tl.philox compute it: key (k0, k1) = (seed & 0xffffffff,
// seed >> 32), counter (c0, c1, 0, 0).
PLORA_HD void philox4(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t out[4]) {
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = umulhi(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = umulhi(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// element j's 16 rounding bits from its group's four Philox words (j may be the column or the column % 8)
PLORA_HD uint32_t bits16_of(const uint32_t words[4], uint32_t j) {
  return (words[(j & 7u) >> 1] >> ((j & 1u) * 16u)) & 0xFFFFu;
}

// the 16 bits of element (row, col) of the full weight, on their own (one Philox call; host loop and tests)
PLORA_HD uint32_t rounding_bits(uint64_t seed, uint32_t row, uint32_t col) {
  uint32_t words[4];
  philox4(seed, col >> 3, row, words);
  return bits16_of(words, col);
}

// ---------------------------------------------------------------------------------------------------------
// 16-bit formats from and to fp32. Device: the hardware conversions. Host: exact bit-level code (what torch's
// .to() computes: round-to-nearest-even, subnormals and overflow to inf included), so the host loop does not
// depend on the CUDA headers' host fallbacks.
PLORA_HD float half_to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return bits_float(sign | 0x7F800000u | (m << 13));
  if (e != 0u) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
  // zero or subnormal: m * 2^-24, exact in fp32
  return bits_float(sign | float_bits(static_cast<float>(m) * 5.9604644775390625e-8f));
#endif
}

PLORA_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

PLORA_HD uint16_t float_to_half_rn(float v) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(v));
#else
  const uint32_t x = float_bits(v), sign = (x >> 16) & 0x8000u, mag = x & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((mag >> 13) & 0x3FFu));  // NaN
  if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 (a tie): inf
  if (mag >= 0x38800000u) {  // fp16 normal: rebias the exponent (127 -> 15), drop 13 mantissa bits, RNE
    const uint32_t r = mag - (112u << 23);
    return static_cast<uint16_t>(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
  }
  if (mag < 0x33000000u) return static_cast<uint16_t>(sign);  // below 2^-25: zero (2^-25 itself ties to 0)
  // fp16 subnormal: the value in units of 2^-24 is m >> shift, rounded to nearest-even (0x400 is 2^-14)
  const uint32_t e = mag >> 23, m = (mag & 0x7FFFFFu) | 0x800000u, shift = 126u - e;
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
#endif
}

PLORA_HD uint16_t float_to_bf16_rn(float v) {
#ifdef __CUDA_ARCH__
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  const uint32_t x = float_bits(v);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN stays NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// stochastic rounding: ops.reference.round_stochastic, bit for bit. carry = bits16 ^ 0xFFFF carries into the
// kept part exactly when bits16 < the first 16 dropped bits of |v|.
PLORA_HD uint16_t stochastic_bf16(float v, uint32_t bits16) {
  const uint32_t raw = float_bits(v), sign = raw & 0x80000000u, mag = raw & 0x7FFFFFFFu;
  uint32_t out = (mag + (bits16 ^ 0xFFFFu)) & 0xFFFF0000u;
  if (mag > 0x7F800000u) out = 0x7FC00000u;  // a NaN's carry could reach the sign bit
  return static_cast<uint16_t>((out | sign) >> 16);  // on bf16's grid: the conversion is the top half
}

PLORA_HD uint16_t stochastic_f16(float v, uint32_t bits16) {
  const uint32_t raw = float_bits(v), sign = raw & 0x80000000u, mag = raw & 0x7FFFFFFFu;
  const uint32_t e = (mag >> 23) < 113u ? 113u : (mag >> 23);  // fp16's grid step stays 2^-24 below 2^-14
  float out;
  if (e == 255u) {
    out = bits_float(mag);  // inf and NaN as they are
  } else {
    const float up = bits_float((280u - e) << 23);   // 2^(26 - max(exp, -14)): the grid step becomes 2^16
    const float down = bits_float((e - 10u) << 23);  // the grid step 2^(max(exp, -14) - 10)
    const int32_t fixed = static_cast<int32_t>(fmul(bits_float(mag), up));  // < 2^27; truncates below 2^-17
    const int32_t q = (fixed + static_cast<int32_t>(bits16 ^ 0xFFFFu)) >> 16;
    out = fmul(static_cast<float>(q), down);  // exact, or inf far past fp16's range
  }
  return float_to_half_rn(bits_float(float_bits(out) | sign));  // on fp16's grid: exact, or inf
}

// ---------------------------------------------------------------------------------------------------------
// per-W-dtype traits: storage type, load as fp32, the two roundings, finiteness of a stored value
template <int WDT> struct WTraits;
template <> struct WTraits<DT_F32> {
  using S = uint32_t;
  PLORA_HD static float load(S s) { return bits_float(s); }
  PLORA_HD static S nearest(float v) { return float_bits(v); }
  PLORA_HD static S stochastic(float v, uint32_t) { return float_bits(v); }
  PLORA_HD static bool finite(S s) { return (s & 0x7F800000u) != 0x7F800000u; }
};
template <> struct WTraits<DT_F16> {
  using S = uint16_t;
  PLORA_HD static float load(S s) { return half_to_float(s); }
  PLORA_HD static S nearest(float v) { return float_to_half_rn(v); }
  PLORA_HD static S stochastic(float v, uint32_t bits16) { return stochastic_f16(v, bits16); }
  PLORA_HD static bool finite(S s) { return (s & 0x7C00u) != 0x7C00u; }
};
template <> struct WTraits<DT_BF16> {
  using S = uint16_t;
  PLORA_HD static float load(S s) { return bf16_to_float(s); }
  PLORA_HD static S nearest(float v) { return float_to_bf16_rn(v); }
  PLORA_HD static S stochastic(float v, uint32_t bits16) { return stochastic_bf16(v, bits16); }
  PLORA_HD static bool finite(S s) { return (s & 0x7F80u) != 0x7F80u; }
};

// a factor element of runtime dtype, as fp32 (exact)
PLORA_HD float load_factor(const void* base, int dtype, int64_t index) {
  switch (dtype) {
    case DT_F16: return half_to_float(static_cast<const uint16_t*>(base)[index]);
    case DT_BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}

// a factor element of a compile-time dtype, as fp32 (exact)
template <int DT>
PLORA_HD float factor_at(const void* base, int64_t index) {
  if (DT == DT_F16) return half_to_float(static_cast<const uint16_t*>(base)[index]);
  if (DT == DT_BF16) return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  return static_cast<const float*>(base)[index];
}

// the per-element epilogue: v = w + coef * delta, rounded once into W's dtype
template <int WDT, int ROUND>
PLORA_HD typename WTraits<WDT>::S merge_element(typename WTraits<WDT>::S w, float delta, float coef,
                                                uint32_t bits16) {
  using Tr = WTraits<WDT>;
  const float v = fadd(Tr::load(w), fmul(coef, delta));
  if (ROUND == ROUND_STOCHASTIC) return Tr::stochastic(v, bits16);
  return Tr::nearest(v);  // an fp32 W: v itself
}

// the arguments of one merge (sizes and strides in elements)
struct Args {
  void* w;
  const void* a;
  const void* b;
  int* flag;
  int M, N, R;  // at most INT32_MAX - 1024 (M, N) and INT32_MAX (R): see check_args
  int64_t s_wm, s_wn, s_ar, s_an, s_bm, s_br;
  int a_dt, b_dt;
  float coef;
  uint64_t seed;
  uint32_t row_offset;
  int write;
};

// ---------------------------------------------------------------------------------------------------------
// GPU kernel: a grid-stride loop over BM x BN tiles of W (consecutive tiles walk along a row panel, so
// neighbouring blocks share B's rows in cache); the grid is the compiled kernel's resident blocks per SM times
// the SMs. In a tile, 32 threads along N each own one 16-byte vector (VEC elements: 8 of a 16-bit W, exactly one
// Philox group; 4 of an fp32 W) and 8 warps along M each own ROWS rows spaced 8 apart, so a warp touches 512
// contiguous bytes of a row. Per tile:
//   1. W's vectors are loaded first, so their latency hides behind the product;
//   2. the A column panel and the B row panel pass through shared memory as fp32, in chunks of KC ranks (A with
//      four loads in flight per thread); each thread sums its ROWS x VEC slice of B A, k in increasing order;
//   3. one Philox call per row vector, the rounding, then the vector store (write pass) or the finiteness test
//      (check pass); rows that are ragged, misaligned or strided along N take a scalar path.
// The check pass reduces "any non-finite" over the block once, after its last tile (__syncthreads_or), and
// publishes it with at most one relaxed integer atomic (atomicOr) per block.
constexpr int TX = 32, TY = 8, ROWS = 2, KC = 16, THREADS = TX * TY;
constexpr int BM = TY * ROWS;

template <int WDT> struct Tile {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(typename WTraits<WDT>::S));
  static constexpr int BN = TX * VEC;
};

// A's rows kk0, kk0 + KSTEP, ... below kn of one column (element index `at`, `step` apart) into column jj of
// the shared panel as fp32, four loads in flight; `in`: the column is inside W (else zeros)
template <int DT, int BN, int KSTEP>
__device__ __forceinline__ void stage_a(float (*As)[BN], const void* a, int64_t at, int64_t step, int kk0, int kn,
                                        int jj, bool in) {
  int kk = kk0;
  for (; kk + 3 * KSTEP < kn; kk += 4 * KSTEP, at += 4 * step) {
    float t[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) t[q] = in ? factor_at<DT>(a, at + q * step) : 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) As[kk + q * KSTEP][jj] = t[q];
  }
  for (; kk < kn; kk += KSTEP, at += step) As[kk][jj] = in ? factor_at<DT>(a, at) : 0.0f;
}

template <int WDT, int ROUND>
__global__ void __launch_bounds__(THREADS) merge_kernel(const Args p) {
  using Tr = WTraits<WDT>;
  using S = typename Tr::S;
  constexpr int VEC = Tile<WDT>::VEC, BN = Tile<WDT>::BN;
  static_assert(ROUND != ROUND_STOCHASTIC || VEC == 8, "a stochastic vector must be one Philox group");
  __shared__ __align__(16) float As[KC][BN];
  __shared__ float Bs[BM][KC + 1];
  union Pack {
    uint4 u;
    S e[VEC];
  };

  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int grid_n = (p.N + BN - 1) / BN;
  const int n_tiles = ((p.M + BM - 1) / BM) * grid_n;  // below 2^31: the launcher checks
  S* const w = static_cast<S*>(p.w);
  bool bad = false;

  for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {  // block-uniform: the syncs are safe
    const int m0 = (tile / grid_n) * BM, n0 = (tile % grid_n) * BN;
    const int j0 = n0 + tx * VEC;  // no overflow: N <= INT32_MAX - 1024

    // 1. W's vectors, before the product
    Pack wv[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int i = m0 + ty + r * TY;
      wv[r].u = make_uint4(0u, 0u, 0u, 0u);
      if (i < p.M && j0 < p.N) {
        const S* row = w + static_cast<int64_t>(i) * p.s_wm;
        if (p.s_wn == 1 && j0 + VEC <= p.N && (reinterpret_cast<uintptr_t>(row + j0) & 15u) == 0) {
          wv[r].u = *reinterpret_cast<const uint4*>(row + j0);
        } else {  // ragged tail, misaligned rows or a strided last dimension
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            if (j0 + v < p.N) wv[r].e[v] = row[static_cast<int64_t>(j0 + v) * p.s_wn];
        }
      }
    }

    // 2. this thread's slice of B A, in fp32
    float acc[ROWS][VEC];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[r][v] = 0.0f;
    for (int kc = 0; kc < p.R; kc += KC) {
      const int kn = p.R - kc < KC ? p.R - kc : KC;  // ranks in this chunk
      __syncthreads();  // the previous chunk (or tile) is done with the panels
      {  // A's rows kc .. kc + kn - 1 over the tile's columns: thread tid stages column tid % BN
        constexpr int KSTEP = THREADS / BN;  // 1 for a 16-bit W, 2 for fp32
        const int jj = tid % BN;
        const int j = n0 + jj;
        const int64_t step_a = KSTEP * p.s_ar;
        const int64_t at = static_cast<int64_t>(kc + tid / BN) * p.s_ar + static_cast<int64_t>(j) * p.s_an;
        if (p.a_dt == DT_F16) stage_a<DT_F16, BN, KSTEP>(As, p.a, at, step_a, tid / BN, kn, jj, j < p.N);
        else if (p.a_dt == DT_BF16) stage_a<DT_BF16, BN, KSTEP>(As, p.a, at, step_a, tid / BN, kn, jj, j < p.N);
        else stage_a<DT_F32, BN, KSTEP>(As, p.a, at, step_a, tid / BN, kn, jj, j < p.N);
      }
      {  // B's rows of the tile over the chunk's ranks: BM * KC <= THREADS, one element per thread
        static_assert(BM * KC <= THREADS, "one B element per thread");
        const int ii = tid / KC, kk = tid % KC;
        const int i = m0 + ii;
        if (ii < BM && kk < kn)
          Bs[ii][kk] = i < p.M ? load_factor(p.b, p.b_dt, static_cast<int64_t>(i) * p.s_bm +
                                                          static_cast<int64_t>(kc + kk) * p.s_br) : 0.0f;
      }
      __syncthreads();
      auto step = [&](int kk) {
        float av[VEC];
#pragma unroll
        for (int v = 0; v < VEC; v += 4) {
          const float4 q = *reinterpret_cast<const float4*>(&As[kk][tx * VEC + v]);
          av[v] = q.x; av[v + 1] = q.y; av[v + 2] = q.z; av[v + 3] = q.w;
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float bv = Bs[ty + r * TY][kk];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[r][v] = fadd(acc[r][v], fmul(bv, av[v]));
        }
      };
      if (kn == KC) {
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) step(kk);
      } else {
        for (int kk = 0; kk < kn; ++kk) step(kk);
      }
    }

    // 3. round, then store or test
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int i = m0 + ty + r * TY;
      if (i >= p.M || j0 >= p.N) continue;
      uint32_t words[4] = {0u, 0u, 0u, 0u};
      // j0 % 8 == 0: the vector is one Philox group, so element v takes bits16_of(words, v)
      if (ROUND == ROUND_STOCHASTIC)
        philox4(p.seed, static_cast<uint32_t>(j0 >> 3), p.row_offset + static_cast<uint32_t>(i), words);
      Pack out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        out.e[v] = merge_element<WDT, ROUND>(wv[r].e[v], acc[r][v], p.coef, bits16_of(words, v));
        if (!p.write && j0 + v < p.N) bad |= !Tr::finite(out.e[v]);
      }
      if (p.write) {
        S* row = w + static_cast<int64_t>(i) * p.s_wm;
        if (p.s_wn == 1 && j0 + VEC <= p.N && (reinterpret_cast<uintptr_t>(row + j0) & 15u) == 0) {
          *reinterpret_cast<uint4*>(row + j0) = out.u;
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            if (j0 + v < p.N) row[static_cast<int64_t>(j0 + v) * p.s_wn] = out.e[v];
        }
      }
    }
  }

  if (!p.write) {  // the check pass: one barrier-reduction and at most one relaxed atomic per block
    if (__syncthreads_or(bad) && tid == 0) atomicOr(p.flag, 1);
  }
}

// ---------------------------------------------------------------------------------------------------------
// host reference loop: the same element math in the same order, one element at a time
template <int WDT, int ROUND>
void merge_host(const Args& p) {
  using Tr = WTraits<WDT>;
  using S = typename Tr::S;
  S* const w = static_cast<S*>(p.w);
  bool bad = false;
  for (int64_t i = 0; i < p.M; ++i) {
    uint32_t words[4] = {0u, 0u, 0u, 0u};
    for (int64_t j = 0; j < p.N; ++j) {
      if (ROUND == ROUND_STOCHASTIC && (j & 7) == 0)
        philox4(p.seed, static_cast<uint32_t>(j >> 3), p.row_offset + static_cast<uint32_t>(i), words);
      float delta = 0.0f;
      for (int64_t k = 0; k < p.R; ++k)
        delta = fadd(delta, fmul(load_factor(p.b, p.b_dt, i * p.s_bm + k * p.s_br),
                                 load_factor(p.a, p.a_dt, k * p.s_ar + j * p.s_an)));
      S* const at = w + i * p.s_wm + j * p.s_wn;
      const S nv = merge_element<WDT, ROUND>(*at, delta, p.coef, bits16_of(words, static_cast<uint32_t>(j)));
      if (p.write) *at = nv;
      else bad |= !Tr::finite(nv);
    }
  }
  if (bad) *p.flag = 1;
}

inline bool valid_dtype(int dt) { return dt == DT_F32 || dt == DT_F16 || dt == DT_BF16; }

// rounding as the Triton wrapper picks it: none for an fp32 W, else nearest or stochastic
inline int effective_rounding(int w_dt, int rounding) {
  if (w_dt == DT_F32) return ROUND_NONE;
  return (rounding == ROUND_NEAREST || rounding == ROUND_STOCHASTIC) ? rounding : -1;
}

// M and N leave room for a tile past the last row or column in 32-bit indices
constexpr int64_t MAX_MN = INT32_MAX - 1024;

inline int check_args(const Args& p, int w_dt, int rounding, int64_t M, int64_t N, int64_t R) {
  if (!valid_dtype(w_dt) || !valid_dtype(p.a_dt) || !valid_dtype(p.b_dt)) return E_DTYPE;
  if (rounding < ROUND_NONE || rounding > ROUND_STOCHASTIC || effective_rounding(w_dt, rounding) < 0)
    return E_ROUNDING;
  if (M < 0 || N < 0 || R < 0 || M > MAX_MN || N > MAX_MN || R > INT32_MAX) return E_SIZE;
  if (p.flag == nullptr) return E_NULL;
  if (p.M > 0 && p.N > 0 && (p.w == nullptr || (p.R > 0 && (p.a == nullptr || p.b == nullptr)))) return E_NULL;
  return OK;
}

// blocks of a kernel resident per SM, from the compiled kernel (asked once per kernel and process: the GPUs of a
// process are assumed alike; another count only changes the grid, which the grid-stride loop handles)
template <int WDT, int ROUND>
cudaError_t blocks_per_sm(int* n) {
  static std::atomic<int> cached{0};
  int v = cached.load(std::memory_order_relaxed);
  if (v == 0) {
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, merge_kernel<WDT, ROUND>, THREADS, 0);
    if (e != cudaSuccess) return e;
    v = v < 1 ? 1 : v;
    cached.store(v, std::memory_order_relaxed);
  }
  *n = v;
  return cudaSuccess;
}

// the grid: resident blocks per SM times the SMs, capped at the number of tiles
template <int WDT, int ROUND>
int launch_typed(const Args& p, int sm_count, cudaStream_t stream) {
  const int64_t tiles = (static_cast<int64_t>(p.M + BM - 1) / BM) * ((p.N + Tile<WDT>::BN - 1) / Tile<WDT>::BN);
  if (tiles > INT32_MAX) return E_SIZE;
  int per_sm = 0;
  const cudaError_t e = blocks_per_sm<WDT, ROUND>(&per_sm);
  if (e != cudaSuccess) return static_cast<int>(e);
  int64_t grid = static_cast<int64_t>(per_sm) * (sm_count > 0 ? sm_count : 1);
  if (grid > tiles) grid = tiles;
  merge_kernel<WDT, ROUND><<<static_cast<unsigned>(grid), THREADS, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

inline Args make_args(void* w, const void* a, int a_dt, const void* b, int b_dt, int32_t* flag, int64_t M, int64_t N,
                      int64_t R, int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an, int64_t s_bm, int64_t s_br,
                      float coef, uint64_t seed, uint32_t row_offset, int write) {
  Args p;
  p.w = w; p.a = a; p.b = b; p.flag = reinterpret_cast<int*>(flag);
  p.M = static_cast<int>(M); p.N = static_cast<int>(N); p.R = static_cast<int>(R);  // checked after
  p.s_wm = s_wm; p.s_wn = s_wn; p.s_ar = s_ar; p.s_an = s_an; p.s_bm = s_bm; p.s_br = s_br;
  p.a_dt = a_dt; p.b_dt = b_dt; p.coef = coef; p.seed = seed; p.row_offset = row_offset; p.write = write ? 1 : 0;
  return p;
}

}  // namespace plora

// ---------------------------------------------------------------------------------------------------------
// C ABI (version 4). Sizes and strides are in elements. dtype: 0 fp32, 1 fp16, 2 bf16. rounding: 0 none,
// 1 nearest-even, 2 stochastic (an fp32 W is never rounded, whatever is passed; a 16-bit W needs 1 or 2).
// seed: the 64-bit Philox key (low word k0, high word k1). row_offset: W is a row shard starting at row
// row_offset of a larger weight; the stream is indexed by the full weight's rows. flag: one int32 on W's device
// (host memory for the host loop), zeroed by the caller; the check pass (write == 0) sets it to 1 if a merged
// value is not finite in W's dtype, the write pass leaves it alone. sm_count: the device's SM count (the grid
// is the kernel's resident blocks per SM times it, capped at the number of tiles).
// Returns 0, a negative plora error code, or (launcher only) a cudaError_t.
extern "C" {

int plora_unload_abi_version(void) { return 4; }

int plora_unload_launch(void* w, int w_dt, const void* a, int a_dt, const void* b, int b_dt, int32_t* flag,
                        int64_t M, int64_t N, int64_t R, int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an,
                        int64_t s_bm, int64_t s_br, float coef, uint64_t seed, uint32_t row_offset, int rounding,
                        int write, int sm_count, void* stream) {
  using namespace plora;
  const Args p = make_args(w, a, a_dt, b, b_dt, flag, M, N, R, s_wm, s_wn, s_ar, s_an, s_bm, s_br, coef, seed,
                           row_offset, write);
  const int err = check_args(p, w_dt, rounding, M, N, R);
  if (err != OK) return err;
  if (M == 0 || N == 0) return OK;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int mode = effective_rounding(w_dt, rounding);
  if (w_dt == DT_F32) return launch_typed<DT_F32, ROUND_NONE>(p, sm_count, s);
  if (w_dt == DT_F16)
    return mode == ROUND_STOCHASTIC ? launch_typed<DT_F16, ROUND_STOCHASTIC>(p, sm_count, s)
                                    : launch_typed<DT_F16, ROUND_NEAREST>(p, sm_count, s);
  return mode == ROUND_STOCHASTIC ? launch_typed<DT_BF16, ROUND_STOCHASTIC>(p, sm_count, s)
                                  : launch_typed<DT_BF16, ROUND_NEAREST>(p, sm_count, s);
}

int plora_unload_host(void* w, int w_dt, const void* a, int a_dt, const void* b, int b_dt, int32_t* flag,
                      int64_t M, int64_t N, int64_t R, int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an,
                      int64_t s_bm, int64_t s_br, float coef, uint64_t seed, uint32_t row_offset, int rounding,
                      int write) {
  using namespace plora;
  const Args p = make_args(w, a, a_dt, b, b_dt, flag, M, N, R, s_wm, s_wn, s_ar, s_an, s_bm, s_br, coef, seed,
                           row_offset, write);
  const int err = check_args(p, w_dt, rounding, M, N, R);
  if (err != OK) return err;
  const int mode = effective_rounding(w_dt, rounding);
  if (w_dt == DT_F32) merge_host<DT_F32, ROUND_NONE>(p);
  else if (w_dt == DT_F16 && mode == ROUND_STOCHASTIC) merge_host<DT_F16, ROUND_STOCHASTIC>(p);
  else if (w_dt == DT_F16) merge_host<DT_F16, ROUND_NEAREST>(p);
  else if (mode == ROUND_STOCHASTIC) merge_host<DT_BF16, ROUND_STOCHASTIC>(p);
  else merge_host<DT_BF16, ROUND_NEAREST>(p);
  return OK;
}

// the 16 rounding bits of columns col0 .. col0 + n - 1 of row `row` of a full weight (host; for tests)
int plora_rounding_bits_host(uint64_t seed, uint32_t row, uint32_t col0, int64_t n, int32_t* out) {
  if (n < 0) return plora::E_SIZE;
  if (n > 0 && out == nullptr) return plora::E_NULL;
  for (int64_t q = 0; q < n; ++q)
    out[q] = static_cast<int32_t>(plora::rounding_bits(seed, row, col0 + static_cast<uint32_t>(q)));
  return plora::OK;
}

const char* plora_unload_error_string(int code) {
  switch (code) {
    case plora::OK: return "ok";
    case plora::E_DTYPE: return "unsupported dtype code (0 fp32, 1 fp16, 2 bf16)";
    case plora::E_ROUNDING: return "bad rounding code (a 16-bit W needs 1 nearest or 2 stochastic)";
    case plora::E_SIZE: return "sizes out of range (M, N in [0, 2^31 - 1024], R in [0, 2^31), below 2^31 tiles)";
    case plora::E_NULL: return "null pointer";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

}  // extern "C"
