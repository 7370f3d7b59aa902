// CPU encoder ops for tkd_core.infer's lean path (encoder_cpu.cpp): BERT self-attention straight
// from the fused QKV projection of packed (unpadded) tokens, and add + LayerNorm. float32,
// inference only, threads from our pool (cpu_pool.h). Raw pointers: the Python wrapper
// validates shapes, dtypes and strides.
#pragma once
#include <cstdint>

namespace tkd {

// qkv: (T, 3, H, D) float32, the tokens of B sequences packed one after the other (no padding),
// token row stride ld elements, Q / K / V at offsets 0, H*D, 2*H*D of a row, head h at h*D.
// Sequence b holds tokens [offsets[b], offsets[b + 1]). out: (T, H*D) float32 contiguous =
// softmax(scale Q K^T) V over each sequence's own tokens, per head, in the layout the output
// projection reads. Work items: (sequence, head) pairs.
void attention_fwd(const float* qkv, int64_t ld, const int64_t* offsets, int64_t B, int64_t H,
                   int64_t D, float scale, float* out, int64_t nthreads);

// out (rows, N) = LayerNorm(x + r) * gamma + beta over each row (r may be nullptr; x, r, out
// contiguous rows; out may alias x or r). Two passes over the row held in L1: the mean, then
// the variance of (h - mean).
void add_layer_norm(const float* x, const float* r, const float* gamma, const float* beta,
                    float eps, float* out, int64_t rows, int64_t N, int64_t nthreads);

}  // namespace tkd
