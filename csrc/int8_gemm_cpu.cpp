// Exact INT8 GEMM on the CPU: C (M, N) = A (M, K) @ B (N, K)^T, int8 in, int32 accumulate,
// with a fused per-token x per-channel scale + bias (+ activation) epilogue (float32 out), and the
// fused per-token activation quantizer that feeds it. Design notes, the cost analysis and the
// measurements behind the choices below: docs/int8_gemm_cpu.md.
//
// Three kernels share this driver, chosen at run time (`cpu_isa()`), each with its own packed
// layout (a packed weight records the ISA it was packed for):
//   avx512vnni  vpdpbusd on u8 (b + 128) x s8 a quads, 6 x 64 tiles, A rows read in place, a
//               per-row correction in the epilogue (int8_gemm_avx512.cpp). 4 MACs per lane
//               per instruction.
//   avx2        operands WIDENED to int16 and multiplied with vpmaddwd (s16 x s16 -> s32 pair
//               sums), never the saturating vpmaddubsw; 6 x 16 tiles.
//   scalar      portable C++ on the avx2 layout (aarch64 included).
// Every kernel is exact: the int32 accumulator holds C exactly for K <= 131071.
//
// Layouts (K padded with zeros to Kp, a multiple of the k group G: 2 int16 / 4 bytes):
//   packed B: panels of NR columns; panel j holds, per k group, NR columns x G k:
//             Bp[j][kg][c][G]; padded columns are zero. VNNI: bytes b ^ 0x80, padding u8 0.
//   packed A (int16 layouts): panels of MR = 6 rows; per k group, its rows x G k:
//             Ap[i][kg][r][G], panel i at offset i * 6 * Kp elements (only the last is short).
//   A (VNNI): row-major int8 rows, no interleaving: the caller's rows in place when their k
//             stride is 1 and K % 4 == 0, else rows copied (or, float input, quantized) into a
//             row-major buffer of Kp bytes a row; with corr[m] = 128 sum_k a[m, k].
// Blocking and threads: with enough rows, each thread takes whole row blocks (mc rows, ~160 KiB
// of A, L2-resident), prepares them itself (VNNI: the row corrections, or the copy / quantized
// rows, into a private buffer; int16: packed panels; never an (M, K) copy of A) and runs them
// against every B panel, which is reused by mc / 6 micro-kernels. With few rows (M < threads *
// mc), or (int16 layouts) on one thread while all of packed A is <= 8 MiB, A is prepared once
// and the B panels are split over threads. The whole K is reduced in registers (no kc
// blocking), so the epilogue runs on registers: no int32 (M, N) tensor is written when a float
// output is asked for. Threads come from our own pool (cpu_pool.h: work items claimed from a
// counter, no barrier waits for a descheduled thread), not OpenMP; small problems run on fewer
// threads (`gemm_threads`: ~1 M MACs per thread at least). Workspaces (A blocks, row buffers)
// are per thread and kept between calls.
//
// ISA: the AVX2 functions carry __attribute__((target("avx2,fma,f16c"))), the AVX-512 ones live
// in int8_gemm_avx512.cpp; both are chosen at run time with __builtin_cpu_supports.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define TKD_X86 1
#include <immintrin.h>
#endif

#include "cpu_pool.h"
#include "int8_gemm_cpu.h"
#include "int8_gemm_cpu_kernels.h"

