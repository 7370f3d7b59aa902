"""INT8 GEMM extension tkd_core._C: exactness (CPU AVX-512 VNNI, AVX2 and scalar), fused epilogue
(scale, bias, GELU / ReLU) against float64, per-token quantizer, Int8Linear accuracy, thread
invariance and the small-problem thread rule, input validation, quantize_model and its size rule,
and the CUDA kernel compiled standalone by nvcc (IMMA in the SASS, no local-memory spills).

Reference for the int32 results: a float64 matmul of the int8 values, which is exact here (every
partial sum is an integer of magnitude <= K * 128^2 < 2^53); `test_float64_reference_is_int64`
checks that against a true int64 matmul.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import assert_close, sqnr_db

import tkd_core
from tkd_core import int8 as G
from tkd_core.nn import Int8Linear

ROOT = os.path.join(os.path.dirname(__file__), "..")
CUDA_SRC = os.path.join(ROOT, "csrc", "int8_gemm_cuda.cu")
ARCHS = ("80", "86", "89", "90a")


def rand_i8(*shape, lo=-127, hi=127, device="cpu"):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, device=device)


def exact(a, b):
    return (a.double() @ b.double().T).long()  # exact: see the module docstring


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def scalar_isa():
    G.set_cpu_isa("scalar")
    yield
    G.set_cpu_isa("auto")


# ------------------------------------------------------------------------------------------
# exactness

def test_cpu_isa_is_detected():
    assert G.cpu_isa() in ("avx512vnni", "avx2", "scalar")
    import platform
    if platform.machine() == "x86_64":
        flags = set(re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M)[1].split())
        want = ("avx512vnni" if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
                <= flags else "avx2" if "avx2" in flags else "scalar")
        assert G.cpu_isa() == want


def test_float64_reference_is_int64():
    a, b = rand_i8(33, 4099, lo=-128), rand_i8(40, 4099, lo=-128)
    assert torch.equal(exact(a, b), a.long() @ b.long().T)


@pytest.mark.parametrize("M", [1, 2, 17, 64, 257])
@pytest.mark.parametrize("K", [1, 3, 16, 31, 768, 3072, 4099])
def test_exact_random(M, K, device):
    a = rand_i8(M, K, device=device)
    for N in (1, 5, 8, 768, 3072):
        b = rand_i8(N, K, device=device)
        out = tkd_core.ops.int8_gemm(a, b)
        assert out.dtype == torch.int32 and out.shape == (M, N)
        assert torch.equal(out.long(), exact(a, b)), f"M={M} K={K} N={N}"


@pytest.mark.parametrize("M,K,N", [(257, 4099, 768), (17, 3072, 5), (64, 31, 3072), (1, 4099, 8)])
def test_exact_extremes(M, K, N, device):
    """All-±127 operands: every vpmaddubsw pair of fbgemm's u8 x s8 route could saturate here."""
    def filled(rows, v):
        return torch.full((rows, K), v, dtype=torch.int8, device=device)

    for a, b in [
        (filled(M, 127), filled(N, 127)),
        (filled(M, -127), filled(N, 127)),
        (filled(M, -127), filled(N, -127)),
        (rand_i8(M, K, lo=0, hi=1, device=device) * 254 - 127,
         rand_i8(N, K, lo=0, hi=1, device=device) * 254 - 127),
    ]:
        a, b = a.to(torch.int8), b.to(torch.int8)
        assert torch.equal(tkd_core.ops.int8_gemm(a, b).long(), exact(a, b))
    full = tkd_core.ops.int8_gemm(filled(M, 127), filled(N, 127))
    assert (full == 127 * 127 * K).all()


def test_exact_with_minus_128(device):
    a, b = rand_i8(19, 1001, lo=-128, device=device), rand_i8(37, 1001, lo=-128, device=device)
    a[0], b[0] = -128, -128
    assert torch.equal(tkd_core.ops.int8_gemm(a, b).long(), exact(a, b))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 33, 21), (64, 768, 37), (13, 4099, 16)])
def test_exact_scalar_fallback(scalar_isa, M, K, N):
    assert G.cpu_isa() == "scalar"
    a, b = rand_i8(M, K), rand_i8(N, K)
    assert torch.equal(tkd_core.ops.int8_gemm(a, b).long(), exact(a, b))
    sa, sb, bias = torch.rand(M) + 0.5, torch.rand(N) + 0.5, torch.randn(N)
    y = tkd_core.ops.int8_gemm(a, b, sa, sb, bias)
    ref = exact(a, b).double() * sa.double()[:, None] * sb.double()[None, :] + bias.double()
    assert_close(y, ref, 1e-6, "scalar epilogue")
    x = torch.randn(M, K)
    q, s = tkd_core.ops.quantize_per_token(x)
    qr, sr = G.quantize_per_token_ref(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)


