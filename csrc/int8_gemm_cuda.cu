// Tensor-core INT8 GEMM for sm_80 and newer: out (M, N) = a (M, K) @ b (N, K)^T, int8 x int8 ->
// int32 via mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, with a fused epilogue
// acc * a_scale[m] * b_scale[n] + bias[n] written as fp32 / fp16 / bf16 (or the exact int32).
// No torch headers: nvcc compiles this file standalone (the test does, for sm_80/86/89/90a).
//
// Tiling: a 128 x 128 block tile, BK = 64 int8 per stage, STAGES = 4 stages of cp.async (16-byte
// cp.async.cg, zero-fill predication for the M, N and K edges), 8 warps as 2 (M) x 4 (N), each
// warp owning 64 x 32 outputs = 4 x 4 mma tiles (64 int32 accumulators per thread).
// Shared memory rows are 64 bytes = 4 chunks of 16 bytes; chunk c of row r is stored at chunk
// c ^ ((r >> 1) & 3), so the 8 row addresses of every ldmatrix phase hit 32 distinct banks.
// Fragments come from ldmatrix.x4 (an 8 x 16-byte int8 matrix is exactly the m16n8k32 A / B
// register layout: lane l holds row l / 4, bytes 4 * (l % 4) .. +3).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int8_gemm_cuda.h"

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 4;
constexpr int WARPS_M = 2, WARPS_N = 4, THREADS = 32 * WARPS_M * WARPS_N;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // 64 x 32 per warp
constexpr int MT = WM / 16, NT = WN / 8;             // 4 x 4 mma tiles per warp
constexpr int TILE_BYTES = BM * BK;                  // one operand, one stage (BM == BN)
constexpr int SMEM_BYTES = 2 * STAGES * TILE_BYTES;  // 64 KiB
constexpr int CHUNKS = BM * BK / 16;                 // 16-byte chunks per operand tile
static_assert(BM == BN, "A and B stage tiles share one layout");
static_assert(CHUNKS % THREADS == 0, "every thread copies the same number of chunks");

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// byte offset of (row, 16-byte chunk) inside a swizzled BM x BK stage tile
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * BK + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// 16-byte async copy; src_bytes < 16 zero-fills the rest (0: nothing is read)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copy one BM x BK (or BN x BK) tile of rows [r0, r0 + BM) and columns [k0, k0 + BK) of the
// row-major int8 operand src (rows x K, row stride ld) into a swizzled stage tile.
__device__ __forceinline__ void load_tile(uint32_t dst, const int8_t* __restrict__ src,
                                          int64_t rows, int64_t K, int64_t ld, int64_t r0,
                                          int64_t k0) {
#pragma unroll
  for (int i = 0; i < CHUNKS / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int row = c >> 2, chunk = c & 3;
    const int64_t gr = r0 + row, gk = k0 + chunk * 16;
    const bool in = gr < rows && gk < K;
    const int64_t left = K - gk;
    const int bytes = in ? (left >= 16 ? 16 : static_cast<int>(left)) : 0;
    const int8_t* p = in ? src + gr * ld + gk : src;  // never read when bytes == 0
    cp_async16(dst + swz(row, chunk), p, bytes);
  }
}

template <int OUT>
struct Store;
template <>
struct Store<1> {
  static __device__ __forceinline__ void put(void* o, int64_t i, float v) {
    static_cast<float*>(o)[i] = v;
  }
};
template <>
struct Store<2> {
  static __device__ __forceinline__ void put(void* o, int64_t i, float v) {
    static_cast<__half*>(o)[i] = __float2half_rn(v);
  }
};
template <>
struct Store<3> {
  static __device__ __forceinline__ void put(void* o, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(o)[i] = __float2bfloat16_rn(v);
  }
};

