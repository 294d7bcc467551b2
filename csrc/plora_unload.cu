// plora_unload.cu — the CUDA C++ twin of the Triton in-place unload merge (plora_kernels/ops/triton/unload.py).
//
//   W <- round(W + coef * B @ A)     W: (M, N) fp16/bf16/fp32, A: (R, N), B: (M, R) fp16/bf16/fp32 (any strides)
//
// computed in fp32 and rounded ONCE into W's dtype, in place, with no W-sized temporary. The element math is
// in __host__ __device__ functions shared by the GPU kernel and a plain CPU loop (plora_unload_host), so a
// machine without a GPU can test the exact arithmetic the kernel does.
//
// Semantics (identical to the Triton kernel `_unload_kernel` and its helper `round_to_grid`):
//   delta  = sum_{k = 0..R-1} float(B[i,k]) * float(A[k,j])   fp32, k in increasing order, mul and add
//                                                              rounded separately (no FMA contraction)
//   v      = float(W[i,j]) + coef * delta                      fp32 (mul, then add)
//   W dtype fp32: no rounding (the fp32 sum is the result); fp16 / bf16: rounded onto the format's grid,
//   nearest-even or stochastic; the stochastic uniform of element (i, j) is the Triton kernel's sr_uniform:
//   16 bits of Philox4x32-10 with key (seed lo, seed hi) and counter (j / 8, i, 0, 0), half j % 2 of output
//   word (j % 8) / 2, as (bits + 0.5) / 2^16 (one Philox call per 8 elements; i counts rows of the full
//   weight, so a row shard passes its row_offset).
//   stats[0] <- max(stats[0], max |new value|), with +inf for any value not finite in W's dtype (|v| above
//   the largest finite value, or NaN); stats[0] must hold a non-negative float (the caller zeroes it).
//   write == 0: a dry run, W is not stored to.
//
// Build: nvcc -shared -Xcompiler -fPIC -O3 -fmad=false -Xcompiler -ffp-contract=off
//        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 ... (see csrc/README.md).
// The code does not rely on those two contraction flags (device math goes through __fmul_rn/__fadd_rn);
// they make sure the host compiler cannot fuse the CPU loop's multiply-adds either.

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
PLORA_HD float fsub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
PLORA_HD int32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_int(x);
#else
  int32_t i;
  __builtin_memcpy(&i, &x, 4);
  return i;
#endif
}
PLORA_HD float bits_float(int32_t i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i);
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
// Philox4x32-10 as triton/language/random.py computes it (tl.philox with 32-bit counters): key (k0, k1) =
// (seed & 0xffffffff, seed >> 32) with the seed widened to uint64 first, counter (c0, c1, 0, 0).
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

// element j's uniform from its group's four Philox words: (16 bits + 0.5) / 2^16, exact in fp32
PLORA_HD float sr_uniform_of(const uint32_t words[4], uint32_t j) {
  const uint32_t bits = (words[(j & 7u) >> 1] >> ((j & 1u) * 16u)) & 0xFFFFu;
  return fmul(fadd(static_cast<float>(bits), 0.5f), 1.0f / 65536.0f);
}

// the uniform of element (row, j) of the full weight, on its own (one Philox call)
PLORA_HD float sr_uniform(uint64_t seed, uint32_t row, uint32_t j) {
  uint32_t words[4];
  philox4(seed, j >> 3, row, words);
  return sr_uniform_of(words, j);
}

// ---------------------------------------------------------------------------------------------------------
// round_to_grid: round fp32 v onto the grid of a float with MANT mantissa bits whose grid stops refining at
// exponent EMIN (fp16: 10, -14; bf16: 7, -119). Stochastic: up with probability frac (u < frac).
template <int MANT, int EMIN, bool STOCHASTIC>
PLORA_HD float round_to_grid(float v, float u) {
  const int e = ((float_bits(v) >> 23) & 0xFF) - 127;
  const int q_exp = (e > EMIN ? e : EMIN) - MANT;
  const float inv_q = bits_float((127 - q_exp) << 23);
  const float q = bits_float((127 + q_exp) << 23);
  const float t = fmul(v, inv_q);  // exact: a power-of-two scaling
  const float f = floorf(t);
  const float frac = fsub(t, f);
  bool up;
  if (STOCHASTIC) {
    up = u < frac;
  } else {  // ties to even; the int conversion only runs for a finite f (frac == 0.5 implies it)
    up = (frac > 0.5f) || (frac == 0.5f && (static_cast<int32_t>(f) & 1) == 1);
  }
  return fmul(fadd(f, up ? 1.0f : 0.0f), q);
}