# ------------------------------------------------------------------------------------------
# fused epilogue

@pytest.mark.parametrize("M,K,N", [(1, 768, 768), (17, 31, 5), (257, 3072, 8), (64, 4099, 771)])
def test_epilogue_against_float64(M, K, N, device):
    a, b = rand_i8(M, K, device=device), rand_i8(N, K, device=device)
    acc = exact(a, b).double()
    sa, sb = torch.rand(M, device=device) * 0.1 + 1e-3, torch.rand(N, device=device) * 0.1 + 1e-3
    bias = torch.randn(N, device=device) * 50
    cases = [
        ((sa, sb, bias), acc * sa.double()[:, None] * sb.double()[None, :] + bias.double()),
        ((sa, sb, None), acc * sa.double()[:, None] * sb.double()[None, :]),
        ((0.02, torch.tensor(0.5, device=device), None), acc * 0.02 * 0.5),
        ((torch.tensor([0.3], device=device), sb, bias),
         acc * 0.3 * sb.double()[None, :] + bias.double()),
        ((None, None, bias), acc + bias.double()),
    ]
    for (a_s, b_s, bi), ref in cases:
        y = tkd_core.ops.int8_gemm(a, b, a_s, b_s, bi)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert_close(y, ref, 2e-7, "epilogue")  # float32 rounding of acc and of the products
        ref_t = G.int8_gemm_ref(a, b, a_s, b_s, bi)
        assert_close(ref_t, ref, 1e-7, "int8_gemm_ref")


def test_out_dtype(device):
    a, b = rand_i8(5, 64, device=device), rand_i8(7, 64, device=device)
    assert tkd_core.ops.int8_gemm(a, b, out_dtype=torch.int32).dtype == torch.int32
    assert tkd_core.ops.int8_gemm(a, b, 1.0, 1.0, out_dtype=torch.float32).dtype == torch.float32
    if device.type == "cuda":  # half outputs from the fused epilogue: CUDA only
        ref = exact(a, b).double() * 0.5
        for dt in (torch.float16, torch.bfloat16):
            y = tkd_core.ops.int8_gemm(a, b, 0.5, 1.0, out_dtype=dt)
            assert y.dtype == dt
            assert_close(y, ref, {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dt], str(dt))
    else:
        with pytest.raises(ValueError, match="out_dtype"):
            tkd_core.ops.int8_gemm(a, b, 1.0, 1.0, out_dtype=torch.float16)  # CUDA only
    with pytest.raises(ValueError, match="out_dtype"):
        tkd_core.ops.int8_gemm(a, b, out_dtype=torch.int8)


# ------------------------------------------------------------------------------------------
# per-token quantizer

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 5, 257), (64, 4099)])
def test_quantize_per_token(dtype, shape, device):
    x = (torch.randn(shape, device=device) * torch.rand(shape[:-1] + (1,), device=device)
         * 10).to(dtype)
    x.view(-1, shape[-1])[0, 0] = -x.view(-1, shape[-1])[0].abs().max() - 1  # hits -absmax
    q, s = tkd_core.ops.quantize_per_token(x)
    qr, sr = G.quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert q.min() >= -127 and q.view(-1, shape[-1])[0, 0] == -127
    xf = x.double()
    assert torch.allclose(s.double(), xf.abs().amax(-1) / 127, rtol=1e-6)
    err = (q.double() * s.double()[..., None] - xf).abs()
    assert (err <= s.double()[..., None] / 2 * (1 + 1e-5)).all()  # round to nearest


def test_quantize_zero_row_and_noncontiguous(device):
    x = torch.randn(6, 40, device=device)
    x[2] = 0
    q, s = tkd_core.ops.quantize_per_token(x)
    assert torch.isfinite(s).all() and s[2] > 0 and (q[2] == 0).all()
    xt = torch.randn(40, 6, device=device).T  # (6, 40) with a non-unit last stride
    q, s = tkd_core.ops.quantize_per_token(xt)
    qr, sr = G.quantize_per_token_ref(xt.contiguous())
    assert torch.equal(q, qr) and torch.equal(s, sr)
    with pytest.raises(TypeError, match="x must have dtype"):
        tkd_core.ops.quantize_per_token(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="last dimension"):
        tkd_core.ops.quantize_per_token(torch.ones(3, 0))


