"""kd_loss: the fused Triton kernels (in Triton's interpreter, or compiled with --device cuda)
and the torch reference path, against an independent float64 reference with autograd for the
student gradient."""
import itertools

import pytest
import torch

import tkd_core
from tkd_core.kernels import kd_loss as kd
from tkd_core.kernels import utils
from helpers import DTYPES, assert_close

# The loss is accumulated in fp32 from the exact input values: fp32-level error for every dtype.
LOSS_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# The gradient is stored in the logits' dtype and rounded twice (forward, then x grad_output).
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
IGNORE = -100


# ------------------------------------------------------------------------------------------
# float64 reference (independent of kernels/kd_loss.py: logsumexp + gather for the CE term)
# ------------------------------------------------------------------------------------------

def ref64(s, t, labels, T, alpha, ignore_index=IGNORE, reduction="mean"):
    s, t = s.double(), t.double()
    log_ps = torch.log_softmax(s / T, dim=-1)
    log_pt = torch.log_softmax(t / T, dim=-1)
    pt = log_pt.exp()
    kl = T * T * torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    if labels is None:
        rows, count = kl, s.shape[0]
    else:
        keep = labels != ignore_index
        safe = torch.where(keep, labels, 0).long()
        ce = torch.logsumexp(s, dim=-1) - s.gather(1, safe[:, None]).squeeze(1)
        rows = torch.where(keep, alpha * kl + (1 - alpha) * ce, torch.zeros_like(kl))
        count = int(keep.sum())
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(count, 1)


def magnitude64(s, t, labels, T, alpha, ignore_index=IGNORE, reduction="mean"):
    """The size of the terms whose difference is the loss, reduced like the loss.

    KL = sum p_t (t - s)/T - lse(t/T) + lse(s/T): when student and teacher nearly agree these
    O(1) terms cancel to a tiny KL, and fp32 arithmetic on them leaves an absolute error of a
    few eps32 x their size. The loss check allows that much on top of its relative tolerance.
    """
    s, t = s.detach().double(), t.detach().double()
    pt = torch.softmax(t / T, dim=-1)
    d = torch.where(pt > 0, pt * ((t - s) / T).nan_to_num(0).abs(), torch.zeros_like(pt)).sum(-1)
    lse = lambda x: torch.logsumexp(x, -1).nan_to_num(0).abs()  # noqa: E731
    rows = T * T * (d + lse(t / T) + lse(s / T))
    if labels is not None:
        keep = labels != ignore_index
        ce = lse(s) + s.gather(1, torch.where(keep, labels, 0).long()[:, None]).squeeze(1).abs()
        rows = torch.where(keep, alpha * rows + (1 - alpha) * ce, torch.zeros_like(rows))
        count = int(keep.sum())
    else:
        count = s.shape[0]
    if reduction == "none":
        return rows
    return rows.sum() / (max(count, 1) if reduction == "mean" else 1)


def assert_loss_close(loss, ref, mag, tol, what):
    """|loss - ref| <= tol |ref| + 8 eps32 x the cancelling terms' size, elementwise."""
    err = (loss.detach().double() - ref.detach()).abs()
    bound = tol * ref.detach().abs() + 8 * torch.finfo(torch.float32).eps * mag
    assert torch.isfinite(loss).all(), f"{what}: non-finite loss"
    assert (err <= bound).all(), (f"{what}: error {err.max().item():.3e} over bound "
                                  f"{bound.min().item():.3e} (relative tolerance {tol:.1e})")


def grad_magnitude64(s, t, labels, T, alpha, go, ignore_index=IGNORE, reduction="mean"):
    """Size of the terms whose difference is d loss / d s, elementwise (see magnitude64):
    T (p_s + p_t) for the soft term, p_s + onehot for the hard one, times the upstream grad."""
    s, t = s.detach().double(), t.detach().double()
    soft = T * (torch.softmax(s / T, -1) + torch.softmax(t / T, -1))
    rows = torch.ones(s.shape[0], dtype=torch.float64, device=s.device)
    if labels is not None:
        keep = labels != ignore_index
        hard = torch.softmax(s, -1) + 1.0
        soft = torch.where(keep[:, None], alpha * soft + (1 - alpha) * hard, torch.zeros_like(s))
        rows = keep.double()
    count = max(int(rows.sum()), 1)
    g = go.detach().double().abs()
    g = g[:, None] if reduction == "none" else g / (count if reduction == "mean" else 1)
    return soft * g


