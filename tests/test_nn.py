"""The drop-in modules of tkd_core.nn against their torch equivalents on the same weights:
LayerNorm vs torch.nn.LayerNorm, KDLoss vs F.kl_div + F.cross_entropy, MultiHeadAttention vs
F.scaled_dot_product_attention, Int8Linear vs nn.Linear (quantization error: SQNR) and vs its
exact int8 reference. Forward and every gradient, on every path of the device (the `path`
fixture: the interpreter and the torch references on CPU, compiled Triton on CUDA), at odd sizes.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, sqnr_db, sum_tol

import tkd_core
from tkd_core import int8 as G
from tkd_core.nn import Int8Linear

IGNORE = -100


def grads(out, leaves, go):
    return torch.autograd.grad(out, leaves, go)


# ------------------------------------------------------------------------------------------
# LayerNorm

@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}])
def test_nn_layernorm_drop_in(kwargs, device):
    ref = torch.nn.LayerNorm(768, eps=1e-6, device=device, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mod = tkd_core.nn.LayerNorm(768, eps=1e-6, device=device, **kwargs)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 768, device=device)
    assert_close(mod(x), ref(x), sum_tol(torch.float32, 768), "y")
    r = torch.randn(2, 3, 768, device=device)
    y, h = mod(x, r)
    assert_close(h, x + r, 0.0, "x + residual")
    assert_close(y, ref(x + r), sum_tol(torch.float32, 768), "y with residual")


@pytest.mark.parametrize("shape", [(3, 1), (7, 7), (257, 7), (2, 4099)])
def test_layernorm_gradients_match_torch(path, device, shape):
    N = shape[-1]
    ref = torch.nn.LayerNorm(N, device=device).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mod = tkd_core.nn.LayerNorm(N, device=device)
    mod.load_state_dict(ref.state_dict())
    x, r, gy, gh = (torch.randn(shape, device=device) for _ in range(4))
    leaves = [x.clone().requires_grad_(), r.clone().requires_grad_(), *mod.parameters()]
    y, h = mod(leaves[0], leaves[1])
    got = (y, h, *grads((y, h), leaves, (gy, gh)))
    leaves64 = [x.double().requires_grad_(), r.double().requires_grad_(), *ref.parameters()]
    h64 = leaves64[0] + leaves64[1]
    y64 = ref(h64)
    want = (y64, h64, *grads((y64, h64), leaves64, (gy.double(), gh.double())))
    # the row sums are over N columns (y, dx) or the rows (dw, db), summed in fp32; N = 1 rows
    # have no spread: rstd = 1/sqrt(eps) ~ 316 amplifies the fp32 rounding of g - mean(g)
    rows = x.numel() // N
    widen = 1 / mod.eps ** 0.5 if N == 1 else 1.0
    for name, g, e, length in zip(("y", "h", "dx", "dr", "dw", "db"), got, want,
                                  (N, 1, N, N, rows, rows)):
        tol = 4 * sum_tol(torch.float32, length) * widen
        if e.abs().max() < 1e-9:  # N = 1: dw = 0 (terms of size |dy| ~ 1)
            assert g.abs().max() <= tol, f"{name}: expected zeros, got {g}"
            continue
        assert_close(g, e, tol, f"{name} {shape} {path}")


# ------------------------------------------------------------------------------------------
# KDLoss

def torch_kd(s, t, y, T, alpha, reduction):
    """The torch composition KDLoss replaces, in float64."""
    s, t = s.double(), t.double()
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="none").sum(-1) * T * T
    if y is None:
        rows, count = kl, s.shape[0]
    else:
        keep = y != IGNORE
        ce = F.cross_entropy(s, y, ignore_index=IGNORE, reduction="none")
        rows = torch.where(keep, alpha * kl + (1 - alpha) * ce, torch.zeros_like(kl))
        count = int(keep.sum())
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / max(count, 1)}[reduction]


def test_kd_loss_module(device):
    m = tkd_core.nn.KDLoss(temperature=2.0, alpha=0.25, reduction="sum")
    assert "temperature=2.0" in repr(m) and not m.state_dict()
    s = torch.randn(4, 30, device=device, requires_grad=True)
    t = torch.randn(4, 30, device=device)
    y = torch.tensor([1, IGNORE, 2, 29], device=device)
    loss = m(s, t, y)
    loss.backward()
    assert_close(loss, torch_kd(s, t, y, 2.0, 0.25, "sum"), 1e-5, "KDLoss")
    assert_close(m(s, t), torch_kd(s, t, None, 2.0, 0.25, "sum"), 1e-5, "KDLoss soft")
    with pytest.raises(ValueError, match="reduction"):
        tkd_core.nn.KDLoss(reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,V", [(1, 1), (7, 2), (257, 7), (3, 4099)])
def test_kd_loss_module_gradient_matches_torch(path, device, N, V, reduction):
    m = tkd_core.nn.KDLoss(temperature=4.0, alpha=0.7, reduction=reduction)
    s, t = torch.randn(N, V, device=device) * 3, torch.randn(N, V, device=device) * 3
    y = torch.randint(0, V, (N,), device=device)
    y[::3] = IGNORE
    s1 = s.clone().requires_grad_()
    loss = m(s1, t, y)
    go = torch.rand_like(loss) + 0.5
    (g,) = grads(loss, [s1], go)
    s64 = s.double().requires_grad_()
    ref = torch_kd(s64, t, y, 4.0, 0.7, reduction)
    (g64,) = grads(ref, [s64], go.double())
    assert_close(loss, ref, 2e-5, f"loss N={N} V={V} {reduction} {path}")
    assert_close(g, g64, 2e-5, f"grad N={N} V={V} {reduction} {path}")


# ------------------------------------------------------------------------------------------
# MultiHeadAttention

def test_multi_head_attention_matches_sdpa(path, device):
    B, S, hidden, heads = 2, 19, 64, 4
    mha = tkd_core.nn.MultiHeadAttention(hidden, heads, device=device)
    x = torch.randn(B, S, hidden, device=device, requires_grad=True)
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[1, 11:] = False  # second sequence padded
    go = torch.linspace(-1, 1, B * S * hidden, device=device).view(B, S, hidden)
    y = mha(x, mask)
    y.backward(go)
    got = [x.grad] + [p.grad for p in mha.parameters()]

    x2 = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in mha.parameters()]
    w_qkv, b_qkv, w_o, b_o = params
    qkv = F.linear(x2, w_qkv, b_qkv).view(B, S, 3, heads, -1).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask[:, None, None, :])
    ref = F.linear(o.transpose(1, 2).reshape(B, S, hidden), w_o, b_o)
    ref.backward(go)
    assert_close(y, ref, 1e-5, "MultiHeadAttention forward")
    for g, r in zip(got, [x2.grad] + [p.grad for p in params]):
        assert_close(g, r, 1e-5, "MultiHeadAttention grads")


def test_multi_head_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be divisible by num_heads"):
        tkd_core.nn.MultiHeadAttention(10, 3)


# ------------------------------------------------------------------------------------------
# Int8Linear

@pytest.mark.parametrize("M,K,N", [(1, 768, 768), (77, 768, 3072), (33, 3072, 768)])
def test_int8_linear_sqnr(M, K, N, device):
    lin = torch.nn.Linear(K, N, device=device)
    x = torch.randn(M, K, device=device)
    q = Int8Linear.from_float(lin)
    with torch.no_grad():
        y, ref = q(x), lin(x)
        db = sqnr_db(y, ref)
        assert db >= 35, f"SQNR {db:.1f} dB < 35 dB"
        # it is exactly the int8 GEMM of the quantized operands with the fused epilogue
        qx, sx = G.quantize_per_token_ref(x)
        expect = G.int8_gemm_ref(qx, q.weight, sx, q.weight_scale, q.bias)
        assert_close(y, expect, 2e-7, "Int8Linear vs its int8 reference")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(1, 7, 1), (257, 33, 7)])
def test_int8_linear_half_inputs(dtype, M, K, N, device):
    lin = torch.nn.Linear(K, N, device=device)
    q = Int8Linear.from_float(lin)
    x = torch.randn(M, K, device=device).to(dtype)
    with torch.no_grad():
        y = q(x)
        qx, sx = G.quantize_per_token_ref(x)
        expect = G.int8_gemm_ref(qx, q.weight, sx, q.weight_scale, q.bias)
    assert y.dtype == dtype and y.shape == (M, N)
    # one rounding of the float32 result to the half dtype
    assert_close(y, expect, {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype], str(dtype))


def test_int8_linear_module_behaviour(device):
    lin = torch.nn.Linear(64, 24, device=device)
    q = Int8Linear.from_float(lin)
    x = torch.randn(2, 5, 64, device=device)
    with torch.no_grad():
        y = q(x)
        assert y.shape == (2, 5, 24) and y.dtype == torch.float32
        assert q(x.bfloat16()).dtype == torch.bfloat16
    assert sorted(q.state_dict()) == ["bias", "weight", "weight_scale"]
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    q2 = Int8Linear(64, 24, device=device)
    q2.load_state_dict(q.state_dict())  # repacks the loaded weight
    with torch.no_grad():
        assert torch.equal(q2(x), y)
    with pytest.raises(RuntimeError, match="inference only"):
        q(x.requires_grad_())
    with pytest.raises(ValueError, match="in_features"):
        with torch.no_grad():
            q(torch.randn(3, 63, device=device))
    nb = Int8Linear.from_float(torch.nn.Linear(64, 24, bias=False, device=device))
    with torch.inference_mode():
        assert nb(x).shape == (2, 5, 24)
    with pytest.raises(TypeError, match="from_float expects an nn.Linear"):
        Int8Linear.from_float(torch.nn.Conv1d(3, 3, 1, device=device))


def test_int8_linear_deepcopies_after_use():
    """A used Int8Linear (its CPU plan built) deep-copies: the pipeline's report copies the INT8
    student (the default run crashed: 'cannot pickle tkd_core._C.LinearPlan')."""
    import copy
    from tkd_core.nn import Int8Linear
    lin = Int8Linear.from_float(torch.nn.Linear(384, 1536))
    x = torch.randn(7, 384)
    with torch.no_grad():
        y = lin(x)
        c = copy.deepcopy(lin)
        assert torch.equal(c(x), y)
        c.weight.zero_()  # the copy's plan is its own: the original is unchanged
        assert torch.equal(lin(x), y) and not torch.equal(c(x), y)
