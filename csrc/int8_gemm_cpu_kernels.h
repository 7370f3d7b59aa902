// Internal to the CPU INT8 GEMM: what the driver (int8_gemm_cpu.cpp) shares with the AVX-512 VNNI
// micro-kernel (int8_gemm_avx512.cpp), which lives in its own file so that only it is compiled
// with AVX-512 code generation (chosen at run time, never reached on other CPUs).
#pragma once
#include <cstdint>

namespace tkd {
namespace cpu {

// Activation applied in the epilogue, after scale + bias (float output only).
enum Act : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActRelu = 3 };

struct Epilogue {
  void* out;               // (M, N) int32 or float32, row stride ldc
  int64_t ldc;
  bool scaled;             // false: exact int32; true: float32 acc * as[m] * bs[n] + bias[n]
  const float* a_scale;    // (M,)
  const float* b_scale;    // (N,)
  const float* bias;       // (N,) or nullptr
  int act;                 // Act, float output only
};

// The scalar activation (the reference every vector form is tested against).
float act_scalar(float v, int act);

// AVX-512 VNNI micro-kernel: rows (1..kVnniMR) x kVnniNR columns. A: s8 rows, row stride lda
// bytes, read in place (4 k per broadcast int32; Kq k quads readable per row); Bp: one packed
// panel of u8 (b + 128) quads. corr[r] = 128 sum_k a[m0 + r, k] (row_corr_vnni) is subtracted in
// the epilogue, which runs on registers. n0, nn: first column and valid columns (<= kVnniNR) of
// the tile; m0: first row.
constexpr int64_t kVnniMR = 6;
constexpr int64_t kVnniNR = 64;
bool vnni_supported();
void micro_vnni(int64_t rows, const int8_t* A, int64_t lda, const uint8_t* Bp, int64_t Kq,
                const int32_t* corr, const Epilogue& ep, int64_t m0, int64_t n0, int64_t nn);
// corr[r] = 128 sum_{k < K} a[r * lda + k] for rows r < rows, in wrapping int32 arithmetic.
void row_corr_vnni(const int8_t* a, int64_t lda, int64_t rows, int64_t K, int32_t* corr);
// One float32 row (K) -> q (Kp bytes: K quantized, then zeros), its scale (returned) and
// *corr = 128 sum_k q[k]: the per-token quantizer on 16 lanes, the same arithmetic as the scalar
// one (a true division, round half to even, clamp to +-127; NaN / +-inf in the row: q = 0,
// scale NaN).
float quantize_row_vnni(const float* x, int64_t K, int64_t Kp, int8_t* q, int32_t* corr);
// The vector activation of the VNNI epilogue on n floats in place (tests and the AVX2 path).
void act_avx512(float* v, int64_t n, int act);

}  // namespace cpu
}  // namespace tkd
