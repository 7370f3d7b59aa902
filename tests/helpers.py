"""Shared test helpers: relative error against float64, dtype tolerances, SQNR."""
import math

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """max|out - ref| / max(max|ref|, floor) (max|out - ref| when both are zero), in float64.
    floor: the scale below which a reference value is a cancellation, not a magnitude."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return float("inf")
    diff = (out - ref).abs().max().item()
    scale = max(ref.abs().max().item(), floor)
    return diff / scale if scale > 0 else diff


def assert_close(out, ref, tol, what="", floor=0.0):
    e = rel_err(out, ref, floor)
    assert e <= tol, f"{what}: relative error {e:.3e} > tolerance {tol:.1e}"


def sum_tol(dtype, length):
    """Relative tolerance of an output that sums `length` terms in fp32 and is stored in `dtype`
    (LayerNorm's y and dx over a row, dw and db over rows; see tests/test_layer_norm.py):
    fp32 8 eps32 sqrt(length), at least 32 eps32; fp16 2e-3 and bf16 1.6e-2 (~4 ulp)."""
    if dtype == torch.float32:
        eps32 = torch.finfo(torch.float32).eps
        return max(32 * eps32, 8 * eps32 * math.sqrt(length))
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def sqnr_db(y, ref):
    """Signal-to-quantization-noise ratio of y against ref, in dB (float64)."""
    return 10 * torch.log10(ref.double().pow(2).mean() / (y.double() - ref.double()).pow(2).mean())
