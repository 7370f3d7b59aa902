"""tkd_core.ops.layer_norm: Triton kernels (in the interpreter, or compiled with --device cuda)
against a float64 torch reference.

Tolerances are on rel_err = max|out - ref| / max|ref| against F.layer_norm on .double() inputs,
widened for ill-conditioned rows by max|terms summed| / max|ref| (see `term_scales`):
- fp32: outputs are rounded to fp32 (2^-24) after fp32 reductions over N columns (y, dx) or M
  rows (dw, db), whose error grows like eps32 * sqrt(length) for random data; we allow
  8 * eps32 * sqrt(length), at least 32 * eps32 (~4e-6; 1.5e-4 at N = 65536).
- fp16: statistics are fp32, so the output rounding (2^-11 ~ 4.9e-4 relative, half an ulp) and the
  fp16 rounding of h = x + residual dominate: 2e-3 (~4 ulp).
- bf16: the same with 8 mantissa bits (2^-8 ~ 3.9e-3; Triton's interpreter truncates rather than
  rounds to bf16, so up to one ulp): 1.6e-2 (~4 ulp).
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, sum_tol

import tkd_core
from tkd_core.kernels import layer_norm as ln


def make_inputs(M, N, dtype, affine="wb", residual=False, lead=None, device="cpu"):
    shape = (*lead, N) if lead else (M, N)
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (torch.randn(N, device=device) * 0.5 + 1).to(dtype) if "w" in affine else None
    b = torch.randn(N, device=device).to(dtype) if "b" in affine else None
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    return x, w, b, r


def grads_like(x, residual):
    """Random float64 grad_outputs for y (not ones: exercises the c1/c2 terms) and h."""
    gy = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    return gy, (torch.randn(x.shape, dtype=torch.float64, device=x.device) if residual else None)


def run(fn, x, w, b, r, gy, gh, eps=1e-5):
    """fn(x, w, b, eps, r) forward + backward with grad_outputs gy (for y) and gh (for h)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out = fn(leaves[0], leaves[1], leaves[2], eps, leaves[3])
    y, h = out if r is not None else (out, None)
    outs, grads = [y], [gy.to(y.dtype)]
    if h is not None:
        outs.append(h)
        grads.append(gh.to(h.dtype))
    torch.autograd.backward(outs, grads)
    return (y, h) + tuple(t.grad if t is not None else None for t in leaves)


def ours(x, w, b, eps, r):
    return tkd_core.ops.layer_norm(x, w, b, eps=eps, residual=r)


def reference64(x, w, b, eps, r, h_rounded=None):
    """float64 LN(x + r). With h_rounded (the kernel's returned x + r, rounded to its dtype), y
    and the gradients are those of LN at exactly that h, as the op documents: rows with N = 2
    and near-equal elements are too ill-conditioned to compare against LN(unrounded h)."""
    def d(t):
        return t.double() if t is not None else None
    h = d(x) if r is None else d(x) + d(r)
    h_ln = h if h_rounded is None else h + (h_rounded.double() - h).detach()
    y = F.layer_norm(h_ln, h.shape[-1:], d(w), d(b), eps)
    return y if r is None else (y, h)


def term_scales(x, w, b, r, h, gy, gh, eps=1e-5):
    """Per output, the float64 magnitude of the terms its computation adds up (>= |output|).

    The forward error of a finite-precision LayerNorm is bounded by u * (these terms), not by
    u * |output|: h - mean cancels when a row's spread is small next to its values (e.g. N = 2
    with near-equal elements), and dx = rstd * (g - xhat * c1 - c2) cancels likewise.
    """
    h = h.double()
    mean = h.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(((h - mean) ** 2).mean(-1, keepdim=True) + eps)
    hs = (h.abs() + mean.abs()) * rstd  # bounds |xhat| and the scale of its rounding error
    aw = (w.double().abs() if w is not None
          else torch.ones(h.shape[-1], dtype=torch.float64, device=h.device))
    ab = b.double().abs() if b is not None else 0.0
    ag = gy.abs() * aw
    dx = rstd * (ag + hs * (ag * hs).mean(-1, keepdim=True) + ag.mean(-1, keepdim=True))
    if gh is not None:
        dx = dx + gh.abs()
    rows = tuple(range(h.dim() - 1))
    return {"y": hs * aw + ab, "x + residual": x.double().abs() + (r.double().abs() if r is
            not None else 0), "dx": dx, "dresidual": dx,
            "dweight": (gy.abs() * hs).sum(rows), "dbias": gy.abs().sum(rows)}


