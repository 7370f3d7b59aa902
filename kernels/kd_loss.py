"""Knowledge-distillation loss: softened KL to the teacher plus hard-label cross-entropy, fused.

Math (one row of logits s = student, t = teacher, both (V,); temperature T, weight alpha):

    a = s / T,  b = t / T,  p_s = softmax(a),  p_t = softmax(b),  q = softmax(s)
    soft = T^2 * KL(p_t || p_s) = T^2 * sum_j p_t[j] * (log p_t[j] - log p_s[j])
    hard = CE(s, y)             = lse(s) - s[y]                 (un-tempered student)
    loss = alpha * soft + (1 - alpha) * hard                    (labels given)
    loss = soft                                                 (labels=None: alpha unused)

Rows whose label is `ignore_index` count in neither term and in no mean: their loss is 0 and
"mean" divides by the number of counted rows (0 when none count).

One pass over the columns, online softmax. With running maxima m_a, m_b, m_s and rescaled sums
d_a = sum_j exp(a_j - m_a) (same for b, s), every time a max grows the sums are multiplied by
exp(m_old - m_new). The KL needs one more running sum, the cross term
c = sum_j exp(b_j - m_b) * (b_j - a_j), rescaled with m_b like d_b. Then, since
log p_t[j] - log p_s[j] = (b_j - a_j) - (m_b - m_a) - log d_b + log d_a and sum_j p_t[j] = 1,

    KL = c / d_b - (m_b - m_a) + log d_a - log d_b,     CE = (m_s - s[y]) + log d_s

Both are written as differences of O(1) quantities rather than of two log-sum-exps (which are
~1e4 for logits of magnitude 1e4 and would cancel catastrophically in fp32). Teacher entries of
-inf (masked classes) have p_t = 0 and contribute 0 to c (guarded: 0 * inf would be NaN); a
column tile that is entirely -inf leaves a running max at -inf, and the shift used for it is
then 0 instead of -inf so that no inf - inf appears. All accumulation is fp32.

Backward (derived, written in the forward pass): with dp_s/da = diag(p_s) - p_s p_s^T and
sum p_t = 1, d KL / d a = p_s - p_t, and da/ds = 1/T, so

    d soft / d s = T^2 * (p_s - p_t) / T = T * (p_s - p_t),    d hard / d s = q - onehot(y)
    d loss / d s = alpha * T * (p_s - p_t) + (1 - alpha) * (q - onehot(y))   (counted rows)
                 = T * (p_s - p_t)                                          (labels=None)
                 = 0                                                        (ignored rows)

Tiling: one program per row with 4096-column tiles for any V > 8, and 64 rows x 8 columns per
program for tiny V (classification heads with 2-3 classes), where one row per program would
leave the GPU launching thousands of nearly empty programs (`config`, used by the launchers and
`aot_specs`).

Once a row's statistics are known, a second sweep over its columns writes this gradient (as
Liger-Kernel's cross-entropy does), times the reduction factor (1/count for "mean"), so the
backward only multiplies it by the upstream gradient: a scalar for "sum"/"mean", one value per
row for "none". The teacher gets no gradient. The gradient is only computed when the student
requires grad. The backward writes a new tensor rather than scaling the saved one in place: a
second backward (retain_graph=True) must see the unscaled gradient again. That costs one more
read + write of (N, V) than Liger-Kernel's in-place multiply.
"""
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import utils
from .aot import AotSpec

