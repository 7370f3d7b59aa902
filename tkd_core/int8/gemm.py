"""The INT8 op: INT8 GEMM and per-token activation quantization over the compiled extension
`tkd_core._C`.

Math. `int8_gemm(a, b)` computes C = a @ b.T for int8 a (M, K) and int8 b (N, K) (nn.Linear
weight layout), accumulated exactly in int32:

    C[m, n] = sum_k a[m, k] * b[n, k]                          (no scales: int32 (M, N))
    Y[m, n] = C[m, n] * a_scale[m] * b_scale[n] + bias[n]      (scales: float, fused epilogue)

Exact for K <= 131071 (|C| <= K * 128^2 < 2^31). With scales the epilogue runs on the
accumulators in registers: no int32 (M, N) tensor is written. A float64 matmul of the int8
values is also exact (every partial sum is an integer below 2^53), which is how `int8_gemm_ref`
reproduces the int64 result quickly.

`quantize_per_token(x)` is symmetric per row (token): scale = absmax / 127 (1 for an all-zero
row), q = clamp(round_half_even(x / scale), -127, 127), so q never takes -128 and x ~ q * scale.

Non-finite inputs propagate: a row holding NaN or +-inf quantizes to q = 0 with scale NaN, so
the epilogue makes every output of that row NaN (nn.Linear gives NaN or +-inf there): a bad
token never turns into finite numbers. The C++ quantizers (AVX-512, AVX2, scalar), the torch
reference (which the CUDA path uses) and the CUDA GEMM's epilogue all do this.

Dispatch. CPU tensors run our C++ kernel, exact, chosen at run time (`cpu_isa()`): AVX-512 VNNI
(vpdpbusd on the weight packed as b + 128, a per-row correction), else AVX2 (vpmaddwd on widened
int16 operands), else portable scalar code; it IS the fast CPU path of this op.
CUDA tensors run the tensor-core kernel (mma.sync m16n8k32 s8, cp.async pipeline) when
`tkd_core._C` was built with CUDA, else a clear error. The TRITON_INTERPRET rule of the other ops
does not apply here: this op has no Triton kernel.

Weights are packed once (`pack_weight`, the layout of the ISA in use); activations are prepared
per call inside the kernel call (AVX-512 VNNI: int8 rows read in place; AVX2 / scalar: packed
panels), and for `tkd_core.nn.Int8Linear` quantized per token there too (one read of x,
`quantized_linear_cpu`). Threads: `torch.get_num_threads()` (or
`kernel_threads(n)`), on the extension's own pool, not OpenMP (csrc/cpu_pool.h).

This file reads top to bottom: the extension (the kernels live in csrc/), the launchers, the
torch.library registration, the public ops, their torch references. What is built on them lives
beside it in tkd_core/int8/: `linear.py` (Int8Linear, quantize_model) and `embedding.py`.
"""
import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels import utils

# ---------------------------------------------------------------------------------------------
# The extension tkd_core._C (its kernels: csrc/int8_gemm_cpu.cpp, csrc/int8_gemm_cuda.cu)
# ---------------------------------------------------------------------------------------------

try:
    from .. import _C
    _C_ERROR = None
except ImportError as e:  # the package was installed without building the extension
    _C, _C_ERROR = None, e

K_MAX = 131071  # int32 accumulation is exact up to here: K * 128 * 128 < 2^31
_X_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CUDA_OUT_KIND = {torch.int32: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
# Epilogue activations (after scale + bias), by their ModelConfig.hidden_act / HF names
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "gelu_new": 2, "gelu_pytorch_tanh": 2,
               "relu": 3}


def activation_code(activation: Optional[str]) -> int:
    """An epilogue activation name (None, "gelu" (erf), "gelu_tanh" and its HF names "gelu_new"
    / "gelu_pytorch_tanh", "relu") -> the kernel's code."""
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of ({names}), got {activation!r}")
    return ACTIVATIONS[activation]


def activation_ref(y: torch.Tensor, code: int) -> torch.Tensor:
    """The torch form of an epilogue activation (any float dtype: float64 for references)."""
    if code == 1:
        return F.gelu(y)
    if code == 2:
        return F.gelu(y, approximate="tanh")
    return torch.relu(y) if code == 3 else y


def _ext():
    if _C is None:
        raise RuntimeError(f"tkd_core._C is not built ({_C_ERROR}); run `pip install -e .` from "
                           "the repository root (needs a C++ compiler and pybind11)")
    return _C