// per-W-dtype traits: storage type, conversions, rounding grid, largest finite value
template <typename T> struct WTraits;
template <> struct WTraits<float> {
  static constexpr int MANT = 23, EMIN = -126;
  PLORA_HD static float max_finite() { return bits_float(0x7F7FFFFF); }
  PLORA_HD static float load(float x) { return x; }
  PLORA_HD static float store(float x) { return x; }
};
template <> struct WTraits<__half> {
  static constexpr int MANT = 10, EMIN = -14;
  PLORA_HD static float max_finite() { return 65504.0f; }
  PLORA_HD static float load(__half x) { return __half2float(x); }
  PLORA_HD static __half store(float x) { return __float2half_rn(x); }  // x is on the grid: exact or overflow
};
template <> struct WTraits<__nv_bfloat16> {
  static constexpr int MANT = 7, EMIN = -119;
  PLORA_HD static float max_finite() { return bits_float(0x7F7F0000); }
  PLORA_HD static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  PLORA_HD static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// a factor element of runtime dtype, as fp32 (exact)
PLORA_HD float load_factor(const void* base, int dtype, int64_t index) {
  switch (dtype) {
    case DT_F16: return __half2float(static_cast<const __half*>(base)[index]);
    case DT_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}

// the whole per-element epilogue: v = w + coef * delta, rounded (u: the element's stochastic uniform, unused
// otherwise); *mag gets |new| or +inf if not finite
template <typename WT, int ROUND>
PLORA_HD float merge_element(float w, float delta, float coef, float u, float* mag) {
  using Tr = WTraits<WT>;
  float v = fadd(w, fmul(coef, delta));
  if (ROUND == ROUND_STOCHASTIC) {
    v = round_to_grid<Tr::MANT, Tr::EMIN, true>(v, u);
  } else if (ROUND == ROUND_NEAREST) {
    v = round_to_grid<Tr::MANT, Tr::EMIN, false>(v, v);
  }
  const float a = fabsf(v);
  *mag = (a <= Tr::max_finite()) ? a : __builtin_huge_valf();  // NaN fails the test too
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// GPU kernel. A block owns a BM x BN tile of W: 32 threads along N, each with one 16-byte vector (VEC
// elements), and 8 threads along M, each with ROWS rows spaced 8 apart, so a warp touches 512 contiguous
// bytes of one row. The A column panel and the B row panel go through shared memory as fp32 in chunks of
// KC ranks; each thread accumulates its ROWS x VEC slice of B A in registers, k in increasing order.
constexpr int TX = 32, TY = 8, ROWS = 4, KC = 16, THREADS = TX * TY;
constexpr int BM = TY * ROWS;

template <typename WT> struct Tile {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(WT));
  static constexpr int BN = TX * VEC;
};

template <typename WT, int ROUND>
__global__ void __launch_bounds__(THREADS)
unload_kernel(WT* __restrict__ w, const void* __restrict__ a, const void* __restrict__ b,
              float* __restrict__ stats, int M, int N, int R,
              int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an, int64_t s_bm, int64_t s_br,
              int a_dt, int b_dt, float coef, uint64_t seed, uint32_t row_offset, int write) {
  constexpr int VEC = Tile<WT>::VEC, BN = Tile<WT>::BN;
  __shared__ __align__(16) float As[KC][BN];
  __shared__ float Bs[BM][KC + 1];
  __shared__ float warp_max[THREADS / 32];

  const int grid_n = (N + BN - 1) / BN;
  const int pid_m = static_cast<int>(blockIdx.x) / grid_n;  // consecutive blocks share a B row panel
  const int pid_n = static_cast<int>(blockIdx.x) % grid_n;
  const int m0 = pid_m * BM, n0 = pid_n * BN;
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;

  float acc[ROWS][VEC];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[r][v] = 0.0f;

  for (int kc = 0; kc < R; kc += KC) {
    __syncthreads();
    for (int idx = tid; idx < KC * BN; idx += THREADS) {
      const int kk = idx / BN, jj = idx % BN, k = kc + kk, j = n0 + jj;
      As[kk][jj] = (k < R && j < N) ? load_factor(a, a_dt, k * s_ar + j * s_an) : 0.0f;
    }
    for (int idx = tid; idx < BM * KC; idx += THREADS) {
      const int ii = idx / KC, kk = idx % KC, i = m0 + ii, k = kc + kk;
      Bs[ii][kk] = (i < M && k < R) ? load_factor(b, b_dt, i * s_bm + k * s_br) : 0.0f;
    }
    __syncthreads();
    const int kn = R - kc < KC ? R - kc : KC;
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

  float tmax = 0.0f;
  const int j0 = n0 + tx * VEC;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int i = m0 + ty + r * TY;
    if (i >= M || j0 >= N) continue;
    WT* row = w + static_cast<int64_t>(i) * s_wm;
    const uint32_t grow = row_offset + static_cast<uint32_t>(i);  // the row in the full weight
    const bool vec = s_wn == 1 && j0 + VEC <= N && (reinterpret_cast<uintptr_t>(row + j0) & 15) == 0;
    if (vec) {
      union { uint4 u; WT e[VEC]; } pack;
      pack.u = *reinterpret_cast<const uint4*>(row + j0);
      // a 16-bit W has VEC = 8 and j0 % 8 == 0: the vector is one Philox group, one call for 8 elements
      uint32_t words[4] = {0u, 0u, 0u, 0u};
      if (ROUND == ROUND_STOCHASTIC) philox4(seed, static_cast<uint32_t>(j0) >> 3, grow, words);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float mag;
        const float u = ROUND == ROUND_STOCHASTIC ? sr_uniform_of(words, static_cast<uint32_t>(j0 + v)) : 0.0f;
        const float nv = merge_element<WT, ROUND>(WTraits<WT>::load(pack.e[v]), acc[r][v], coef, u, &mag);
        tmax = fmaxf(tmax, mag);
        pack.e[v] = WTraits<WT>::store(nv);
      }
      if (write) *reinterpret_cast<uint4*>(row + j0) = pack.u;
    } else {  // ragged tail, misaligned rows or a strided last dimension
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int j = j0 + v;
        if (j >= N) break;
        WT* p = row + static_cast<int64_t>(j) * s_wn;
        float mag;
        const float u = ROUND == ROUND_STOCHASTIC ? sr_uniform(seed, grow, static_cast<uint32_t>(j)) : 0.0f;
        const float nv = merge_element<WT, ROUND>(WTraits<WT>::load(*p), acc[r][v], coef, u, &mag);
        tmax = fmaxf(tmax, mag);
        if (write) *p = WTraits<WT>::store(nv);
      }
    }
  }

  // block max, then one atomic: non-negative floats (+inf included) order like their int bit patterns
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
  if ((tid & 31) == 0) warp_max[tid >> 5] = tmax;
  __syncthreads();
  if (tid == 0) {
    float m = warp_max[0];
#pragma unroll
    for (int q = 1; q < THREADS / 32; ++q) m = fmaxf(m, warp_max[q]);
    atomicMax(reinterpret_cast<int*>(stats), __float_as_int(m));
  }
}