def make_labels(N, V, mode, device="cpu"):
    """'kept': random labels; 'some': every third row ignored; 'all': every row ignored; None."""
    if mode is None:
        return None
    y = torch.randint(0, V, (N,), device=device)
    if mode == "all":
        y[:] = IGNORE
    elif mode == "some":
        y[::3] = IGNORE
    return y


def grad_output_like(loss):
    # not ones: a random scalar, or random per-row values for "none"
    return torch.rand_like(loss) * 2 + 0.5


def run_and_check(N, V, dtype, label_mode, reduction, T, alpha, scale=3.0, device="cpu"):
    s = (torch.randn(N, V, device=device) * scale).to(dtype)
    t = (torch.randn(N, V, device=device) * scale).to(dtype)
    y = make_labels(N, V, label_mode, device)
    s_ours = s.clone().requires_grad_()
    loss = tkd_core.ops.kd_loss(s_ours, t, y, temperature=T, alpha=alpha, reduction=reduction)
    assert loss.dtype == torch.float32
    go = grad_output_like(loss)
    loss.backward(go)

    s64 = s.double().requires_grad_()
    ref = ref64(s64, t, y, T, alpha, reduction=reduction)
    ref.backward(go.double())
    what = f"N={N} V={V} {dtype} labels={label_mode} {reduction} T={T} alpha={alpha}"
    mag = magnitude64(s, t, y, T, alpha, reduction=reduction)
    assert_loss_close(loss, ref, mag, LOSS_TOL[dtype], f"loss {what}")
    assert s_ours.grad.dtype == dtype
    gmag = grad_magnitude64(s, t, y, T, alpha, go, reduction=reduction)
    err = (s_ours.grad.double() - s64.grad).abs()
    bound = (GRAD_TOL[dtype] * s64.grad.abs().max()
             + 8 * torch.finfo(torch.float32).eps * gmag)
    assert torch.isfinite(s_ours.grad).all(), f"grad {what}: non-finite"
    assert (err <= bound).all(), (f"grad {what}: error {err.max().item():.3e} over bound "
                                  f"(relative tolerance {GRAD_TOL[dtype]:.1e})")
    return loss, s_ours.grad


# ------------------------------------------------------------------------------------------
# Interpreter path: sweep
# ------------------------------------------------------------------------------------------

# (3, 9): first V past the tiny bucket (64 rows x 8 columns per program); 257 = 4 x 64 + 1 rows
SHAPES = ([(n, v) for n in (1, 3) for v in (1, 2, 7, 768, 1000, 4099)]
          + [(3, 9), (257, 2), (257, 7), (2, 32000)])
LABEL_MODES, REDUCTIONS = ("some", None, "kept", "all"), ("mean", "sum", "none")
TEMPS, ALPHAS = (1.0, 2.0, 4.0, 1.5), (0.5, 0.0, 1.0, 0.3, 0.9)


def _sweep():
    """Every shape x dtype once, rotating labels / reduction / T / alpha over the sweep so that
    no knob is tied to one dtype (257 rows only with small V: the interpreter is slow)."""
    cases = []
    for k, (n, v) in enumerate(SHAPES):
        for d, dt in enumerate(DTYPES):
            mode = LABEL_MODES[(k + 2 * d) % 4]
            if mode == "all" and n * v > 1000:  # keep the large cases doing real work
                mode = "some"
            cases.append((n, v, dt, mode, REDUCTIONS[(k + d) % 3], TEMPS[(k + d) % 4],
                          ALPHAS[(2 * k + d) % 5]))
    return cases


SWEEP = _sweep()
COMBOS = list(itertools.product(("some", None, "all"), REDUCTIONS))


@pytest.mark.parametrize("N,V,dtype,label_mode,reduction,T,alpha", SWEEP)
def test_sweep_against_float64(N, V, dtype, label_mode, reduction, T, alpha, device):
    run_and_check(N, V, dtype, label_mode, reduction, T, alpha, device=device)


