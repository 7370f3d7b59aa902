// CPU encoder ops of tkd_core.infer (see encoder_cpu.h): attention over packed sequences and
// add + LayerNorm, float32, AVX-512 where the CPU has it (chosen at run time), portable C++
// otherwise.
//
// Attention, per (sequence, head) work item with n tokens: K^T is copied once into a (D, n16)
// scratch (n16 = n rounded up to 16), then 4 query rows at a time: scores s = scale q K^T
// (4 x n16, a 4 x 64 register tile per step of the d loop), softmax in place (max, exp, sum),
// and o = (e V) / sum (a 4 x 64 tile over d, one broadcast of e per key and row). Nothing of
// size n x n is kept: the 4 x n16 score rows stay in L1. Padded keys never exist (packed
// tokens), so there is no mask and no fully masked row.
#include "encoder_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "avx512_math.h"
#include "cpu_pool.h"

namespace tkd {

namespace {

constexpr int64_t QR = 4;  // query rows per step

struct AttnScratch {
  std::vector<float> kt;  // (D, n16) K^T
  std::vector<float> v;   // (n, D) V, contiguous
  std::vector<float> s;   // (QR, n16) scores, then exp(s - max)
};

AttnScratch& attn_scratch(int64_t D, int64_t n16) {
  static thread_local AttnScratch sc;
  if (static_cast<int64_t>(sc.kt.size()) < D * n16) {
    sc.kt.resize(static_cast<size_t>(D * n16));
    sc.v.resize(static_cast<size_t>(D * n16));
  }
  if (static_cast<int64_t>(sc.s.size()) < QR * n16) sc.s.resize(static_cast<size_t>(QR * n16));
  return sc;
}

// Portable form: the same math, row by row.
void attend_scalar(const float* q, const float* k, const float* v, int64_t ld, int64_t n,
                   int64_t D, float scale, float* o, int64_t ldo, AttnScratch& sc) {
  float* s = sc.s.data();
  for (int64_t i = 0; i < n; ++i) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += q[i * ld + d] * k[j * ld + d];
      s[j] = acc * scale;
      mx = std::max(mx, s[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) acc += s[j] * v[j * ld + d];
      o[i * ldo + d] = acc / sum;
    }
  }
}

#if TKD_X86

TKD_AVX512 inline __mmask16 lanes(int64_t n) {  // the first n of 16 lanes (none for n <= 0)
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// s[r][j0 .. j0 + 16 NJ) = scale * q_r . K^T[:, j] for the 4 rows q_r.
template <int NJ>
TKD_AVX512 void scores_tile(const float* const* qr, const float* kt, int64_t n16, int64_t D,
                            int64_t j0, float scale, float* s) {
  __m512 acc[QR][NJ];
  for (int r = 0; r < QR; ++r)
    for (int c = 0; c < NJ; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[NJ];
    for (int c = 0; c < NJ; ++c) kv[c] = _mm512_loadu_ps(kt + d * n16 + j0 + 16 * c);
    for (int r = 0; r < QR; ++r) {
      const __m512 qd = _mm512_set1_ps(qr[r][d]);
      for (int c = 0; c < NJ; ++c) acc[r][c] = _mm512_fmadd_ps(qd, kv[c], acc[r][c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < QR; ++r)
    for (int c = 0; c < NJ; ++c)
      _mm512_storeu_ps(s + r * n16 + j0 + 16 * c, _mm512_mul_ps(acc[r][c], sc));
}

// o_r[d0 .. d0 + 16 ND) = (sum_j e[r][j] v_j) / sum_r for the first R of the 4 rows.
template <int ND>
TKD_AVX512 void values_tile(const float* e, int64_t n16, const float* v, int64_t ld, int64_t n,
                            int64_t D, int64_t d0, const float* inv, float* const* orow,
                            int64_t R) {
  __m512 acc[QR][ND];
  for (int r = 0; r < QR; ++r)
    for (int c = 0; c < ND; ++c) acc[r][c] = _mm512_setzero_ps();
  __mmask16 km[ND];
  for (int c = 0; c < ND; ++c) km[c] = lanes(D - d0 - 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[ND];
    for (int c = 0; c < ND; ++c) vv[c] = _mm512_maskz_loadu_ps(km[c], v + j * ld + d0 + 16 * c);
    for (int r = 0; r < QR; ++r) {
      const __m512 p = _mm512_set1_ps(e[r * n16 + j]);
      for (int c = 0; c < ND; ++c) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 w = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < ND; ++c)
      _mm512_mask_storeu_ps(orow[r] + d0 + 16 * c, km[c], _mm512_mul_ps(acc[r][c], w));
  }
}

TKD_AVX512 void attend_avx512(const float* q, const float* k, const float* v, int64_t ld,
                              int64_t n, int64_t D, float scale, float* o, int64_t ldo,
                              AttnScratch& sc) {
  const int64_t n16 = (n + 15) / 16 * 16;
  float* kt = sc.kt.data();
  float* vp = sc.v.data();
  // K^T and V packed in one pass over the key rows (row by row: reading K column-wise
  // across rows 4.5 KiB apart was a third of the item)
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * ld;
    for (int64_t d = 0; d < D; ++d) kt[d * n16 + j] = kj[d];
    std::memcpy(vp + j * D, v + j * ld, static_cast<size_t>(D) * sizeof(float));
  }
  for (int64_t d = 0; d < D; ++d)  // zero columns past n
    for (int64_t j = n; j < n16; ++j) kt[d * n16 + j] = 0.f;
  float* s = sc.s.data();
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i0 = 0; i0 < n; i0 += QR) {
    const int64_t R = std::min(QR, n - i0);  // rows past n repeat the last row, unstored
    const float* qr[QR];
    float* orow[QR];
    for (int64_t r = 0; r < QR; ++r) {
      const int64_t i = std::min(i0 + r, n - 1);
      qr[r] = q + i * ld;
      orow[r] = o + i * ldo;
    }
    int64_t j0 = 0;
    for (; j0 + 64 <= n16; j0 += 64) scores_tile<4>(qr, kt, n16, D, j0, scale, s);
    for (; j0 < n16; j0 += 16) scores_tile<1>(qr, kt, n16, D, j0, scale, s);
    float inv[QR];
    for (int64_t r = 0; r < QR; ++r) {  // softmax over the n real keys, in place
      float* sr = s + r * n16;
      __m512 mx = ninf;
      for (int64_t j = 0; j < n16; j += 16)
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, lanes(n - j), sr + j));
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n16; j += 16) {
        const __mmask16 km = lanes(n - j);
        const __m512 e = _mm512_maskz_mov_ps(km, cpu::exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j),
                                                                      m)));
        _mm512_storeu_ps(sr + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      inv[r] = 1.f / _mm512_reduce_add_ps(sum);
    }
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t rem = D - d0;
      if (rem > 48) values_tile<4>(s, n16, vp, D, n, D, d0, inv, orow, R);
      else if (rem > 32) values_tile<3>(s, n16, vp, D, n, D, d0, inv, orow, R);
      else if (rem > 16) values_tile<2>(s, n16, vp, D, n, D, d0, inv, orow, R);
      else values_tile<1>(s, n16, vp, D, n, D, d0, inv, orow, R);
    }
  }
}