def cpu_isa() -> str:
    """The CPU kernel chosen at run time by feature detection: "avx512vnni", "avx2" or
    "scalar"."""
    return _ext().cpu_isa()


def set_cpu_isa(isa: str) -> str:
    """Force the CPU path for weights packed from now on: "scalar" (the portable fallback),
    "avx2" (where supported; for tests) or "auto" (detection). Returns `cpu_isa()`."""
    if isa not in ("scalar", "avx2", "auto"):
        raise ValueError(f"isa must be 'scalar', 'avx2' or 'auto', got {isa!r}")
    return _ext().set_cpu_isa(isa)


def cuda_built() -> bool:
    """True when `tkd_core._C` contains the CUDA kernel (nvcc + CUDA torch at build time)."""
    return _C is not None and bool(_C.with_cuda)


def _isa_code(t: torch.Tensor) -> int:
    return -1 if t.is_cuda else _ext().cpu_isa_code()


_KERNEL_THREADS: Optional[int] = None  # set by kernel_threads(); None: torch's thread count


def _threads() -> int:
    return _KERNEL_THREADS or max(1, torch.get_num_threads())


# Large CPU outputs come from the extension's output pool (csrc/out_pool.h). glibc maps a block
# above its mmap threshold (at most 32 MiB) anew at every call, and the kernel then faults it in
# page by page: 9.8 ms of a 20 ms M=4096 x N=3072 float32 GEMM on 2 threads here. A pooled block
# goes back to the pool when torch frees its tensor's storage (the tensor and every view of it
# gone), and the next output of that size, or up to a quarter smaller, reuses it, already
# faulted in. Below 32 MiB glibc's heap usually reuses memory too (at 12 MiB fresh and reused
# outputs cost the same here); the pool starts at 8 MiB, where the kernel advises huge pages,
# and smaller outputs stay with torch's allocator.
POOL_MIN_BYTES = 8 << 20
# the cap on idle pooled bytes (the extension's default), kept here so that cpu_output does not
# ask the extension at every call; set_output_pool changes both
_POOL_MAX_IDLE = _C.output_pool_stats()["max_idle_bytes"] if _C is not None else 0


def set_output_pool(max_idle_bytes: int) -> int:
    """Caps the bytes of idle pooled output blocks kept for reuse (default 256 MiB); returns
    the previous cap. 0 turns the pool off: idle blocks are freed, and outputs come from torch's
    allocator again (leased blocks are freed when their tensors are)."""
    global _POOL_MAX_IDLE
    if isinstance(max_idle_bytes, bool) or not isinstance(max_idle_bytes, int) \
            or max_idle_bytes < 0:
        raise ValueError(f"max_idle_bytes must be an int >= 0, got {max_idle_bytes!r}")
    prev, _POOL_MAX_IDLE = _POOL_MAX_IDLE, max_idle_bytes
    _ext().output_pool_set_max_idle(max_idle_bytes)
    return prev


def output_pool_stats() -> dict:
    """The output pool's bytes and blocks, idle and leased, its cap, reuses and allocations."""
    return dict(_ext().output_pool_stats())


def release_output_pool() -> int:
    """Frees the pool's idle blocks (blocks still held by tensors are not touched); returns the
    bytes freed."""
    return _ext().output_pool_release()