CPU_ISAS = ["avx512vnni", "avx2", "scalar"]


def pytest_generate_tests(metafunc):
    if "isa" in metafunc.fixturenames:
        cuda = metafunc.config.getoption("--device") == "cuda"
        metafunc.parametrize("isa", ["cuda"] if cuda else CPU_ISAS, indirect=True)


def _force_isa(name):
    """Force a CPU kernel for weights packed from now on; skip where the CPU lacks it."""
    if G.set_cpu_isa("auto" if name == "avx512vnni" else name) != name:
        G.set_cpu_isa("auto")
        pytest.skip(f"this CPU has no {name}")


@pytest.fixture
def isa(request, device):
    """Every kernel of the device: on CPU each ISA the CPU has, on CUDA its own."""
    if request.param == "cuda":
        yield "cuda"
        return
    _force_isa(request.param)
    yield request.param
    G.set_cpu_isa("auto")


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 257, 4099), (257, 4099, 7), (1, 4099, 257),
                                   (64, 384, 65)])
def test_exact_every_isa(isa, M, K, N, device):
    """Every kernel exact on awkward shapes: partial tiles in M (6) and N (16 / 64), K not a
    multiple of the k group (2 / 4), the extreme -128 in both operands."""
    a, b = rand_i8(M, K, lo=-128, device=device), rand_i8(N, K, lo=-128, device=device)
    a[0, : K // 2], b[-1, K // 3:] = -128, -128
    assert torch.equal(tkd_core.ops.int8_gemm(a, b).long(), exact(a, b))


def test_vnni_biased_accumulator_wraps_exactly():
    """The VNNI kernel accumulates (a + 128) b, which leaves int32 past K ~ 65800 at these values;
    the epilogue's correction wraps back: exact wherever C itself fits in int32."""
    _force_isa("avx512vnni")
    try:
        K = G.K_MAX
        for va, vb in ((127, 127), (-128, -128), (127, -128), (-127, 127)):
            a = torch.full((7, K), va, dtype=torch.int8)
            b = torch.full((3, K), vb, dtype=torch.int8)
            out = tkd_core.ops.int8_gemm(a, b)
            assert (out.long() == va * vb * K).all(), (va, vb)
    finally:
        G.set_cpu_isa("auto")


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("K", [196, 768, 771])
@pytest.mark.parametrize("M", [5, 257, 700])
def test_vnni_rows_in_place_and_copied(threads, nthreads, M, K):
    """The VNNI kernel reads int8 rows in place (unit k stride, K % 4 == 0: any row stride, any
    byte offset) and copies the others (K % 4 != 0, zero-padded); the row sums of the correction
    take whole 64-byte vectors, an odd one and a masked tail (K = 196: 3 x 64 + 4, K = 771:
    12 x 64 + 3 + zero padding to 772), on the row-block path (M past
    2 row blocks at 2 threads, every M at 1) and the few-rows path (M = 5 at 2 threads: B panels
    split); the dynamic linear quantizes rows into the same blocks. Exact against int64 and the
    same results at 1 and 2 threads."""
    _force_isa("avx512vnni")
    torch.set_num_threads(nthreads)
    try:
        wide = rand_i8(M, K + 13, lo=-128)
        a = wide[:, 5:5 + K]  # row stride K + 13, rows start at odd byte offsets
        a[0], a[-1, : K // 2] = -128, 127
        b = rand_i8(515, K, lo=-128)
        assert torch.equal(tkd_core.ops.int8_gemm(a, b).long(), exact(a, b))
        assert torch.equal(tkd_core.ops.int8_gemm(a.contiguous(), b).long(), exact(a, b))
        sa, sb, bias = torch.rand(M) + 0.5, torch.rand(515) + 0.5, torch.randn(515)
        y = tkd_core.ops.int8_gemm(a, b, sa, sb, bias)
        ref = exact(a, b).double() * sa.double()[:, None] * sb.double()[None, :] + bias.double()
        assert_close(y, ref, 1e-6, f"epilogue M={M} K={K}")
        lin = Int8Linear.from_float(torch.nn.Linear(K, 515))
        x = torch.randn(M, K)
        q, s = G.quantize_per_token_ref(x)
        with torch.no_grad():
            y = lin(x)
        acc = exact(q, lin.weight).double()
        ref = acc * s.double()[:, None] * lin.weight_scale.double()[None, :] + lin.bias.double()
        assert_close(y, ref, 1e-6, f"dynamic linear M={M} K={K}")
    finally:
        G.set_cpu_isa("auto")


ACTS = ["gelu", "gelu_tanh", "relu"]


@pytest.mark.parametrize("M,K,N", [(1, 7, 1), (7, 1, 257), (257, 257, 7), (13, 4099, 4099),
                                   (4099, 7, 65)])
def test_activation_epilogue_against_float64(isa, M, K, N, device):
    """act(acc * s_a * s_w + bias) fused into the epilogue against float64 on the exact int64
    accumulator. Error budget: float32 rounding of the epilogue (a few ulp of |y|, as the plain
    epilogue) plus the activation's own approximation (erf: < 4e-7 absolute, times |y| / 2)."""
    a, b = rand_i8(M, K, device=device), rand_i8(N, K, device=device)
    acc = exact(a, b).double()
    # scales that put the pre-activations across GELU's whole shape (|y| up to ~8)
    sa = (torch.rand(M, device=device) + 0.5) * 4 / (127 * 127 * max(K, 1) ** 0.5)
    sb = torch.rand(N, device=device) + 0.5
    bias = torch.randn(N, device=device)
    pre = acc * sa.double()[:, None] * sb.double()[None, :] + bias.double()
    for act in ACTS:
        y = tkd_core.ops.int8_gemm(a, b, sa, sb, bias, activation=act)
        ref = G.activation_ref(pre, G.activation_code(act))
        assert y.dtype == torch.float32 and y.shape == (M, N)
        err = (y.double() - ref).abs()
        tol = 8 * 2.0 ** -24 * (pre.abs() + bias.double().abs() + 1) + 4e-7 * pre.abs()
        assert (err <= tol).all(), f"{act}: max excess {(err - tol).max().item():.3g}"
    assert torch.equal(G.int8_gemm_ref(a, b, sa, sb, bias, activation="gelu"),
                       G.activation_ref(pre, 1).float())


@pytest.mark.parametrize("act", ACTS)
def test_vector_activation_against_float64(act):
    """The epilogue's activation alone on a dense grid, incl. the tails and erf's clamp at 4."""
    x = torch.cat([torch.linspace(-12, 12, 200001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    code = G.activation_code(act)
    ref = G.activation_ref(x.double(), code)
    for isa in (2, 0):
        y = x.clone()
        G._ext().activation(y.data_ptr(), y.numel(), code, isa)
        err = (y.double() - ref).abs()
        assert (err <= 2.0 ** -22 * ref.abs() + 4e-7 * x.double().abs() + 1e-30).all(), \
            (act, isa, err.max().item())
    y = torch.tensor([float("nan")] * 3)
    G._ext().activation(y.data_ptr(), 3, code, 2)
    assert torch.isnan(y).all()  # a NaN token stays NaN through every activation


@pytest.mark.parametrize("act", ACTS + [None])
def test_int8_linear_activation(act, device):
    """Int8Linear(activation=...) = act(Int8Linear(x)) to float32 rounding, on every path."""
    lin = torch.nn.Linear(257, 4099 if device.type == "cpu" else 512, device=device)
    x = torch.randn(7, 3, 257, device=device)
    with torch.no_grad():
        plain = Int8Linear.from_float(lin)
        fused = Int8Linear.from_float(lin, activation=act)
        ref = G.activation_ref(plain(x).double(), G.activation_code(act))
        y = fused(x)
    assert y.shape == (7, 3, lin.out_features)
    assert ("activation" in repr(fused)) == (act is not None)
    assert_close(y, ref, 1e-6, f"fused {act}")


def non_finite_rows(M, K, dtype, device):
    """(x (M, K), bad (M,) bool): rows 0-3 hold NaN / +inf / -inf at the start, the middle (the
    16-wide vector loop) and the last column (the scalar tail), the other rows are finite."""
    x = (torch.randn(M, K, device=device) * 3).to(dtype)
    x[0, 0] = float("nan")
    x[1, K - 1] = float("inf")
    x[2, K // 2] = -float("inf")
    x[3, K // 2] = float("nan")
    x[3, K - 1] = float("inf")
    bad = torch.zeros(M, dtype=torch.bool, device=device)
    bad[:4] = True
    return x, bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [5, 37, 4099])
def test_non_finite_rows_quantize_to_nan_scale(isa, dtype, K, device):
    x, bad = non_finite_rows(7, K, dtype, device)
    q, s = tkd_core.ops.quantize_per_token(x)
    qr, sr = G.quantize_per_token_ref(x)
    assert torch.isnan(s[bad]).all() and (q[bad] == 0).all(), (isa, s, q[bad].abs().max())
    assert torch.isfinite(s[~bad]).all()
    assert torch.equal(q, qr) and torch.equal(s.isnan(), sr.isnan())
    assert torch.equal(s[~bad], sr[~bad])
    # the finite rows are quantized as if alone
    q1, s1 = tkd_core.ops.quantize_per_token(x[~bad])
    assert torch.equal(q[~bad], q1) and torch.equal(s[~bad], s1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(7, 5, 3), (257, 37, 7), (9, 4099, 16)])
def test_non_finite_tokens_give_nan_rows_in_int8_linear(isa, dtype, M, K, N, device):
    lin = torch.nn.Linear(K, N, device=device)
    q = Int8Linear.from_float(lin)
    x, bad = non_finite_rows(M, K, dtype, device)
    with torch.no_grad():
        y, ref = q(x), lin.to(dtype)(x)
        alone = q(x[~bad])
    assert (~torch.isfinite(ref[bad])).all()  # nn.Linear: NaN or +-inf in every bad row
    assert torch.isnan(y[bad]).all(), "a token with NaN/inf must not give finite outputs"
    assert torch.isfinite(y[~bad]).all() and torch.equal(y[~bad], alone)
    # the GEMM's epilogue propagates a NaN per-token scale by itself
    a, w = rand_i8(M, K, device=device), rand_i8(N, K, device=device)
    sa = torch.rand(M, device=device) + 0.5
    sa[bad] = float("nan")
    sb, bias = torch.rand(N, device=device) + 0.5, torch.randn(N, device=device)
    out = tkd_core.ops.int8_gemm(a, w, sa, sb, bias)
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()


def test_non_finite_weight_channel_gives_nan_column(device):
    lin = torch.nn.Linear(37, 5, device=device)
    with torch.no_grad():
        lin.weight[2, 7] = float("nan")
        q = Int8Linear.from_float(lin)
        y = q(torch.randn(4, 37, device=device))
    assert torch.isnan(q.weight_scale[2]) and (q.weight[2] == 0).all()
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, [0, 1, 3, 4]]).all()


# ------------------------------------------------------------------------------------------
# threads, quantize_model (Int8Linear itself: tests/test_nn.py)

# (2105, 2000, 37): packed A > 8 MiB, so 1 thread takes the row-block path too (a 5-row last panel)
@pytest.mark.parametrize("M,K,N", [(131, 1000, 515), (2105, 2000, 37)])
def test_same_result_at_1_and_2_threads(threads, M, K, N):
    a, b = rand_i8(M, K), rand_i8(N, K)
    sa, sb, bias = torch.rand(M), torch.rand(N), torch.randn(N)
    lin = Int8Linear.from_float(torch.nn.Linear(K, N))
    x = torch.randn(M, K)
    assert torch.equal(tkd_core.ops.int8_gemm(a, b).long(), exact(a, b))
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        with torch.no_grad():
            outs.append((tkd_core.ops.int8_gemm(a, b), tkd_core.ops.int8_gemm(a, b, sa, sb, bias),
                         lin(x), tkd_core.ops.quantize_per_token(x)[0]))
    for o1, o2 in zip(*outs):
        assert torch.equal(o1, o2)


def test_quantize_model():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()),
                                torch.nn.Linear(64, 3))
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
    report = tkd_core.quantize_model(model, skip=["3"], min_weights=0)
    assert [n for n, _, _ in report.converted] == ["0", "2.0"]
    assert report.skipped == [("3", "matched skip")]
    assert "converted 2" in str(report)
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    assert type(model[3]) is torch.nn.Linear
    with torch.no_grad():
        assert sqnr_db(model(x), ref) > 25
    mha = tkd_core.nn.MultiHeadAttention(32, 4)
    r2 = tkd_core.quantize_model(mha, skip=lambda name, m: name == "out", min_weights=0)
    assert [n for n, _, _ in r2.converted] == ["qkv"] and isinstance(mha.qkv, Int8Linear)
    with pytest.raises(TypeError, match="from_float"):
        tkd_core.quantize_model(torch.nn.Linear(4, 4))


def test_quantize_model_size_rule():
    """Layers below min_weights stay float (INT8 would make them slower), and the report says
    which and why; the rule is on weight counts only, decided without timing anything."""
    assert G.MIN_INT8_WEIGHTS == 16384
    assert G.int8_pays(128, 128) and G.int8_pays(64, 256) and not G.int8_pays(64, 255)
    assert G.int8_pays(384, 1536) and G.int8_pays(1, 1, min_weights=0)
    # the default run's 2-layer student (hidden 64, FFN 256): the FFN converts, the attention
    # projections (64 x 192, 64 x 64) stay float
    from tkd_core.models import ModelConfig, build_model
    student = build_model(ModelConfig.preset("cpu-student-2", vocab_size=100))
    rep = tkd_core.quantize_model(student, skip=("pooler", "classifier"))
    assert [n for n, _, _ in rep.converted] == [f"layers.{i}.ffn.{p}" for i in (0, 1)
                                                 for p in ("up", "down")]
    assert rep.too_small == [f"layers.{i}.attn.{p}" for i in (0, 1) for p in ("qkv", "out")]
    assert "too small for INT8 to pay: 64 x 64 = 4,096 weights < min_weights 16,384" in str(rep)
    # MiniLM's shapes all convert; a custom threshold moves the line
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384),
                                torch.nn.Linear(384, 2))
    rep = tkd_core.quantize_model(model)
    assert [n for n, _, _ in rep.converted] == ["0", "1"] and rep.too_small == ["2"]
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    rep = tkd_core.quantize_model(model, min_weights=4096)
    assert [n for n, _, _ in rep.converted] == ["0"] and rep.min_weights == 4096
    with pytest.raises(ValueError, match="min_weights"):
        tkd_core.quantize_model(model, min_weights=-1)


