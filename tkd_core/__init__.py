"""tkd: fused kernels and a distillation trainer for Transformer knowledge distillation (TKD-NLP).

    import tkd_core
    y = tkd_core.ops.layer_norm(x, weight, bias)          # fused Triton kernel on CUDA
    tkd_core.ops.backend(x)                               # "triton" | "interpreter" | "reference"
    tkd_core.patch_hf(hf_bert)                            # our ops inside a transformers model
    tkd_core.export_onnx(student, "student.onnx", int8=True)  # for ONNX Runtime (export.py)
"""
from . import ops, nn  # noqa: F401
from .int8 import QuantizeReport, quantize_model  # noqa: F401
from .hf import patch_hf, unpatch_hf  # noqa: F401
from .export import export_onnx  # noqa: F401

__version__ = "0.1.0"
