"""Fused attention (kernels/attention.py): the Triton kernels in the interpreter (compiled with
--device cuda) against a float64 reference, for the output and dq, dk, dv; dropout determinism
and its mask; bad input; torch.compile; the reference CPU path (MultiHeadAttention against
torch's SDPA: tests/test_nn.py).

The interpreter is slow, so the sweep covers every listed value (S in {1, 17, 97, 200}, D in
{16, 64, 128, 40}, each dtype, causal on/off, S_q != S_k, padding incl. a fully padded sequence)
in a handful of cases instead of the cartesian product.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tkd_core
from helpers import assert_close, rel_err
from tkd_core.kernels import attention as A

# interpreter: fp16 dots run in numpy fp16 x fp16 -> fp32, bf16 ones upcast to fp32 (exact
# products); errors are dominated by rounding P and dS to the input dtype before the dots
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(B, H, S_q, S_k, D, dtype, padded=True, device="cpu"):
    q, k, v = (torch.randn(B, H, s, D, dtype=dtype, device=device).requires_grad_()
               for s in (S_q, S_k, S_k))
    mask = None
    if padded:  # random per-batch lengths; the last sequence is fully padded
        lengths = torch.randint(1, S_k + 1, (B,), device=device)
        lengths[-1] = 0
        # (B, S_k), True = attend
        mask = torch.arange(S_k, device=device)[None, :] < lengths[:, None]
    return q, k, v, mask


def _rng_state(device):
    """The state of the generator the op draws its dropout seed from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _ref64(q, k, v, mask, causal, dropout_p=0.0, dropout_mask=None, scale=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = A.attention_ref(q64, k64, v64, mask, causal, dropout_p, scale, dropout_mask)
    return out, (q64, k64, v64)


def _visible_rows(B, S_q, S_k, mask, causal, device):
    """(B, S_q) True where a query row sees at least one key."""
    vis = torch.ones(S_q, S_k, dtype=torch.bool, device=device)
    if causal:
        vis = vis.tril(S_k - S_q)
    vis = vis.expand(B, S_q, S_k)
    if mask is not None:
        vis = vis & mask[:, None, :]
    return vis.any(-1)


# (dtype, B, H, S_q, S_k, D, causal, padded)
CASES = [
    (torch.float16, 2, 1, 200, 200, 64, False, True),
    (torch.bfloat16, 2, 1, 97, 200, 128, True, True),    # S_q < S_k, causal
    (torch.float32, 2, 2, 17, 17, 40, True, False),      # padded head dim
    (torch.float16, 2, 1, 200, 97, 16, True, True),      # S_q > S_k: rows with no key
    (torch.bfloat16, 2, 1, 1, 200, 40, False, True),
    (torch.float32, 2, 1, 97, 1, 16, False, True),
    (torch.float16, 2, 2, 17, 97, 128, False, True),
    (torch.bfloat16, 1, 2, 1, 1, 64, True, False),
]


@pytest.mark.parametrize("dtype,B,H,S_q,S_k,D,causal,padded", CASES,
                         ids=[f"{str(c[0])[6:]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-causal{int(c[6])}-"
                              f"pad{int(c[7])}" for c in CASES])
def test_forward_backward_against_float64(dtype, B, H, S_q, S_k, D, causal, padded, device):
    q, k, v, mask = _inputs(B, H, S_q, S_k, D, dtype, padded, device)
    out = tkd_core.ops.attention(q, k, v, key_padding_mask=mask, causal=causal)
    do = torch.randn_like(out)  # grad_output other than ones
    out.backward(do)
    ref, (q64, k64, v64) = _ref64(q, k, v, mask, causal)
    ref.backward(do.double())
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (B, H, S_q, D)
    assert_close(out, ref, tol, "out")
    assert_close(q.grad, q64.grad, tol, "dq")
    assert_close(k.grad, k64.grad, tol, "dk")
    assert_close(v.grad, v64.grad, tol, "dv")
    # rows that see no key (fully padded sequence, causal with S_q > S_k): exact zeros
    dead = ~_visible_rows(B, S_q, S_k, mask, causal, device)  # (B, S_q)
    if dead.any():
        dead = dead[:, None, :].expand(B, H, S_q)
        assert (out.detach()[dead] == 0).all() and (q.grad[dead] == 0).all()
    if mask is not None:  # padded keys get no gradient
        for g in (k.grad, v.grad):
            assert (g.transpose(1, 2)[~mask] == 0).all()


def test_logsumexp_and_empty_row_sentinel(device):
    B, H, S_q, S_k, D = 2, 2, 40, 23, 32
    q, k, v, mask = _inputs(B, H, S_q, S_k, D, torch.float32, device=device)
    scale = 0.3
    o, lse = A.attention_fwd(q.detach(), k.detach(), v.detach(), mask, None, True, 0.0, scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    vis = (torch.ones(S_q, S_k, dtype=torch.bool, device=device).tril(S_k - S_q)
           & mask[:, None, None, :])
    ref = s.masked_fill(~vis, float("-inf")).logsumexp(-1)  # -inf on rows with no key
    live = torch.isfinite(ref)
    assert (~live).any() and live.any()
    assert_close(lse[live], ref[live], 1e-5, "lse")
    assert (lse[~live] == A.LSE_EMPTY).all()
    assert torch.isfinite(o).all()


def test_non_contiguous_inputs_and_custom_scale(device):
    # q/k/v as MultiHeadAttention makes them: strided views of one fused (B, S, 3, H, D) tensor
    B, S, H, D = 2, 33, 2, 32
    qkv = torch.randn(B, S, 3, H, D, dtype=torch.float16, device=device)
    q, k, v = (t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    out = tkd_core.ops.attention(q, k, v, softmax_scale=0.05)
    do = torch.randn_like(out)
    out.backward(do)
    ref, (q64, k64, v64) = _ref64(q, k, v, None, False, scale=0.05)
    ref.backward(do.double())
    for a, b, what in ((out, ref, "out"), (q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"),
                       (v.grad, v64.grad, "dv")):
        assert_close(a, b, TOL[torch.float16], what)


def test_backward_saves_nothing_of_size_s_squared(device):
    # what autograd keeps for the backward: q, k, v, O, L (B, H, S_q), the seed; no S x S mask
    B, H, S_q, S_k, D = 1, 2, 64, 80, 16  # S_q * S_k = 5120 > S * D = 1280
    q, k, v, mask = _inputs(B, H, S_q, S_k, D, torch.float16, device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = tkd_core.ops.attention(q, k, v, mask, causal=True, dropout_p=0.2)
    assert saved, "no tensor went through the saved-tensor hooks"
    biggest = max(t.numel() for t in saved)
    assert biggest <= B * H * max(S_q, S_k) * D, [tuple(t.shape) for t in saved]
    assert all(t.numel() < S_q * S_k for t in saved), [tuple(t.shape) for t in saved]
    out.backward(torch.randn_like(out))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# -- dropout -------------------------------------------------------------------------------------

def test_dropout_zero_is_exact_and_draws_no_seed(device):
    q, k, v, mask = _inputs(2, 1, 17, 33, 16, torch.float16, device=device)
    state = _rng_state(device)
    out = tkd_core.ops.attention(q, k, v, mask, dropout_p=0.0)
    assert torch.equal(state, _rng_state(device)), "dropout_p=0 must not draw a seed"
    assert torch.equal(out, tkd_core.ops.attention(q, k, v, mask))
    ref, _ = _ref64(q, k, v, mask, False)
    assert_close(out, ref, TOL[torch.float16], "out")


def _run(q, k, v, mask, causal, p, seed):
    torch.manual_seed(seed)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = tkd_core.ops.attention(q, k, v, mask, causal=causal, dropout_p=p)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def test_dropout_same_seed_is_bit_identical(device):
    q, k, v, mask = _inputs(2, 2, 17, 40, 16, torch.bfloat16, device=device)
    a = _run(q, k, v, mask, True, 0.3, seed=11)
    b = _run(q, k, v, mask, True, 0.3, seed=11)
    c = _run(q, k, v, mask, True, 0.3, seed=12)
    for x, y, what in zip(a, b, ("out", "dq", "dk", "dv")):
        assert torch.equal(x, y), f"{what} differs between two runs with the same seed"
    assert not torch.equal(a[0], c[0]), "a different seed must give a different dropout mask"


def test_dropout_kept_fraction_and_independence(device):
    B, H, S_q, S_k, p = 2, 2, 64, 200, 0.3
    keep = A.attention_dropout_mask(B, H, S_q, S_k, p, A.dropout_seed(device), device)
    assert keep.shape == (B, H, S_q, S_k) and keep.dtype == torch.bool
    n = keep.numel()
    frac = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, (
        f"kept fraction {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}")
    # every (b, h) gets its own stream: masks of different heads / batches / rows differ
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert not torch.equal(keep, A.attention_dropout_mask(B, H, S_q, S_k, p, 12345, device))


@pytest.mark.parametrize("dtype,S_q,S_k,D,causal", [
    (torch.float16, 97, 40, 64, True),
    (torch.float32, 17, 97, 40, False),
])
def test_dropout_matches_reference_with_identical_mask(dtype, S_q, S_k, D, causal, device):
    B, H, p, seed = 2, 2, 0.25, 1234
    q, k, v, mask = _inputs(B, H, S_q, S_k, D, dtype, device=device)
    out, dq, dk, dv = _run(q, k, v, mask, causal, p, seed)
    torch.manual_seed(seed)  # the op's first draw is its dropout seed
    keep = A.attention_dropout_mask(B, H, S_q, S_k, p, A.dropout_seed(device), device)
    ref, (q64, k64, v64) = _ref64(q, k, v, mask, causal, p, keep)
    ref.backward(torch.linspace(-1, 1, ref.numel(), dtype=torch.float64, device=device)
                 .view_as(ref).to(dtype).double())
    tol = TOL[dtype]
    assert_close(out, ref, tol, "out")
    assert_close(dq, q64.grad, tol, "dq")
    assert_close(dk, k64.grad, tol, "dk")
    assert_close(dv, v64.grad, tol, "dv")
    # and the mask matters: without it the reference is far off
    ref_nodrop, _ = _ref64(q, k, v, mask, causal)
    assert rel_err(out, ref_nodrop) > 10 * tol


# -- bad input -----------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_t(2, 2, 8, 16), _t(2, 2, 8, 16), _t(2, 8, 16)), {}, ValueError, "v must be 4-D"),
    ((_t(2, 2, 8), _t(2, 2, 8, 16), _t(2, 2, 8, 16)), {}, ValueError, "q must be 4-D"),
    ((_t(2, 2, 8, 16), _t(2, 2, 9, 16), _t(2, 2, 8, 16)), {}, ValueError, "same shape"),
    ((_t(2, 2, 8, 16), _t(2, 3, 8, 16), _t(2, 3, 8, 16)), {}, ValueError, "does not match q"),
    ((_t(2, 2, 8, 16), _t(2, 2, 8, 32), _t(2, 2, 8, 32)), {}, ValueError, "does not match q"),
    ((_t(1, 1, 4, 160), _t(1, 1, 4, 160), _t(1, 1, 4, 160)), {}, ValueError, "<= 128"),
    ((_t(2, 1, 4, 16), _t(2, 1, 5, 16), _t(2, 1, 5, 16)),
     dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"shape \(B, S_k\)"),
    ((_t(2, 1, 4, 16), _t(2, 1, 5, 16), _t(2, 1, 5, 16)),
     dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must have dtype"),
    ((_t(1, 1, 4, 16), _t(1, 1, 4, 16), _t(1, 1, 4, 16)), dict(dropout_p=1.0), ValueError,
     "dropout_p"),
    ((_t(1, 1, 4, 16), _t(1, 1, 4, 16), _t(1, 1, 4, 16)), dict(dropout_p=-0.1), ValueError,
     "dropout_p"),
    ((_t(1, 1, 4, 16), _t(1, 1, 4, 16, dtype=torch.float16), _t(1, 1, 4, 16)), {}, TypeError,
     "k has dtype"),
    ((_t(1, 1, 4, 16, dtype=torch.float64),) * 3, {}, TypeError, "q must have dtype"),
    ((_t(1, 1, 4, 16), _t(1, 1, 4, 16), _t(1, 1, 4, 16, dtype=torch.bfloat16)), {}, TypeError,
     "v has dtype"),
])
def test_bad_input_raises_clearly(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tkd_core.ops.attention(*args, **kwargs)


def test_mixed_devices_raise_clearly():
    q = _t(1, 1, 4, 16)
    k = torch.empty(1, 1, 4, 16, device="meta")
    with pytest.raises(ValueError, match="k is on meta"):
        tkd_core.ops.attention(q, k, k.clone())


# -- torch.compile, reference path, module ---------------------------------------------------------

def test_torch_compile_fullgraph_traces_the_custom_op(device):
    q, k, v, mask = _inputs(2, 2, 17, 17, 16, torch.float32, device=device)
    mask[-1, 0] = True  # keep every sequence non-empty so eager and compiled match everywhere

    def f(q, k, v, mask, p):
        return tkd_core.ops.attention(q, k, v, mask, causal=True, dropout_p=p).sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = cf(q, k, v, mask, 0.0)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v, mask, 0.0).backward()
    assert torch.allclose(loss, f(q, k, v, mask, 0.0), rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, (q, k, v)):
        assert_close(g, t.grad, 1e-5, "compiled grad")
    # dropout traces too (the seed is drawn outside the custom op) and differentiates
    for t in (q, k, v):
        t.grad = None
    cf(q, k, v, mask, 0.2).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_opcheck_of_the_custom_ops():
    # schema, fake (meta) implementations, autograd registration, AOT dispatch with dynamic shapes
    q, k, v = (torch.randn(1, 2, s, 16, requires_grad=True) for s in (5, 7, 7))
    mask = torch.tensor([[True] * 5 + [False] * 2])
    seed = A.dropout_seed("cpu")
    torch.library.opcheck(torch.ops.tkd.attention_fwd.default,
                          (q, k, v, mask, seed, True, 0.2, 0.25))
    o, lse = A.attention_fwd(q.detach(), k.detach(), v.detach(), mask, seed, True, 0.2, 0.25)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, mask, seed, True,
            0.2, 0.25)
    torch.library.opcheck(torch.ops.tkd.attention_bwd.default, args)


def test_reference_path_on_cpu(reference_backend):
    assert tkd_core.ops.backend(torch.zeros(1)) == "reference"
    q, k, v, mask = _inputs(2, 2, 30, 20, 24, torch.float32)
    out = tkd_core.ops.attention(q, k, v, mask, causal=True)
    out.backward(torch.randn_like(out))
    ref, _ = _ref64(q, k, v, mask, True)
    assert_close(out, ref, 1e-5, "out")
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("case", ["no_mask", "all_true", "padded", "fully_padded", "causal",
                                  "causal_rect", "causal_padded", "fp16", "dropout"])
def test_cpu_path_sdpa_or_reference(reference_backend, monkeypatch, case):
    """The CPU path takes torch's SDPA where it has our semantics and the reference elsewhere;
    either way: forward and every gradient (random grad_out) against float64."""
    B, H, S_q, S_k, D = 3, 2, 17, 17, 16
    causal = case.startswith("causal")
    if case == "causal_rect":
        S_q = 7
    dtype = torch.float16 if case == "fp16" else torch.float32
    padded = case in ("all_true", "padded", "fully_padded", "causal_padded", "fp16")
    q, k, v, mask = _inputs(B, H, S_q, S_k, D, dtype, padded=padded)
    if case in ("padded", "causal_padded", "fp16"):
        mask[-1, :3] = True  # every sequence sees a key
    elif case == "all_true":
        mask[:] = True
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    p = 0.3 if case == "dropout" else 0.0
    out = tkd_core.ops.attention(q, k, v, mask, causal=causal, dropout_p=p)
    want_sdpa = case not in ("fp16", "dropout")  # fp32 without dropout: SDPA, any mask
    assert bool(calls) == want_sdpa, case
    if case == "dropout":  # the reference's dropout stream (torch.rand_like), as in training
        torch.manual_seed(7)
        again = tkd_core.ops.attention(q, k, v, mask, causal=causal, dropout_p=p)
        torch.manual_seed(7)
        torch.testing.assert_close(again, A.attention_ref(q, k, v, mask, causal, p))
        return
    go = torch.randn_like(out)
    out.backward(go)
    ref, leaves = _ref64(q, k, v, mask, causal)
    ref.backward(go.double())
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert_close(out, ref, tol, "out")
    for name, t, r in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, r.grad, 4 * tol, f"d{name}")


@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
def test_compile_fullgraph_with_padding_mask(path, device, causal):
    """torch.compile(fullgraph=True) with a padding mask that leaves a sequence fully padded: no
    data-dependent branch on either path (the CPU path used to guard on key_padding_mask.all())."""
    q, k, v, mask = _inputs(3, 2, 9, 13, 16, torch.float32, device=device)  # last: fully padded

    def f(q, k, v, mask):
        return tkd_core.ops.attention(q, k, v, key_padding_mask=mask, causal=causal)

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, leaves = _ref64(q, k, v, mask, causal)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    assert_close(out, ref, 1e-5, f"compiled out ({path})")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, 4e-5, f"compiled d{name} ({path})")
    assert (out[-1] == 0).all() and (grads[0][-1] == 0).all()  # the fully padded sequence


def test_whole_model_compiles_fullgraph_with_padding_on_cpu(reference_backend):
    """The case that failed (issue 14): a Transformer with a padding mask under
    torch.compile(fullgraph=True) with inductor on CPU, logits equal to eager within 1e-5."""
    from tkd_core.models import ModelConfig, TransformerClassifier
    model = TransformerClassifier(ModelConfig.preset("tiny", vocab_size=50, num_labels=3)).eval()
    ids = torch.randint(1, 50, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 6:] = False
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(ids, mask)
        want = model(ids, mask)
    assert_close(got, want, 1e-5, "compiled logits")


def test_causal_is_bottom_right_aligned_like_torch():
    from torch.nn.attention.bias import causal_lower_right
    for S_q, S_k in ((5, 9), (9, 9)):
        q, k, v = (torch.randn(1, 2, s, 8, dtype=torch.float64) for s in (S_q, S_k, S_k))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(S_q, S_k))
        assert_close(A.attention_ref(q, k, v, causal=True), ref, 1e-12, f"S_q={S_q} S_k={S_k}")