@pytest.mark.parametrize("M,N,K,T,want", [(1, 64, 64, 2, 1), (64, 384, 384, 2, 2),
                                          (16, 64, 256, 2, 1), (4096, 768, 768, 8, 8),
                                          (64, 64, 256, 4, 1), (0, 5, 5, 2, 1)])
def test_small_problems_run_on_fewer_threads(M, N, K, T, want):
    """The thread rule: about 1 M multiply-adds per thread at least (a decision, not a timing)."""
    assert G._ext().gemm_threads(M, N, K, T) == want


# ------------------------------------------------------------------------------------------
# bad input

def test_bad_inputs():
    a, b = rand_i8(4, 16), rand_i8(5, 16)
    with pytest.raises(TypeError, match="a must have dtype"):
        tkd_core.ops.int8_gemm(a.float(), b)
    with pytest.raises(TypeError, match="b must have dtype"):
        tkd_core.ops.int8_gemm(a, b.to(torch.int16))
    with pytest.raises(ValueError, match="K mismatch"):
        tkd_core.ops.int8_gemm(a, rand_i8(5, 17))
    with pytest.raises(ValueError, match="b must be 2-D"):
        tkd_core.ops.int8_gemm(a, rand_i8(5, 16, 1))
    with pytest.raises(ValueError, match=r"a_scale must be a scalar or have shape \(4,\)"):
        tkd_core.ops.int8_gemm(a, b, torch.ones(5), torch.ones(5))
    with pytest.raises(ValueError, match=r"b_scale must be a scalar or have shape \(5,\)"):
        tkd_core.ops.int8_gemm(a, b, torch.ones(4), torch.ones(4, 5))
    with pytest.raises(TypeError, match="a_scale must be a floating-point"):
        tkd_core.ops.int8_gemm(a, b, torch.ones(4, dtype=torch.int32), torch.ones(5))
    with pytest.raises(ValueError, match="bias"):
        tkd_core.ops.int8_gemm(a, b, torch.ones(4), torch.ones(5), torch.ones(4))
    with pytest.raises(ValueError, match="K=200000"):
        tkd_core.ops.int8_gemm(rand_i8(1, 200000), rand_i8(1, 200000))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 257, 4099), (257, 4099, 7), (64, 768, 771)])