def check(M, N, dtype, affine="wb", residual=False, lead=None, x=None, device="cpu"):
    xx, w, b, r = make_inputs(M, N, dtype, affine, residual, lead, device)
    x = xx if x is None else x
    gy, gh = grads_like(x, residual)
    got = run(ours, x, w, b, r, gy, gh)

    def ref64(*args):
        return reference64(*args, h_rounded=got[1])
    ref = run(ref64, x.double(), *(t.double() if t is not None else None for t in (w, b, r)),
              gy, gh)
    scales = term_scales(x, w, b, r, got[1] if residual else x, gy, gh)
    rows = x.numel() // max(N, 1)
    names = ("y", "x + residual", "dx", "dweight", "dbias", "dresidual")
    lengths = (N, 1, N, rows, rows, N)
    for name, g, e, length in zip(names, got, ref, lengths):
        assert (g is None) == (e is None), f"{name}: presence differs from torch"
        if g is None:
            continue
        assert g.dtype == (x.dtype if name in ("y", "x + residual", "dx", "dresidual")
                           else dtype), f"{name}: dtype {g.dtype}"
        if e.numel() and e.abs().max() < 1e-9:  # N = 1: xhat = 0, so dx = dw = 0 exactly
            assert g.abs().max() <= 1e-6, f"{name}: expected zeros, got {g}"
            continue
        # relative to max|ref|, widened by how much larger the summed terms are (the
        # conditioning of the row: ~1-3 for ordinary rows, large only for near-constant ones)
        cond = max(1.0, scales[name].max().item() / e.abs().max().item()) if e.numel() else 1.0
        assert_close(g, e, sum_tol(dtype, length) * cond,
                     f"{name} ({M}x{N} {dtype}, cond {cond:.1f})")


# 257 rows only with short rows (the interpreter's cost grows with programs x tile size)
SHAPES = ([(m, n) for m in (1, 3) for n in (1, 2, 7, 768, 1000, 4099)]
          + [(257, n) for n in (1, 2, 7)])
# 65536: the longest row (swept in 16 chunks); 8193: just above the forward's single-tile limit
# (4099 is already above the backward's, see ln.config)
CHUNKED = [(1, 65536), (2, 8193)]


@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("affine", ["wb", "none"])
@pytest.mark.parametrize("M,N", SHAPES + CHUNKED)
def test_fp32(M, N, affine, residual, device):
    check(M, N, torch.float32, affine, residual, device=device)