@pytest.mark.parametrize("label_mode,reduction", COMBOS)
def test_labels_and_reductions(label_mode, reduction, device):
    loss, grad = run_and_check(7, 300, torch.float32, label_mode, reduction, T=2.0, alpha=0.4,
                               device=device)
    if label_mode == "all":  # nothing counts: zero loss ("mean" is 0, not NaN), zero gradient
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


def test_largest_vocabulary_one_row(device):
    run_and_check(1, kd.MAX_V, torch.bfloat16, "kept", "sum", T=2.0, alpha=0.5, device=device)


def test_ignored_rows_have_zero_loss_and_grad_and_are_not_averaged(device):
    N, V = 5, 33
    s = torch.randn(N, V, device=device, requires_grad=True)
    t = torch.randn(N, V, device=device)
    y = torch.tensor([3, IGNORE, 0, IGNORE, 32], device=device)
    rows = tkd_core.ops.kd_loss(s, t, y, 2.0, 0.5, reduction="none")
    assert rows[1] == 0 and rows[3] == 0 and (rows[[0, 2, 4]] > 0).all()
    mean = tkd_core.ops.kd_loss(s, t, y, 2.0, 0.5, reduction="mean")
    assert_close(mean, rows.sum() / 3, 1e-6, "mean over the 3 counted rows")
    mean.backward()
    assert torch.count_nonzero(s.grad[[1, 3]]) == 0 and torch.count_nonzero(s.grad[[0, 2, 4]])


def test_no_labels_ignores_alpha(device):
    s, t = torch.randn(4, 50, device=device), torch.randn(4, 50, device=device)
    a = tkd_core.ops.kd_loss(s, t, None, 3.0, alpha=0.1)
    b = tkd_core.ops.kd_loss(s, t, None, 3.0, alpha=0.9)
    assert a == b
    assert_close(a, ref64(s, t, None, 3.0, 0.0), 1e-5, "T^2 KL alone")


def test_outputs_poisoned_then_fully_written(device):
    assert utils.poison_requested()  # conftest: every launcher buffer starts as NaN
    N, V = 6, 70
    s, t = torch.randn(N, V, device=device), torch.randn(N, V, device=device)
    y = make_labels(N, V, "some", device)
    rows, grad = kd.kd_loss_fwd(s, t, y, 2.0, 0.5, IGNORE, "none", compute_grad=True)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    out = kd.kd_loss_bwd(grad, torch.rand(N, device=device))
    assert torch.isfinite(out).all()
    loss, g = kd.kd_loss_fwd(s, t, y, 2.0, 0.5, IGNORE, "mean", compute_grad=False)
    assert torch.isfinite(loss) and g.numel() == 0  # no gradient work without requires_grad


def test_teacher_gets_no_gradient_and_retain_graph_is_repeatable(device):
    s = torch.randn(3, 20, device=device, requires_grad=True)
    t = torch.randn(3, 20, device=device, requires_grad=True)
    y = torch.tensor([1, 2, 3], device=device)
    loss = tkd_core.ops.kd_loss(s, t, y, 2.0, 0.5, reduction="sum")
    go = torch.tensor(0.7, device=device)
    loss.backward(go, retain_graph=True)
    g1 = s.grad.clone()
    loss.backward(go)  # the saved gradient was not scaled in place
    assert_close(s.grad, 2 * g1, 1e-6, "second backward")
    assert t.grad is None


def test_student_only_requires_grad_through_teacher_is_fine(device):
    s = torch.randn(3, 20, device=device)
    t = torch.randn(3, 20, device=device, requires_grad=True)
    loss = tkd_core.ops.kd_loss(s, t, None, 2.0)
    assert not loss.requires_grad and t.grad is None


