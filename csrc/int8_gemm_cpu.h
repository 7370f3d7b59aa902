// CPU INT8 GEMM entry points (int8_gemm_cpu.cpp). Raw pointers: the Python wrapper
// (tkd_core/int8_gemm.py) validates dtypes, shapes and strides before calling them.
// isa: 0 scalar, 1 avx2, 2 avx512vnni; a weight packed for one ISA is only run with that ISA.
// act: 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 ReLU, after scale + bias.
#pragma once
#include <cstdint>
#include <string>

namespace tkd {

std::string cpu_isa();  // "avx512vnni", "avx2" or "scalar": the kernel in use
int cpu_isa_code();     // the same as an isa code
// "scalar" / "avx2" force a path (tests), "auto" restores detection; returns cpu_isa()
std::string set_cpu_isa(const std::string& isa);

// bytes of a weight (N, K) packed for isa
int64_t packed_b_bytes(int64_t N, int64_t K, int isa);

// b: int8 (N, K) with element strides (sn, sk) -> out: packed B panels (once per weight)
void pack_b(const int8_t* b, int64_t N, int64_t K, int64_t sn, int64_t sk, void* out, int isa,
            int64_t nthreads);

// x: (M, K) rows (row stride sm elements, unit column stride), dtype 0 fp32 / 1 fp16 / 2 bf16.
// One read of each row: absmax, scale = absmax / 127 (1 for an all-zero row), then
// q = clamp(round_half_even(x / scale), -127, 127). A row holding NaN or +-inf gets q = 0 and
// scale NaN (its outputs are NaN). Writes q (M, K) contiguous and scale (M,).
void quantize_rows(const void* x, int dtype, int64_t M, int64_t K, int64_t sm, int8_t* q,
                   float* scale, int64_t nthreads);

// The threads a GEMM of this size runs on, at most nthreads.
int64_t gemm_threads(int64_t M, int64_t N, int64_t K, int64_t nthreads);

// out (M, N), row stride ldc = a (M, K; element strides sm, sk) @ B^T with B packed by pack_b:
// int32 if a_scale is null, else float32 act(acc * a_scale[m] * b_scale[n] (+ bias[n])), fused
// in the epilogue.
void gemm_int8(const int8_t* a, int64_t sm, int64_t sk, const void* Bp, int isa, int64_t M,
               int64_t N, int64_t K, void* out, int64_t ldc, const float* a_scale,
               const float* b_scale, const float* bias, int act, int64_t nthreads);

// Dynamic int8 linear: x (M, K) float rows (dtype as in quantize_rows) quantized per token
// (scales written to x_scale (M,)) inside the GEMM, out float32 =
// act(acc * x_scale * w_scale + bias).
void linear_dynamic(const void* x, int dtype, int64_t sm, const void* Bp, int isa, int64_t M,
                    int64_t N, int64_t K, float* out, int64_t ldc, float* x_scale,
                    const float* w_scale, const float* bias, int act, int64_t nthreads);

// A dynamic int8 linear bound to its packed weight, scales, bias and activation once, so that a
// call passes only the activation rows and the output (the Python side keeps the tensors alive
// and rebuilds the plan when any of them moves). x_scale lives in a per-thread workspace.
struct LinearPlan {
  const void* Bp;
  int isa;
  int64_t N, K;
  const float* w_scale;
  const float* bias;  // or nullptr
  int act;
};
void linear_plan_run(const LinearPlan& p, const void* x, int dtype, int64_t sm, int64_t M,
                     float* out, int64_t ldc, int64_t nthreads);

// The epilogue's activation alone, in place on n floats, in the form isa's kernel uses (tests).
void activation(float* v, int64_t n, int act, int isa);

}  // namespace tkd
