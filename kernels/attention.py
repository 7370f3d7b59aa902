"""Fused multi-head attention: FlashAttention-2 forward and backward in Triton.

Math (one batch b, head h; q_i, k_j, v_j rows of Q (S_q, D), K, V (S_k, D); c = softmax_scale):

    s_ij = c * q_i . k_j                       masked entries (padding, causal) are -inf
    P_ij = exp(s_ij - L_i),  L_i = log sum_j exp(s_ij)      (row logsumexp, fp32)
    Z_ij ~ Bernoulli(1 - p)                    dropout keep-mask, p = dropout_p
    O_i  = sum_j P_ij Z_ij / (1 - p) v_j

Forward (FlashAttention-2): one program per (query block, b*h); it walks the key blocks keeping a
running max m_i, running sum l_i and an unnormalized accumulator (online softmax), rescaling by
exp(m_old - m_new) when the max grows, and divides by l_i once at the end. Exponentials are
exp2 of log2(e)-scaled scores. Only O and L (B, H, S_q) are written: O(B*H*S) extra memory.

Backward, with Pd = P * Z / (1 - p) (the dropped, rescaled probabilities) and dO given:

    dV   = Pd^T dO
    dPd  = dO V^T,  dP = dPd * Z / (1 - p)
    dS   = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_j Pd_ij dPd_ij = dO_i . O_i
           (softmax Jacobian: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik))
    dQ   = c * dS K,  dK = c * dS^T Q

so the backward needs only L (to recompute P blockwise), delta (a `rowsum(dO * O)` preprocess
kernel) and the dropout seed (to regenerate Z): nothing of size S x S is stored. dK/dV are
accumulated per key block by one kernel looping over query blocks, dQ per query block by a
second kernel looping over key blocks: every output element has one writer, no atomics.

Masking: `key_padding_mask` (B, S_k) bool, True = attend. `causal` is bottom-right aligned (as
flash-attn >= 2.1 and torch's `causal_lower_right`): query i sees key j iff j <= i + S_k - S_q,
so the last query row sees every key; with S_q > S_k the first S_q - S_k rows see none. A row
with no visible key outputs 0, gets zero gradients, and its L is the finite sentinel LSE_EMPTY.

Dropout: Z comes from Philox (`tl.rand`), counter-based: key = seed + (b*H + h) * 2^32, counter =
i * S_k + j. The seed is drawn from torch's generator (`dropout_seed`), outside the custom op, so
`torch.manual_seed` fixes it and the backward regenerates the same Z. `attention_dropout_mask`
(testing only) materializes Z with the same Triton function.

Head dims: D up to 128; the tile width BLOCK_D is the next power of two >= max(D, 16) and the
extra columns are masked (zeros), so D = 40 runs as a padded 64.
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

LSE_EMPTY = 1e30  # logsumexp of a row with no visible key: finite, and exp(s - it) == 0
MAX_HEAD_DIM = 128
_LSE_EMPTY = tl.constexpr(LSE_EMPTY)
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2 e)
_LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _dropout_keep(seed, bh, offs, dropout_p):
    """Keep-mask Z for counters `offs` (= i * S_k + j, any 2-D layout) of head `bh`."""
    key = seed + bh.to(tl.int64) * 4294967296  # one Philox key per (b, h): (seed, b*H + h)
    return tl.rand(key, offs) >= dropout_p


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b in fp32 (acc None: a fresh accumulator), on the tensor cores for fp16/bf16.
    UPCAST_DOT (set only for bf16 in Triton's interpreter, whose numpy dot multiplies bf16 bit
    patterns as integers: triton-lang/triton#11584, bf16 is unsupported there) computes the same
    products in fp32: bf16 x bf16 is exact in fp32, as on the tensor cores. Compiled kernels never
    set it (aot_specs: UPCAST_DOT=False)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _key_ok(mask_ptr, b, cols, S_k, stride_mb, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) True for keys in range and not padding."""
    ok = cols < S_k
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + b * stride_mb + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _attn_fwd(
    q_ptr,                      # (B, H, S_q, D) queries, last dim contiguous
    k_ptr, v_ptr,               # (B, H, S_k, D) keys, values
    mask_ptr,                   # (B, S_k) uint8 key padding mask, 1 = attend (if HAS_MASK)
    seed_ptr,                   # (1,) int64 dropout seed (if DROPOUT)
    o_ptr,                      # (B, H, S_q, D) output
    lse_ptr,                    # (B, H, S_q) fp32 row logsumexp (natural log), contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb,                  # mask row stride
    H, S_q, S_k,
    sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), ignored for fp16/bf16
    UPCAST_DOT: tl.constexpr,     # interpreter + bf16 only: see _dot
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < S_q

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * _LOG2E  # scores in log2 units
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)       # unnormalized O
    diag = S_k - S_q  # bottom-right causal: key j visible from row i iff j <= i + diag
    hi = S_k
    if CAUSAL:  # keys past the block's last row's diagonal are never visible
        hi = tl.minimum(S_k, pid_m * BLOCK_M + BLOCK_M + diag)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        key_ok = _key_ok(mask_ptr, b, cols, S_k, stride_mb, HAS_MASK)
        kv_mask = (cols < S_k)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # normalizer uses P before dropout
        if DROPOUT:  # 1 / (1 - p) is applied once, with 1 / l_i
            p = tl.where(_dropout_keep(seed, bh, rows[:, None] * S_k + cols[None, :], dropout_p),
                         p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, None, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: O = 0, L = LSE_EMPTY
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    acc = acc * inv_l[:, None]
    lse = tl.where(empty, _LSE_EMPTY, (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(lse_ptr + bh.to(tl.int64) * S_q + rows, lse, mask=row_ok)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_preprocess(
    o_ptr, do_ptr,              # (B, H, S_q, D) output and its gradient
    delta_ptr,                  # (B, H, S_q) fp32 out: rowsum(dO * O), contiguous
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, S_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows < S_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * S_q + rows, tl.sum(o * do, 1), mask=rows < S_q)


@triton.jit
def _attn_bwd_dkdv(
    q_ptr, k_ptr, v_ptr,        # (B, H, S_q, D), (B, H, S_k, D) x2
    do_ptr,                     # (B, H, S_q, D) gradient of the output
    lse_ptr, delta_ptr,         # (B, H, S_q) fp32 each, contiguous
    mask_ptr,                   # (B, S_k) uint8, 1 = attend (if HAS_MASK)
    seed_ptr,                   # (1,) int64 dropout seed (if DROPOUT)
    dk_ptr, dv_ptr,             # (B, H, S_k, D) out, contiguous like dk_ptr's strides below
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,  # shared by dk and dv
    stride_mb,
    H, S_q, S_k,
    sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program per (key block, b*h): dK, dV of BLOCK_N keys, looping over query blocks.
    Tiles are transposed (keys x queries) so the accumulations are plain dots."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (cols < S_k)[:, None] & d_ok[None, :]
    key_ok = _key_ok(mask_ptr, b, cols, S_k, stride_mb, HAS_MASK)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    lse_base = lse_ptr + bh.to(tl.int64) * S_q
    delta_base = delta_ptr + bh.to(tl.int64) * S_q
    qk_scale = sm_scale * _LOG2E
    seed = 0
    inv_keep = 1.0
    if DROPOUT:
        seed = tl.load(seed_ptr)
        inv_keep = 1.0 / (1.0 - dropout_p)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    diag = S_k - S_q
    lo = 0
    if CAUSAL:  # rows before the first one seeing this block's first key contribute nothing
        lo = tl.maximum(0, pid_n * BLOCK_N - diag) // BLOCK_M * BLOCK_M
    for start_m in range(lo, S_q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < S_q
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=qd_mask,
                     other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * _LOG2E
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        sT = _dot(k, tl.trans(q), None, DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_N, BLOCK_M)
        visible = key_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[:, None] <= rows[None, :] + diag)
        pT = tl.math.exp2(tl.where(visible, sT - lse2[None, :], float("-inf")))  # P^T
        dpT = _dot(v, tl.trans(do), None, DOT_PRECISION, UPCAST_DOT)    # (dO V^T)^T = dPd^T
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[None, :] * S_k + cols[:, None], dropout_p)
            pdT = tl.where(keep, pT * inv_keep, 0.0)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            pdT = pT
        dv = _dot(pdT.to(do.dtype), do, dv, DOT_PRECISION, UPCAST_DOT)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_PRECISION, UPCAST_DOT)

    out = b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(
    q_ptr, k_ptr, v_ptr,        # (B, H, S_q, D), (B, H, S_k, D) x2
    do_ptr,                     # (B, H, S_q, D) gradient of the output
    lse_ptr, delta_ptr,         # (B, H, S_q) fp32 each, contiguous
    mask_ptr,                   # (B, S_k) uint8, 1 = attend (if HAS_MASK)
    seed_ptr,                   # (1,) int64 dropout seed (if DROPOUT)
    dq_ptr,                     # (B, H, S_q, D) out
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb,
    H, S_q, S_k,
    sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program per (query block, b*h): dQ of BLOCK_M rows, looping over key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < S_q
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=qd_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :], mask=qd_mask, other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * S_q + rows, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S_q + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * _LOG2E
    seed = 0
    inv_keep = 1.0
    if DROPOUT:
        seed = tl.load(seed_ptr)
        inv_keep = 1.0 / (1.0 - dropout_p)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = S_k - S_q
    hi = S_k
    if CAUSAL:
        hi = tl.minimum(S_k, pid_m * BLOCK_M + BLOCK_M + diag)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        key_ok = _key_ok(mask_ptr, b, cols, S_k, stride_mb, HAS_MASK)
        kv_mask = (cols < S_k)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diag)
        p = tl.math.exp2(tl.where(visible, s - lse2[:, None], float("-inf")))
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION, UPCAST_DOT)  # dPd
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None] * S_k + cols[None, :], dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION, UPCAST_DOT)

    out = b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptr + out, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dropout_mask_kernel(
    seed_ptr,                   # (1,) int64 dropout seed
    keep_ptr,                   # (B*H, S_q, S_k) uint8 out, contiguous
    S_q, S_k, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Testing only: materialize the keep-mask Z the attention kernels use."""
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(seed_ptr), bh, rows[:, None] * S_k + cols[None, :], dropout_p)
    tl.store(keep_ptr + bh.to(tl.int64) * S_q * S_k + rows[:, None] * S_k + cols[None, :],
             keep.to(tl.uint8), mask=(rows < S_q)[:, None] & (cols < S_k)[None, :])


# ------------------------------------------------------------------------------------------
# Launchers: `config(...) -> Config` (the one heuristic), then tensor in, tensor out
# ------------------------------------------------------------------------------------------

def block_d(D: int) -> int:
    """Tile width of the head dim: a power of two >= 16 (tl.dot's minimum K)."""
    return max(16, utils.next_power_of_2(D))


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int     # query rows per tile
    block_n: int     # key rows per tile (0 for "pre", which has no key loop)
    num_warps: int
    num_stages: int


def config(kind: str, D: int, dtype: torch.dtype) -> Config:
    """Tile sizes, warps and stages per kernel kind ("fwd", "dkdv", "dq", "pre"), head-dim tile
    and dtype. Chosen so every configuration compiles with zero spills and fits the shared
    memory of sm_80 and sm_90 (checked by tests/test_aot.py): the Philox dropout and the masks
    cost registers, hence 8 warps from BLOCK_D = 64 on. fp32 uses IEEE (FMA) dots with smaller
    tiles: it is the accuracy path, not the fast one."""
    bd = block_d(D)
    warps = 4 if bd <= 32 else 8
    padded = D != bd  # masked head-dim columns cost registers (unvectorized loads/stores)
    if kind == "pre":
        return Config(64, 0, num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        if kind == "fwd":
            return Config(128, 64, num_warps=warps, num_stages=3)
        if kind == "dkdv":
            return Config(32, 32 if padded else 64, num_warps=warps, num_stages=2)
        if kind == "dq":
            return Config(64, 32, num_warps=4 if bd <= 64 and not padded else 8, num_stages=2)
    else:
        if kind == "fwd":
            return Config(64 if bd <= 64 else 32, 32, num_warps=8, num_stages=2)
        if kind == "dkdv":
            return Config(32 if bd <= 64 else 16, 32, num_warps=4 if bd <= 64 else 8,
                          num_stages=1)
        if kind == "dq":
            return Config(32, 32, num_warps=4 if bd <= 64 else 8, num_stages=1)
    raise ValueError(f"unknown kernel kind {kind!r}")


def _launch_kwargs(cfg: Config) -> dict:
    """The tile constexprs and launch options of `cfg`, as the kernels' keyword arguments."""
    kw = dict(BLOCK_M=cfg.block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.block_n:
        kw["BLOCK_N"] = cfg.block_n
    return kw


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_flags(q):
    return dict(DOT_PRECISION=_dot_precision(q.dtype),
                UPCAST_DOT=q.dtype == torch.bfloat16 and utils.backend(q) == "interpreter")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_args(key_padding_mask, dummy):
    if key_padding_mask is None:
        return dummy, 0
    m = key_padding_mask.contiguous().view(torch.uint8)  # (B, S_k), 1 = attend
    return m, m.stride(0)


def attention_fwd(q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    """O (B, H, S_q, D) in q's dtype and L (B, H, S_q) fp32 row logsumexp."""
    utils.ensure_launchable(_attn_fwd, utils.backend(q))
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    o = utils.empty((B, H, S_q, D), dtype=q.dtype, device=q.device)
    lse = utils.empty((B, H, S_q), dtype=torch.float32, device=q.device)
    mask, stride_mb = _mask_args(key_padding_mask, q)
    dropout = dropout_p > 0
    cfg = config("fwd", D, q.dtype)
    grid = (triton.cdiv(S_q, cfg.block_m), B * H)
    _attn_fwd[grid](
        q, k, v, mask, seed if dropout else q, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        stride_mb, H, S_q, S_k, softmax_scale, dropout_p,
        HEAD_DIM=D, BLOCK_D=block_d(D), HAS_MASK=key_padding_mask is not None,
        CAUSAL=causal, DROPOUT=dropout, **_dot_flags(q), **_launch_kwargs(cfg))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    """dq, dk, dv (shapes and dtypes of q, k, v) from dO and the forward's O and L."""
    utils.ensure_launchable(_attn_bwd_dq, utils.backend(q))
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    bd = block_d(D)
    dropout = dropout_p > 0
    seed = seed if dropout else q
    mask, stride_mb = _mask_args(key_padding_mask, q)
    flags = dict(HAS_MASK=key_padding_mask is not None, CAUSAL=causal, DROPOUT=dropout,
                 **_dot_flags(q))

    delta = utils.empty((B, H, S_q), dtype=torch.float32, device=q.device)
    cfg = config("pre", D, q.dtype)
    _attn_bwd_preprocess[(triton.cdiv(S_q, cfg.block_m), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), H, S_q, HEAD_DIM=D, BLOCK_D=bd,
        **_launch_kwargs(cfg))

    dq = utils.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = utils.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = utils.empty(v.shape, dtype=v.dtype, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    cfg = config("dkdv", D, q.dtype)
    _attn_bwd_dkdv[(triton.cdiv(S_k, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, mask, seed, dk, dv, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), stride_mb, H, S_q, S_k,
        softmax_scale, dropout_p, HEAD_DIM=D, BLOCK_D=bd, **flags, **_launch_kwargs(cfg))
    cfg = config("dq", D, q.dtype)
    _attn_bwd_dq[(triton.cdiv(S_q, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, mask, seed, dq, *strides,
        dq.stride(0), dq.stride(1), dq.stride(2), stride_mb, H, S_q, S_k,
        softmax_scale, dropout_p, HEAD_DIM=D, BLOCK_D=bd, **flags, **_launch_kwargs(cfg))
    return dq, dk, dv


def dropout_seed(device) -> torch.Tensor:
    """The dropout seed, (1,) int64 on `device`, drawn from torch's generator (so
    torch.manual_seed fixes it). Drawn outside the custom op: compiled graphs stay traceable and
    the backward reuses the forward's seed."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def attention_dropout_mask(B, H, S_q, S_k, dropout_p, seed, device) -> torch.Tensor:
    """Testing only: the (B, H, S_q, S_k) bool keep-mask Z the kernels draw for `seed` (a tensor
    from `dropout_seed` or an int). Runs a Triton kernel (CUDA, or the interpreter)."""
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    seed = seed.to(device=device, dtype=torch.int64).reshape(1)
    keep = utils.empty((B * H, S_q, S_k), dtype=torch.uint8, device=device)
    utils.ensure_launchable(_dropout_mask_kernel, utils.backend(keep))
    BM, BN = 64, 64
    _dropout_mask_kernel[(triton.cdiv(S_q, BM), triton.cdiv(S_k, BN), B * H)](
        seed, keep, S_q, S_k, float(dropout_p), BLOCK_M=BM, BLOCK_N=BN)
    return keep.view(B, H, S_q, S_k).bool()


# ------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces these without graph breaks)
# ------------------------------------------------------------------------------------------

@torch.library.custom_op("tkd::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                      causal: bool, dropout_p: float, softmax_scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale)


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    B, H, S_q, D = q.shape
    return q.new_empty((B, H, S_q, D)), q.new_empty((B, H, S_q), dtype=torch.float32)


@torch.library.custom_op("tkd::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      o: torch.Tensor, lse: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                      causal: bool, dropout_p: float, softmax_scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, key_padding_mask, seed, causal, dropout_p,
                         softmax_scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the op


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, seed)
    ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale


def _backward(ctx, do, _dlse):  # L is an internal statistic: its gradient is ignored
    q, k, v, o, lse, key_padding_mask, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, key_padding_mask, seed, ctx.causal,
                                   ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        utils.check_tensor(name, t, dtypes=utils.FLOAT_DTYPES, ndim=4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share "
                            "one dtype")
        utils.check_tensor(name, t, device=q.device)
    B, H, S_q, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, H, S_k, D), got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: expected "
                         f"(B={B}, H={H}, S_k, D={D})")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D = q.shape[-1] must be <= {MAX_HEAD_DIM}, got {D}")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}")
    if key_padding_mask is not None:
        utils.check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), ndim=2,
                           device=q.device)
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, S_k) = {(B, k.shape[2])}, got "
                             f"{tuple(key_padding_mask.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and (not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")


def _attention_torch(q, k, v, key_padding_mask, causal, dropout_p, scale):
    """The reference path (CPU tensors; any tensor under TKD_OPS=reference): torch's fused SDPA
    for fp32 inputs without dropout, `attention_ref` elsewhere (half precision should match the
    reference's fp32 softmax, and with dropout the reference keeps the random stream that CPU
    training runs, and their recorded results, were made with). SDPA's own causal mask is
    top-left aligned and its fully-masked rows are backend-dependent (NaN in the math backend),
    so masks other than square causal go in as one boolean mask in which a row that sees no key
    attends everywhere, and that row's output is then zeroed (zero gradients too). Same results
    as the reference to fp32 rounding; at batch 1 x 64 tokens several masked_fill and softmax
    calls fewer per layer (a 2-layer student's batch-1 forward: 1.31 -> 0.97 ms). No branch on
    tensor data but eager-only shortcuts, so torch.compile(fullgraph=True) traces it."""
    S_q, S_k = q.shape[-2], k.shape[-2]
    if q.dtype != torch.float32 or dropout_p > 0:
        return attention_ref(q, k, v, key_padding_mask, causal, dropout_p, scale)
    if key_padding_mask is None and not (causal and S_q != S_k):  # every row sees a key
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if not causal and not torch.compiler.is_compiling():
        # eager shortcuts (they read the mask, so not under torch.compile): no padding at all
        # skips SDPA's mask handling, and no fully padded sequence needs no zeroing
        if bool(key_padding_mask.all()):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if bool(key_padding_mask.any(-1).all()):
            mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, S_k), True = attend
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    visible = _visible(q, k, key_padding_mask, causal)  # (B or 1, 1, S_q or 1, S_k)
    alive = visible.any(-1, keepdim=True)  # rows that see a key
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~alive, scale=scale)
    return torch.where(alive, o, 0.0)


def attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, softmax_scale=None):
    """Scaled dot-product attention softmax(c * Q K^T + mask) V, fused (FlashAttention-2).

    q (B, H, S_q, D); k, v (B, H, S_k, D); one dtype among fp16, bf16, fp32; D <= 128.
    key_padding_mask: (B, S_k) bool, True = attend, False = padding; None attends everywhere.
    causal: bottom-right aligned, query i sees key j iff j <= i + S_k - S_q.
    dropout_p in [0, 1) on the attention probabilities (seeded from torch's generator).
    softmax_scale c defaults to 1/sqrt(D). A query row with no visible key outputs zeros.
    Returns (B, H, S_q, D) in q's dtype; differentiable in q, k, v.
    """
    _check_inputs(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if utils.backend(q) == "reference":
        return _attention_torch(q, k, v, key_padding_mask, causal, dropout_p, scale)
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    o, _ = _attention_fwd_op(q, k, v, key_padding_mask, seed, causal, float(dropout_p), scale)
    return o


# ------------------------------------------------------------------------------------------
# Torch reference (the CPU path, and the tests' float64 reference)
# ------------------------------------------------------------------------------------------

def attention_ref(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, softmax_scale=None,
                  dropout_mask=None):
    """Same semantics as `attention`, in plain torch (fp32 softmax, or the input's dtype if
    wider). `dropout_mask` (B, H, S_q, S_k) bool, True = keep, overrides torch's own draw."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    ct = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale  # (B, H, S_q, S_k)
    visible = _visible(q, k, key_padding_mask, causal)
    # rows with no visible key: softmax over zeros, then zeroed (finite values and gradients)
    any_visible = visible.any(-1, keepdim=True)
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~visible, 0.0)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1 - dropout_p)
    return torch.matmul(p, v.to(ct)).to(q.dtype)


def _visible(q, k, key_padding_mask, causal):
    """(B or 1, 1, S_q or 1, S_k) bool, broadcastable to the scores: True where query i sees key
    j (causal bottom-right aligned: j <= i + S_k - S_q; padding: key_padding_mask False)."""
    S_q, S_k = q.shape[-2], k.shape[-2]
    visible = torch.ones(1, 1, S_q if causal else 1, S_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(S_k - S_q)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return visible


# ------------------------------------------------------------------------------------------
# Ahead-of-time compile list: the configurations `config` yields (kernels/aot.py)
# ------------------------------------------------------------------------------------------

def _signature(kernel, dtype, constexprs):
    """AOT signature from the argument names: data pointers in `dtype`, fp32 statistics,
    uint8 mask, int64 seed, i32 sizes/strides, fp32 scalars."""
    t = utils.TRITON_DTYPE[dtype]
    special = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "mask_ptr": "*u8", "seed_ptr": "*i64",
               "keep_ptr": "*u8", "sm_scale": "fp32", "dropout_p": "fp32"}
    sig = {}
    for a in kernel.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in special:
            sig[a] = special[a]
        elif a.endswith("_ptr"):
            sig[a] = "*" + t
        else:
            sig[a] = "i32"
    return sig


def _aligned(kernel):
    # pointers and row/batch/head strides are 16-divisible for D in {16, 32, 64, 128}
    return tuple(a for a in kernel.arg_names
                 if (a.endswith("_ptr") and a != "seed_ptr") or
                 (a.startswith("stride_") and a != "stride_mb"))


def _spec(label, kernel, kind, D, dtype, flags):
    cfg = config(kind, D, dtype)
    tiles = {k: v for k, v in _launch_kwargs(cfg).items() if k.startswith("BLOCK")}
    const = dict(HEAD_DIM=D, BLOCK_D=block_d(D), **tiles, **flags)
    if kind != "pre":
        const.update(DOT_PRECISION=_dot_precision(dtype), UPCAST_DOT=False)
    return AotSpec(label=label, kernel=kernel, signature=_signature(kernel, dtype, const),
                   constexprs=const, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   aligned=_aligned(kernel) if D % 16 == 0 else ())


def aot_specs():
    """The configurations the dispatcher launches, at their heaviest variant (padding mask +
    causal + dropout: the most registers), plus BERT's own flag sets at D=64 fp16:
    forward and backward at D in {64, 128} x {fp16, bf16}, fp32 at D=128 (its largest tiles'
    register use), and the padded head dim D=40 (BLOCK_D=64, masked columns). Kept small: each
    compile takes seconds and tests/test_aot.py compiles every row for sm_80 and sm_90."""
    full = dict(HAS_MASK=True, CAUSAL=True, DROPOUT=True)
    configs = [(D, dt) for D in (64, 128) for dt in (torch.float16, torch.bfloat16)]
    configs += [(128, torch.float32), (40, torch.float16)]
    specs = []
    for D, dt in configs:
        name = f"D={D} {utils.TRITON_DTYPE[dt]} mask+causal+dropout"
        specs += [_spec(f"attention_fwd {name}", _attn_fwd, "fwd", D, dt, full),
                  _spec(f"attention_bwd_dkdv {name}", _attn_bwd_dkdv, "dkdv", D, dt, full),
                  _spec(f"attention_bwd_dq {name}", _attn_bwd_dq, "dq", D, dt, full)]
    # BERT's own launches (padding mask, with dropout in training, without in inference) are
    # compiled too rather than assumed to be subsets of the heaviest variant
    for flags, tag in ((dict(HAS_MASK=True, CAUSAL=False, DROPOUT=False), "mask"),
                       (dict(HAS_MASK=True, CAUSAL=False, DROPOUT=True), "mask+dropout")):
        name = f"D=64 fp16 {tag}"
        specs += [_spec(f"attention_fwd {name}", _attn_fwd, "fwd", 64, torch.float16, flags),
                  _spec(f"attention_bwd_dkdv {name}", _attn_bwd_dkdv, "dkdv", 64, torch.float16,
                        flags),
                  _spec(f"attention_bwd_dq {name}", _attn_bwd_dq, "dq", 64, torch.float16, flags)]
    # a row reduction with no matmul: labelled "attn_..." (not "attention") because the
    # tensor-core check of tests/test_aot.py is about the matmul kernels
    specs.append(_spec("attn_bwd_preprocess rowsum(dO*O) D=128 float16", _attn_bwd_preprocess,
                       "pre", 128, torch.float16, {}))
    return specs