def cpu_output(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU float32 / int32 tensor for a kernel to write: from the
    output pool when it holds >= POOL_MIN_BYTES and the pool is on, else `utils.empty` (both
    poisoned under TKD_POISON_OUTPUTS=1). A pooled tensor's storage is not resizable
    (`resize_` to a larger size raises)."""
    rows, cols = math.prod(shape[:-1]), (shape[-1] if len(shape) else 1)
    if _POOL_MAX_IDLE == 0 or rows * cols * 4 < POOL_MIN_BYTES or _C is None:
        return utils.empty(tuple(shape), dtype=dtype, device="cpu")
    out = torch.from_dlpack(_C.pooled_output(rows, cols, dtype == torch.int32)).view(shape)
    return utils.poison_(out) if utils.poison_requested() else out


@contextlib.contextmanager
def kernel_threads(n: int):
    """Within the block our CPU kernels (INT8 GEMM, quantizer, tkd_core.infer's encoder ops) run
    on n threads of their own pool, whatever torch.get_num_threads() says (tkd_core.infer runs
    torch's remaining small ops on 1 thread meanwhile: OpenMP stalls on a busy machine)."""
    global _KERNEL_THREADS
    old, _KERNEL_THREADS = _KERNEL_THREADS, max(1, int(n))
    try:
        yield
    finally:
        _KERNEL_THREADS = old


# ---------------------------------------------------------------------------------------------
# Launchers: input validation, the CPU path (packing + the AVX2/scalar kernel), CUDA
# ---------------------------------------------------------------------------------------------

def _scaled(a_scale, b_scale, bias, out_dtype) -> bool:
    return (a_scale is not None or b_scale is not None or bias is not None
            or (out_dtype is not None and out_dtype != torch.int32))


def _vec(s, n, device, dtype=torch.float32):
    """A scale given as None (1), a Python number, a 0-d/1-element tensor, or (n,) -> (n,)."""
    if s is None:
        return torch.ones(n, dtype=dtype, device=device)
    if not isinstance(s, torch.Tensor):
        return torch.full((n,), float(s), dtype=dtype, device=device)
    s = s.to(device=device, dtype=dtype)
    return s.reshape(1).expand(n).contiguous() if s.numel() == 1 else s.contiguous()


def _check_scale(name, s, n, what, device):
    if s is None or isinstance(s, (int, float)):
        return
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a number, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but a is on {device}")
    if not (s.numel() == 1 and s.dim() <= 1) and tuple(s.shape) != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},) ({what}), "
                         f"got shape {tuple(s.shape)}")


def _validate_gemm(a, b, a_scale, b_scale, bias, out_dtype, *, packed_k=None):
    utils.check_tensor("a", a, dtypes=(torch.int8,), ndim=2)
    M, K = a.shape
    if packed_k is None:
        utils.check_tensor("b", b, dtypes=(torch.int8,), ndim=2, device=a.device)
        N, Kb = b.shape
        if Kb != K:
            raise ValueError(f"K mismatch: a is (M, K) = {tuple(a.shape)} and b is (N, K) = "
                             f"{tuple(b.shape)}; b must be in the nn.Linear weight layout (N, K)")
    else:
        N, Kb = packed_k
        if Kb != K:
            raise ValueError(f"K mismatch: a has K={K}, the packed weight has K={Kb}")
    if K > K_MAX:
        raise ValueError(f"K={K} > {K_MAX}: the int32 accumulator could overflow")
    _check_scale("a_scale", a_scale, M, "per token", a.device)
    _check_scale("b_scale", b_scale, N, "per channel", a.device)
    if bias is not None:
        utils.check_tensor("bias", bias, ndim=1, device=a.device)
        if not bias.is_floating_point() or bias.shape[0] != N:
            raise ValueError(f"bias must be a floating-point ({N},) tensor, got "
                             f"{bias.dtype} {tuple(bias.shape)}")
    scaled = _scaled(a_scale, b_scale, bias, out_dtype)
    if out_dtype is not None:
        if not scaled:
            allowed = (torch.int32,)
        else:
            allowed = ((torch.float32, torch.float16, torch.bfloat16) if a.is_cuda
                       else (torch.float32,))
        if out_dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise ValueError(f"out_dtype must be one of ({names}) on {a.device.type} "
                             f"{'with scales' if scaled else 'without scales'}, got {out_dtype}")
    if a.is_cuda and not cuda_built():
        raise RuntimeError("tkd_core._C was built without CUDA: int8_gemm on CUDA tensors needs "
                           "the extension rebuilt with nvcc and a CUDA torch (pip install -e .)")
    return M, N, K, scaled


class PackedInt8Weight:
    """An int8 (N, K) weight packed once into the CPU kernel's panel layout, for the ISA in use
    when it was packed (`isa`, a code of `cpu_isa()`; the kernels run on the packed layout's ISA).
    `data` is a uint8 tensor (a buffer torch.compile can carry)."""

    def __init__(self, b: torch.Tensor):
        utils.check_tensor("b", b, dtypes=(torch.int8,), ndim=2)
        if b.is_cuda:
            raise ValueError("PackedInt8Weight is the CPU layout; CUDA uses the int8 (N, K) weight")
        C = _ext()
        self.N, self.K = b.shape
        self.isa = C.cpu_isa_code()
        self.data = torch.empty(C.packed_b_bytes(self.N, self.K, self.isa), dtype=torch.uint8)
        C.pack_b(b.data_ptr(), self.N, self.K, b.stride(0), b.stride(1), self.data.data_ptr(),
                 self.isa, _threads())