TKD_AVX512 void add_ln_row_avx512(const float* x, const float* r, const float* g, const float* b,
                                  float eps, float* out, int64_t N) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < N; j += 16) {
    const __mmask16 k = lanes(N - j);
    __m512 h = _mm512_maskz_loadu_ps(k, x + j);
    if (r) h = _mm512_add_ps(h, _mm512_maskz_loadu_ps(k, r + j));
    _mm512_mask_storeu_ps(out + j, k, h);
    acc = _mm512_add_ps(acc, h);
  }
  const float mean = _mm512_reduce_add_ps(acc) / static_cast<float>(N);
  const __m512 mu = _mm512_set1_ps(mean);
  acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < N; j += 16) {
    const __mmask16 k = lanes(N - j);
    const __m512 c = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, out + j), mu);
    acc = _mm512_fmadd_ps(c, c, acc);
  }
  const float rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(N) + eps);
  const __m512 rs = _mm512_set1_ps(rstd);
  for (int64_t j = 0; j < N; j += 16) {
    const __mmask16 k = lanes(N - j);
    const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, out + j), mu), rs);
    _mm512_mask_storeu_ps(out + j, k, _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(k, g + j),
                                                      _mm512_maskz_loadu_ps(k, b + j)));
  }
}

#endif  // TKD_X86

void add_ln_row_scalar(const float* x, const float* r, const float* g, const float* b, float eps,
                       float* out, int64_t N) {
  float sum = 0.f;
  for (int64_t j = 0; j < N; ++j) sum += (out[j] = r ? x[j] + r[j] : x[j]);
  const float mean = sum / static_cast<float>(N);
  float var = 0.f;
  for (int64_t j = 0; j < N; ++j) var += (out[j] - mean) * (out[j] - mean);
  const float rstd = 1.f / std::sqrt(var / static_cast<float>(N) + eps);
  for (int64_t j = 0; j < N; ++j) out[j] = (out[j] - mean) * rstd * g[j] + b[j];
}

}  // namespace

void attention_fwd(const float* qkv, int64_t ld, const int64_t* offsets, int64_t B, int64_t H,
                   int64_t D, float scale, float* out, int64_t nthreads) {
  const bool avx512 = cpu::avx512_supported();
  int64_t work = 0;  // multiply-adds: about 2 n^2 D per head
  for (int64_t b = 0; b < B; ++b) work += (offsets[b + 1] - offsets[b]) * (offsets[b + 1] -
                                                                           offsets[b]);
  work *= 2 * D * H;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(nthreads, work >> 19));
  pool::parallel_for(B * H, T, [&](int64_t item) {
    const int64_t b = item / H, h = item % H, t0 = offsets[b], n = offsets[b + 1] - t0;
    if (n <= 0) return;
    const float* q = qkv + t0 * ld + h * D;
    const float* k = q + H * D;
    const float* v = k + H * D;
    float* o = out + t0 * H * D + h * D;
    AttnScratch& sc = attn_scratch(D, (n + 15) / 16 * 16);
#if TKD_X86
    if (avx512) {
      attend_avx512(q, k, v, ld, n, D, scale, o, H * D, sc);
      return;
    }
#endif
    (void)avx512;
    attend_scalar(q, k, v, ld, n, D, scale, o, H * D, sc);
  });
}

void add_layer_norm(const float* x, const float* r, const float* gamma, const float* beta,
                    float eps, float* out, int64_t rows, int64_t N, int64_t nthreads) {
  const bool avx512 = cpu::avx512_supported();
  constexpr int64_t kRows = 16;  // rows per work item
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(nthreads, rows * N >> 15));
  pool::parallel_for((rows + kRows - 1) / kRows, T, [&](int64_t i) {
    for (int64_t m = i * kRows; m < std::min(rows, i * kRows + kRows); ++m) {
      const float* rm = r ? r + m * N : nullptr;
#if TKD_X86
      if (avx512) {
        add_ln_row_avx512(x + m * N, rm, gamma, beta, eps, out + m * N, N);
        continue;
      }
#endif
      add_ln_row_scalar(x + m * N, rm, gamma, beta, eps, out + m * N, N);
    }
  });
}

}  // namespace tkd
