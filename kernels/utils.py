"""Helpers shared by every kernel: the dispatch rule, dtype names, block-size heuristics."""
import contextlib
import os

import torch
import triton

BACKENDS = ("triton", "interpreter", "reference")

# torch dtype -> Triton type name, for AOT signatures ("*fp16" for a pointer to fp16).
TRITON_DTYPE = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8",
}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET=1 is set now (Triton reads it when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_REFERENCE_DEPTH = 0  # > 0 inside reference_ops()


@contextlib.contextmanager
def reference_ops():
    """Within the block every op runs its torch reference, as with TKD_OPS=reference (used by
    tkd_core.export_onnx: exporters trace plain torch math, not our kernels' launchers)."""
    global _REFERENCE_DEPTH
    _REFERENCE_DEPTH += 1
    try:
        yield
    finally:
        _REFERENCE_DEPTH -= 1


def backend(t: torch.Tensor) -> str:
    """The one dispatch rule of every op: which path runs for a tensor on this device.

    CUDA tensors -> "triton" (compiled kernels). CPU tensors -> "reference" (the op's torch
    reference, the fast CPU path), or "interpreter" (the Triton kernels in Triton's interpreter)
    when TRITON_INTERPRET=1 is set. TKD_OPS=reference sends every tensor, CUDA ones included, to
    the torch references (to compare a run against the same run without our kernels).
    """
    ops = os.environ.get("TKD_OPS", "auto")
    if ops not in ("auto", "reference"):
        raise ValueError(f"TKD_OPS must be 'auto' or 'reference', got {ops!r}")
    if ops == "reference" or _REFERENCE_DEPTH:
        return "reference"
    if t.is_cuda:
        return "triton"
    if interpreter_requested():
        return "interpreter"
    return "reference"


def ensure_launchable(kernel, path: str) -> None:
    """Fail clearly instead of crashing when the interpreter is asked for after import.

    Triton decides between compiled and interpreted kernels when `@triton.jit` runs, i.e. when
    tkd_core is imported, so TRITON_INTERPRET=1 must be set before that import.
    """
    if path == "interpreter" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after tkd_core was imported; Triton kernels were already "
            "compiled for the GPU. Set TRITON_INTERPRET=1 in the environment before importing "
            "tkd_core to run the Triton kernels on CPU tensors.")


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def num_warps_for(block: int) -> int:
    """Warps for a 1-D row tile of `block` elements: ~8 elements/thread keeps registers low."""
    return max(1, min(16, block // 256))


def check_tensor(name: str, t, *, dtypes=None, ndim=None, device=None) -> None:
    """Boundary checks shared by all ops; messages name the argument and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(t.dtype).replace("torch.", "")
        raise TypeError(f"{name} must have dtype in ({names}), got {got}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; "
                         "all tensors must be on one device")


def poison_requested() -> bool:
    return os.environ.get("TKD_POISON_OUTPUTS", "0") == "1"


def empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty for every buffer a launcher hands to a kernel to write.

    With TKD_POISON_OUTPUTS=1 (set by the test suite) it is NaN-filled (integers: their minimum),
    so an element a kernel fails to write shows up in the test instead of passing by luck.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    return poison_(t) if poison_requested() else t


def poison_(t: torch.Tensor) -> torch.Tensor:
    """t filled, in place, with NaN (integers: their minimum): what `empty` hands out under
    TKD_POISON_OUTPUTS=1, for buffers allocated elsewhere (tkd_core.int8's output pool)."""
    return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)