REDUCTIONS = ("mean", "sum", "none")
MAX_V = 262144  # largest vocabulary tested and listed by aot_specs (larger V: same config)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _online_update(m, d, x):
    """Fold a tile x (ROWS, BLOCK) into the running row maxima m (ROWS,) and rescaled sums
    d (ROWS,) of exp(x - m).

    Returns (m_new, d_new, shift, e): shift = m_new, or 0 while a row's max is still -inf (a
    tile of only -inf entries), e = exp(x - shift) (0 at -inf entries, never NaN).
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - shift[:, None])
    d_new = d * tl.exp(m - shift) + tl.sum(e, axis=1)
    return m_new, d_new, shift, e


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr, s_row_stride,        # student logits (N, V), unit column stride
    t_ptr, t_row_stride,        # teacher logits (N, V), same dtype, unit column stride
    y_ptr,                      # labels (N,) int64, or None (no hard term)
    loss_ptr,                   # per-row loss (N,) fp32; 0 for ignored rows
    g_ptr, g_row_stride,        # d loss_row / d s (N, V) in the student dtype (COMPUTE_GRAD)
    scale_ptr,                  # (1,) fp32 reduction factor folded into g: 1/count for "mean"
    N, V,                       # rows, classes (columns)
    inv_T, T, alpha,            # 1/temperature, temperature, weight of the soft term
    ignore_index,               # label value of rows that do not count
    ROWS: tl.constexpr,         # rows per program (> 1 only for tiny V)
    BLOCK: tl.constexpr,        # column tile
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    row_ok = rows < N
    s_rows = s_ptr + rows[:, None] * s_row_stride  # (ROWS, 1)
    t_rows = t_ptr + rows[:, None] * t_row_stride
    cols0 = tl.arange(0, BLOCK)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
        counted = row_ok & (y != ignore_index)  # ignored rows: no loads, zero loss and grad
    else:
        counted = row_ok
    live = counted[:, None]  # (ROWS, 1)

    # sweep 1: running row statistics of a = s/T, b = t/T (and s itself for the CE term)
    m_a = tl.full([ROWS], float("-inf"), tl.float32)
    m_b = tl.full([ROWS], float("-inf"), tl.float32)
    m_s = tl.full([ROWS], float("-inf"), tl.float32)
    d_a = tl.zeros([ROWS], tl.float32)
    d_b = tl.zeros([ROWS], tl.float32)
    d_s = tl.zeros([ROWS], tl.float32)
    c = tl.zeros([ROWS], tl.float32)  # sum_j exp(b_j - m_b) * (b_j - a_j)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        in_row = (cols < V)[None, :]  # (1, BLOCK)
        # rows that do not count read zeros (finite statistics, discarded), padding reads -inf
        s = tl.load(s_rows + cols[None, :], mask=live & in_row, other=0.0).to(tl.float32)
        t = tl.load(t_rows + cols[None, :], mask=live & in_row, other=0.0).to(tl.float32)
        s = tl.where(in_row, s, float("-inf"))
        t = tl.where(in_row, t, float("-inf"))
        a = s * inv_T
        b = t * inv_T
        m_a, d_a, _, _ = _online_update(m_a, d_a, a)
        m_b_old = m_b
        m_b, d_b, shift_b, e_b = _online_update(m_b, d_b, b)
        # p_t = 0 where b = -inf: contribute 0, not 0 * (-inf - a) (NaN when a = -inf too)
        t_masked = b == float("-inf")
        cross = e_b * (tl.where(t_masked, 0.0, b) - tl.where(t_masked, 0.0, a))
        c = c * tl.exp(m_b_old - shift_b) + tl.sum(cross, axis=1)
        if HAS_LABELS:
            m_s, d_s, _, _ = _online_update(m_s, d_s, s)

    kl = (c / d_b - (m_b - m_a)) + (tl.log(d_a) - tl.log(d_b))  # (ROWS,)
    if HAS_LABELS:
        y_safe = tl.where(counted, y, 0)
        s_y = tl.load(s_ptr + rows * s_row_stride + y_safe, mask=counted, other=0.0)
        ce = (m_s - s_y.to(tl.float32)) + tl.log(d_s)
        loss = alpha * T * T * kl + (1.0 - alpha) * ce
    else:
        loss = T * T * kl
    tl.store(loss_ptr + rows, tl.where(counted, loss, 0.0), mask=row_ok)

    if COMPUTE_GRAD:
        # sweep 2: the gradient, now that the row statistics are known
        scale = tl.load(scale_ptr)
        inv_d_a = (1.0 / d_a)[:, None]
        inv_d_b = (1.0 / d_b)[:, None]
        g_rows = g_ptr + rows[:, None] * g_row_stride
        for start in range(0, V, BLOCK):
            cols = start + cols0
            in_row = (cols < V)[None, :]
            s = tl.load(s_rows + cols[None, :], mask=live & in_row, other=0.0).to(tl.float32)
            t = tl.load(t_rows + cols[None, :], mask=live & in_row, other=0.0).to(tl.float32)
            p_s = tl.exp(s * inv_T - m_a[:, None]) * inv_d_a
            p_t = tl.exp(t * inv_T - m_b[:, None]) * inv_d_b
            if HAS_LABELS:
                q = tl.exp(s - m_s[:, None]) / d_s[:, None]
                onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
                g = alpha * T * (p_s - p_t) + (1.0 - alpha) * (q - onehot)
            else:
                g = T * (p_s - p_t)
            g = tl.where(live, g * scale, 0.0)
            tl.store(g_rows + cols[None, :], g.to(g_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & in_row)


@triton.jit
def _kd_loss_bwd_kernel(
    g_ptr, g_row_stride,        # gradient written by the forward (N, V)
    go_ptr, go_stride,          # upstream gradient: (N,) for "none", a scalar with stride 0
    out_ptr, out_row_stride,    # d loss / d s (N, V), same dtype as g
    N, V,
    ROWS: tl.constexpr,         # grid = (cdiv(N, ROWS), cdiv(V, BLOCK))
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < V)[None, :]
    go = tl.load(go_ptr + rows * go_stride, mask=row_ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * g_row_stride + cols[None, :], mask=mask, other=0.0)
    out = g.to(tl.float32) * go[:, None]
    tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Launchers: `config(...) -> Config` (the one heuristic), then tensor in, tensor out
# ------------------------------------------------------------------------------------------

TINY_V = 8      # V <= TINY_V (classification heads: 2-3 classes): many rows per program
WIDE_BLOCK = 4096  # column tile for every larger V (online softmax over V / 4096 tiles)


@dataclasses.dataclass(frozen=True)
class Config:
    rows: int        # rows per program (> 1 only for tiny V)
    block: int       # column tile
    num_warps: int


def config(V: int) -> Config:
    """Tile (rows x block) and warps of both kernels for V classes: two buckets for any V.

    Wide: one row per program, ~8 elements per thread (utils.num_warps_for). Tiny: a warp
    spans 4 rows x 8 columns and every thread keeps the 7 running statistics of each of its
    rows, so 2 rows per thread (rows / 8 warps): ~48 registers instead of ~170 at 8 rows."""
    if V <= TINY_V:
        return Config(rows=64, block=TINY_V, num_warps=64 // 8)
    return Config(rows=1, block=WIDE_BLOCK, num_warps=utils.num_warps_for(WIDE_BLOCK))


def _reduction_count(labels, ignore_index, N, device):
    """Number of counted rows as a (1,) fp32 tensor (no host sync)."""
    if labels is None:
        return torch.full((1,), float(N), dtype=torch.float32, device=device)
    return (labels != ignore_index).sum().to(torch.float32).reshape(1)


def kd_loss_fwd(student_logits, teacher_logits, labels=None, temperature=1.0, alpha=0.5,
                ignore_index=-100, reduction="mean", compute_grad=False):
    """Forward launcher. Returns (loss, grad): loss fp32, () for "sum"/"mean" and (N,) for
    "none"; grad (N, V) in the student dtype, d loss / d s with the reduction factor folded in
    (1/count for "mean"), or an empty (0,) tensor when compute_grad is False."""
    # the kernel needs unit column strides and dense labels (any row stride is fine)
    s = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    t = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    N, V = s.shape
    device = s.device
    count = _reduction_count(labels, ignore_index, N, device)  # (1,)
    scale = (1.0 / count.clamp(min=1.0)) if reduction == "mean" else torch.ones_like(count)
    rows = utils.empty((N,), dtype=torch.float32, device=device)
    grad = (utils.empty((N, V), dtype=s.dtype, device=device) if compute_grad
            else torch.empty((0,), dtype=s.dtype, device=device))
    if N > 0:
        kernel = _kd_loss_fwd_kernel
        utils.ensure_launchable(kernel, utils.backend(s))
        cfg = config(V)
        kernel[(triton.cdiv(N, cfg.rows),)](
            s, s.stride(0), t, t.stride(0), labels, rows,
            grad, grad.stride(0) if compute_grad else 0, scale,
            N, V, 1.0 / temperature, float(temperature), float(alpha), int(ignore_index),
            ROWS=cfg.rows, BLOCK=cfg.block, HAS_LABELS=labels is not None,
            COMPUTE_GRAD=compute_grad, num_warps=cfg.num_warps)
    if reduction == "none":
        return rows, grad
    loss = rows.sum()
    if reduction == "mean":
        loss = loss / count.clamp(min=1.0)[0]
    return loss, grad


def kd_loss_bwd(grad, grad_output):
    """Backward launcher: d loss / d s = grad * grad_output, grad_output a scalar ("sum",
    "mean") or one value per row (N,) ("none"). Returns a new (N, V) tensor."""
    N, V = grad.shape
    go = grad_output.to(torch.float32)
    go_stride = go.stride(0) if go.dim() == 1 else 0
    out = utils.empty((N, V), dtype=grad.dtype, device=grad.device)
    if N > 0 and V > 0:
        kernel = _kd_loss_bwd_kernel
        utils.ensure_launchable(kernel, utils.backend(grad))
        cfg = config(V)
        grid = (triton.cdiv(N, cfg.rows), triton.cdiv(V, cfg.block))
        kernel[grid](grad, grad.stride(0), go, go_stride, out, out.stride(0), N, V,
                     ROWS=cfg.rows, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return out


# ------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces these without graph breaks)
# ------------------------------------------------------------------------------------------

def _check_label_range(labels, V, ignore_index):
    """Data-dependent check (syncs on GPU): runs inside the op implementations, never traced."""
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index ({ignore_index}); "
                         f"got {first}")


@torch.library.custom_op("tkd::kd_loss_fwd", mutates_args=())
def _kd_loss_fwd_op(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    labels: Optional[torch.Tensor], temperature: float, alpha: float,
                    ignore_index: int, reduction: str, compute_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_label_range(labels, student_logits.shape[1], ignore_index)
    return kd_loss_fwd(student_logits, teacher_logits, labels, temperature, alpha, ignore_index,
                       reduction, compute_grad)


@_kd_loss_fwd_op.register_fake
def _(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction,
      compute_grad):
    N, V = student_logits.shape
    loss_shape = (N,) if reduction == "none" else ()
    loss = student_logits.new_empty(loss_shape, dtype=torch.float32)
    grad = student_logits.new_empty((N, V) if compute_grad else (0,))
    return loss, grad


@torch.library.custom_op("tkd::kd_loss_bwd", mutates_args=())
def _kd_loss_bwd_op(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    return kd_loss_bwd(grad, grad_output)


@_kd_loss_bwd_op.register_fake
def _(grad, grad_output):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[7]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    grad_s = _kd_loss_bwd_op(grad, grad_loss) if ctx.compute_grad else None
    return grad_s, None, None, None, None, None, None, None


_kd_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------

def _validate(student_logits, teacher_logits, labels, temperature, alpha, ignore_index,
              reduction):
    utils.check_tensor("student_logits", student_logits, dtypes=utils.FLOAT_DTYPES, ndim=2)
    utils.check_tensor("teacher_logits", teacher_logits, dtypes=utils.FLOAT_DTYPES, ndim=2,
                       device=student_logits.device)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    N, V = student_logits.shape
    if N > 0 and V < 1:
        raise ValueError(f"student_logits must have at least one class (V >= 1), got shape "
                         f"{tuple(student_logits.shape)}")
    if labels is not None:
        utils.check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), ndim=1,
                           device=student_logits.device)
        if labels.shape[0] != N:
            raise ValueError(f"labels must have shape ({N},) (one per row of student_logits), "
                             f"got {tuple(labels.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not (
            -2**31 <= ignore_index < 2**31):
        raise ValueError(f"ignore_index must be an int32 value, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def kd_loss(student_logits, teacher_logits, labels=None, temperature=1.0, alpha=0.5,
            ignore_index=-100, reduction="mean"):
    """Fused knowledge-distillation loss.

    student_logits, teacher_logits: (N, V) fp32/fp16/bf16 on one device; mixed dtypes are
    computed in the wider one (fp32 for fp16 with fp32), never by rounding the teacher down.
    The teacher never receives a gradient; the student's gradient has the student's dtype.
    labels: (N,) int64/int32 in [0, V) or `ignore_index`, or None (soft term only).
    Per row: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, label);
    with labels=None: T^2 * KL. Ignored rows are 0 and excluded from the mean.
    Returns fp32: a scalar ("mean" over counted rows, 0 if none; "sum") or (N,) ("none").
    """
    _validate(student_logits, teacher_logits, labels, temperature, alpha, ignore_index,
              reduction)
    teacher_logits = teacher_logits.detach()
    if labels is not None:
        labels = labels.to(torch.int64)
    if utils.backend(student_logits) == "reference":  # fp32 math for any mix of dtypes
        if not torch.compiler.is_compiling():
            _check_label_range(labels, student_logits.shape[1], ignore_index)
        return kd_loss_ref(student_logits, teacher_logits, labels, temperature, alpha,
                           ignore_index, reduction)
    # mixed dtypes (an fp16 student, fp32 teacher logits): both in the wider dtype, never the
    # teacher rounded down (7e4 would become inf in fp16); autograd casts the gradient back
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = _kd_loss_fwd_op(student_logits, teacher_logits, labels, float(temperature),
                              float(alpha), int(ignore_index), reduction, compute_grad)
    return loss


# ------------------------------------------------------------------------------------------
# Torch reference (the CPU path, and the tests' float64 reference)
# ------------------------------------------------------------------------------------------

def kd_loss_ref(student_logits, teacher_logits, labels=None, temperature=1.0, alpha=0.5,
                ignore_index=-100, reduction="mean"):
    """Torch reference, computed in fp32 (float64 for float64 inputs); loss fp32 / float64."""
    acc = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype),
                              torch.float32)
    s = student_logits.to(acc)
    t = teacher_logits.to(acc)
    T = temperature
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    pt = log_pt.exp()
    # p_t = 0 (teacher -inf) contributes 0; the where also keeps NaN out of the gradient
    diff = torch.where(pt > 0, log_pt - log_ps, torch.zeros_like(pt))
    kl = (pt * diff).sum(-1) * T * T
    if labels is None:
        rows, count = kl, s.new_tensor(float(kl.shape[0]))
    else:
        keep = labels != ignore_index
        ce = F.cross_entropy(s, torch.where(keep, labels, 0), reduction="none")
        rows = torch.where(keep, alpha * kl + (1 - alpha) * ce, torch.zeros_like(kl))
        count = keep.sum().to(acc)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / count.clamp(min=1)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compile list: the configurations `config` yields (kernels/aot.py)
# ------------------------------------------------------------------------------------------

def _fwd_spec(dtype, cfg, has_labels, compute_grad, rows_aligned):
    ty = utils.TRITON_DTYPE[dtype]
    sig = {"s_ptr": f"*{ty}", "s_row_stride": "i32", "t_ptr": f"*{ty}", "t_row_stride": "i32",
           "y_ptr": "*i64" if has_labels else "constexpr", "loss_ptr": "*fp32",
           "g_ptr": f"*{ty}", "g_row_stride": "i32", "scale_ptr": "*fp32", "N": "i32",
           "V": "i32", "inv_T": "fp32", "T": "fp32", "alpha": "fp32", "ignore_index": "i32",
           "ROWS": "constexpr", "BLOCK": "constexpr", "HAS_LABELS": "constexpr",
           "COMPUTE_GRAD": "constexpr"}
    const = dict(ROWS=cfg.rows, BLOCK=cfg.block, HAS_LABELS=has_labels,
                 COMPUTE_GRAD=compute_grad)
    if not has_labels:
        const["y_ptr"] = None
    aligned = ("s_ptr", "t_ptr", "loss_ptr", "g_ptr")
    if rows_aligned:
        aligned += ("s_row_stride", "t_row_stride", "g_row_stride", "V")
    label = (f"kd_loss_fwd {cfg.rows}x{cfg.block} {ty} "
             f"{'labels' if has_labels else 'nolabels'} {'grad' if compute_grad else 'nograd'}"
             f"{' V%16=0' if rows_aligned else ''}")
    return AotSpec(label, _kd_loss_fwd_kernel, sig, const, num_warps=cfg.num_warps,
                   aligned=aligned)


def _bwd_spec(dtype, cfg, rows_aligned):
    ty = utils.TRITON_DTYPE[dtype]
    sig = {"g_ptr": f"*{ty}", "g_row_stride": "i32", "go_ptr": "*fp32", "go_stride": "i32",
           "out_ptr": f"*{ty}", "out_row_stride": "i32", "N": "i32", "V": "i32",
           "ROWS": "constexpr", "BLOCK": "constexpr"}
    aligned = ("g_ptr", "out_ptr")
    if rows_aligned:
        aligned += ("g_row_stride", "out_row_stride", "V")
    label = f"kd_loss_bwd {cfg.rows}x{cfg.block} {ty}{' V%16=0' if rows_aligned else ''}"
    return AotSpec(label, _kd_loss_bwd_kernel, sig, dict(ROWS=cfg.rows, BLOCK=cfg.block),
                   num_warps=cfg.num_warps, aligned=aligned)


def aot_specs():
    """Every distinct configuration of the heuristics (`config`) over V in [1, MAX_V] x
    {fp32, fp16, bf16} x {labels, no labels} x {grad, no grad}. Triton also specializes on V
    and the row strides being multiples of 16 (vectorized loads): that variant is listed too
    for the wide bucket, where vocabularies (32000, 128256, ...) fall."""
    Vs = sorted({1, MAX_V} | {2**k + d for k in range(1, MAX_V.bit_length()) for d in (-1, 0, 1)})
    configs = sorted({config(v) for v in Vs}, key=lambda c: (c.block, c.rows, c.num_warps))
    specs = []
    for dtype in utils.FLOAT_DTYPES:
        for cfg in configs:
            # V <= TINY_V is never a multiple of 16: the tiny bucket has one alignment only
            alignments = (False, True) if cfg.block > TINY_V else (False,)
            for rows_aligned in alignments:
                for has_labels in (True, False):
                    for compute_grad in (True, False):
                        specs.append(_fwd_spec(dtype, cfg, has_labels, compute_grad,
                                               rows_aligned))
                specs.append(_bwd_spec(dtype, cfg, rows_aligned))
    return specs
