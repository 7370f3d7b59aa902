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
  const int32_t* comp;     // VNNI layout only: 128 * sum_k b[n, k], padded to whole panels
  int act;                 // Act, float output only
};

// The scalar activation (the reference every vector form is tested against).
float act_scalar(float v, int act);

// AVX-512 VNNI micro-kernel: rows (1..kVnniMR) x kVnniNR columns of u8 (a + 128) quads of A
// against s8 quads of B, then the epilogue on registers. Kq: k quads. n0, nn: first column and
// valid columns (<= kVnniNR) of the tile; m0: first row.
constexpr int64_t kVnniMR = 6;
constexpr int64_t kVnniNR = 64;
bool vnni_supported();
void micro_vnni(int64_t rows, const uint8_t* Ap, const int8_t* Bp, int64_t Kq, const Epilogue& ep,
                int64_t m0, int64_t n0, int64_t nn);
// The vector activation of the VNNI epilogue on n floats in place (tests and the AVX2 path).
void act_avx512(float* v, int64_t n, int act);

}  // namespace cpu
}  // namespace tkd