def pack_weight(b: torch.Tensor) -> PackedInt8Weight:
    """Pack an int8 (N, K) CPU weight once for repeated `int8_gemm_packed` calls."""
    return PackedInt8Weight(b)


def _cpu_scales(scaled, a_scale, b_scale, bias, M, N, device):
    """float32 contiguous (M,), (N,), (N,) tensors (kept alive by the caller), their addresses."""
    if not scaled:
        return [], [0, 0, 0]
    keep = [_vec(a_scale, M, device), _vec(b_scale, N, device),
            bias.float().contiguous() if bias is not None else None]
    return keep, [t.data_ptr() if t is not None else 0 for t in keep]


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """[first byte, one past the last byte] that t's elements can touch."""
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _check_out(out, M: int, N: int, dtype, a, others) -> None:
    """out= of a CPU GEMM: (M, N) of `dtype` on a's device, rows of unit stride (the kernel
    writes row by row with a leading dimension), and no byte shared with an input."""
    utils.check_tensor("out", out, dtypes=(dtype,), ndim=2, device=a.device)
    if tuple(out.shape) != (M, N):
        raise ValueError(f"out must have shape (M, N) = ({M}, {N}), got {tuple(out.shape)}")
    if N > 1 and out.stride(1) != 1 or M > 1 and out.stride(0) < N:
        raise ValueError(f"out must have unit stride along its rows and rows that do not overlap "
                         f"(out.stride(1) == 1, out.stride(0) >= {N}), got strides "
                         f"{tuple(out.stride())}")
    o0, o1 = _span(out)
    for name, t in others:
        if t is not None and t.numel() and out.numel():
            t0, t1 = _span(t)
            if o0 < t1 and t0 < o1:
                raise ValueError(f"out overlaps {name}: the kernel would overwrite its input")


def int8_gemm_packed(a, w: PackedInt8Weight, a_scale=None, b_scale=None, bias=None,
                     out_dtype=None, activation: Optional[str] = None, out=None):
    """`int8_gemm` on the CPU with a weight packed once by `pack_weight`.

    out: an (M, N) float32 (int32 without scales) tensor to write instead of a new one; its
    rows need unit stride. Without it, an output of >= 8 MiB comes from the output pool
    (`cpu_output`)."""
    M, N, K, scaled = _validate_gemm(a, None, a_scale, b_scale, bias, out_dtype,
                                     packed_k=(w.N, w.K))
    act = activation_code(activation)
    if act and not scaled:
        raise ValueError("an activation needs the float epilogue: pass a_scale / b_scale / bias")
    if a.is_cuda:
        raise ValueError("int8_gemm_packed takes CPU tensors; call int8_gemm on CUDA")
    dtype = torch.float32 if scaled else torch.int32
    if out is None:
        out = cpu_output((M, N), dtype)
    else:
        others = [("a", a), ("the packed weight", w.data)] + [
            (n, t) for n, t in (("a_scale", a_scale), ("b_scale", b_scale), ("bias", bias))
            if isinstance(t, torch.Tensor)]
        _check_out(out, M, N, dtype, a, others)
    if M == 0 or N == 0:
        return out
    keep, ptrs = _cpu_scales(scaled, a_scale, b_scale, bias, M, N, a.device)  # noqa: F841
    _ext().gemm_int8(a.data_ptr(), a.stride(0), a.stride(1), w.data.data_ptr(), w.isa, M, N, K,
                     out.data_ptr(), max(out.stride(0), 1), *ptrs, act, _threads())
    return out


def _linear_cpu(x2d: torch.Tensor, packed: torch.Tensor, isa: int, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], act: int, out: Optional[torch.Tensor] = None):
    """The dynamic int8 linear's kernel call: x2d (M, K) float32 / float16 / bfloat16 with a unit
    column stride, `packed` a PackedInt8Weight's data for `isa`, w_scale (N,) and bias (N,) or
    None float32 contiguous (checked once, when the weight is packed) -> float32 (M, N), written
    into `out` when given. Per-token quantization (one read of x) fused into the GEMM's A
    packing, then act(acc * s_x * s_w + bias) on the accumulators."""
    M, K = x2d.shape
    N = w_scale.shape[0]
    if out is None:
        out = cpu_output((M, N), torch.float32)
    if M == 0 or N == 0:
        return out
    x_scale = torch.empty(M, dtype=torch.float32)  # written by the quantizer, read by the epilogue
    _ext().linear_dynamic(x2d.data_ptr(), _X_DTYPE_CODE[x2d.dtype], x2d.stride(0),
                          packed.data_ptr(), isa, M, N, K, out.data_ptr(), N, x_scale.data_ptr(),
                          w_scale.data_ptr(), bias.data_ptr() if bias is not None else 0, act,
                          _threads())
    return out


