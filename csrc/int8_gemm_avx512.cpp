// AVX-512 VNNI micro-kernel of the CPU INT8 GEMM, its vector epilogue (scale, bias, GELU) and
// the per-token quantizer that feeds it.
//
// Exact s8 x s8 with vpdpbusd. vpdpbusd multiplies UNSIGNED bytes by signed bytes and adds each
// group of 4 products to an int32 lane, with no intermediate saturation (unlike vpmaddubsw). The
// weight b in [-128, 127] is packed as the byte b ^ 0x80 = b + 128 in [0, 255] (once per weight),
// the activation a enters as itself, so the kernel accumulates sum_k (b + 128) a = C +
// 128 sum_k a, and the epilogue subtracts corr[m] = 128 sum_k a[m, k], one int32 per row
// (computed by the quantizer, or in one pass over the row block for int8 input). The int32 lanes
// wrap (two's complement) if the biased sum leaves the int32 range, and the subtraction then
// wraps back: the result is exact whenever C itself fits in int32 (K <= 131071 for int8
// operands).
//
// Layouts (bytes; K padded to Kp = 4 Kq):
//   packed B: panels of NR = 64 columns; panel j holds, per k quad, 64 columns x 4 k:
//             Bp[j][kq][c][4] (4 zmm per k quad), u8 b + 128; padded k are u8 0, so whatever
//             an A row holds past K (the next row's bytes, the zero padding) adds nothing.
//   A:        row-major s8 rows (row stride lda bytes), read in place: k quad kq of row m is
//             the int32 at a + m lda + 4 kq, broadcast to all 16 lanes. No interleaved panels.
// Micro-kernel: 6 x 64 int32 accumulators in 24 zmm; per k quad it loads 4 B vectors,
// broadcasts one int32 (4 bytes of A) per row and issues 24 vpdpbusd (64 MACs each).
//
// Activations (erf and exp from avx512_math.h): NaN propagates, every form multiplies by x last
// (ReLU keeps a NaN through the operand order of vmaxps).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "avx512_math.h"
#include "int8_gemm_cpu_kernels.h"

namespace tkd {
namespace cpu {

float act_scalar(float v, int act) {
  switch (act) {
    case kActGelu:
      return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case kActGeluTanh: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + std::tanh(u));
    }
    case kActRelu:
      return std::isnan(v) ? v : std::max(v, 0.f);
    default:
      return v;
  }
}

#if TKD_X86

bool vnni_supported() { return avx512_supported() && __builtin_cpu_supports("avx512vnni"); }

namespace {

TKD_AVX512 inline __m512 act512(__m512 v, int act) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f);
  switch (act) {
    case kActGelu: {
      const __m512 e = erf512(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
      return _mm512_mul_ps(_mm512_mul_ps(half, _mm512_add_ps(one, e)), v);
    }
    case kActGeluTanh: {
      const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                     _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
      // tanh(u) = sign(u) (1 - t) / (1 + t), t = exp(-2 |u|)
      const __m512 au = _mm512_abs_ps(u);
      const __m512 t = exp512(_mm512_mul_ps(_mm512_set1_ps(-2.f), au));
      __m512 th = _mm512_div_ps(_mm512_sub_ps(one, t), _mm512_add_ps(one, t));
      th = _mm512_or_ps(th, _mm512_and_ps(u, _mm512_set1_ps(-0.f)));  // sign of u
      return _mm512_mul_ps(_mm512_mul_ps(half, _mm512_add_ps(one, th)), v);
    }
    case kActRelu:
      return _mm512_max_ps(_mm512_setzero_ps(), v);  // vmaxps returns v when v is NaN
    default:
      return v;
  }
}

