// Exact INT8 GEMM on the CPU: C (M, N) = A (M, K) @ B (N, K)^T, int8 in, int32 accumulate,
// with a fused per-token x per-channel scale + bias epilogue (float32 out), and the fused per-token
// activation quantizer that feeds it. Design notes, the Zen 3 cost analysis and the measurements
// behind the choices below: docs/int8_gemm_cpu.md.
//
// Exactness: operands are WIDENED to int16 and multiplied with vpmaddwd (s16 x s16 -> s32 pair
// sums), never the saturating vpmaddubsw; the int32 accumulator is exact for K < 131072.
//
// Layouts (int16 elements, K padded to an even Kp with zeros):
//   packed B: panels of NR = 16 columns; panel j holds, for each k pair kp, 16 columns x 2 k:
//             Bp[j][kp][c][2], size ceil(N / 16) * 16 * Kp. Padded columns are zero.
//   packed A: panels of MR = 6 rows; panel i holds, for each k pair, its rows x 2 k:
//             Ap[i][kp][r][2], panel i at offset i * 6 * Kp (only the last panel can be short).
// Micro-kernel: MR x NR = 6 x 16 int32 accumulators in 12 ymm registers; per k pair it loads two
// B vectors, broadcasts one int32 (two int16 of A) per row and issues 12 vpmaddwd + 12 vpaddd.
// Blocking and threads: with enough rows, each thread takes whole row blocks (mc rows, ~160 KiB of
// packed A, L2-resident), packs or quantizes them itself into a private buffer (no barrier, no
// (M, K) int16 copy of A) and runs them against every 16-column B panel (Kp * 32 bytes, L1/L2),
// which is reused by mc / 6 micro-kernels. With few rows (M < threads * mc), or on one thread
// while all of packed A is <= 8 MiB, A is prepared once and the B panels are split over threads
// (each panel then sweeps all of A). The whole K is reduced in registers (no kc blocking: the
// micro-kernel is issue-bound), so the epilogue runs on registers: no int32 (M, N) tensor is
// written when a float output is asked for.
//
// ISA: the AVX2 functions carry __attribute__((target("avx2,fma,f16c"))) and are chosen at run
// time with __builtin_cpu_supports("avx2"); the scalar path is portable C++ (aarch64 included).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define TKD_X86 1
#include <immintrin.h>
#endif

#include "int8_gemm_cpu.h"

