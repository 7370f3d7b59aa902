"""INT8 in tkd, in one place: the op, the modules built on it, and model quantization.

    y = int8_gemm(a, b, a_scale, b_scale, bias)     # gemm.py: exact int8 GEMM, fused epilogue
    q, s = quantize_per_token(x)                     # gemm.py: symmetric per-token activations
    lin8 = Int8Linear.from_float(linear)             # linear.py: the drop-in module
    report = quantize_model(model, skip=("classifier",))   # linear.py: the size rule decides
    emb8 = Int8Embedding.from_float(embedding)       # embedding.py: per-row int8 tables
    cpu_isa()                                        # "avx512vnni" | "avx2" | "scalar"
    set_output_pool(n), release_output_pool()        # gemm.py: large CPU outputs, reused

The kernels are C++/CUDA in csrc/ (the extension tkd_core._C); measurements and their history
in docs/int8_gemm_cpu.md.
"""
from .embedding import Int8Embedding, quantize_embeddings  # noqa: F401
from .gemm import (ACTIVATIONS, K_MAX, POOL_MIN_BYTES, PackedInt8Weight, _ext,  # noqa: F401
                   activation_code, activation_ref, cpu_isa, cpu_output, cuda_built, int8_gemm,
                   int8_gemm_packed, int8_gemm_ref, kernel_threads, output_pool_stats,
                   pack_weight, quantize_per_token, quantize_per_token_ref,
                   quantized_linear_cpu, release_output_pool, set_cpu_isa, set_output_pool)
from .linear import (MIN_INT8_WEIGHTS, Int8Linear, QuantizeReport, int8_pays,  # noqa: F401
                     quantize_model)