@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("affine", ["w", "b"])
@pytest.mark.parametrize("M,N", [(3, 7), (3, 1000), (2, 8193)])
def test_weight_or_bias_only(M, N, affine, residual, device):
    check(M, N, torch.float32, affine, residual, device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("M,N", [(1, 1), (3, 7), (3, 768), (1, 4099), (257, 2), (1, 8193)])
def test_half(M, N, dtype, residual, device):
    check(M, N, dtype, "wb", residual, device=device)


def test_half_longest_row(device):
    check(1, 65536, torch.bfloat16, "wb", True, device=device)


def test_fp16_input_with_fp32_params(device):
    # mixed precision: fp32 weight/bias with fp16 activations; grads come back in fp32
    x, _, _, r = make_inputs(3, 768, torch.float16, residual=True, device=device)
    _, w, b, _ = make_inputs(3, 768, torch.float32, device=device)
    gy, gh = grads_like(x, True)
    got = run(ours, x, w, b, r, gy, gh)
    ref = run(reference64, x.double(), w.double(), b.double(), r.double(), gy, gh)
    assert got[3].dtype == got[4].dtype == torch.float32
    for name, g, e in zip(("y", "h", "dx", "dw", "db", "dr"), got, ref):
        assert_close(g, e, 2e-3, name)


def test_leading_dims_and_non_contiguous(device):
    check(None, 768, torch.float32, "wb", True, lead=(2, 3), device=device)
    base = torch.randn(1000, 5, device=device)
    x = base.t()  # (5, 1000), column-major: not contiguous
    assert not x.is_contiguous()
    check(5, 1000, torch.float32, "wb", False, x=x, device=device)


def test_large_mean_is_stable(device):
    # a row mean 1e3 times its spread: E[x^2] - E[x]^2 in fp32 would lose the variance entirely
    for N in (768, 9000):  # single tile and chunked (Chan's merge of chunk statistics)
        x = 1000 + torch.randn(2, N, device=device)
        y = tkd_core.ops.layer_norm(x)
        assert_close(y, reference64(x, None, None, 1e-5, None), 1e-3, f"N={N}")


@pytest.mark.parametrize("kind", ["mean 1e6", "magnitude 1e30"])
@pytest.mark.parametrize("N", [7, 768, 9000])  # 7: 8 rows per program; 9000: chunked kernels
def test_ill_conditioned_rows_on_every_path(path, device, kind, N):
    """Rows of mean 1e6 and std 1 (fp32 sums of h lose ~0.06 of xhat), and rows of magnitude
    1e30 (squares overflow fp32: Triton returned the bias, torch NaN) next to an ordinary row:
    forward and every gradient within fp32 tolerance of float64, not widened by conditioning."""
    x, w, b, r = make_inputs(3, N, torch.float32, residual=True, device=device)
    noise = torch.randn(2, N, device=device)
    x[1:] = 1e6 + noise if kind == "mean 1e6" else noise * 1e30
    gy, gh = grads_like(x, True)
    got = run(ours, x, w, b, r, gy, gh)

    def ref64(*args):  # LN of exactly the returned (rounded) h = x + r, as the op documents
        return reference64(*args, h_rounded=got[1])
    ref = run(ref64, x.double(), w.double(), b.double(), r.double(), gy, gh)
    names = ("y", "x + residual", "dx", "dweight", "dbias", "dresidual")
    for name, g, e, length in zip(names, got, ref, (N, 1, N, 3, 3, N)):
        assert torch.isfinite(g).all(), f"{name}: not finite ({kind}, {path})"
        if name in ("dx", "dresidual"):  # per row: dx of a 1e30 row is ~1e-30
            for i in range(3):
                assert_close(g[i], e[i], 4 * sum_tol(torch.float32, length),
                             f"{name} row {i} ({kind}, N={N}, {path})")
        else:
            assert_close(g, e, 4 * sum_tol(torch.float32, length), f"{name} ({kind}, N={N}, "
                         f"{path})")


def test_outputs_fully_written_under_poison(device):
    # launchers allocate through utils.empty (NaN under TKD_POISON_OUTPUTS=1): every element of
    # y, h, mean, rstd, dx and the partial dw/db rows must be overwritten
    import os
    assert os.environ.get("TKD_POISON_OUTPUTS") == "1"
    x, w, b, r = make_inputs(5, 300, torch.float16, residual=True, device=device)
    y, h, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-5, r)
    dx, dw, db = ln.layer_norm_bwd(torch.randn_like(y), h, w, mean, rstd, torch.randn_like(h))
    for t in (y, h, mean, rstd, dx, dw, db):
        assert torch.isfinite(t).all()


def test_backend_is_interpreter_here():
    assert tkd_core.ops.backend(torch.zeros(2)) == "interpreter"