namespace tkd {

namespace {

constexpr int64_t MR = 6;   // rows per micro-kernel (A panel height)
constexpr int64_t NR = 16;  // columns per micro-kernel (B panel width): two ymm of int32

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t even(int64_t k) { return round_up(k, 2); }

// ---------------------------------------------------------------------------------------------
// Packing B (portable; memory-bound, once per weight)

void pack_b_panel(const int8_t* b, int64_t N, int64_t K, int64_t sn, int64_t sk, int64_t j,
                  int16_t* out) {
  const int64_t Kp = even(K);
  int16_t* dst = out + j * NR * Kp;  // (Kp / 2, 16, 2)
  for (int64_t kp = 0; kp < Kp / 2; ++kp) {
    for (int64_t c = 0; c < NR; ++c) {
      const int64_t n = j * NR + c;
      for (int64_t t = 0; t < 2; ++t) {
        const int64_t k = 2 * kp + t;
        dst[(kp * NR + c) * 2 + t] = (n < N && k < K) ? b[n * sn + k * sk] : 0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue: a finished MR' x NR tile of int32 accumulators -> out (int32, or fp32 scaled)

struct Epilogue {
  void* out;               // (M, N) int32 or float32, row stride ldc
  int64_t ldc;
  bool scaled;             // false: exact int32; true: float32 acc * as[m] * bs[n] + bias[n]
  const float* a_scale;    // (M,)
  const float* b_scale;    // (N,)
  const float* bias;       // (N,) or nullptr
};

inline void store_row_scalar(const Epilogue& ep, const int32_t* acc, int64_t m, int64_t n0,
                             int64_t nn) {
  if (!ep.scaled) {
    int32_t* o = static_cast<int32_t*>(ep.out) + m * ep.ldc + n0;
    for (int64_t c = 0; c < nn; ++c) o[c] = acc[c];
    return;
  }
  float* o = static_cast<float*>(ep.out) + m * ep.ldc + n0;
  const float as = ep.a_scale[m];
  for (int64_t c = 0; c < nn; ++c) {
    float v = static_cast<float>(acc[c]) * (as * ep.b_scale[n0 + c]);
    o[c] = ep.bias ? v + ep.bias[n0 + c] : v;
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar micro-kernel (portable fallback; same packed layouts, same exact int32 arithmetic)

template <int R>
void micro_scalar(const int16_t* Ap, const int16_t* Bp, int64_t Kp, const Epilogue& ep,
                  int64_t m0, int64_t n0, int64_t nn) {
  int32_t acc[R][NR] = {};
  for (int64_t kp = 0; kp < Kp / 2; ++kp) {
    const int16_t* bk = Bp + kp * NR * 2;
    const int16_t* ak = Ap + kp * R * 2;
    for (int r = 0; r < R; ++r) {
      const int32_t a0 = ak[2 * r], a1 = ak[2 * r + 1];
      for (int c = 0; c < NR; ++c) acc[r][c] += a0 * bk[2 * c] + a1 * bk[2 * c + 1];
    }
  }
  for (int r = 0; r < R; ++r) store_row_scalar(ep, acc[r], m0 + r, n0, nn);
}

#if TKD_X86
// ---------------------------------------------------------------------------------------------
// AVX2 micro-kernel: R x 16 int32 accumulators (2R ymm), widened int16 operands, vpmaddwd.

#define TKD_AVX2 __attribute__((target("avx2,fma,f16c")))

TKD_AVX2 inline void store_row_avx2(const Epilogue& ep, __m256i c0, __m256i c1, int64_t m,
                                    int64_t n0, int64_t nn) {
  if (nn < NR) {  // right edge: spill the row to the stack and store the valid columns
    alignas(32) int32_t tmp[NR];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), c1);
    store_row_scalar(ep, tmp, m, n0, nn);
    return;
  }
  if (!ep.scaled) {
    int32_t* o = static_cast<int32_t*>(ep.out) + m * ep.ldc + n0;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), c1);
    return;
  }
  float* o = static_cast<float*>(ep.out) + m * ep.ldc + n0;
  const __m256 as = _mm256_set1_ps(ep.a_scale[m]);
  const __m256 s0 = _mm256_mul_ps(as, _mm256_loadu_ps(ep.b_scale + n0));
  const __m256 s1 = _mm256_mul_ps(as, _mm256_loadu_ps(ep.b_scale + n0 + 8));
  __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(c0), s0);
  __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(c1), s1);
  if (ep.bias) {
    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ep.bias + n0));
    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ep.bias + n0 + 8));
  }
  _mm256_storeu_ps(o, v0);
  _mm256_storeu_ps(o + 8, v1);
}

template <int R>
TKD_AVX2 void micro_avx2(const int16_t* Ap, const int16_t* Bp, int64_t Kp, const Epilogue& ep,
                         int64_t m0, int64_t n0, int64_t nn) {
  __m256i c[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
  const int32_t* a32 = reinterpret_cast<const int32_t*>(Ap);  // one int32 = 2 int16 of a row
  const __m256i* b = reinterpret_cast<const __m256i*>(Bp);     // 2 ymm per k pair
  const int64_t KP = Kp / 2;
  for (int64_t kp = 0; kp < KP; ++kp) {
    _mm_prefetch(reinterpret_cast<const char*>(b + 2 * kp + 16), _MM_HINT_T0);
    const __m256i b0 = _mm256_loadu_si256(b + 2 * kp);
    const __m256i b1 = _mm256_loadu_si256(b + 2 * kp + 1);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256i a = _mm256_set1_epi32(a32[kp * R + r]);
      c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(a, b0));
      c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(a, b1));
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) store_row_avx2(ep, c[r][0], c[r][1], m0 + r, n0, nn);
}
#endif  // TKD_X86

using MicroFn = void (*)(const int16_t*, const int16_t*, int64_t, const Epilogue&, int64_t,
                         int64_t, int64_t);

int g_isa_override = -1;  // -1: auto-detect, 0: force scalar, 1: AVX2 if supported (tests)

