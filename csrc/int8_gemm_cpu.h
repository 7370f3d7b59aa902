// CPU INT8 GEMM entry points (int8_gemm_cpu.cpp). Raw pointers: the Python wrapper
// (tkd_core/int8_gemm.py) validates dtypes, shapes and strides before calling them.
#pragma once
#include <cstdint>
#include <string>

namespace tkd {

std::string cpu_isa();  // "avx2" or "scalar": the path chosen by CPU feature detection
// "scalar" forces the portable path (tests), "auto" restores detection; returns cpu_isa()
std::string set_cpu_isa(const std::string& isa);

// int16 elements of the packed (widened) weight
int64_t packed_b_numel(int64_t N, int64_t K);

// b: int8 (N, K) with element strides (sn, sk) -> out: packed int16 B panels (once per weight)
void pack_b(const int8_t* b, int64_t N, int64_t K, int64_t sn, int64_t sk, int16_t* out,
            int64_t nthreads);

// x: (M, K) rows (row stride sm elements, unit column stride), dtype 0 fp32 / 1 fp16 / 2 bf16.
// One read of each row: absmax, scale = absmax / 127 (1 for an all-zero row), then
// q = clamp(round_half_even(x / scale), -127, 127). A row holding NaN or +-inf gets q = 0 and
// scale NaN (its outputs are NaN). Writes q (M, K) contiguous and scale (M,).
void quantize_rows(const void* x, int dtype, int64_t M, int64_t K, int64_t sm, int8_t* q,
                   float* scale, int64_t nthreads);

// out (M, N), row stride ldc = a (M, K; element strides sm, sk) @ B^T with B packed by pack_b:
// int32 if a_scale is null, else float32 acc * a_scale[m] * b_scale[n] (+ bias[n] if non-null),
// fused in the epilogue.
void gemm_int8(const int8_t* a, int64_t sm, int64_t sk, const int16_t* Bp, int64_t M, int64_t N,
               int64_t K, void* out, int64_t ldc, const float* a_scale, const float* b_scale,
               const float* bias, int64_t nthreads);

// Dynamic int8 linear: x (M, K) float rows (dtype as in quantize_rows) quantized per token
// (scales written to x_scale (M,)) inside the GEMM, out float32 = acc * x_scale * w_scale + bias.
void linear_dynamic(const void* x, int dtype, int64_t sm, const int16_t* Bp, int64_t M,
                    int64_t N, int64_t K, float* out, int64_t ldc, float* x_scale,
                    const float* w_scale, const float* bias, int64_t nthreads);

}  // namespace tkd