def test_packed_gemm_with_and_without_out(threads, M, K, N):
    """int8_gemm_packed (the weight packed once) equals the int64 product, and its float
    epilogue float64, into a new tensor and into out= (poisoned first; a row-strided view of
    a wider buffer, whose other columns stay untouched), on 1 and 2 threads."""
    a, b = rand_i8(M, K), rand_i8(N, K)
    w = G.pack_weight(b)
    ref = exact(a, b)
    sa, sb = torch.rand(M) * 0.1 + 1e-3, torch.rand(N) * 0.1 + 1e-3
    bias = torch.randn(N) * 50
    ref_f = ref.double() * sa.double()[:, None] * sb.double()[None, :] + bias.double()
    for n in (1, 2):
        torch.set_num_threads(n)
        assert torch.equal(G.int8_gemm_packed(a, w).long(), ref)
        wide = torch.full((M, N + 5), torch.iinfo(torch.int32).min, dtype=torch.int32)
        out = wide[:, 2:2 + N]
        assert G.int8_gemm_packed(a, w, out=out) is out
        assert torch.equal(out.long(), ref)
        assert (wide[:, :2] == torch.iinfo(torch.int32).min).all() and (
            wide[:, 2 + N:] == torch.iinfo(torch.int32).min).all()
        out_f = torch.full((M, N), float("nan"))
        y = G.int8_gemm_packed(a, w, sa, sb, bias, activation="gelu", out=out_f)
        assert y is out_f
        # elementwise, as test_activation_epilogue_against_float64 (|ref_f| + |bias| bounds the
        # product too): a pre-activation far below zero gives GELU ~1e-15 in float64 and 0 in
        # float32 (a whole-tensor relative error of 1 when M = N = 1)
        err = (y.double() - G.activation_ref(ref_f, G.activation_code("gelu"))).abs()
        tol = 8 * 2.0 ** -24 * (ref_f.abs() + bias.double().abs() + 1) + 4e-7 * ref_f.abs()
        assert (err <= tol).all(), f"gelu out=: max excess {(err - tol).max().item():.3g}"
        # elementwise too: at M = N = 1 the product and the bias can cancel, and float32
        # rounding is relative to them, not to their small sum
        err = (G.int8_gemm_packed(a, w, sa, sb, bias).double() - ref_f).abs()
        assert (err <= 8 * 2.0 ** -24 * (ref_f.abs() + bias.double().abs())).all(), "epilogue"