bool cpu_has_avx2() {
#if TKD_X86 && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool have_avx2() { return g_isa_override == 0 ? false : cpu_has_avx2(); }

MicroFn micro_for(int64_t rows, bool avx2) {
#if TKD_X86
  if (avx2) {
    static const MicroFn t[] = {nullptr, micro_avx2<1>, micro_avx2<2>, micro_avx2<3>,
                                micro_avx2<4>, micro_avx2<5>, micro_avx2<6>};
    return t[rows];
  }
#endif
  (void)avx2;
  static const MicroFn t[] = {nullptr, micro_scalar<1>, micro_scalar<2>, micro_scalar<3>,
                              micro_scalar<4>, micro_scalar<5>, micro_scalar<6>};
  return t[rows];
}

int clamp_threads(int64_t nthreads) {
  return static_cast<int>(std::max<int64_t>(1, nthreads));
}

// ---------------------------------------------------------------------------------------------
// Per-token quantization of one row (float32 in L1 after the one read of x)

#if TKD_X86
// max |x[k]|, or NaN when the row holds a NaN (vmaxps returns its second operand when either is
// NaN, so NaNs are tracked apart: an unordered compare of each vector with itself).
TKD_AVX2 float absmax_avx2(const float* x, int64_t K) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + k), v1 = _mm256_loadu_ps(x + k + 8);
    m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, v0));
    m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, v1));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_max_ps(m0, m1));
  float m = 0.f;
  for (float v : t) m = std::max(m, v);
  if (_mm256_movemask_ps(nan)) return std::nanf("");
  for (; k < K; ++k) {
    if (std::isnan(x[k])) return std::nanf("");
    m = std::max(m, std::fabs(x[k]));
  }
  return m;
}

// q = clamp(round_half_even(x / scale), -127, 127): a true division, like the torch reference
TKD_AVX2 void quantize_row_avx2(const float* x, int64_t K, float scale, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + k), s);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256i i32 = _mm256_cvtps_epi32(v);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32),
                                        _mm256_extracti128_si256(i32, 1));
    const __m128i i8 = _mm_packs_epi16(i16, i16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), i8);
  }
  for (; k < K; ++k) {
    float v = std::nearbyint(x[k] / scale);
    q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
}
#endif

float absmax_scalar(const float* x, int64_t K) {  // NaN when the row holds a NaN
  float m = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    if (std::isnan(x[k])) return std::nanf("");
    m = std::max(m, std::fabs(x[k]));
  }
  return m;
}

void quantize_row_scalar(const float* x, int64_t K, float scale, int8_t* q) {
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] / scale);  // default rounding mode: half to even
    q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Load one row of x (dtype: 0 fp32, 1 fp16, 2 bf16) as float32 into buf (or point at it).
const float* row_as_float(const void* x, int dtype, int64_t K, float* buf) {
  if (dtype == 0) return static_cast<const float*>(x);
  const uint16_t* h = static_cast<const uint16_t*>(x);
  if (dtype == 2) {
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits = static_cast<uint32_t>(h[k]) << 16;
      std::memcpy(buf + k, &bits, 4);
    }
  } else {
    for (int64_t k = 0; k < K; ++k) buf[k] = half_to_float(h[k]);
  }
  return buf;
}

// One row m of x (row stride sm elements, dtype 0 fp32 / 1 fp16 / 2 bf16) -> q (K int8) and its
// scale; one read of the row from memory (the float copy stays in L1 for the second pass).
float quantize_row(const void* x, int dtype, int64_t sm, int64_t m, int64_t K, float* buf,
                   int8_t* q, bool avx2) {
  const int64_t esize = dtype == 0 ? 4 : 2;
  const float* xf = row_as_float(static_cast<const char*>(x) + m * sm * esize, dtype, K, buf);
#if TKD_X86
  const float amax = avx2 ? absmax_avx2(xf, K) : absmax_scalar(xf, K);
#else
  const float amax = absmax_scalar(xf, K);
#endif
  if (!std::isfinite(amax)) {  // NaN or +-inf in the row: q = 0, scale NaN, so every output of
    std::memset(q, 0, static_cast<size_t>(K));  // this row is NaN (the epilogue multiplies by it)
    return std::nanf("");
  }
  const float s = amax > 0.f ? amax / 127.f : 1.f;  // all-zero row: finite scale, q = 0
#if TKD_X86
  if (avx2) quantize_row_avx2(xf, K, s, q);
  else quantize_row_scalar(xf, K, s, q);
#else
  quantize_row_scalar(xf, K, s, q);
#endif
  return s;
}

// Where the GEMM's A rows come from.
struct ASource {
  const void* ptr;
  int kind;         // 0: int8 rows (strides sm, sk); 1: float rows to quantize per token
  int dtype;        // kind 1: 0 fp32, 1 fp16, 2 bf16 (unit column stride)
  int64_t sm, sk;   // element strides
  float* scale_out; // kind 1: the per-token scales, written here, then read by the epilogue
};