// ---------------------------------------------------------------------------------------------------------
// host reference loop: the same element math in the same order, one element at a time
template <typename WT, int ROUND>
void unload_host(WT* w, const void* a, const void* b, float* stats, int64_t M, int64_t N, int64_t R,
                 int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an, int64_t s_bm, int64_t s_br,
                 int a_dt, int b_dt, float coef, uint64_t seed, uint32_t row_offset, int write) {
  float tmax = 0.0f;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      float delta = 0.0f;
      for (int64_t k = 0; k < R; ++k)
        delta = fadd(delta, fmul(load_factor(b, b_dt, i * s_bm + k * s_br), load_factor(a, a_dt, k * s_ar + j * s_an)));
      WT* p = w + i * s_wm + j * s_wn;
      float mag;
      const float u = ROUND == ROUND_STOCHASTIC
          ? sr_uniform(seed, row_offset + static_cast<uint32_t>(i), static_cast<uint32_t>(j)) : 0.0f;
      const float nv = merge_element<WT, ROUND>(WTraits<WT>::load(*p), delta, coef, u, &mag);
      tmax = tmax > mag ? tmax : mag;
      if (write) *p = WTraits<WT>::store(nv);
    }
  }
  if (tmax > *stats || !(*stats == *stats)) *stats = tmax;
}

