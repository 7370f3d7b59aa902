"""Shared test helpers: relative error against float64, poisoning, dtype tolerances."""
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| (max|out - ref| when ref is all zeros), in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return float("inf")
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or an extreme value for integers) so an unwritten element fails a test."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


def assert_close(out, ref, tol, what=""):
    e = rel_err(out, ref)
    assert e <= tol, f"{what}: relative error {e:.3e} > tolerance {tol:.1e}"