// OUT: 0 int32, 1 fp32, 2 fp16, 3 bf16 (with the scale/bias epilogue)
template <int OUT>
__global__ void __launch_bounds__(THREADS)
int8_gemm_kernel(const int8_t* __restrict__ a,       // (M, K) row-major, row stride lda
                 const int8_t* __restrict__ b,       // (N, K) row-major, row stride ldb
                 void* __restrict__ out,             // (M, N), row stride ldc
                 const float* __restrict__ a_scale,  // (M,) per token       (OUT != 0)
                 const float* __restrict__ b_scale,  // (N,) per channel     (OUT != 0)
                 const float* __restrict__ bias,     // (N,) or null         (OUT != 0)
                 int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  extern __shared__ __align__(128) int8_t smem[];  // [STAGES][A tile, B tile]
  const uint32_t s_base = smem_addr(smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int k_tiles = static_cast<int>((K + BK - 1) / BK);

  auto stage_a = [&](int s) { return s_base + s * 2 * TILE_BYTES; };
  auto stage_b = [&](int s) { return s_base + s * 2 * TILE_BYTES + TILE_BYTES; };

  int32_t acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // prologue: STAGES - 1 tiles in flight
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) {
      load_tile(stage_a(s), a, M, K, lda, m0, static_cast<int64_t>(s) * BK);
      load_tile(stage_b(s), b, N, K, ldb, n0, static_cast<int64_t>(s) * BK);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies)
    __syncthreads();              // ... everyone's, and stage (kt - 1) % STAGES is free again
    const int next = kt + STAGES - 1;
    if (next < k_tiles) {
      load_tile(stage_a(next % STAGES), a, M, K, lda, m0, static_cast<int64_t>(next) * BK);
      load_tile(stage_b(next % STAGES), b, N, K, ldb, n0, static_cast<int64_t>(next) * BK);
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform

    const uint32_t sa = stage_a(kt % STAGES), sb = stage_b(kt % STAGES);
#pragma unroll
    for (int kk = 0; kk < BK / 32; ++kk) {
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {  // matrices: rows 0-7 / 8-15 x k bytes 0-15 / 16-31
        const int row = wm * WM + i * 16 + (lane & 15);
        ldmatrix_x4(af[i], sa + swz(row, 2 * kk + (lane >> 4)));
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {  // matrices: (n-tile j, k 0-15), (j, 16-31), (j+1, ...)
        const int q = lane >> 3;
        const int row = wn * WN + j * 8 + (lane & 7) + 8 * (q >> 1);
        uint32_t r[4];
        ldmatrix_x4(r, sb + swz(row, 2 * kk + (q & 1)));
        bf[j][0] = r[0], bf[j][1] = r[1], bf[j + 1][0] = r[2], bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();

  // epilogue straight from the accumulators: c0, c1 -> (row g, cols 2t, 2t+1); c2, c3 -> row g+8
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wm * WM + i * 16 + g + 8 * h;
      if (m >= M) continue;
      const float as = OUT == 0 ? 1.f : a_scale[m];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t n = n0 + wn * WN + j * 8 + 2 * t + e;
          if (n >= N) continue;
          const int32_t v = acc[i][j][2 * h + e];
          if constexpr (OUT == 0) {
            static_cast<int32_t*>(out)[m * ldc + n] = v;
          } else {
            // a NaN scale (a token holding NaN / inf, see quantize_per_token) gives NaN here
            float y = static_cast<float>(v) * (as * b_scale[n]);
            if (bias != nullptr) y += bias[n];
            Store<OUT>::put(out, m * ldc + n, y);
          }
        }
      }
    }
  }
}

template <int OUT>
cudaError_t launch(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                   int64_t lda, int64_t ldb, void* out, int64_t ldc, const float* a_scale,
                   const float* b_scale, const float* bias, cudaStream_t stream) {
  // > 48 KiB of dynamic shared memory must be opted into, per device (cheap: set every launch)
  cudaError_t e = cudaFuncSetAttribute(int8_gemm_kernel<OUT>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((N + BN - 1) / BN), static_cast<unsigned>((M + BM - 1) / BM));
  int8_gemm_kernel<OUT><<<grid, THREADS, SMEM_BYTES, stream>>>(a, b, out, a_scale, b_scale, bias,
                                                               M, N, K, lda, ldb, ldc);
  return cudaGetLastError();
}

}  // namespace

extern "C" int tkd_int8_gemm_cuda(const int8_t* a, const int8_t* b, int64_t M, int64_t N,
                                  int64_t K, int64_t lda, int64_t ldb, void* out, int64_t ldc,
                                  int out_kind, const float* a_scale, const float* b_scale,
                                  const float* bias, uintptr_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if ((M + BM - 1) / BM > 65535 || lda % 16 || ldb % 16 ||
      (out_kind != 0 && (a_scale == nullptr || b_scale == nullptr)))
    return cudaErrorInvalidValue;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (out_kind) {
    case 0: return launch<0>(a, b, M, N, K, lda, ldb, out, ldc, nullptr, nullptr, nullptr, s);
    case 1: return launch<1>(a, b, M, N, K, lda, ldb, out, ldc, a_scale, b_scale, bias, s);
    case 2: return launch<2>(a, b, M, N, K, lda, ldb, out, ldc, a_scale, b_scale, bias, s);
    case 3: return launch<3>(a, b, M, N, K, lda, ldb, out, ldc, a_scale, b_scale, bias, s);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" const char* tkd_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
