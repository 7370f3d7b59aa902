// AVX-512 VNNI micro-kernel of the CPU INT8 GEMM and its vector epilogue (scale, bias, GELU).
//
// Exact s8 x s8 with vpdpbusd. vpdpbusd multiplies UNSIGNED bytes by signed bytes and adds each
// group of 4 products to an int32 lane, with no intermediate saturation (unlike vpmaddubsw). A
// signed a in [-128, 127] enters as the byte a ^ 0x80 = a + 128 in [0, 255], so the kernel
// accumulates sum_k (a + 128) b = C + 128 sum_k b, and the epilogue subtracts comp[n] =
// 128 sum_k b[n, k], computed once when the weight is packed. The int32 lanes wrap (two's
// complement) if the biased sum leaves the int32 range, and the subtraction then wraps back:
// the result is exact whenever C itself fits in int32 (K <= 131071 for int8 operands).
//
// Layouts (bytes; K padded with zeros to Kp = 4 Kq):
//   packed B: panels of NR = 64 columns; panel j holds, per k quad, 64 columns x 4 k:
//             Bp[j][kq][c][4] (4 zmm per k quad), then comp (int32, one per padded column).
//   packed A: panels of MR = 6 rows; per k quad, its rows x 4 biased bytes: Ap[i][kq][r][4].
// Micro-kernel: 6 x 64 int32 accumulators in 24 zmm; per k quad it loads 4 B vectors,
// broadcasts one int32 (4 bytes of A) per row and issues 24 vpdpbusd (64 MACs each).
//
// Activations (erf and exp from avx512_math.h): NaN propagates, every form multiplies by x last
// (ReLU keeps a NaN through the operand order of vmaxps).
#include <algorithm>
#include <cmath>
#include <cstdint>

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

// One finished row of the tile: 4 zmm of biased int32 accumulators -> out row m, columns
// n0 .. n0 + nn - 1.
TKD_AVX512 inline void store_row(const Epilogue& ep, __m512i c0, __m512i c1, __m512i c2,
                                 __m512i c3, int64_t m, int64_t n0, int64_t nn) {
  const float as = ep.scaled ? ep.a_scale[m] : 0.f;
  const __m512i c[4] = {c0, c1, c2, c3};  // by value: the accumulators never leave registers
  for (int j = 0; j < 4 && 16 * j < nn; ++j) {
    const int64_t n = n0 + 16 * j;
    const __mmask16 k = lanes(nn - 16 * j);
    const __m512i v = _mm512_sub_epi32(c[j], _mm512_loadu_si512(ep.comp + n));
    if (!ep.scaled) {
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(ep.out) + m * ep.ldc + n, k, v);
      continue;
    }
    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(as), _mm512_maskz_loadu_ps(k, ep.b_scale + n));
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
    if (ep.bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(k, ep.bias + n));
    if (ep.act) f = act512(f, ep.act);
    _mm512_mask_storeu_ps(static_cast<float*>(ep.out) + m * ep.ldc + n, k, f);
  }
}

template <int R>
TKD_AVX512 void micro(const uint8_t* Ap, const int8_t* Bp, int64_t Kq, const Epilogue& ep,
                      int64_t m0, int64_t n0, int64_t nn) {
  __m512i c[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    c[r][0] = c[r][1] = c[r][2] = c[r][3] = _mm512_setzero_si512();
  const int32_t* a32 = reinterpret_cast<const int32_t*>(Ap);  // one int32 = 4 bytes of a row
  const __m512i* b = reinterpret_cast<const __m512i*>(Bp);     // 4 zmm per k quad
  for (int64_t kq = 0; kq < Kq; ++kq) {
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * kq + 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * kq + 34), _MM_HINT_T0);
    const __m512i b0 = _mm512_loadu_si512(b + 4 * kq), b1 = _mm512_loadu_si512(b + 4 * kq + 1);
    const __m512i b2 = _mm512_loadu_si512(b + 4 * kq + 2), b3 = _mm512_loadu_si512(b + 4 * kq + 3);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(a32[kq * R + r]);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, b0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, b1);
      c[r][2] = _mm512_dpbusd_epi32(c[r][2], a, b2);
      c[r][3] = _mm512_dpbusd_epi32(c[r][3], a, b3);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) store_row(ep, c[r][0], c[r][1], c[r][2], c[r][3], m0 + r, n0, nn);
}

}  // namespace

void micro_vnni(int64_t rows, const uint8_t* Ap, const int8_t* Bp, int64_t Kq, const Epilogue& ep,
                int64_t m0, int64_t n0, int64_t nn) {
  using Fn = void (*)(const uint8_t*, const int8_t*, int64_t, const Epilogue&, int64_t, int64_t,
                      int64_t);
  static const Fn t[] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};
  t[rows](Ap, Bp, Kq, ep, m0, n0, nn);
}

TKD_AVX512 void act_avx512(float* v, int64_t n, int act) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    _mm512_mask_storeu_ps(v + i, k, act512(_mm512_maskz_loadu_ps(k, v + i), act));
  }
}

#else  // not x86: the driver never selects the VNNI layout

bool vnni_supported() { return false; }
void micro_vnni(int64_t, const uint8_t*, const int8_t*, int64_t, const Epilogue&, int64_t, int64_t,
                int64_t) {}
void act_avx512(float* v, int64_t n, int act) {
  for (int64_t i = 0; i < n; ++i) v[i] = act_scalar(v[i], act);
}

#endif

}  // namespace cpu
}  // namespace tkd