def test_mixed_dtypes_noncontiguous_and_int32_labels(device):
    s = torch.randn(6, 20, dtype=torch.float16, device=device).T  # (20, 6), column stride 20
    t = torch.randn(20, 6, dtype=torch.float32, device=device)
    y = torch.randint(0, 6, (40,), dtype=torch.int32, device=device)[::2]  # strided int32
    loss = tkd_core.ops.kd_loss(s, t, y, 2.0, 0.5)  # computed in fp32: t is not rounded
    assert_close(loss, ref64(s, t, y, 2.0, 0.5), 1e-4, "fp16 student, fp32 teacher")
    s = torch.randn(20, 10, device=device)[:, 3:9].requires_grad_()  # row stride 10
    y = torch.randint(0, 6, (40,), device=device)[::2]  # strided int64 labels
    loss = tkd_core.ops.kd_loss(s, t, y, 2.0, 0.5, reduction="none")
    loss.sum().backward()
    s64 = s.detach().double().requires_grad_()
    ref64(s64, t, y, 2.0, 0.5, reduction="none").sum().backward()
    assert_close(loss, ref64(s, t, y, 2.0, 0.5, reduction="none"), 1e-5, "row-strided")
    assert_close(s.grad, s64.grad, 1e-5, "row-strided grad")


@pytest.mark.parametrize("student_dtype", [torch.float16, torch.bfloat16])
def test_fp32_teacher_is_not_rounded_to_a_half_student(path, device, student_dtype):
    """Teacher logits of 7e4 (fp32) with an fp16 student: cast to fp16 they were inf and the
    loss NaN. Mixed dtypes are computed in fp32; the gradient comes back in the student's dtype."""
    N, V = 5, 33
    s = torch.randn(N, V, device=device).to(student_dtype)
    t = torch.randn(N, V, device=device) * 3
    t[0, 4], t[1, 0], t[3, 32] = 7e4, -7e4, 1e5
    y = torch.tensor([4, 1, IGNORE, 32, 0], device=device)
    s_ours = s.clone().requires_grad_()
    loss = tkd_core.ops.kd_loss(s_ours, t, y, 2.0, 0.5, reduction="none")
    go = grad_output_like(loss)
    loss.backward(go)
    s64 = s.double().requires_grad_()
    ref = ref64(s64, t, y, 2.0, 0.5, reduction="none")
    ref.backward(go.double())
    assert torch.isfinite(loss).all() and torch.isfinite(s_ours.grad).all()
    assert s_ours.grad.dtype == student_dtype
    mag = magnitude64(s, t, y, 2.0, 0.5, reduction="none")
    assert_loss_close(loss, ref, mag, 1e-5, f"loss {student_dtype} {path}")
    assert_close(s_ours.grad, s64.grad, GRAD_TOL[student_dtype], f"grad {student_dtype} {path}")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(reduction, device):
    s = torch.randn(0, 10, device=device, requires_grad=True)
    loss = tkd_core.ops.kd_loss(s, torch.randn(0, 10, device=device),
                                torch.zeros(0, dtype=torch.long, device=device),
                                reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert s.grad.shape == (0, 10)


# ------------------------------------------------------------------------------------------
# Numerical stability: huge magnitudes, -inf masks
# ------------------------------------------------------------------------------------------

def stability_inputs(kind, N=4, V=300, dtype=torch.float32, device="cpu"):
    s, t = torch.randn(N, V, device=device), torch.randn(N, V, device=device)
    if kind == "1e4":
        s, t = s * 1e4, t * 1e4
    elif kind == "masked_both":  # masked classes: -inf in student and teacher at one place
        mask = torch.rand(N, V, device=device) < 0.3
        mask[:, :5] = False  # every row keeps a few classes (labels are drawn from them)
        s, t = s.masked_fill(mask, float("-inf")), t.masked_fill(mask, float("-inf"))
    elif kind == "masked_teacher":  # teacher -inf where the student is finite
        mask = torch.rand(N, V, device=device) < 0.3
        mask[:, :5] = False
        t = t.masked_fill(mask, float("-inf"))
    elif kind == "masked_tile":  # a whole column tile of -inf before any finite value
        V = 2 * kd.config(5000).block + 7
        s, t = torch.randn(N, V, device=device), torch.randn(N, V, device=device)
        s[:, :V - 9] = float("-inf")
        t[:, :V - 9] = float("-inf")
    lo, hi = (V - 5, V) if kind == "masked_tile" else (0, 5)
    return s.to(dtype), t.to(dtype), torch.randint(lo, hi, (N,), device=device)


@pytest.mark.parametrize("kind,dtype", [
    *itertools.product(["1e4", "masked_both", "masked_teacher"], DTYPES),
    ("masked_tile", torch.float32)])
def test_stability_finite_and_matches_reference(kind, dtype, device):
    s, t, y = stability_inputs(kind, dtype=dtype, device=device)
    for labels in (y, None):
        s_ours = s.clone().requires_grad_()
        loss = tkd_core.ops.kd_loss(s_ours, t, labels, 2.0, 0.7, reduction="none")
        go = grad_output_like(loss)
        loss.backward(go)
        assert torch.isfinite(loss).all() and torch.isfinite(s_ours.grad).all()
        s64 = s.double().requires_grad_()
        ref = ref64(s64, t, labels, 2.0, 0.7, reduction="none")
        ref.backward(go.double())
        assert torch.isfinite(ref).all() and torch.isfinite(s64.grad).all()
        # logits of 1e4 carry absolute rounding ~1e-3 into exp(): a looser tolerance
        tol = 1e-3 if kind == "1e4" else LOSS_TOL[dtype]
        assert_close(loss, ref, tol, f"loss {kind} {dtype}")
        assert_close(s_ours.grad, s64.grad, max(tol, GRAD_TOL[dtype]), f"grad {kind} {dtype}")


# ------------------------------------------------------------------------------------------
# Reference path (the fast CPU path)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_mode,reduction", [("some", "mean"), (None, "none"),
                                                  ("all", "mean"), ("some", "sum")])