struct Scratch {  // per-thread buffers
  std::vector<int16_t> a;  // packed A row block
  std::vector<float> f;    // one row as float32 (fp16 / bf16 input)
  std::vector<int8_t> q;   // one quantized row
  std::vector<int16_t> w;  // one row widened to int16, zero-padded to Kp
  Scratch(const ASource& src, int64_t K, int64_t a_numel)
      : a(static_cast<size_t>(a_numel)), f(src.kind == 1 && src.dtype != 0 ? K : 0),
        q(src.kind == 1 ? K : 0), w(static_cast<size_t>(even(K))) {}
};

// Widen (kind 0) or quantize (kind 1) rows [r0, r1) of A into panels at dst (r0 % MR == 0).
// Per row: widen into a contiguous int16 row (a sign-extending loop the compiler vectorizes),
// then move its k pairs, one 32-bit word each, to their interleaved panel slots (kp * mr + r),
// which keeps per-element index arithmetic out of the loop.
void prepare_rows(const ASource& src, int64_t M, int64_t K, int64_t r0, int64_t r1,
                  int16_t* dst, Scratch& sc, bool avx2) {
  const int64_t Kp = even(K);
  int16_t* w = sc.w.data();
  if (Kp > K) w[K] = 0;
  for (int64_t p = r0; p < r1; p += MR) {
    const int64_t mr = std::min(MR, M - p);
    int16_t* panel = dst + (p - r0) * Kp;  // (Kp / 2, mr, 2)
    for (int64_t r = 0; r < mr; ++r) {
      const int64_t m = p + r;
      if (src.kind == 0) {
        const int8_t* row = static_cast<const int8_t*>(src.ptr) + m * src.sm;
        if (src.sk == 1) {
          for (int64_t k = 0; k < K; ++k) w[k] = row[k];
        } else {
          for (int64_t k = 0; k < K; ++k) w[k] = row[k * src.sk];
        }
      } else {
        src.scale_out[m] = quantize_row(src.ptr, src.dtype, src.sm, m, K, sc.f.data(),
                                        sc.q.data(), avx2);
        const int8_t* q = sc.q.data();
        for (int64_t k = 0; k < K; ++k) w[k] = q[k];
      }
      int16_t* col = panel + 2 * r;
      for (int64_t kp = 0; kp < Kp / 2; ++kp)
        std::memcpy(col + kp * mr * 2, w + 2 * kp, 4);  // one int32: (a[m, 2kp], a[m, 2kp+1])
    }
  }
}

