"""LayerNorm over the last dimension, optionally fused with the residual add (BERT's add-and-norm).

Math. For one row h (N elements; h = x, or h = x + residual rounded to x's dtype, which is also
returned so pre-LN models keep their residual stream):

    mean = sum(h) / N            var = sum((h - mean)^2) / N        rstd = 1 / sqrt(var + eps)
    xhat = (h - mean) * rstd     y = xhat * w + b

Numerics. Statistics are fp32 for every input dtype. LN is invariant to shifting a row, and to
scaling it (up to eps), so the statistics are computed on c = (h - p) / s, with the pivot p = h_0
(the row's first element) and s = 1, or max|h - p| for rows where that exceeds BIG = 2^40:

    mean_c = sum(c) / N     var_c = sum((c - mean_c)^2) / N     rstd = 1 / (s sqrt(var_c + eps/s^2))

- The shift keeps a large mean out of the sums: a row of mean 1e6 and std 1 has h - p = O(1),
  exact in fp32, where sum(h) / N would carry ulp(1e6) = 0.06 of error into every xhat.
- The scale keeps squares finite: (h - p)^2 overflows fp32 past |h - p| ~ 1.8e19, and a row of
  magnitude 1e30 then normalized to exactly the bias; scaled, any finite row normalizes.
Rows of ordinary magnitude have s = 1 and are computed exactly as without it. The per-row
statistics saved for the backward are mean = s * mean_c (relative to p) and rstd; the backward
reloads p and forms xhat = ((h - p) - mean) * rstd. A row holding NaN or inf gives NaN.

Backward: with g = w * dy and d rstd / d h_j = -rstd^2 * xhat_j / N, the Jacobian is
d xhat_i / d h_j = rstd * (delta_ij - 1/N - xhat_i * xhat_j / N), so

    dh = rstd * (g - xhat * c1 - c2),   c1 = sum(g * xhat) / N,   c2 = sum(g) / N
    dw = sum_rows(dy * xhat)            db = sum_rows(dy)

With a residual, the gradient arriving at the returned h = x + residual is added to dh in the same
kernel, and dx = dresidual = dh.

Kernels and tiling (one heuristic, `config(N, backward)`, used by the launchers and `aot_specs()`):
- N <= MAX_BLOCK (MAX_BLOCK_BWD for the backward): a row lives in registers as one
  BLOCK_N = next_pow2(N) tile; short rows are packed ROWS to a program ((ROWS, BLOCK_N) tile of
  SMALL_TILE elements). Forward: one program per ROWS rows. Backward: a fixed number of programs,
  each looping over row tiles with its dw/db partial sums in registers, stored to a
  (num_programs, BLOCK_N) fp32 buffer that the launcher sums (two-stage reduction, no atomics).
- Wider rows would spill registers: one row per program, swept in CHUNK-wide column chunks
  twice. Forward: statistics (per-chunk mean and M2 merged with Chan's formula, stable for rows
  with a large mean; h = x + residual is written here), then normalize. Backward: c1 and c2,
  then dx, accumulating dy * xhat and dy into the program's own (num_programs, N) partial row
  (its first row stores, later rows add).
"""
import dataclasses
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .utils import (FLOAT_DTYPES, TRITON_DTYPE, backend, check_tensor, empty, ensure_launchable,
                    next_power_of_2, num_warps_for)

MIN_BLOCK = 128     # narrowest row tile (shorter rows are masked): fewer compiled variants
SMALL_TILE = 1024   # elements per program when several short rows share one
MAX_BLOCK = 8192    # widest row held in registers by the forward; wider rows are swept in chunks
MAX_BLOCK_BWD = 4096  # the backward keeps dw/db accumulators too: 8192 spills at 16 warps
CHUNK = 4096        # column chunk of the swept path
BIG = 2.0 ** 40     # rows with max|h - p| past this are scaled to 1 before squaring (see above)
_BIG = tl.constexpr(BIG)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _row_pivot(X, R, H, first, ok, HAS_RES: tl.constexpr):
    """p = h at the rows' first elements `first` (x, or x + residual rounded like h), fp32."""
    p = tl.load(X + first, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + first, mask=ok, other=0.0).to(tl.float32)
        p = (p + r).to(H.dtype.element_ty).to(tl.float32)
    return p