TKD_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// One finished row of the tile: 4 zmm of biased int32 accumulators, minus the row's correction
// -> out row m, columns n0 .. n0 + nn - 1. FULL (nn = 64, every tile but the right edge): plain
// loads and stores, no masks (measured 2% of a whole GEMM at K = 768 on Zen 5).
template <bool FULL>
TKD_AVX512 inline void store_row(const Epilogue& ep, __m512i c0, __m512i c1, __m512i c2,
                                 __m512i c3, int32_t corr, int64_t m, int64_t n0, int64_t nn) {
  const __m512i cr = _mm512_set1_epi32(corr);
  const __m512i c[4] = {c0, c1, c2, c3};  // by value: the accumulators never leave registers
  const __m512 as = _mm512_set1_ps(ep.scaled ? ep.a_scale[m] : 0.f);
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    if (!FULL && 16 * j >= nn) break;
    const int64_t n = n0 + 16 * j;
    const __mmask16 k = FULL ? static_cast<__mmask16>(0xFFFF) : lanes(nn - 16 * j);
    const __m512i v = _mm512_sub_epi32(c[j], cr);
    if (!ep.scaled) {
      int32_t* o = static_cast<int32_t*>(ep.out) + m * ep.ldc + n;
      if (FULL) _mm512_storeu_si512(o, v);
      else _mm512_mask_storeu_epi32(o, k, v);
      continue;
    }
    const float* bsp = ep.b_scale + n;
    const __m512 s = _mm512_mul_ps(as, FULL ? _mm512_loadu_ps(bsp) : _mm512_maskz_loadu_ps(k, bsp));
    __m512 f = _mm512_cvtepi32_ps(v);
    if (ep.bias) {
      const __m512 b = FULL ? _mm512_loadu_ps(ep.bias + n) : _mm512_maskz_loadu_ps(k, ep.bias + n);
      f = _mm512_fmadd_ps(f, s, b);
    } else {
      f = _mm512_mul_ps(f, s);
    }
    if (ep.act) f = act512(f, ep.act);
    float* o = static_cast<float*>(ep.out) + m * ep.ldc + n;
    if (FULL) _mm512_storeu_ps(o, f);
    else _mm512_mask_storeu_ps(o, k, f);
  }
}

inline int32_t load_i32(const int8_t* p) {  // 4 bytes of an A row, any alignment
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int R>
TKD_AVX512 void micro(const int8_t* A, int64_t lda, const uint8_t* Bp, int64_t Kq,
                      const int32_t* corr, const Epilogue& ep, int64_t m0, int64_t n0,
                      int64_t nn) {
  __m512i c[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    c[r][0] = c[r][1] = c[r][2] = c[r][3] = _mm512_setzero_si512();
  const __m512i* b = reinterpret_cast<const __m512i*>(Bp);  // 4 zmm per k quad
  // the tile's output lines (int32 or float32, 4 bytes either way), fetched while the k loop runs
  // instead of missing when the epilogue stores (measured +3% at M = 4096, K = N = 768)
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4 && 16 * j < nn; ++j)
      _mm_prefetch(static_cast<const char*>(ep.out) + ((m0 + r) * ep.ldc + n0 + 16 * j) * 4,
                   _MM_HINT_T0);
  // unrolled twice: +3-5% for a whole GEMM at K = 768 on Zen 5 (docs/int8_gemm_cpu.md)
#pragma GCC unroll 2
  for (int64_t kq = 0; kq < Kq; ++kq) {
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * kq + 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * kq + 34), _MM_HINT_T0);
    const __m512i b0 = _mm512_loadu_si512(b + 4 * kq), b1 = _mm512_loadu_si512(b + 4 * kq + 1);
    const __m512i b2 = _mm512_loadu_si512(b + 4 * kq + 2), b3 = _mm512_loadu_si512(b + 4 * kq + 3);
    const int8_t* ak = A + 4 * kq;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(load_i32(ak + r * lda));
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], b0, a);  // u8 operand: b + 128; s8: a
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], b1, a);
      c[r][2] = _mm512_dpbusd_epi32(c[r][2], b2, a);
      c[r][3] = _mm512_dpbusd_epi32(c[r][3], b3, a);
    }
  }
  if (nn == kVnniNR) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
      store_row<true>(ep, c[r][0], c[r][1], c[r][2], c[r][3], corr[r], m0 + r, n0, nn);
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
      store_row<false>(ep, c[r][0], c[r][1], c[r][2], c[r][3], corr[r], m0 + r, n0, nn);
  }
}

}  // namespace

void micro_vnni(int64_t rows, const int8_t* A, int64_t lda, const uint8_t* Bp, int64_t Kq,
                const int32_t* corr, const Epilogue& ep, int64_t m0, int64_t n0, int64_t nn) {
  using Fn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, const int32_t*,
                      const Epilogue&, int64_t, int64_t, int64_t);
  static const Fn t[] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};
  t[rows](A, lda, Bp, Kq, corr, ep, m0, n0, nn);
}