def test_reference_path(reference_backend, label_mode, reduction):
    s = torch.randn(9, 101, dtype=torch.bfloat16)
    assert tkd_core.ops.backend(s) == "reference"
    t = torch.randn(9, 101, dtype=torch.bfloat16)
    y = make_labels(9, 101, label_mode)
    if reduction == "sum":
        y = y.int()  # int32 labels are accepted on both paths
    s_ours = s.clone().requires_grad_()
    loss = tkd_core.ops.kd_loss(s_ours, t, y, 2.0, 0.3, reduction=reduction)
    go = grad_output_like(loss)
    loss.backward(go)
    s64 = s.double().requires_grad_()
    ref = ref64(s64, t, y, 2.0, 0.3, reduction=reduction)
    ref.backward(go.double())
    assert_close(loss, ref, 1e-5, "reference loss")
    assert_close(s_ours.grad, s64.grad, GRAD_TOL[torch.bfloat16], "reference grad")


@pytest.mark.parametrize("kind", ["1e4", "masked_both", "masked_teacher"])
def test_reference_path_stability(reference_backend, kind):
    s, t, y = stability_inputs(kind)
    s = s.requires_grad_()
    loss = tkd_core.ops.kd_loss(s, t, y, 2.0, 0.7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    tol = 1e-3 if kind == "1e4" else 1e-5
    assert_close(loss, ref64(s, t, y, 2.0, 0.7), tol, f"reference {kind}")


def test_reference_path_rejects_bad_label(reference_backend):
    with pytest.raises(ValueError, match="labels must be in"):
        tkd_core.ops.kd_loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 5]))


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

