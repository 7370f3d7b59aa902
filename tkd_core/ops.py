"""Public ops of tkd: tensor in, tensor out, with autograd and torch.library registration.

Every op follows one dispatch rule (see `backend`): CUDA tensors run the Triton kernels; CPU
tensors run the op's torch reference; with TRITON_INTERPRET=1 set before import, CPU tensors run
the Triton kernels in Triton's interpreter. Each op lives with its kernels in
`tkd_core/kernels/<op>.py`; this module only gathers the public names.
"""
from .kernels.utils import backend  # noqa: F401

# -- ops (one line each, kept in this order) --
from .kernels.layer_norm import layer_norm  # noqa: F401
from .kernels.kd_loss import kd_loss  # noqa: F401
from .kernels.attention import attention  # noqa: F401
from .int8 import int8_gemm, quantize_per_token  # noqa: F401