def test_packed_gemm_bad_out():
    a, b = rand_i8(4, 16), rand_i8(5, 16)
    w = G.pack_weight(b)
    with pytest.raises(TypeError, match=r"out must have dtype in \(int32\)"):
        G.int8_gemm_packed(a, w, out=torch.empty(4, 5))
    with pytest.raises(TypeError, match=r"out must have dtype in \(float32\)"):
        G.int8_gemm_packed(a, w, 1.0, 1.0, out=torch.empty(4, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"out must have shape \(M, N\) = \(4, 5\)"):
        G.int8_gemm_packed(a, w, out=torch.empty(5, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="unit stride along its rows"):
        G.int8_gemm_packed(a, w, out=torch.empty(5, 4, dtype=torch.int32).T)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        G.int8_gemm_packed(a, w, out=[[0] * 5] * 4)
    out = torch.empty(4, 5)
    with pytest.raises(ValueError, match="out overlaps bias"):
        G.int8_gemm_packed(a, w, 1.0, 1.0, bias=out[1], out=out)
    with pytest.raises(ValueError, match="out overlaps a_scale"):
        G.int8_gemm_packed(a, w, out[:, 0], 1.0, out=out)
    buf = torch.zeros(64, dtype=torch.int32)
    a_in = buf.view(torch.int8)[:64].view(4, 16)  # a's bytes are out's first 16 int32 slots
    with pytest.raises(ValueError, match="out overlaps a"):
        G.int8_gemm_packed(a_in, w, out=buf[:20].view(4, 5))


def test_noncontiguous_inputs_are_handled(device):
    a_t = rand_i8(300, 37, device=device).T  # (37, 300), strides (1, 37)
    b_s = rand_i8(20, 600, device=device)[::2, ::2]  # (10, 300), strides (1200, 2)
    assert not a_t.is_contiguous() and not b_s.is_contiguous()
    assert torch.equal(tkd_core.ops.int8_gemm(a_t, b_s).long(), exact(a_t, b_s))
    sa = (torch.rand(74, device=device) + 0.1)[::2]
    y = tkd_core.ops.int8_gemm(a_t, b_s, sa, 0.5)
    assert_close(y, exact(a_t, b_s).double() * sa.double()[:, None] * 0.5, 2e-7, "strided")


def test_empty_and_k0(device):
    def i8(*shape):
        return rand_i8(*shape, device=device)

    for M, N in [(0, 5), (4, 0), (0, 0)]:
        out = tkd_core.ops.int8_gemm(i8(M, 16), i8(N, 16))
        assert out.shape == (M, N) and out.dtype == torch.int32
        ones = torch.ones(M + N, device=device)
        y = tkd_core.ops.int8_gemm(i8(M, 16), i8(N, 16), ones[:M], ones[M:])
        assert y.shape == (M, N) and y.dtype == torch.float32
    out = tkd_core.ops.int8_gemm(i8(3, 0), i8(4, 0))
    assert torch.equal(out, torch.zeros(3, 4, dtype=torch.int32, device=device))
    bias = torch.randn(4, device=device)
    assert torch.equal(tkd_core.ops.int8_gemm(i8(3, 0), i8(4, 0), 1.0, 1.0, bias),
                       bias.expand(3, 4))
    lin = Int8Linear.from_float(torch.nn.Linear(8, 3, device=device))
    with torch.no_grad():
        assert lin(torch.randn(0, 8, device=device)).shape == (0, 3)


class _FakeCuda(torch.Tensor):
    """A CPU tensor that claims to live on CUDA: reaches the CUDA branch on a CPU-only torch."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.skipif(G.cuda_built(), reason="this build has the CUDA kernel")
def test_cuda_tensors_on_cpu_only_build():
    a, b = rand_i8(4, 16).as_subclass(_FakeCuda), rand_i8(5, 16).as_subclass(_FakeCuda)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        tkd_core.ops.int8_gemm(a, b)


# ------------------------------------------------------------------------------------------
# build configuration and the CUDA kernel compiled standalone

def _build_ext():
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    try:
        import build_ext
    finally:
        sys.path.pop(0)
    return build_ext


def test_build_config(monkeypatch):
    be = _build_ext()
    monkeypatch.delenv("TKD_CUDA_ARCHS", raising=False)
    assert be.cuda_archs() == ["80", "86", "89", "90a"]
    monkeypatch.setenv("TKD_CUDA_ARCHS", "sm_80, 90a")
    assert be.cuda_archs() == ["80", "90a"]
    assert be.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("TKD_CUDA_ARCHS", "ampere")
    with pytest.raises(ValueError, match="TKD_CUDA_ARCHS"):
        be.cuda_archs()
    monkeypatch.delenv("TKD_WITH_CUDA", raising=False)
    if torch.version.cuda is None:  # this torch is a CPU build: the CUDA part is not built
        assert be.installed_torch_cuda() is None
        nvcc, why = be.want_cuda()
        assert nvcc is None and why
        assert not G.cuda_built()


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.fixture(scope="module")
def cuda_fatbin(tmp_path_factory):
    """The CUDA source compiled once by nvcc for every architecture, in one call."""
    nvcc = _build_ext().find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = str(tmp_path_factory.mktemp("cuda") / "int8_gemm.fatbin")
    cmd = [nvcc, "-fatbin", "-O3", "-std=c++17", CUDA_SRC, "-o", out,
           *_build_ext().gencode_flags(ARCHS)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed:\n{res.stderr[-3000:]}"
    return out


def test_cuda_kernel_compiles_with_imma_and_no_spills(cuda_fatbin):
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", cuda_fatbin],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([_cuobjdump(), "-sass", cuda_fatbin],
                          capture_output=True, text=True, check=True).stdout
    for arch in ARCHS:
        # per-architecture section of the resource report
        sec = re.search(rf"arch = sm_{arch}\n(.*?)(?=arch = sm_|\Z)", usage, re.S)
        assert sec, f"no sm_{arch} code in the fatbin"
        funcs = re.findall(r"Function (\S*int8_gemm_kernel\S*):\s*\n\s*REG:(\d+) STACK:(\d+) "
                           r"SHARED:\d+ LOCAL:(\d+)", sec.group(1))
        assert len(funcs) == 4, f"sm_{arch}: expected 4 kernel variants, got {funcs}"
        for name, regs, stack, local in funcs:
            assert int(local) == 0 and int(stack) == 0, f"sm_{arch} {name} spills: LOCAL={local}"
            assert int(regs) <= 255
        ssec = re.search(rf"arch = sm_{arch}\n(.*?)(?=arch = sm_|\Z)", sass, re.S)
        assert ssec and "IMMA.16832.S8.S8" in ssec.group(1), f"sm_{arch}: no IMMA in the SASS"


def test_registered_custom_ops():
    a, b = rand_i8(5, 40), rand_i8(7, 40)
    sa, sb, bias = torch.rand(5), torch.rand(7), torch.randn(7)
    torch.library.opcheck(torch.ops.tkd.int8_gemm.default, (a, b, sa, sb, bias, None))
    torch.library.opcheck(torch.ops.tkd.int8_gemm.default, (a, b, None, None, None, None))
    torch.library.opcheck(torch.ops.tkd.quantize_per_token.default, (torch.randn(3, 4, 40),))