def _bad_cases():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, IGNORE])
    return [
        (dict(teacher_logits=torch.randn(4, 11)), ValueError,
         "teacher_logits must have the shape"),
        (dict(student_logits=torch.randn(4, 10, 1), teacher_logits=torch.randn(4, 10, 1)),
         ValueError, "student_logits must be 2-D"),
        (dict(teacher_logits=torch.randn(40)), ValueError, "teacher_logits must be 2-D"),
        (dict(student_logits=torch.ones(4, 10, dtype=torch.int32)), TypeError,
         "student_logits must have dtype"),
        (dict(teacher_logits=torch.ones(4, 10, dtype=torch.int64)), TypeError,
         "teacher_logits must have dtype"),
        (dict(teacher_logits=torch.randn(4, 10, device="meta")), ValueError,
         "teacher_logits is on meta"),
        (dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
         "labels is on meta"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError,
         r"labels must have shape \(4,\)"),
        (dict(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels must be 1-D"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must have dtype"),
        (dict(labels=torch.tensor([0, 10, 1, 2])), ValueError, r"labels must be in \[0, 10\)"),
        (dict(labels=torch.tensor([0, -1, 1, 2])), ValueError, r"labels must be in \[0, 10\)"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(alpha=1.5), ValueError, r"alpha must be a number in \[0, 1\]"),
        (dict(alpha=-0.1), ValueError, r"alpha must be a number in \[0, 1\]"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
    ], dict(student_logits=s, teacher_logits=t, labels=y)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_input_names_the_argument(case):
    cases, base = _bad_cases()
    override, exc, match = cases[case]
    with pytest.raises(exc, match=match):
        tkd_core.ops.kd_loss(**dict(base, **override))


def test_ignore_index_value_is_not_a_bad_label(device):
    y = torch.tensor([0, 7, 1], device=device)
    loss = tkd_core.ops.kd_loss(torch.randn(3, 4, device=device), torch.randn(3, 4, device=device),
                                y, ignore_index=7, reduction="none")
    assert loss[1] == 0


# ------------------------------------------------------------------------------------------
# torch.compile, module, AOT configuration list
# ------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph(device):
    def f(s, t, y):
        return tkd_core.ops.kd_loss(s, t, y, temperature=2.0, alpha=0.3) * 2

    s, t = torch.randn(5, 37, device=device), torch.randn(5, 37, device=device)
    y = torch.tensor([0, IGNORE, 36, 4, 5], device=device)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(s1, t, y)
    out.backward()
    ref = f(s2, t, y)
    ref.backward()
    assert_close(out, ref, 1e-6, "compiled loss")
    assert_close(s1.grad, s2.grad, 1e-6, "compiled grad")
    with pytest.raises(ValueError, match="labels must be in"):  # checked inside the op
        compiled(s1, t, torch.tensor([0, 1, 2, 3, 37], device=device))


def test_fake_implementation_shapes():
    s = torch.randn(3, 8)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fs, ft = mode.from_tensor(s), mode.from_tensor(s)
        loss, grad = kd._kd_loss_fwd_op(fs, ft, None, 1.0, 0.5, IGNORE, "none", True)
        assert loss.shape == (3,) and grad.shape == (3, 8)
        loss, grad = kd._kd_loss_fwd_op(fs, ft, None, 1.0, 0.5, IGNORE, "sum", False)
        assert loss.shape == () and grad.numel() == 0


def test_opcheck_registration():
    # schema, fake tensor and autograd registration of both ops (tracing: test_torch_compile_*)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    s = torch.randn(3, 9, requires_grad=True)
    args = (s, torch.randn(3, 9), torch.tensor([1, IGNORE, 8]), 2.0, 0.5, IGNORE, "mean", True)
    torch.library.opcheck(kd._kd_loss_fwd_op, args, test_utils=checks)
    torch.library.opcheck(kd._kd_loss_bwd_op, (torch.randn(3, 9), torch.rand(3)),
                          test_utils=checks)


def test_aot_specs_cover_every_launch_configuration():
    specs = {(sp.label.split()[0], sp.constexprs["ROWS"], sp.constexprs["BLOCK"],
              sp.signature.get("s_ptr") or sp.signature["g_ptr"], sp.constexprs.get("HAS_LABELS"),
              sp.constexprs.get("COMPUTE_GRAD"), sp.num_warps) for sp in kd.aot_specs()}
    Vs = sorted({1, 2, 3, 7, 1000, 4099, 32000, 128256, kd.MAX_V}
                | {2**k + d for k in range(19) for d in (-1, 0, 1)})
    for V, dtype, has_labels, grad in itertools.product(Vs, DTYPES, (True, False), (True, False)):
        ptr = "*" + utils.TRITON_DTYPE[dtype]
        c = kd.config(V)
        key = (c.rows, c.block, ptr)
        assert ("kd_loss_fwd", *key, has_labels, grad, c.num_warps) in specs, V
        assert ("kd_loss_bwd", *key, None, None, c.num_warps) in specs, V
    labels = [sp.label for sp in kd.aot_specs()]
    assert len(labels) == len(set(labels)) <= 48  # bucketed heuristics keep the set small