def quantized_linear_cpu(x2d: torch.Tensor, w: PackedInt8Weight, w_scale: torch.Tensor,
                         bias: Optional[torch.Tensor], activation: Optional[str] = None):
    """Dynamic int8 linear on the CPU in one kernel call: per-token quantization (one read of x)
    fused into the GEMM's A packing, then act(x_scale * w_scale * acc + bias) in the epilogue.
    x2d: (M, K) float32 / float16 / bfloat16 -> float32 (M, N)."""
    M, K = x2d.shape
    if x2d.dtype not in _X_DTYPE_CODE:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x2d.dtype}")
    if K != w.K:
        raise ValueError(f"x has K={K}, the weight has K={w.K}")
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    w_scale = _vec(w_scale, w.N, x2d.device)
    bias = bias.float().contiguous() if bias is not None else None
    return _linear_cpu(x2d, w.data, w.isa, w_scale, bias, activation_code(activation))


def _gemm_cuda(a, b, M, N, K, scaled, a_scale, b_scale, bias, out_dtype):
    out_dtype = out_dtype or (torch.float32 if scaled else torch.int32)
    out = utils.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    # the kernel reads a and b with a unit K stride and 16-byte-aligned rows (cp.async)
    a = a if _cp_async_ready(a) else _aligned_rows(a)
    b = b if _cp_async_ready(b) else _aligned_rows(b)
    keep, ptr = _cpu_scales(scaled, a_scale, b_scale, bias, M, N, a.device)  # noqa: F841
    with torch.cuda.device(a.device):  # the launch goes to the current device
        stream = torch.cuda.current_stream(a.device).cuda_stream
        _ext().gemm_cuda(a.data_ptr(), b.data_ptr(), M, N, K, a.stride(0), b.stride(0),
                         out.data_ptr(), N, _CUDA_OUT_KIND[out_dtype], *ptr, stream)
    return out


def _cp_async_ready(t):
    return t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0


