// Host launcher of the tensor-core INT8 GEMM (int8_gemm_cuda.cu). Plain C ABI, no CUDA headers,
// so bindings.cpp compiles with the host compiler alone; the stream is passed as an integer
// (torch.cuda.current_stream().cuda_stream).
#pragma once
#include <cstdint>

extern "C" {
// out (M, N) row stride ldc = a (M, K) @ b (N, K)^T; a, b row-major int8 with 16-byte-aligned
// rows (lda, ldb multiples of 16) and unit K stride.
// out_kind: 0 int32 (exact, scales ignored), 1 float32, 2 float16, 3 bfloat16 with the fused
// epilogue acc * a_scale[m] * b_scale[n] + bias[n] (bias may be null). Returns a cudaError_t.
int tkd_int8_gemm_cuda(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                       int64_t lda, int64_t ldb, void* out, int64_t ldc, int out_kind,
                       const float* a_scale, const float* b_scale, const float* bias,
                       uintptr_t stream);
const char* tkd_cuda_error_string(int err);
}