def test_reference_path(reference_backend):
    x, w, b, r = make_inputs(3, 768, torch.float32, residual=True)
    assert tkd_core.ops.backend(x) == "reference"
    gy, gh = torch.randn(3, 768, dtype=torch.float64), torch.randn(3, 768, dtype=torch.float64)
    got = run(ours, x, w, b, r, gy, gh)
    ref = run(reference64, x.double(), w.double(), b.double(), r.double(), gy, gh)
    for name, g, e in zip(("y", "h", "dx", "dw", "db", "dr"), got, ref):
        assert_close(g, e, sum_tol(torch.float32, 768), name)
    y = tkd_core.ops.layer_norm(x, w, b)
    assert isinstance(y, torch.Tensor)
    assert_close(y, reference64(x, w, b, 1e-5, None), sum_tol(torch.float32, 768), "y")


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        tkd_core.ops.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        tkd_core.ops.layer_norm(x, None, torch.zeros(9))
    with pytest.raises(TypeError, match="x must have dtype"):
        tkd_core.ops.layer_norm(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight must have dtype"):
        tkd_core.ops.layer_norm(x, torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="residual must have dtype"):
        tkd_core.ops.layer_norm(x, residual=torch.ones(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        tkd_core.ops.layer_norm(x, residual=torch.ones(4, 9))
    with pytest.raises(ValueError, match="weight is on meta"):
        tkd_core.ops.layer_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="bias is on meta"):
        tkd_core.ops.layer_norm(x, None, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="residual is on meta"):
        tkd_core.ops.layer_norm(x, residual=torch.ones(4, 8, device="meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tkd_core.ops.layer_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="eps must be"):
        tkd_core.ops.layer_norm(x, eps=-1.0)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-5, True, "1e-5"])
def test_eps_must_be_finite_and_non_negative(eps):
    with pytest.raises(ValueError, match=r"eps must be a finite non-negative float, got"):
        tkd_core.ops.layer_norm(torch.randn(2, 8), eps=eps)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (4, 0)])
def test_empty(shape, device):
    N = shape[-1]
    x, r = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(N, device=device, requires_grad=True) for _ in range(2))
    y, h = tkd_core.ops.layer_norm(x, w, b, residual=r)
    assert y.shape == h.shape == x.shape
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == r.grad.shape == x.shape
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0
    assert w.grad.shape == b.grad.shape == (N,)
    assert tkd_core.ops.layer_norm(x.detach()).shape == x.shape


def test_torch_compile_fullgraph(device):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def block(x, w, b, r):
        y, h = tkd_core.ops.layer_norm(x, w, b, residual=r)
        return torch.tanh(y) * 2 + h

    x, w, b, r = (t.requires_grad_() for t in make_inputs(3, 96, torch.float32, residual=True,
                                                          device=device))
    compiled = torch.compile(block, backend=capture, fullgraph=True)
    out = compiled(x, w, b, r)
    assert any("tkd.layer_norm_fwd" in g for g in graphs), graphs
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b, r), g)
    out_e = block(x, w, b, r)
    grads_e = torch.autograd.grad(out_e, (x, w, b, r), g)
    assert_close(out, out_e, 1e-6, "compiled output")
    for name, a, e in zip(("dx", "dw", "db", "dr"), grads, grads_e):
        assert_close(a, e, 1e-6, f"compiled {name}")


def test_reference_path_compiles_fullgraph(reference_backend):
    # the eager CPU path checks its statistics (a data-dependent branch); compiled, it always
    # takes the stable formula: same results, ordinary and ill-conditioned rows alike
    x, w, b, r = make_inputs(4, 96, torch.float32, residual=True)
    x[1] = 1e6 + torch.randn(96)
    x[2] = torch.randn(96) * 1e30

    def block(x, w, b, r):
        y, h = tkd_core.ops.layer_norm(x, w, b, residual=r)
        return y * 2, h

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, w, b, r), block(x, w, b, r)):
        assert_close(got, want, sum_tol(torch.float32, 96), "compiled reference path")


def test_aot_specs_cover_every_launch_config():
    labels = {s.label for s in ln.aot_specs()}
    for backward in (False, True):
        for cfg in {ln.config(N, backward) for N in range(1, 65537)}:
            for dtype in ("fp32", "fp16", "bf16"):
                label = (f"layer_norm_{'bwd' if backward else 'fwd'}"
                         f"{' chunked' if cfg.chunked else ''} BLOCK_N={cfg.block_n} "
                         f"ROWS={cfg.rows} {dtype}")
                assert label in labels and label + " res" in labels, label