inline bool valid_dtype(int dt) { return dt == DT_F32 || dt == DT_F16 || dt == DT_BF16; }

// rounding as the Triton wrapper picks it: none for an fp32 W, else nearest or stochastic
inline int effective_rounding(int w_dt, int rounding) {
  if (w_dt == DT_F32) return ROUND_NONE;
  return (rounding == ROUND_NEAREST || rounding == ROUND_STOCHASTIC) ? rounding : -1;
}

inline int check_args(const void* w, int w_dt, const void* a, int a_dt, const void* b, int b_dt,
                      const float* stats, int64_t M, int64_t N, int64_t R, int rounding) {
  if (!valid_dtype(w_dt) || !valid_dtype(a_dt) || !valid_dtype(b_dt)) return E_DTYPE;
  if (rounding < ROUND_NONE || rounding > ROUND_STOCHASTIC || effective_rounding(w_dt, rounding) < 0)
    return E_ROUNDING;
  if (M < 0 || N < 0 || R < 0 || M > INT32_MAX || N > INT32_MAX || R > INT32_MAX) return E_SIZE;
  if (stats == nullptr) return E_NULL;
  if (M > 0 && N > 0 && (w == nullptr || (R > 0 && (a == nullptr || b == nullptr)))) return E_NULL;
  return OK;
}

template <typename WT, int ROUND>
int launch_typed(void* w, const void* a, int a_dt, const void* b, int b_dt, float* stats, int64_t M, int64_t N,
                 int64_t R, int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an, int64_t s_bm, int64_t s_br,
                 float coef, uint64_t seed, uint32_t row_offset, int write, cudaStream_t stream) {
  constexpr int BN = Tile<WT>::BN;
  const int64_t blocks = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  if (blocks > INT32_MAX) return E_SIZE;
  unload_kernel<WT, ROUND><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
      static_cast<WT*>(w), a, b, stats, static_cast<int>(M), static_cast<int>(N), static_cast<int>(R), s_wm, s_wn,
      s_ar, s_an, s_bm, s_br, a_dt, b_dt, coef, seed, row_offset, write);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace plora

