"""LayerNorm (+ residual add), forward and forward+backward: ours against torch's F.layer_norm.

    python -m bench layer_norm [--quick]

GPU: M = 4096 rows x hidden {768, 1024, 4096, 8192} and odd sizes, fp16, timed, GB/s with
bytes = every input read once + every output written once (mean/rstd, internal, not counted;
dx = dresidual counted once). CPU: 64 rows, the kernels run in Triton's interpreter and are only
checked against float64; torch is timed on CPU for reference.
"""
import torch
import torch.nn.functional as F

from bench import harness
from bench.harness import Case, Provider

import tkd_core


def ours_fwd(x, w, b, r, dy, dh):
    return tkd_core.ops.layer_norm(x, w, b, residual=r)


def torch_fwd(x, w, b, r, dy, dh):
    if r is None:
        return F.layer_norm(x, x.shape[-1:], w, b)
    h = x + r
    return F.layer_norm(h, h.shape[-1:], w, b), h


def fwd_bwd(fwd):
    """fwd + backward with grad_outputs dy (and dh for x + residual): (y, [h,] dx, dw, db)."""
    def fn(x, w, b, r, dy, dh):
        out = fwd(x, w, b, r, dy, dh)
        outs, grads = ((out,), (dy,)) if r is None else (out, (dy, dh))
        inputs = (x, w, b) if r is None else (x, w, b, r)
        g = torch.autograd.grad(outs, inputs, grads)
        return (*outs, *g[:3])  # dresidual == dx
    return fn


def _reference64(mode):
    def ref(x, w, b, r, dy, dh):
        leaves = [t.detach().double().requires_grad_() if t is not None else None
                  for t in (x, w, b, r)]
        out = torch_fwd(*leaves, None, None)
        if mode == "fwd":
            return out
        outs, grads = ((out,), (dy.double(),)) if r is None else (out, (dy.double(), dh.double()))
        g = torch.autograd.grad(outs, [t for t in leaves if t is not None], grads)
        return (*outs, *g[:3])
    return ref


def make_inputs(M, N, dtype, device, residual, grad):
    def make():
        def t(*shape):
            return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)
        x, w, b = t(M, N), t(N), t(N)
        r = t(M, N) if residual else None
        dy = torch.randn(M, N, device=device, dtype=dtype)
        dh = torch.randn(M, N, device=device, dtype=dtype) if residual else None
        return x, w, b, r, dy, dh
    return make


def nbytes(M, N, dtype, residual, mode):
    e = torch.tensor([], dtype=dtype).element_size()
    acts = 2 + 2 * residual  # fwd: read x (+ r), write y (+ h)
    params = 2  # read w, b
    if mode == "fwd+bwd":
        acts += 2 + residual  # read dy (+ dh), write dx (= dresidual)
        params += 2  # write dw, db
    return (acts * M * N + params * N) * e


def cases(device, quick=False):
    on_gpu = device.type == "cuda"
    M = 4096 if on_gpu else 64
    sizes = [768, 1024, 4096, 8192] + ([1000, 4099] if not quick else [])
    if not on_gpu and quick:
        sizes = [768, 4099]
    dtype = torch.float16
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for residual in (False, True):
            for N in sizes:
                grad = mode == "fwd+bwd"
                ours = ours_fwd if mode == "fwd" else fwd_bwd(ours_fwd)
                peer = torch_fwd if mode == "fwd" else fwd_bwd(torch_fwd)
                out.append(Case(
                    op="layer_norm", shape=f"M={M} N={N}" + (" +residual" if residual else ""),
                    dtype=dtype, mode=mode,
                    make_inputs=make_inputs(M, N, dtype, device, residual, grad),
                    providers={"ours": Provider(ours, time_on_cpu=False),
                               "torch": Provider(peer)},
                    reference64=_reference64(mode),
                    nbytes=nbytes(M, N, dtype, residual, mode)))
    return out


def main(device, quick=False):
    return harness.run_cases(
        "layer_norm", cases(device, quick), device,
        targets=["LayerNorm forward+backward >= 80% of measured HBM bandwidth for hidden "
                 "768-8192"])