def _aligned_rows(t):
    """Copy t (R, K) into a buffer whose rows start 16-byte aligned (row stride % 16 == 0)."""
    R, K = t.shape
    buf = torch.zeros((R, (K + 15) // 16 * 16), dtype=t.dtype, device=t.device)
    buf[:, :K] = t
    return buf[:, :K]


# ---------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces these without graph breaks)
# ---------------------------------------------------------------------------------------------

def _as_tensor(s, device):
    """Python number scales -> 0-d float32 tensors (custom ops take tensors)."""
    if s is None or isinstance(s, torch.Tensor):
        return s
    return torch.tensor(float(s), dtype=torch.float32, device=device)


@torch.library.custom_op("tkd::int8_gemm", mutates_args=())
def _int8_gemm_op(a: torch.Tensor, b: torch.Tensor, a_scale: Optional[torch.Tensor],
                  b_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    M, N, K, scaled = _validate_gemm(a, b, a_scale, b_scale, bias, out_dtype)
    if a.is_cuda:
        return _gemm_cuda(a, b, M, N, K, scaled, a_scale, b_scale, bias, out_dtype)
    if M == 0 or N == 0:
        return utils.empty((M, N), dtype=torch.float32 if scaled else torch.int32,
                           device=a.device)
    return int8_gemm_packed(a, pack_weight(b), a_scale, b_scale, bias, out_dtype)


@_int8_gemm_op.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype):
    scaled = _scaled(a_scale, b_scale, bias, out_dtype)
    dtype = out_dtype or (torch.float32 if scaled else torch.int32)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=dtype)


@torch.library.custom_op("tkd::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    if x.is_cuda:
        return quantize_per_token_ref(x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    M = x2d.shape[0]
    q = utils.empty((M, K), dtype=torch.int8, device=x.device)
    scale = utils.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        _ext().quantize_rows(x2d.data_ptr(), _X_DTYPE_CODE[x.dtype], M, K, x2d.stride(0),
                             q.data_ptr(), scale.data_ptr(), _threads())
    return q.reshape(*lead, K), scale.reshape(lead)


@_quantize_per_token_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tkd::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, packed: torch.Tensor, isa: int, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], act: int) -> torch.Tensor:
    """Int8Linear's CPU forward as one op (torch.compile calls it; eager calls _linear_cpu):
    x (..., K) -> float32 (..., N)."""
    K, N = x.shape[-1], w_scale.shape[0]
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    return _linear_cpu(x2, packed, isa, w_scale, bias, act).view(*x.shape[:-1], N)


@_int8_linear_op.register_fake
def _(x, packed, isa, w_scale, bias, act):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------

def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale=None, b_scale=None, bias=None,
              out_dtype: Optional[torch.dtype] = None,
              activation: Optional[str] = None) -> torch.Tensor:
    """a @ b.T for int8 a (M, K) and int8 b (N, K) (nn.Linear weight layout).

    Without a_scale / b_scale / bias: the exact int32 (M, N) result. With them:
    act(acc * a_scale[:, None] * b_scale[None, :] + bias), fused into the kernel's epilogue, where
    a_scale is (M,) per token or a scalar, b_scale is (N,) per channel or a scalar (a missing one
    counts as 1), bias is (N,), act the `activation` (None, "gelu" (erf), "gelu_tanh", "relu";
    on CUDA applied after the kernel). out_dtype: float32 on CPU; float16, bfloat16 or float32
    on CUDA (default float32). Any strides are accepted. Inference only (no autograd).
    Registered as torch.ops.tkd.int8_gemm (with a fake implementation for torch.compile).
    """
    M, N, K, scaled = _validate_gemm(a, b, a_scale, b_scale, bias, out_dtype)  # clear errors
    act = activation_code(activation)
    if act and not scaled:
        raise ValueError("an activation needs the float epilogue: pass a_scale / b_scale / bias")
    a_scale, b_scale = _as_tensor(a_scale, a.device), _as_tensor(b_scale, a.device)
    if act and not a.is_cuda:
        if M == 0 or N == 0:
            return utils.empty((M, N), dtype=torch.float32, device=a.device)
        return int8_gemm_packed(a, pack_weight(b), a_scale, b_scale, bias, out_dtype, activation)
    y = _int8_gemm_op(a, b, a_scale, b_scale, bias, out_dtype)
    return activation_ref(y, act) if act else y


def quantize_per_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8 quantization of x (..., K) (float32, float16 or bfloat16).

    Returns (q int8 (..., K) in [-127, 127], scale float32 (...)) with scale = absmax / 127 per
    row (1 for an all-zero row) and q = round_half_even(x / scale); x ~ q * scale[..., None].
    A row holding NaN or +-inf gets q = 0 and scale NaN.
    On CPU one fused pass (one read of x); on CUDA the torch reference.
    Registered as torch.ops.tkd.quantize_per_token.
    """
    utils.check_tensor("x", x, dtypes=utils.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (..., K)")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    return _quantize_per_token_op(x)


# ---------------------------------------------------------------------------------------------
# Torch references
# ---------------------------------------------------------------------------------------------

def int8_gemm_ref(a, b, a_scale=None, b_scale=None, bias=None, out_dtype=None, activation=None):
    """Reference: exact int32 a @ b.T (via float64, exact for K <= K_MAX), or the scaled float
    result (then the activation) computed in float64 and cast to `out_dtype` (default
    float32)."""
    acc = a.double() @ b.double().T  # (M, N), exact integers
    if not _scaled(a_scale, b_scale, bias, out_dtype):
        return acc.to(torch.int32)
    M, N = acc.shape
    y = acc * _vec(a_scale, M, a.device, torch.float64)[:, None]
    y = y * _vec(b_scale, N, a.device, torch.float64)[None, :]
    if bias is not None:
        y = y + bias.double()
    return activation_ref(y, activation_code(activation)).to(out_dtype or torch.float32)


def quantize_per_token_ref(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of `quantize_per_token` in torch (float32 math, same rounding, same NaN rows)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # (...); NaN when the row holds a NaN, inf when it holds an inf
    finite = torch.isfinite(amax)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    scale = torch.where(finite, scale, torch.full_like(amax, float("nan")))
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127)
    q = torch.where(finite[..., None], q, torch.zeros_like(q)).to(torch.int8)
    return q, scale