// ---------------------------------------------------------------------------------------------------------
// C ABI. Sizes and strides are in elements. dtype: 0 fp32, 1 fp16, 2 bf16. rounding: 0 none, 1 nearest-even,
// 2 stochastic (an fp32 W is never rounded, whatever is passed; a 16-bit W needs 1 or 2). seed: the 64-bit
// pattern Triton would see after widening its seed argument to uint64 (sign-extended for a negative seed).
// row_offset: W is a row shard starting at row row_offset of a larger weight; the stochastic stream is indexed
// by the full weight's rows, so the shard rounds with the random numbers the full weight would use.
// Returns 0, a negative plora error code, or (launcher only) a cudaError_t.
extern "C" {

int plora_unload_abi_version(void) { return 3; }

int plora_unload_launch(void* w, int w_dt, const void* a, int a_dt, const void* b, int b_dt, float* stats,
                        int64_t M, int64_t N, int64_t R, int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an,
                        int64_t s_bm, int64_t s_br, float coef, uint64_t seed, uint32_t row_offset, int rounding, int write,
                        void* stream) {
  using namespace plora;
  const int err = check_args(w, w_dt, a, a_dt, b, b_dt, stats, M, N, R, rounding);
  if (err != OK) return err;
  if (M == 0 || N == 0) return OK;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int mode = effective_rounding(w_dt, rounding);
#define PLORA_ARGS w, a, a_dt, b, b_dt, stats, M, N, R, s_wm, s_wn, s_ar, s_an, s_bm, s_br, coef, seed, row_offset, write, s
  if (w_dt == DT_F32) return launch_typed<float, ROUND_NONE>(PLORA_ARGS);
  if (w_dt == DT_F16)
    return mode == ROUND_STOCHASTIC ? launch_typed<__half, ROUND_STOCHASTIC>(PLORA_ARGS)
                                    : launch_typed<__half, ROUND_NEAREST>(PLORA_ARGS);
  return mode == ROUND_STOCHASTIC ? launch_typed<__nv_bfloat16, ROUND_STOCHASTIC>(PLORA_ARGS)
                                  : launch_typed<__nv_bfloat16, ROUND_NEAREST>(PLORA_ARGS);
#undef PLORA_ARGS
}

int plora_unload_host(void* w, int w_dt, const void* a, int a_dt, const void* b, int b_dt, float* stats,
                      int64_t M, int64_t N, int64_t R, int64_t s_wm, int64_t s_wn, int64_t s_ar, int64_t s_an,
                      int64_t s_bm, int64_t s_br, float coef, uint64_t seed, uint32_t row_offset, int rounding, int write) {
  using namespace plora;
  const int err = check_args(w, w_dt, a, a_dt, b, b_dt, stats, M, N, R, rounding);
  if (err != OK) return err;
  const int mode = effective_rounding(w_dt, rounding);
#define PLORA_ARGS a, b, stats, M, N, R, s_wm, s_wn, s_ar, s_an, s_bm, s_br, a_dt, b_dt, coef, seed, row_offset, write
  if (w_dt == DT_F32) {
    unload_host<float, ROUND_NONE>(static_cast<float*>(w), PLORA_ARGS);
  } else if (w_dt == DT_F16) {
    if (mode == ROUND_STOCHASTIC) unload_host<__half, ROUND_STOCHASTIC>(static_cast<__half*>(w), PLORA_ARGS);
    else unload_host<__half, ROUND_NEAREST>(static_cast<__half*>(w), PLORA_ARGS);
  } else {
    if (mode == ROUND_STOCHASTIC)
      unload_host<__nv_bfloat16, ROUND_STOCHASTIC>(static_cast<__nv_bfloat16*>(w), PLORA_ARGS);
    else unload_host<__nv_bfloat16, ROUND_NEAREST>(static_cast<__nv_bfloat16*>(w), PLORA_ARGS);
  }
#undef PLORA_ARGS
  return OK;
}

// the stochastic uniforms of columns col0 .. col0 + n - 1 of row `row` of a full weight (host; for tests)
int plora_sr_uniform_host(uint64_t seed, uint32_t row, uint32_t col0, int64_t n, float* out) {
  if (n < 0 || (n > 0 && out == nullptr)) return plora::E_NULL;
  for (int64_t q = 0; q < n; ++q) out[q] = plora::sr_uniform(seed, row, col0 + static_cast<uint32_t>(q));
  return plora::OK;
}

const char* plora_unload_error_string(int code) {
  switch (code) {
    case plora::OK: return "ok";
    case plora::E_DTYPE: return "unsupported dtype code (0 fp32, 1 fp16, 2 bf16)";
    case plora::E_ROUNDING: return "bad rounding code (a 16-bit W needs 1 nearest or 2 stochastic)";
    case plora::E_SIZE: return "sizes out of range (M, N, R must be in [0, 2^31), the grid below 2^31 blocks)";
    case plora::E_NULL: return "null pointer";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

}  // extern "C"