// Fresh outputs larger than glibc's mmap threshold arrive as untouched pages, faulted in 4 KiB at
// a time inside the kernel. Asking for transparent huge pages on the output's 2 MiB-aligned
// interior first makes that 512x fewer faults (a no-op where THP is off, and for pages already
// touched).
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t H = uintptr_t{2} << 20;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + H - 1) & ~(H - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(H - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Rows of the A block keep an L2 budget; B panels are reused by every row panel of a block.
int64_t block_rows(int64_t Kp) {
  const int64_t rows = (160 * 1024) / std::max<int64_t>(2 * Kp, 1) / MR * MR;
  return std::max(MR, std::min<int64_t>(rows, 16 * MR));
}

// C rows [r0, r1) x columns [c0, c1) (c0 % NR == 0) from the packed A block at Ab (row r0 first).
void compute_block(const int16_t* Ab, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                   const int16_t* Bp, int64_t Kp, const Epilogue& ep, bool avx2) {
  for (int64_t n0 = c0; n0 < c1; n0 += NR) {
    const int16_t* bp = Bp + (n0 / NR) * NR * Kp;
    const int64_t nn = std::min(NR, c1 - n0);
    for (int64_t m0 = r0; m0 < r1; m0 += MR) {
      const int64_t rows = std::min(MR, r1 - m0);
      micro_for(rows, avx2)(Ab + (m0 - r0) * Kp, bp, Kp, ep, m0, n0, nn);
    }
  }
}

}  // namespace

// =============================================================================================
// Public entry points (raw pointers; the Python wrapper validated shapes, dtypes, strides)

std::string cpu_isa() { return have_avx2() ? "avx2" : "scalar"; }

std::string set_cpu_isa(const std::string& isa) {
  if (isa == "scalar") g_isa_override = 0;
  else if (isa == "auto" || isa == "avx2") g_isa_override = -1;
  return cpu_isa();
}

int64_t packed_b_numel(int64_t N, int64_t K) { return round_up(N, NR) * even(K); }

void pack_b(const int8_t* b, int64_t N, int64_t K, int64_t sn, int64_t sk, int16_t* out,
            int64_t nthreads) {
  const int64_t panels = round_up(N, NR) / NR;
#pragma omp parallel for num_threads(clamp_threads(nthreads)) schedule(static)
  for (int64_t j = 0; j < panels; ++j) pack_b_panel(b, N, K, sn, sk, j, out);
}

void quantize_rows(const void* x, int dtype, int64_t M, int64_t K, int64_t sm, int8_t* q,
                   float* scale, int64_t nthreads) {
  const bool avx2 = have_avx2();
#pragma omp parallel num_threads(clamp_threads(nthreads))
  {
    std::vector<float> buf(dtype == 0 ? 0 : K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      scale[m] = quantize_row(x, dtype, sm, m, K, buf.data(), q + m * K, avx2);
  }
}

static void gemm(const ASource& src, const int16_t* Bp, int64_t M, int64_t N, int64_t K, void* out,
          int64_t ldc, const float* a_scale, const float* b_scale, const float* bias,
          int64_t nthreads) {
  const bool avx2 = have_avx2();
  const int64_t Kp = even(K), T = clamp_threads(nthreads);
  const Epilogue ep{out, ldc, a_scale != nullptr, a_scale, b_scale, bias};
  const int64_t out_bytes = M * ldc * 4;  // int32 or float32
  if (out_bytes >= (int64_t{8} << 20)) advise_huge_pages(out, out_bytes);
  const int64_t mc = block_rows(Kp);
  // One thread: row blocks only once all of packed A (swept again for every B panel by the
  // few-rows path) is past 8 MiB, a measured threshold (docs/int8_gemm_cpu.md).
  const bool big_a = M * Kp * 2 > (int64_t{8} << 20);
  if (M >= T * mc && (T > 1 || big_a)) {
    // Row split, one parallel region and no barrier: each thread prepares (widens or
    // quantizes) its own row blocks into an L2-resident buffer and runs them against all of B.
    const int64_t blocks = (M + mc - 1) / mc;
#pragma omp parallel num_threads(static_cast<int>(T))
    {
      Scratch sc(src, K, mc * Kp);
#pragma omp for schedule(static)
      for (int64_t mb = 0; mb < blocks; ++mb) {
        const int64_t r0 = mb * mc, r1 = std::min(M, r0 + mc);
        prepare_rows(src, M, K, r0, r1, sc.a.data(), sc, avx2);
        compute_block(sc.a.data(), r0, r1, 0, N, Bp, Kp, ep, avx2);
      }
    }
    return;
  }
  // Few rows (M < T * mc): prepare all of A once (split over threads, one barrier), then split
  // the 16-column B panels over threads.
  std::vector<int16_t> ap(static_cast<size_t>(M * Kp));
  const int64_t a_panels = (M + MR - 1) / MR, b_panels = (N + NR - 1) / NR;
#pragma omp parallel num_threads(static_cast<int>(T))
  {
    Scratch sc(src, K, 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a_panels; ++i)
      prepare_rows(src, M, K, i * MR, std::min(M, i * MR + MR), ap.data() + i * MR * Kp, sc, avx2);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < b_panels; ++j)
      compute_block(ap.data(), 0, M, j * NR, std::min(N, j * NR + NR), Bp, Kp, ep, avx2);
  }
}

void gemm_int8(const int8_t* a, int64_t sm, int64_t sk, const int16_t* Bp, int64_t M, int64_t N,
               int64_t K, void* out, int64_t ldc, const float* a_scale, const float* b_scale,
               const float* bias, int64_t nthreads) {
  const ASource src{a, 0, 0, sm, sk, nullptr};
  gemm(src, Bp, M, N, K, out, ldc, a_scale, b_scale, bias, nthreads);
}

void linear_dynamic(const void* x, int dtype, int64_t sm, const int16_t* Bp, int64_t M,
                    int64_t N, int64_t K, float* out, int64_t ldc, float* x_scale,
                    const float* w_scale, const float* bias, int64_t nthreads) {
  const ASource src{x, 1, dtype, sm, 1, x_scale};
  gemm(src, Bp, M, N, K, out, ldc, x_scale, w_scale, bias, nthreads);
}

}  // namespace tkd
