"""kd_loss: the fused Triton kernel against the straightforward torch composition
(log_softmax + kl_div + cross_entropy), forward and forward+backward.

GB/s counts the logits read once (student + teacher), plus the student gradient written once for
fwd+bwd. On CPU the kernel runs in Triton's interpreter: checked for correctness, not timed.
"""
import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, run_cases
from tkd_core.kernels.kd_loss import kd_loss_ref
from tkd_core.ops import kd_loss

T, ALPHA, IGNORE = 2.0, 0.5, -100


def torch_kd_loss(s, t, y):
    """What one writes without a fused kernel (fp32 math, as our kernel does)."""
    s32, t32 = s.float(), t.float()
    log_ps = F.log_softmax(s32 / T, dim=-1)
    log_pt = F.log_softmax(t32 / T, dim=-1)
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1) * (T * T)
    ce = F.cross_entropy(s32, y, ignore_index=IGNORE, reduction="none")
    keep = y != IGNORE
    rows = torch.where(keep, ALPHA * kl + (1 - ALPHA) * ce, torch.zeros_like(kl))
    return rows.sum() / keep.sum().clamp(min=1)


def ours(s, t, y):
    return kd_loss(s, t, y, temperature=T, alpha=ALPHA, ignore_index=IGNORE)


def with_backward(fn):
    def run(s, t, y):
        s.grad = None
        loss = fn(s, t, y)
        loss.backward()
        return loss, s.grad
    return run


def reference64(backward, chunk=1024):
    """float64 loss ("mean") and student gradient, a chunk of rows at a time (memory)."""
    def ref(s, t, y):
        rows, grads = [], []
        for i in range(0, s.shape[0], chunk):
            s64 = s[i:i + chunk].detach().double().requires_grad_(backward)
            r = kd_loss_ref(s64, t[i:i + chunk].double(), y[i:i + chunk], T, ALPHA, IGNORE,
                            "none")
            if backward:
                r.sum().backward()
                grads.append(s64.grad)
            rows.append(r.detach())
        count = (y != IGNORE).sum().clamp(min=1)
        loss = torch.cat(rows).sum() / count
        return (loss, torch.cat(grads) / count) if backward else loss
    return ref


def make_case(N, V, dtype, device, mode):
    backward = mode == "fwd+bwd"

    def make_inputs():
        s = torch.randn(N, V, device=device, dtype=dtype).requires_grad_(backward)
        t = torch.randn(N, V, device=device, dtype=dtype)
        y = torch.randint(0, V, (N,), device=device)
        y[::10] = IGNORE  # some padding rows
        return s, t, y

    wrap = with_backward if backward else (lambda fn: fn)
    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = (2 + backward) * N * V * elem
    return Case(op="kd_loss", shape=f"N={N} V={V}", dtype=dtype, make_inputs=make_inputs,
                providers={"ours": Provider(wrap(ours), time_on_cpu=False),
                           "torch": Provider(wrap(torch_kd_loss))},
                reference64=reference64(backward), nbytes=nbytes, mode=mode)


def fits(N, V, device):
    """The torch composition keeps ~10 fp32 (N, V) tensors alive in fwd+bwd (log-probs, KL
    terms, their gradients): skip, and say so, a shape whose peak would not fit."""
    if device.type != "cuda":
        return True
    need = 10 * N * V * 4
    if need > torch.cuda.mem_get_info(device)[0]:
        print(f"(skipping N={N} V={V}: the torch peer needs ~{need / 2**30:.0f} GiB)")
        return False
    return True


def main(device, quick=False):
    if device.type == "cuda":
        Ns = (64, 2048) if quick else (64, 2048, 8192)
        Vs = (2, 32000, 128256)
        dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    else:  # interpreter: a correctness check of the kernels, small N
        Ns, Vs, dtypes = (4,), ((2, 32000) if quick else (2, 1000, 32000)), (torch.float32,
                                                                            torch.bfloat16)
    cases = [make_case(N, V, dt, device, mode)
             for mode in ("fwd", "fwd+bwd") for dt in dtypes for N in Ns for V in Vs
             if fits(N, V, device)]
    return run_cases("kd_loss", cases, device,
                     targets=["kd_loss >= 80% of measured HBM bandwidth for V >= 32k"])