// Whole vectors in a counted loop, then one masked tail: written as `for (k = 0; k < K; k += 64)`
// with a mask per step, the -fwrapv in Python's build flags made this pass cost ~5% of a whole
// GEMM at K = 3072 (docs/int8_gemm_cpu.md).
TKD_AVX512 void row_corr_vnni(const int8_t* a, int64_t lda, int64_t rows, int64_t K,
                              int32_t* corr) {
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t n64 = K / 64;
  const __mmask64 tail = (~__mmask64{0}) >> (63 - (K % 64)) >> 1;  // the last K % 64 bytes
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* p = a + r * lda;
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();  // 2 chains
    for (int64_t i = n64 / 2; i > 0; --i, p += 128) {
      acc0 = _mm512_dpbusd_epi32(acc0, ones, _mm512_loadu_si512(p));
      acc1 = _mm512_dpbusd_epi32(acc1, ones, _mm512_loadu_si512(p + 64));
    }
    if (n64 & 1) {
      acc0 = _mm512_dpbusd_epi32(acc0, ones, _mm512_loadu_si512(p));
      p += 64;
    }
    if (tail) acc1 = _mm512_dpbusd_epi32(acc1, ones, _mm512_maskz_loadu_epi8(tail, p));
    const __m512i acc = _mm512_add_epi32(acc0, acc1);
    const uint32_t sum = static_cast<uint32_t>(_mm512_reduce_add_epi32(acc));
    corr[r] = static_cast<int32_t>(sum * 128u);  // wraps like the kernel's lanes (no UB)
  }
}

TKD_AVX512 float quantize_row_vnni(const float* x, int64_t K, int64_t Kp, int8_t* q,
                                   int32_t* corr) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  __mmask16 nan = 0;  // vmaxps drops a NaN operand: NaNs are tracked apart
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 v0 = _mm512_loadu_ps(x + k), v1 = _mm512_loadu_ps(x + k + 16);
    m0 = _mm512_max_ps(m0, _mm512_andnot_ps(sign, v0));
    m1 = _mm512_max_ps(m1, _mm512_andnot_ps(sign, v1));
    nan |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q);
  }
  for (; k < K; k += 16) {
    const __mmask16 t = lanes(K - k);
    const __m512 v = _mm512_maskz_loadu_ps(t, x + k);
    m0 = _mm512_max_ps(m0, _mm512_andnot_ps(sign, v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  if (nan || !std::isfinite(amax)) {  // NaN or +-inf: q = 0, scale NaN (every output NaN)
    std::memset(q, 0, static_cast<size_t>(Kp));
    *corr = 0;
    return std::nanf("");
  }
  const float s = amax > 0.f ? amax / 127.f : 1.f;  // all-zero row: finite scale, q = 0
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  __m512i sum = _mm512_setzero_si512();
  for (k = 0; k < K; k += 16) {
    const __mmask16 t = lanes(K - k);
    // a true division (like the reference), round half to even, clamp: q in [-127, 127]
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(t, x + k), vs);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i i = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    sum = _mm512_add_epi32(sum, i);  // masked-off lanes are 0
    _mm512_mask_cvtepi32_storeu_epi8(q + k, t, i);
  }
  std::memset(q + K, 0, static_cast<size_t>(Kp - K));
  *corr = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(sum)) * 128u);
  return s;
}

TKD_AVX512 void act_avx512(float* v, int64_t n, int act) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    _mm512_mask_storeu_ps(v + i, k, act512(_mm512_maskz_loadu_ps(k, v + i), act));
  }
}

#else  // not x86: the driver never selects the VNNI layout

bool vnni_supported() { return false; }
void micro_vnni(int64_t, const int8_t*, int64_t, const uint8_t*, int64_t, const int32_t*,
                const Epilogue&, int64_t, int64_t, int64_t) {}
void row_corr_vnni(const int8_t*, int64_t, int64_t, int64_t, int32_t*) {}
float quantize_row_vnni(const float*, int64_t, int64_t, int8_t*, int32_t*) { return 0.f; }
void act_avx512(float* v, int64_t n, int act) {
  for (int64_t i = 0; i < n; ++i) v[i] = act_scalar(v[i], act);
}

#endif

}  // namespace cpu
}  // namespace tkd