@triton.jit
def _spread_scale(amax):
    """s: 1, or the row's max|h - p| itself when it is past BIG (NaN: 1, and NaN propagates)."""
    return tl.where(amax > _BIG, amax, 1.0)


@triton.jit
def _layer_norm_fwd(
    X,          # (M, N) input, contiguous
    R,          # (M, N) residual (unused unless HAS_RES)
    W,          # (N,) fp32 weight (ones when absent)
    B,          # (N,) fp32 bias (zeros when absent)
    Y,          # (M, N) output, x.dtype
    H,          # (M, N) output h = x + residual, x.dtype (unused unless HAS_RES)
    Mean,       # (M,) fp32 output
    Rstd,       # (M,) fp32 output
    M, N,       # rows, hidden size (row stride of every 2-D buffer)
    eps,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # add in fp32, round to x.dtype like torch's x + r: y is LN of exactly the returned h
        h = (h + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        h = h.to(tl.float32)
    p = _row_pivot(X, R, H, rows.to(tl.int64) * N, row_ok, HAS_RES)  # (ROWS,)
    c = tl.where(mask, h - p[:, None], 0.0)
    inv_s = 1.0 / _spread_scale(tl.max(tl.abs(c), axis=1))  # (ROWS,), 1 for ordinary rows
    c = c * inv_s[:, None]
    mean = tl.sum(c, axis=1) / N  # (ROWS,) of c
    d = tl.where(mask, c - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps * inv_s * inv_s)  # of c
    w = tl.load(W + cols, mask=col_ok, other=0.0)
    b = tl.load(B + cols, mask=col_ok, other=0.0)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean / inv_s, mask=row_ok)  # of h - p
    tl.store(Rstd + rows, rstd * inv_s, mask=row_ok)  # of h


@triton.jit
def _layer_norm_fwd_chunked(
    X, R, W, B, Y, H, Mean, Rstd,  # as in _layer_norm_fwd
    M, N, eps,
    BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    p = _row_pivot(X, R, H, base, True, HAS_RES)
    # sweep 1: statistics of c = (h - p) / s, merging per-chunk (count, mean, M2) with Chan's
    # parallel formula; s grows to the largest max|h - p| past BIG seen so far, and the running
    # mean and M2 are rescaled by s_old / s_new (s_old^2 / s_new^2) when it does
    count = 0.0
    mean = 0.0
    m2 = 0.0
    s = 1.0
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        h = tl.load(X + base + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            h = (h + tl.load(R + base + c, mask=ok, other=0.0).to(tl.float32)).to(
                H.dtype.element_ty)
            tl.store(H + base + c, h, mask=ok)  # sweep 2 reads it back
            h = h.to(tl.float32)
        hs = tl.where(ok, h - p, 0.0)
        s_new = tl.maximum(s, _spread_scale(tl.max(tl.abs(hs), axis=0)))
        r = s / s_new  # 1 unless the scale grew
        mean = mean * r
        m2 = m2 * r * r
        s = s_new
        hs = hs * (1.0 / s)
        n_c = tl.minimum(N - start, BLOCK_N).to(tl.float32)
        mean_c = tl.sum(hs, axis=0) / n_c
        d = tl.where(ok, hs - mean_c, 0.0)
        m2_c = tl.sum(d * d, axis=0)
        total = count + n_c
        delta = mean_c - mean
        mean = mean + delta * (n_c / total)
        m2 = m2 + m2_c + delta * delta * (count * n_c / total)
        count = total
    inv_s = 1.0 / s
    rstd = 1.0 / tl.sqrt(m2 / N + eps * inv_s * inv_s)  # of c
    tl.store(Mean + row, mean * s)  # of h - p
    tl.store(Rstd + row, rstd * inv_s)  # of h
    if HAS_RES:
        tl.debug_barrier()  # h written above is visible to every thread of the program
    # sweep 2: normalize
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        if HAS_RES:
            h = tl.load(H + base + c, mask=ok, other=0.0).to(tl.float32)
        else:
            h = tl.load(X + base + c, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + c, mask=ok, other=0.0)
        b = tl.load(B + c, mask=ok, other=0.0)
        y = ((h - p) * inv_s - mean) * rstd * w + b
        tl.store(Y + base + c, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _layer_norm_bwd(
    Hin,        # (M, N) the normalized input h (x, or x + residual), x.dtype
    W,          # (N,) fp32 weight (ones when absent)
    DY,         # (M, N) grad of y
    DH,         # (M, N) grad of the returned h (unused unless HAS_DH)
    DX,         # (M, N) output: grad of h (= dx = dresidual)
    Mean, Rstd,  # (M,) fp32 from the forward (Mean relative to the row's first element)
    DWp, DBp,   # (num_programs, BLOCK_N) fp32 outputs: this program's partial dw, db
    M, N, num_tiles,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(Hin + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(Hin + rows.to(tl.int64) * N, mask=row_ok, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, ((h - p[:, None]) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    # unmasked into BLOCK_N-wide rows (padding columns hold zeros): keeping the column mask
    # alive across the loop costs predicate spills
    tl.store(DWp + pid * BLOCK_N + cols, dw)
    tl.store(DBp + pid * BLOCK_N + cols, db)


@triton.jit
def _layer_norm_bwd_chunked(
    Hin, W, DY, DH, DX, Mean, Rstd, DWp, DBp,  # as in _layer_norm_bwd
    M, N,
    BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N  # this program's row of DWp / DBp
    for row in range(pid, M, num_progs):
        base = tl.cast(row, tl.int64) * N
        p = tl.load(Hin + base).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        # sweep 1: c1 = sum(g * xhat) / N, c2 = sum(g) / N
        s1 = 0.0
        s2 = 0.0
        for start in range(0, N, BLOCK_N):
            c = start + cols
            ok = c < N
            h = tl.load(Hin + base + c, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + c, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=ok, other=0.0)
            xhat = tl.where(ok, ((h - p) - mean) * rstd, 0.0)
            g = dy * w
            s1 += tl.sum(g * xhat, axis=0)
            s2 += tl.sum(g, axis=0)
        c1 = s1 / N
        c2 = s2 / N
        # sweep 2: dx, and this row's dy * xhat, dy into the program's partial sums
        later = row != pid  # the program's first row stores its partial sums, later rows add
        tl.debug_barrier()  # the previous row's partial-sum stores are visible to all threads
        for start in range(0, N, BLOCK_N):
            c = start + cols
            ok = c < N
            h = tl.load(Hin + base + c, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + c, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=ok, other=0.0)
            xhat = tl.where(ok, ((h - p) - mean) * rstd, 0.0)
            dx = (dy * w - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + base + c, mask=ok, other=0.0).to(tl.float32)
            tl.store(DX + base + c, dx.to(DX.dtype.element_ty), mask=ok)
            dw = tl.load(DWp + part + c, mask=ok & later, other=0.0)
            db = tl.load(DBp + part + c, mask=ok & later, other=0.0)
            tl.store(DWp + part + c, dw + dy * xhat, mask=ok)
            tl.store(DBp + part + c, db + dy, mask=ok)


# ------------------------------------------------------------------------------------------
# Launchers: `config(...) -> Config` (the one heuristic), then tensor in, tensor out
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int     # columns per tile (power of two)
    rows: int        # rows per tile
    num_warps: int
    chunked: bool    # sweep a row in block_n-wide chunks instead of holding it


def config(N: int, backward: bool = False) -> Config:
    """The launch configuration for hidden size N, bucketed by next_pow2(N) (dtype-independent).

    Used by the launchers and by `aot_specs()`, so the compiled variants are the launched ones.
    """
    block = max(MIN_BLOCK, next_power_of_2(N))
    if block > (MAX_BLOCK_BWD if backward else MAX_BLOCK):
        return Config(CHUNK, 1, num_warps_for(CHUNK), True)
    rows = max(1, SMALL_TILE // block)
    return Config(block, rows, num_warps_for(rows * block), False)


def _bwd_programs(num_tiles: int, cfg: Config, device: torch.device) -> int:
    """Backward programs: enough to fill the GPU; each owns one row of the dw/db partial buffer."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        per_sm = max(1, 32 // cfg.num_warps)  # resident programs per SM at ~1024 threads
        return max(1, min(num_tiles, sms * per_sm))
    return max(1, min(num_tiles, 4))  # interpreter: a few programs still exercise the reduction


@functools.lru_cache(maxsize=16)
def _filled(N: int, fill: float, device: torch.device) -> torch.Tensor:
    return torch.full((N,), fill, dtype=torch.float32, device=device)  # read-only, never returned


def _affine32(t: Optional[torch.Tensor], N: int, fill: float, device) -> torch.Tensor:
    """Weight or bias as contiguous fp32 (N,), ones / zeros when absent, so one kernel variant
    serves every weight dtype and presence (a no-op for fp32 parameters, the usual case)."""
    if t is None:
        return _filled(N, fill, device)
    return t.detach().to(torch.float32).contiguous()


def layer_norm_fwd(x, weight=None, bias=None, eps=1e-5, residual=None):
    """x (..., N) -> y (..., N) x.dtype, h (..., N) = x + residual (or a (0,) tensor when no
    residual), mean (...,) fp32, rstd (...,) fp32."""
    N = x.shape[-1]
    M = x.numel() // N if N else 0
    x2 = x.reshape(-1, N).contiguous() if N else x
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    h = (empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None
         else x.new_empty((0,)))
    mean = empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, h, mean.zero_(), rstd.zero_()
    r2 = residual.reshape(-1, N).contiguous() if residual is not None else x2
    w32 = _affine32(weight, N, 1.0, x.device)
    b32 = _affine32(bias, N, 0.0, x.device)
    h_out = h if residual is not None else y  # never written without a residual
    cfg = config(N)
    # one program per row (chunked: rows too long for registers) or per ROWS-row tile
    kernel, grid, tile = ((_layer_norm_fwd_chunked, (M,), {}) if cfg.chunked else
                          (_layer_norm_fwd, (triton.cdiv(M, cfg.rows),), dict(ROWS=cfg.rows)))
    ensure_launchable(kernel, backend(x))
    kernel[grid](x2, r2, w32, b32, y, h_out, mean, rstd, M, N, eps, BLOCK_N=cfg.block_n,
                 HAS_RES=residual is not None, num_warps=cfg.num_warps, **tile)
    return y, h, mean, rstd


def layer_norm_bwd(dy, h, weight, mean, rstd, dh=None):
    """Grads of y = LN(h): dy, h (..., N), weight (N,) or None, mean/rstd (...,) fp32, dh (...,
    N) the grad arriving at the returned h, or None. Returns dh_total (..., N) h.dtype (the grad
    of x and of residual), dw (N,) fp32, db (N,) fp32."""
    N = h.shape[-1]
    M = h.numel() // N if N else 0
    dx = empty(h.shape, dtype=h.dtype, device=h.device)
    if h.numel() == 0:
        zeros = torch.zeros(N, dtype=torch.float32, device=h.device)
        return dx, zeros, zeros.clone()
    h2 = h.reshape(-1, N).contiguous()
    dy2 = dy.reshape(-1, N).contiguous()
    dh2 = dh.reshape(-1, N).contiguous() if dh is not None else dy2
    w32 = _affine32(weight, N, 1.0, h.device)
    cfg = config(N, backward=True)
    num_tiles = triton.cdiv(M, cfg.rows)
    P = _bwd_programs(num_tiles, cfg, h.device)
    width = N if cfg.chunked else cfg.block_n  # the single-tile kernel pads rows to BLOCK_N
    dw_part = empty((P, width), dtype=torch.float32, device=h.device)
    db_part = empty((P, width), dtype=torch.float32, device=h.device)
    # P programs over the rows (chunked: one row at a time) or over ROWS-row tiles
    kernel, tiles, tile = ((_layer_norm_bwd_chunked, (), {}) if cfg.chunked else
                           (_layer_norm_bwd, (num_tiles,), dict(ROWS=cfg.rows)))
    ensure_launchable(kernel, backend(h))
    kernel[(P,)](h2, w32, dy2, dh2, dx, mean, rstd, dw_part, db_part, M, N, *tiles,
                 BLOCK_N=cfg.block_n, HAS_DH=dh is not None, num_warps=cfg.num_warps, **tile)
    return dx, dw_part[:, :N].sum(0), db_part[:, :N].sum(0)  # stage 2 of the dw/db reduction


# ------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces these without graph breaks)
# ------------------------------------------------------------------------------------------

# Custom ops may not return None nor alias their inputs: the forward always returns four fresh
# tensors, h being a (0,) placeholder when there is no residual.


@torch.library.custom_op("tkd::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float,
                       residual: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fwd(x, weight, bias, eps, residual)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, residual):
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x), h, stats, torch.empty_like(stats)


@torch.library.custom_op("tkd::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, h: torch.Tensor, weight: Optional[torch.Tensor],
                       mean: torch.Tensor, rstd: torch.Tensor, dh: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_bwd(dy, h, weight, mean, rstd, dh)


@_layer_norm_bwd_op.register_fake
def _(dy, h, weight, mean, rstd, dh):
    N = h.shape[-1]
    return torch.empty_like(h), h.new_empty((N,), dtype=torch.float32), \
        h.new_empty((N,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.has_residual = residual is not None


def _backward(ctx, dy, dh, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw, db = _layer_norm_bwd_op(dy, h, weight, mean, rstd,
                                    dh if ctx.has_residual else None)
    dw = dw.to(weight.dtype) if weight is not None else None
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dw, db, None, (dx if ctx.has_residual else None)


torch.library.register_autograd("tkd::layer_norm_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------

def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dimension of x (..., N), fp32 statistics.

    weight, bias: (N,) or None (independently). residual: like x, or None.
    Returns y (..., N) in x.dtype; with a residual returns (y, x + residual), y = LN(x + residual).
    Differentiable in x, weight, bias and residual.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (the normalized one), got a scalar")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, dtypes=FLOAT_DTYPES, device=x.device)
            if tuple(t.shape) != (N,):
                raise ValueError(f"{name} must have shape ({N},) (the hidden size, x.shape[-1]), "
                                 f"got {tuple(t.shape)}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")
    if backend(x) == "reference":
        return layer_norm_ref(x, weight, bias, eps, residual)
    y, h, _, _ = _layer_norm_fwd_op(x, weight, bias, float(eps), residual)
    return y if residual is None else (y, h)


# ------------------------------------------------------------------------------------------
# Torch reference (the CPU path, and the tests' float64 reference)
# ------------------------------------------------------------------------------------------

COND = 2.0 ** 8  # |mean| * rstd past this: torch's fp32 mean loses > 2^-16 of xhat


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, residual=None):
    """Torch reference: y = LN(x + residual); returns y, or (y, x + residual) with a residual.

    Eagerly: torch's fused LayerNorm, whose statistics also say whether it was accurate; rows of
    a large mean next to their spread (|mean| * rstd > COND) or whose variance overflowed fp32
    (rstd = 0) are recomputed by `_layer_norm_stable`. Under torch.compile (no data-dependent
    branch) always `_layer_norm_stable`, which inductor fuses."""
    h = x if residual is None else x + residual
    if torch.compiler.is_compiling():
        y = _layer_norm_stable(h, weight, bias, eps)
    else:
        y, mean, rstd = torch.native_layer_norm(h, h.shape[-1:], weight, bias, eps)
        if mean.numel() and not _accurate(mean, rstd):
            y = _layer_norm_stable(h, weight, bias, eps)
    return y if residual is None else (y, h)


def _accurate(mean, rstd) -> bool:
    """Whether fp32 statistics are accurate for every row: |mean| * rstd <= COND (False for a
    NaN) and rstd > 0. Two reductions, a few microseconds: it runs on every eager CPU call."""
    return (float(torch.linalg.vector_norm(mean * rstd, float("inf"))) <= COND
            and float(rstd.min()) > 0)


def _layer_norm_stable(h, weight, bias, eps):
    """LN with the kernels' numerics (see the module docstring): statistics of (h - p) / s in
    fp32 (float64 for float64 h), y cast back to h's dtype."""
    hf = h.to(torch.promote_types(h.dtype, torch.float32))
    c = hf - hf[..., :1]
    a = c.abs().amax(-1, keepdim=True)
    s = torch.where(a > BIG, a, torch.ones_like(a))
    c = c / s
    d = c - c.mean(-1, keepdim=True)
    y = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps / (s * s))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(h.dtype)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compile list: the configurations `config` yields (kernels/aot.py)
# ------------------------------------------------------------------------------------------

def _spec(backward: bool, cfg: Config, dtype: torch.dtype, has_res: bool) -> AotSpec:
    t = TRITON_DTYPE[dtype]
    p, f32 = f"*{t}", "*fp32"
    if backward:
        kernel = _layer_norm_bwd_chunked if cfg.chunked else _layer_norm_bwd
        sig = dict(Hin=p, W=f32, DY=p, DH=p, DX=p, Mean=f32, Rstd=f32, DWp=f32, DBp=f32,
                   M="i32", N="i32")
        consts = dict(BLOCK_N=cfg.block_n, HAS_DH=has_res)
    else:
        kernel = _layer_norm_fwd_chunked if cfg.chunked else _layer_norm_fwd
        sig = dict(X=p, R=p, W=f32, B=f32, Y=p, H=p, Mean=f32, Rstd=f32, M="i32", N="i32",
                   eps="fp32")
        consts = dict(BLOCK_N=cfg.block_n, HAS_RES=has_res)
    if not cfg.chunked:
        consts["ROWS"] = cfg.rows
        if backward:
            sig["num_tiles"] = "i32"
    sig.update({k: "constexpr" for k in consts})
    label = (f"layer_norm_{'bwd' if backward else 'fwd'}{' chunked' if cfg.chunked else ''} "
             f"BLOCK_N={cfg.block_n} ROWS={cfg.rows} {t}{' res' if has_res else ''}")
    aligned = tuple(a for a, ty in sig.items() if ty.startswith("*"))  # torch allocations
    return AotSpec(label=label, kernel=kernel, signature=sig, constexprs=consts,
                   num_warps=cfg.num_warps, aligned=aligned)


def aot_specs():
    """Every configuration `config(N, backward)` yields for N in [1, 65536] (it only depends on
    next_pow2(N)), for each dtype, with and without residual."""
    sizes = [1] + [2 ** k + d for k in range(17) for d in (0, 1) if 2 ** k + d <= 65536]
    specs = []
    for backward in (False, True):
        cfgs = sorted({config(n, backward) for n in sizes}, key=lambda c: (c.chunked, c.block_n))
        specs += [_spec(backward, cfg, dtype, has_res) for cfg in cfgs for dtype in FLOAT_DTYPES
                  for has_res in (False, True)]
    return specs