namespace tkd {

namespace {

using cpu::Epilogue;

enum Isa : int { kScalar = 0, kAvx2 = 1, kVnni = 2 };

constexpr int64_t MR = 6;  // rows per micro-kernel (A panel height), every ISA

struct Layout {
  int64_t nr;     // columns per micro-kernel (B panel width)
  int64_t group;  // k elements per group (2: int16 pairs, 4: byte quads)
  int64_t esize;  // bytes per packed element
};

Layout layout(int isa) {
  return isa == kVnni ? Layout{cpu::kVnniNR, 4, 1} : Layout{16, 2, 2};
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Packing B (portable; memory-bound, once per weight)

void pack_b_panel_i16(const int8_t* b, int64_t N, int64_t K, int64_t sn, int64_t sk, int64_t j,
                      int16_t* out) {
  constexpr int64_t NR = 16;
  const int64_t Kp = round_up(K, 2);
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

// VNNI panel j: (Kp / 4, 64, 4) bytes u8 b + 128 (b ^ 0x80); padded k and columns are u8 0, so
// the bytes an A row holds past K contribute nothing.
void pack_b_panel_vnni(const int8_t* b, int64_t N, int64_t K, int64_t sn, int64_t sk, int64_t j,
                       uint8_t* out) {
  constexpr int64_t NR = cpu::kVnniNR;
  const int64_t Kp = round_up(K, 4);
  uint8_t* dst = out + j * NR * Kp;
  for (int64_t c = 0; c < NR; ++c) {
    const int64_t n = j * NR + c;
    for (int64_t k = 0; k < Kp; ++k) {
      const uint8_t v = (n < N && k < K) ? static_cast<uint8_t>(b[n * sn + k * sk]) ^ 0x80u : 0;
      dst[((k / 4) * NR + c) * 4 + k % 4] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue of the int16 kernels: a finished MR' x 16 tile of int32 accumulators -> out

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
    v = ep.bias ? v + ep.bias[n0 + c] : v;
    o[c] = ep.act ? cpu::act_scalar(v, ep.act) : v;
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar micro-kernel (portable fallback; the avx2 layout, the same exact int32 arithmetic)

template <int R>
void micro_scalar(const int16_t* Ap, const int16_t* Bp, int64_t Kp, const Epilogue& ep,
                  int64_t m0, int64_t n0, int64_t nn) {
  constexpr int64_t NR = 16;
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
  if (nn < 16 || ep.act) {  // right edge or an activation: spill the row, scalar epilogue
    alignas(32) int32_t tmp[16];
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

int g_isa_override = -1;  // -1: best detected; else the ISA forced by set_cpu_isa (tests)

bool cpu_has_avx2() {
#if TKD_X86 && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

int best_isa() { return cpu::vnni_supported() ? kVnni : cpu_has_avx2() ? kAvx2 : kScalar; }

int current_isa() { return g_isa_override >= 0 ? g_isa_override : best_isa(); }

// One micro-kernel call: rows x NR tile of C at (m0, n0) from an A panel and a B panel.
// (int16 layouts; the VNNI kernel reads A in place: gemm_vnni)
void micro(int isa, int64_t rows, const void* Ap, const void* Bp, int64_t Kp, const Epilogue& ep,
           int64_t m0, int64_t n0, int64_t nn) {
  using Fn = void (*)(const int16_t*, const int16_t*, int64_t, const Epilogue&, int64_t, int64_t,
                      int64_t);
#if TKD_X86
  static const Fn avx2[] = {nullptr, micro_avx2<1>, micro_avx2<2>, micro_avx2<3>, micro_avx2<4>,
                            micro_avx2<5>, micro_avx2<6>};
#endif
  static const Fn scalar[] = {nullptr, micro_scalar<1>, micro_scalar<2>, micro_scalar<3>,
                              micro_scalar<4>, micro_scalar<5>, micro_scalar<6>};
#if TKD_X86
  const Fn* t = isa == kAvx2 ? avx2 : scalar;
#else
  const Fn* t = scalar;
#endif
  t[rows](static_cast<const int16_t*>(Ap), static_cast<const int16_t*>(Bp), Kp, ep, m0, n0, nn);
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

// Per-thread workspaces, kept between calls (grown, never shrunk): a call allocates nothing once
// the shapes have been seen.
struct Scratch {
  std::vector<uint8_t> a;  // packed A: a row block (row split) or all of A (few rows)
  std::vector<float> f;    // one row as float32 (fp16 / bf16 input)
  std::vector<int8_t> q;   // one int8 row, zero-padded to Kp
  std::vector<int16_t> w;  // one row widened to int16 (int16 layouts)
  std::vector<int32_t> corr;  // VNNI: the row corrections of a row block (or of all of A)
};

Scratch& scratch(int64_t K, int64_t Kp) {
  static thread_local Scratch s;
  if (static_cast<int64_t>(s.f.size()) < K) s.f.resize(static_cast<size_t>(K));
  if (static_cast<int64_t>(s.q.size()) < Kp) s.q.resize(static_cast<size_t>(Kp));
  if (static_cast<int64_t>(s.w.size()) < Kp) s.w.resize(static_cast<size_t>(Kp));
  return s;
}

uint8_t* grow(std::vector<uint8_t>& v, int64_t bytes) {
  if (static_cast<int64_t>(v.size()) < bytes) v.resize(static_cast<size_t>(bytes));
  return v.data();
}

// Row m of an int8 A (any k stride) into q[0, K).
inline void copy_int8_row(const ASource& src, int64_t m, int64_t K, int8_t* q) {
  const int8_t* row = static_cast<const int8_t*>(src.ptr) + m * src.sm;
  if (src.sk == 1) {
    std::memcpy(q, row, static_cast<size_t>(K));
  } else {
    for (int64_t k = 0; k < K; ++k) q[k] = row[k * src.sk];
  }
}

// Rows [r0, r1) of A -> packed int16 panels at dst (r0 % MR == 0). Per row: one int8 row in sc.q
// (copied or quantized from x, zero-padded to Kp), widened to int16 (a sign-extending loop the
// compiler vectorizes), then its k pairs, one 32-bit word each, go to their interleaved panel
// slots (kp * mr + r).
void prepare_rows(const ASource& src, int isa, int64_t M, int64_t K, int64_t r0, int64_t r1,
                  uint8_t* dst, Scratch& sc) {
  const Layout L = layout(isa);
  const int64_t Kp = round_up(K, L.group);
  const bool avx2 = isa != kScalar && cpu_has_avx2();
  int8_t* q = sc.q.data();
  std::memset(q + K, 0, static_cast<size_t>(Kp - K));
  for (int64_t p = r0; p < r1; p += MR) {
    const int64_t mr = std::min(MR, M - p);
    uint32_t* panel = reinterpret_cast<uint32_t*>(dst + (p - r0) * Kp * L.esize);
    for (int64_t r = 0; r < mr; ++r) {
      const int64_t m = p + r;
      if (src.kind == 0) {
        copy_int8_row(src, m, K, q);
      } else {
        src.scale_out[m] = quantize_row(src.ptr, src.dtype, src.sm, m, K, sc.f.data(), q, avx2);
      }
      const int64_t words = Kp / L.group;
      int16_t* w = sc.w.data();
      for (int64_t k = 0; k < Kp; ++k) w[k] = q[k];
      for (int64_t kp = 0; kp < words; ++kp)
        std::memcpy(panel + kp * mr + r, w + 2 * kp, 4);  // (a[m, 2kp], a[m, 2kp+1])
    }
  }
}

// Whether the VNNI kernel can read A's int8 rows where they are (no copy).
bool vnni_in_place(const ASource& src, int64_t K) {
  return src.kind == 0 && src.sk == 1 && K % 4 == 0;
}

// Rows [r0, r1) of A as the VNNI kernel reads them, returned with their row stride *lda: int8 rows
// with a unit k stride and K % 4 == 0 are read in place (a row's last k quad ends at its last
// byte); other int8 rows are copied into buf, and float rows quantized per token into it (Kp
// bytes a row, zero-padded). corr[m - r0] = 128 sum_k a[m, k] either way.
const int8_t* prepare_rows_vnni(const ASource& src, int64_t K, int64_t r0, int64_t r1,
                                uint8_t* buf, int32_t* corr, Scratch& sc, int64_t* lda) {
  const int64_t Kp = round_up(K, 4);
  if (vnni_in_place(src, K)) {
    const int8_t* a = static_cast<const int8_t*>(src.ptr) + r0 * src.sm;
    cpu::row_corr_vnni(a, src.sm, r1 - r0, K, corr);
    *lda = src.sm;
    return a;
  }
  int8_t* dst = reinterpret_cast<int8_t*>(buf);
  for (int64_t m = r0; m < r1; ++m) {
    int8_t* q = dst + (m - r0) * Kp;
    if (src.kind == 0) {
      copy_int8_row(src, m, K, q);
      std::memset(q + K, 0, static_cast<size_t>(Kp - K));
      cpu::row_corr_vnni(q, Kp, 1, K, corr + (m - r0));
    } else {
      const int64_t esize = src.dtype == 0 ? 4 : 2;
      const float* xf = row_as_float(static_cast<const char*>(src.ptr) + m * src.sm * esize,
                                     src.dtype, K, sc.f.data());
      src.scale_out[m] = cpu::quantize_row_vnni(xf, K, Kp, q, corr + (m - r0));
    }
  }
  *lda = Kp;
  return dst;
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
int64_t block_rows(int64_t row_bytes) {
  const int64_t rows = (160 * 1024) / std::max<int64_t>(row_bytes, 1) / MR * MR;
  return std::max(MR, std::min<int64_t>(rows, 16 * MR));
}

// C rows [r0, r1) x columns [c0, c1) (c0 % NR == 0) from the packed A block at Ab (row r0 first).
void compute_block(int isa, const uint8_t* Ab, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                   const uint8_t* Bp, int64_t Kp, const Epilogue& ep) {
  const Layout L = layout(isa);
  for (int64_t n0 = c0; n0 < c1; n0 += L.nr) {
    const uint8_t* bp = Bp + (n0 / L.nr) * L.nr * Kp * L.esize;
    const int64_t nn = std::min(L.nr, c1 - n0);
    for (int64_t m0 = r0; m0 < r1; m0 += MR) {
      const int64_t rows = std::min(MR, r1 - m0);
      micro(isa, rows, Ab + (m0 - r0) * Kp * L.esize, bp, Kp, ep, m0, n0, nn);
    }
  }
}

}  // namespace

// =============================================================================================
// Public entry points (raw pointers; the Python wrapper validated shapes, dtypes, strides)

std::string cpu_isa() {
  static const char* names[] = {"scalar", "avx2", "avx512vnni"};
  return names[current_isa()];
}

int cpu_isa_code() { return current_isa(); }

std::string set_cpu_isa(const std::string& isa) {
  if (isa == "scalar") g_isa_override = kScalar;
  else if (isa == "avx2" && cpu_has_avx2()) g_isa_override = kAvx2;
  else if (isa == "auto" || isa == "avx512vnni") g_isa_override = -1;
  return cpu_isa();
}

int64_t packed_b_bytes(int64_t N, int64_t K, int isa) {
  const Layout L = layout(isa);
  const int64_t Np = round_up(N, L.nr);
  return Np * round_up(K, L.group) * L.esize;
}

void pack_b(const int8_t* b, int64_t N, int64_t K, int64_t sn, int64_t sk, void* out, int isa,
            int64_t nthreads) {
  const Layout L = layout(isa);
  const int64_t panels = round_up(N, L.nr) / L.nr;
  pool::parallel_for(panels, clamp_threads(nthreads), [&](int64_t j) {
    if (isa == kVnni) {
      pack_b_panel_vnni(b, N, K, sn, sk, j, static_cast<uint8_t*>(out));
    } else {
      pack_b_panel_i16(b, N, K, sn, sk, j, static_cast<int16_t*>(out));
    }
  });
}

void quantize_rows(const void* x, int dtype, int64_t M, int64_t K, int64_t sm, int8_t* q,
                   float* scale, int64_t nthreads) {
  const bool avx2 = current_isa() != kScalar && cpu_has_avx2();
  constexpr int64_t kRows = 16;  // rows per work item
  const int64_t T = std::min<int64_t>(clamp_threads(nthreads), 1 + M * K / (int64_t{1} << 16));
  pool::parallel_for((M + kRows - 1) / kRows, T, [&](int64_t i) {
    float* buf = scratch(K, K).f.data();
    for (int64_t m = i * kRows; m < std::min(M, i * kRows + kRows); ++m)
      scale[m] = quantize_row(x, dtype, sm, m, K, buf, q + m * K, avx2);
  });
}

int64_t gemm_threads(int64_t M, int64_t N, int64_t K, int64_t nthreads) {
  // below ~1 M multiply-adds per thread the parallel region's fork/join costs more than the
  // split saves (measured on a 2-core Zen 5: docs/int8_gemm_cpu.md)
  constexpr int64_t kMacsPerThread = int64_t{1} << 20;
  const int64_t macs = M * N * std::max<int64_t>(K, 1);
  return std::max<int64_t>(1, std::min<int64_t>(clamp_threads(nthreads), macs / kMacsPerThread));
}

// The VNNI driver. Row blocks (mc rows, A and its corrections prepared by the thread that takes
// the block; int8 rows in place) each run against every B panel, the block's micro-tiles inner,
// so a B panel is reused from L1/L2 by mc / 6 micro-kernels and the block's rows stay in L2. With
// few rows on several threads (M < T * mc), A is prepared once and the B panels are split.
void gemm_vnni(const ASource& src, const uint8_t* Bp, int64_t M, int64_t N, int64_t K,
               const Epilogue& ep, int64_t T) {
  constexpr int64_t NR = cpu::kVnniNR;
  const int64_t Kp = round_up(K, 4), panels = round_up(N, NR) / NR, mc = block_rows(Kp);
  // rows [r0, r1) of the block at a (row stride lda) x panels [j0, j1)
  auto compute = [&](const int8_t* a, int64_t lda, const int32_t* corr, int64_t r0, int64_t r1,
                     int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* bp = Bp + j * NR * Kp;
      const int64_t n0 = j * NR, nn = std::min(NR, N - n0);
      for (int64_t m0 = r0; m0 < r1; m0 += MR)
        cpu::micro_vnni(std::min(MR, r1 - m0), a + (m0 - r0) * lda, lda, bp, Kp / 4,
                        corr + (m0 - r0), ep, m0, n0, nn);
    }
  };
  const bool in_place = vnni_in_place(src, K);
  if (T == 1 || M >= T * mc) {
    pool::parallel_for((M + mc - 1) / mc, T, [&](int64_t mb) {
      Scratch& sc = scratch(K, Kp);
      if (static_cast<int64_t>(sc.corr.size()) < mc) sc.corr.resize(static_cast<size_t>(mc));
      const int64_t r0 = mb * mc, r1 = std::min(M, r0 + mc);
      int64_t lda;
      uint8_t* buf = in_place ? nullptr : grow(sc.a, mc * Kp);
      const int8_t* a = prepare_rows_vnni(src, K, r0, r1, buf, sc.corr.data(), sc, &lda);
      compute(a, lda, sc.corr.data(), r0, r1, 0, panels);
    });
    return;
  }
  Scratch& own = scratch(K, Kp);  // the calling thread's workspace holds all of A (unless read
  if (static_cast<int64_t>(own.corr.size()) < M) own.corr.resize(static_cast<size_t>(M));
  uint8_t* buf = in_place ? nullptr : grow(own.a, M * Kp);  // in place) and its corrections
  int32_t* corr = own.corr.data();
  const int64_t a_panels = (M + MR - 1) / MR;
  // a few rows per work item: preparing a row costs far less than the pool's hand-off
  const int64_t per_item = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K * MR, 1));
  pool::parallel_for((a_panels + per_item - 1) / per_item, T, [&](int64_t i) {
    const int64_t r0 = i * per_item * MR, r1 = std::min(M, r0 + per_item * MR);
    int64_t ld;
    prepare_rows_vnni(src, K, r0, r1, in_place ? nullptr : buf + r0 * Kp, corr + r0,
                      scratch(K, Kp), &ld);
  });
  const int8_t* a = in_place ? static_cast<const int8_t*>(src.ptr) : reinterpret_cast<int8_t*>(buf);
  const int64_t lda = in_place ? src.sm : Kp;
  pool::parallel_for(panels, T, [&](int64_t j) { compute(a, lda, corr, 0, M, j, j + 1); });
}

static void gemm(const ASource& src, const void* Bp_, int isa, int64_t M, int64_t N, int64_t K,
                 void* out, int64_t ldc, const float* a_scale, const float* b_scale,
                 const float* bias, int act, int64_t nthreads) {
  const Layout L = layout(isa);
  const uint8_t* Bp = static_cast<const uint8_t*>(Bp_);
  const int64_t Kp = round_up(K, L.group), T = gemm_threads(M, N, K, nthreads);
  const int64_t Np = round_up(N, L.nr);
  const Epilogue ep{out, ldc, a_scale != nullptr, a_scale, b_scale, bias,
                    a_scale != nullptr ? act : 0};
  const int64_t out_bytes = M * ldc * 4;  // int32 or float32
  if (out_bytes >= (int64_t{8} << 20)) advise_huge_pages(out, out_bytes);
  if (isa == kVnni) {
    gemm_vnni(src, Bp, M, N, K, ep, T);
    return;
  }
  const int64_t row_bytes = Kp * L.esize, mc = block_rows(row_bytes);
  // One thread: row blocks only once all of packed A (swept again for every B panel by the
  // few-rows path) is past 8 MiB, a measured threshold (docs/int8_gemm_cpu.md).
  const bool big_a = M * row_bytes > (int64_t{8} << 20);
  if (M >= T * mc && (T > 1 || big_a)) {
    // Row split, no barrier: each work item is a row block a thread prepares (copies or
    // quantizes) into its own L2-resident buffer and runs against all of B.
    const int64_t blocks = (M + mc - 1) / mc;
    pool::parallel_for(blocks, T, [&](int64_t mb) {
      Scratch& sc = scratch(K, Kp);
      uint8_t* ab = grow(sc.a, mc * row_bytes);
      const int64_t r0 = mb * mc, r1 = std::min(M, r0 + mc);
      prepare_rows(src, isa, M, K, r0, r1, ab, sc);
      compute_block(isa, ab, r0, r1, 0, N, Bp, Kp, ep);
    });
    return;
  }
  // Few rows (M < T * mc): prepare all of A once (row panels split over threads), then split
  // the B panels over threads.
  uint8_t* ap = grow(scratch(K, Kp).a, M * row_bytes);  // the calling thread's workspace
  const int64_t a_panels = (M + MR - 1) / MR, b_panels = Np / L.nr;
  // a few rows per work item: quantizing a row costs far less than the pool's hand-off
  const int64_t per_item = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K * MR, 1));
  pool::parallel_for((a_panels + per_item - 1) / per_item, T, [&](int64_t i) {
    const int64_t r0 = i * per_item * MR, r1 = std::min(M, r0 + per_item * MR);
    prepare_rows(src, isa, M, K, r0, r1, ap + r0 * row_bytes, scratch(K, Kp));
  });
  pool::parallel_for(b_panels, T, [&](int64_t j) {
    compute_block(isa, ap, 0, M, j * L.nr, std::min(N, j * L.nr + L.nr), Bp, Kp, ep);
  });
}

void gemm_int8(const int8_t* a, int64_t sm, int64_t sk, const void* Bp, int isa, int64_t M,
               int64_t N, int64_t K, void* out, int64_t ldc, const float* a_scale,
               const float* b_scale, const float* bias, int act, int64_t nthreads) {
  const ASource src{a, 0, 0, sm, sk, nullptr};
  gemm(src, Bp, isa, M, N, K, out, ldc, a_scale, b_scale, bias, act, nthreads);
}

void linear_dynamic(const void* x, int dtype, int64_t sm, const void* Bp, int isa, int64_t M,
                    int64_t N, int64_t K, float* out, int64_t ldc, float* x_scale,
                    const float* w_scale, const float* bias, int act, int64_t nthreads) {
  const ASource src{x, 1, dtype, sm, 1, x_scale};
  gemm(src, Bp, isa, M, N, K, out, ldc, x_scale, w_scale, bias, act, nthreads);
}

void linear_plan_run(const LinearPlan& p, const void* x, int dtype, int64_t sm, int64_t M,
                     float* out, int64_t ldc, int64_t nthreads) {
  static thread_local std::vector<float> x_scale;
  if (static_cast<int64_t>(x_scale.size()) < M) x_scale.resize(static_cast<size_t>(M));
  linear_dynamic(x, dtype, sm, p.Bp, p.isa, M, p.N, p.K, out, ldc, x_scale.data(), p.w_scale,
                 p.bias, p.act, nthreads);
}

void activation(float* v, int64_t n, int act, int isa) {
  if (isa == kVnni && cpu::vnni_supported()) {
    cpu::act_avx512(v, n, act);
    return;
  }
  for (int64_t i = 0; i < n; ++i) v[i] = cpu::act_scalar(v[i], act);
}

}  // namespace tkd
