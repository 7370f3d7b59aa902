"""The bench section of `python -m bench gpu`: every tkd kernel against its peers on one GPU, in
one process, written to bench/<op>.csv as it goes.

Timing: `triton.testing.do_bench` (median, p20 and p80 in ms). Memory: the peak allocated during
one call above what was allocated before it. Units: GB/s for the memory-bound ops (every input
read once + every output written once, as in bench/bench_<op>.py) and their % of the HBM
bandwidth measured in the same run (a device-to-device copy); TFLOP/s for attention
(4*B*H*S*S*D forward, x2.5 backward, halved when causal); TOP/s for the INT8 GEMM (2*M*N*K).

Peers, each only when it imports (nothing is installed for it): flash-attn (its Triton
LayerNorm, flash_attn_func), Liger-Kernel (its LayerNorm); torch's SDPA with the flash and the
memory-efficient backends, torch._int_mm, fp16 matmul.

Targets (summary.md): LayerNorm and kd_loss >= 80% of the measured bandwidth; attention >=
FlashAttention-2 (flash-attn when it imports, else torch SDPA's flash backend, which is FA2);
INT8 GEMM >= 70% of torch._int_mm (cuBLASLt), M >= 4096.
"""
import csv
import functools
import os
import time
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F

COLUMNS = ["op", "mode", "shape", "dtype", "provider", "ms", "ms_p20", "ms_p80", "GB/s",
           "pct_hbm", "TFLOP/s", "TOP/s", "peak_extra_mb", "check", "error"]
LN_HIDDEN = {"full": (768, 1024, 2048, 4096, 8192), "quick": (768, 4096), "smoke": (64,)}
KD_VOCAB = {"full": (2, 8, 1024, 32000, 128256, 262144), "quick": (2, 32000, 262144),
            "smoke": (3, 100)}
ATTN_SEQ = {"full": (128, 512, 2048, 8192), "quick": (2048,), "smoke": (16,)}
INT8_M = {"full": (128, 4096, 16384), "quick": (4096,), "smoke": (16,)}
BERT_KN = ((768, 768), (768, 3072), (3072, 768))


def _size(quick: bool, smoke: bool) -> str:
    return "smoke" if smoke else ("quick" if quick else "full")


def describe(quick: bool) -> List[str]:
    s = _size(quick, False)
    return ["bandwidth: device-to-device copy of 1 GiB",
            f"layer_norm: bf16, M=8192 x hidden {LN_HIDDEN[s]}, with and without residual, fwd / "
            "bwd / fwd+bwd; tkd, torch, flash-attn and Liger (when they import)",
            f"kd_loss: bf16, V in {KD_VOCAB[s]} (N x V ~ 2^26), fwd and fwd+bwd; tkd, torch "
            "(log_softmax + kl_div + cross_entropy)",
            f"attention: bf16, D in (64, 128), S in {ATTN_SEQ[s]}, 16k tokens, plain / causal / "
            "padded, fwd and fwd+bwd; tkd, SDPA flash, SDPA efficient, flash-attn (when it "
            "imports)",
            f"int8_gemm: M in {INT8_M[s]} x BERT (K, N) {BERT_KN}; tkd (int32, and bf16 with "
            "scales), torch._int_mm, fp16 matmul; exactness against float64 on 64 rows"]


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------

def timer(device) -> Callable[[Callable], dict]:
    """measure(fn) -> ms, ms_p20, ms_p80, peak_extra_mb. On CPU (the smoke run of the tests):
    three timed calls, no memory numbers."""
    if device.type == "cuda":
        import triton.testing

        def measure(fn):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            med, p20, p80 = triton.testing.do_bench(fn, warmup=5, rep=25,
                                                    quantiles=[0.5, 0.2, 0.8])
            return dict(ms=med, ms_p20=p20, ms_p80=p80, peak_extra_mb=peak)
        return measure

    def measure(fn):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return dict(ms=ts[1], ms_p20=ts[0], ms_p80=ts[2], peak_extra_mb=None)
    return measure


class Writer:
    """Appends rows to <folder>/<op>.csv as they come (a killed run keeps what it measured)."""

    def __init__(self, folder):
        self.folder, self.rows, self.files = folder, [], []

    def add(self, row: dict):
        path = os.path.join(self.folder, f"{row['op']}.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
                self.files.append(os.path.basename(path))
            w.writerow(row)
        self.rows.append(row)


def _try_import(fn):
    try:
        return fn()
    except Exception:  # an optional peer that does not import is simply absent
        return None


# ------------------------------------------------------------------------------------------
# Cases: (op, mode, shape, dtype, {provider: fn}, bytes, flops, unit, check) per shape
# ------------------------------------------------------------------------------------------

def _backward_only(fwd, args, inputs, grads):
    """The backward alone: fwd(*args) once, then a retained-graph autograd.grad per call."""
    outs = fwd(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return functools.partial(torch.autograd.grad, outs, inputs, grads[:len(outs)],
                             retain_graph=True)


def _grads_of(fwd, inputs, grad_out):
    return torch.autograd.grad(fwd(), inputs, grad_out)


def _max_diff(f, g) -> Optional[float]:
    try:
        return (f().float() - g().float()).abs().max().item()
    except Exception:  # a peer that refuses the shape (e.g. a backend on this device)
        return None


def cases_layer_norm(device, size) -> Iterator[dict]:
    from bench.bench_layer_norm import fwd_bwd, make_inputs, nbytes, ours_fwd, torch_fwd
    flash = _try_import(lambda: __import__("flash_attn.ops.triton.layer_norm",
                                           fromlist=["layer_norm_fn"]).layer_norm_fn)
    liger = _try_import(lambda: __import__("liger_kernel.ops.layer_norm",
                                           fromlist=["LigerLayerNormFunction"])
                        .LigerLayerNormFunction.apply)
    M = 8192 if size != "smoke" else 8
    dtype = torch.bfloat16
    for N in LN_HIDDEN[size]:
        for residual in (False, True):
            x, w, b, r, dy, dh = make_inputs(M, N, dtype, device, residual, True)()
            peers = {"tkd": ours_fwd, "torch": torch_fwd}
            if flash is not None:
                peers["flash_attn"] = lambda x, w, b, r, dy, dh: flash(
                    x, w, b, residual=r, eps=1e-5, prenorm=r is not None)
            if liger is not None and not residual:
                peers["liger"] = lambda x, w, b, r, dy, dh: liger(x, w, b, 1e-5)
            args = (x, w, b, r, dy, dh)
            leaves = [t for t in (x, w, b, r) if t is not None]
            grads = (dy, dh) if residual else (dy,)
            y_ref = torch_fwd(*args)
            y_ours = ours_fwd(*args)
            err = ((y_ours[0] if residual else y_ours) - (y_ref[0] if residual else y_ref)) \
                .abs().max().item()
            shape = f"M={M} N={N}" + (" +residual" if residual else "")
            fwd_b, all_b = nbytes(M, N, dtype, residual, "fwd"), \
                nbytes(M, N, dtype, residual, "fwd+bwd")
            bwd_b = all_b - fwd_b + M * N * x.element_size()  # the backward also reads h
            for mode, nb in (("fwd", fwd_b), ("bwd", bwd_b), ("fwd+bwd", all_b)):
                fns = {}
                for name, fwd in peers.items():
                    if mode == "fwd":
                        fns[name] = functools.partial(fwd, *args)
                    elif mode == "bwd":  # lazy: measured after its forward has run once
                        fns[name] = functools.partial(_backward_only, fwd, args, leaves, grads)
                    else:
                        fns[name] = functools.partial(fwd_bwd(fwd), *args)
                yield dict(op="layer_norm", mode=mode, shape=shape, dtype="bf16", providers=fns,
                           nbytes=nb, check=f"max|y - torch| {err:.2e}",
                           lazy=(mode == "bwd"))


def cases_kd_loss(device, size) -> Iterator[dict]:
    from bench.bench_kd_loss import IGNORE, ours, torch_kd_loss, with_backward
    dtype = torch.bfloat16
    for V in KD_VOCAB[size]:
        N = max(64, min(2**20, 2**26 // V)) if size != "smoke" else 4
        s = torch.randn(N, V, device=device, dtype=dtype).requires_grad_()
        t = torch.randn(N, V, device=device, dtype=dtype)
        y = torch.randint(0, V, (N,), device=device)
        y[::10] = IGNORE
        err = (ours(s, t, y) - torch_kd_loss(s, t, y)).abs().item()
        e = s.element_size()
        for mode, wrap, nb in (("fwd", lambda f: f, 2 * N * V * e),
                               ("fwd+bwd", with_backward, 3 * N * V * e)):
            fns = {name: functools.partial(wrap(f), s, t, y)
                   for name, f in (("tkd", ours), ("torch", torch_kd_loss))}
            yield dict(op="kd_loss", mode=mode, shape=f"N={N} V={V}", dtype="bf16",
                       providers=fns, nbytes=nb, check=f"|loss - torch| {err:.2e}")


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, name)])


def cases_attention(device, size) -> Iterator[dict]:
    import tkd_core
    fa = _try_import(lambda: __import__("flash_attn", fromlist=["flash_attn_func"])
                     .flash_attn_func)
    dtype = torch.bfloat16
    for D in (64, 128) if size != "smoke" else (16,):
        H = 2048 // D if size != "smoke" else 2
        for S in ATTN_SEQ[size]:
            B = max(1, 16384 // S) if size != "smoke" else 1
            q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype).requires_grad_()
                       for _ in range(3))
            do = torch.randn_like(q)
            qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_()
                          for t in (q, k, v))  # flash-attn's (B, S, H, D)
            lengths = torch.randint(S // 2, S + 1, (B,), device=device)
            padding = torch.arange(S, device=device)[None, :] < lengths[:, None]
            for variant in ("plain", "causal", "padded"):
                causal = variant == "causal"
                mask = padding if variant == "padded" else None
                m4 = mask[:, None, None, :] if mask is not None else None

                def sdpa(backend, q=q, k=k, v=v, causal=causal, m4=m4):
                    def run():
                        with _sdpa_backend(backend):
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=m4,
                                                                  is_causal=causal)
                    return run
                fwds = {"tkd": lambda q=q, k=k, v=v, mask=mask, causal=causal:
                        tkd_core.ops.attention(q, k, v, key_padding_mask=mask, causal=causal),
                        "sdpa_efficient": sdpa("EFFICIENT_ATTENTION")}
                if mask is None:
                    fwds["sdpa_flash"] = sdpa("FLASH_ATTENTION")
                    if fa is not None:
                        fwds["flash_attn"] = lambda qf=qf, kf=kf, vf=vf, causal=causal: fa(
                            qf, kf, vf, causal=causal)
                err = _max_diff(fwds["tkd"], fwds["sdpa_efficient"])
                flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
                shape = f"B={B} H={H} S={S} D={D} {variant}"
                yield dict(op="attention", mode="fwd", shape=shape, dtype="bf16", providers=fwds,
                           flops=flops, unit="TFLOP/s", check=f"max|o - sdpa| {err}")
                bwds = {}
                for name, f in fwds.items():
                    inputs, g = ((qf, kf, vf), do.transpose(1, 2).contiguous()) \
                        if name == "flash_attn" else ((q, k, v), do)
                    bwds[name] = functools.partial(_grads_of, f, inputs, g)
                yield dict(op="attention", mode="fwd+bwd", shape=shape, dtype="bf16",
                           providers=bwds, flops=flops * 3.5, unit="TFLOP/s")
            del q, k, v, qf, kf, vf, do


def cases_int8_gemm(device, size) -> Iterator[dict]:
    from tkd_core import int8 as G
    for M in INT8_M[size]:
        for K, N in BERT_KN if size != "smoke" else ((32, 32),):
            a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
            b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
            sa = torch.rand(M, device=device) + 0.5
            sb = torch.rand(N, device=device) + 0.5
            ah, bht = a.half(), b.half().T
            rows = min(M, 64)
            exact = torch.equal(G.int8_gemm(a[:rows], b).double(),
                                a[:rows].double() @ b.double().T)
            half_out = torch.bfloat16 if device.type == "cuda" else None
            fns = {"tkd": lambda a=a, b=b: G.int8_gemm(a, b),
                   "tkd_scaled_bf16": lambda a=a, b=b, sa=sa, sb=sb, o=half_out: G.int8_gemm(
                       a, b, sa, sb, out_dtype=o),
                   "torch_int_mm": lambda a=a, b=b: torch._int_mm(a, b.T),
                   "fp16_matmul": lambda ah=ah, bht=bht: ah @ bht}
            yield dict(op="int8_gemm", mode="gemm", shape=f"M={M} K={K} N={N}", dtype="int8",
                       providers=fns, flops=2 * M * N * K, unit="TOP/s",
                       check=f"exact on {rows} rows: {exact}")


CASES = (("layer_norm", cases_layer_norm), ("kd_loss", cases_kd_loss),
         ("attention", cases_attention), ("int8_gemm", cases_int8_gemm))


# ------------------------------------------------------------------------------------------
# The run and its targets
# ------------------------------------------------------------------------------------------

def copy_bandwidth(device, measure, nbytes=2**30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = measure(functools.partial(torch.empty_like(src).copy_, src))["ms"]
    return 2 * nbytes / ms / 1e6


def run(folder: str, quick: bool, deadline: float, device: Optional[torch.device] = None,
        smoke: bool = False) -> dict:
    device = device or torch.device("cuda")
    measure = timer(device)
    size = _size(quick, smoke)
    out = Writer(folder)
    bw = copy_bandwidth(device, measure, 2**20 if smoke else 2**30)
    out.add(dict(op="bandwidth", mode="copy", shape="1 GiB" if not smoke else "1 MiB",
                 dtype="uint8", provider="torch", **{"GB/s": bw}))
    stopped = None
    for op, gen in CASES:
        try:
            for case in gen(device, size):
                if time.time() > deadline - 3:
                    stopped = f"stopped at the budget during {op} {case['shape']}"
                    break
                _measure_case(case, measure, bw, out)
        except Exception as e:  # the op's remaining shapes are skipped, the next op runs
            out.add(dict(op=op, mode="setup", shape="", dtype="", provider="",
                         error=f"{type(e).__name__}: {e}"[:500]))
        if stopped:
            break
    return dict(ok=stopped is None and not any(r.get("error") and r.get("provider") == "tkd"
                                               for r in out.rows),
                bandwidth_gbs=bw, stopped=stopped, csvs=out.files,
                targets=targets(out.rows), error=stopped)


def _measure_case(case, measure, bw, out):
    for name, fn in case["providers"].items():
        row = {k: case.get(k) for k in ("op", "mode", "shape", "dtype")}
        row.update(provider=name, check=case.get("check") if name == "tkd" else None)
        try:
            if case.get("lazy"):  # the backward alone: its forward runs once, here
                fn = fn()
            row.update(measure(fn))
            if case.get("nbytes"):
                row["GB/s"] = case["nbytes"] / row["ms"] / 1e6
                row["pct_hbm"] = 100 * row["GB/s"] / bw
            if case.get("flops"):
                row[case["unit"]] = case["flops"] / row["ms"] / 1e9
        except Exception as e:  # e.g. a backend that refuses the shape: recorded, next runs
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        out.add(row)


def _pick(rows, **match) -> List[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("ms")]


def targets(rows: List[dict]) -> List[dict]:
    """Every GPU target of the bench, met or not, from this run's rows."""
    out = []

    def bandwidth_target(op, mode, keep, label):
        got = [r for r in _pick(rows, op=op, mode=mode, provider="tkd") if keep(r)]
        if not got:
            out.append(dict(target=label, met=None, numbers="not measured"))
            return
        worst = min(got, key=lambda r: r["pct_hbm"])
        out.append(dict(target=label, met=worst["pct_hbm"] >= 80,
                        numbers=f"{min(r['pct_hbm'] for r in got):.0f}-"
                                f"{max(r['pct_hbm'] for r in got):.0f}% of the measured "
                                f"bandwidth (worst: {worst['shape']}, "
                                f"{worst['GB/s']:.0f} GB/s)"))

    bandwidth_target("layer_norm", "fwd+bwd", lambda r: True,
                     "LayerNorm fwd+bwd >= 80% of HBM bandwidth, hidden 768-8192")
    bandwidth_target("kd_loss", "fwd+bwd", lambda r: int(r["shape"].split("V=")[1]) >= 32000,
                     "kd_loss fwd+bwd >= 80% of HBM bandwidth, V >= 32k")

    def ratio_target(op, unit, peers, keep, need, label):
        ratios = []
        for r in _pick(rows, op=op, provider="tkd"):
            if not keep(r):
                continue
            for peer in peers:
                p = _pick(rows, op=op, mode=r["mode"], shape=r["shape"], provider=peer)
                if p:
                    ratios.append((r[unit] / p[0][unit], f"{r['mode']} {r['shape']} vs {peer}"))
                    break
        if not ratios:
            out.append(dict(target=label, met=None, numbers="not measured"))
            return
        worst = min(ratios)
        out.append(dict(target=label, met=worst[0] >= need,
                        numbers=f"ratio {worst[0]:.2f}-{max(ratios)[0]:.2f} "
                                f"(worst: {worst[1]}; {len(ratios)} shapes)"))

    ratio_target("attention", "TFLOP/s", ("flash_attn", "sdpa_flash"),
                 lambda r: "padded" not in r["shape"], 1.0,
                 "attention fwd and fwd+bwd >= FlashAttention-2 (flash-attn, else SDPA flash)")
    ratio_target("int8_gemm", "TOP/s", ("torch_int_mm",),
                 lambda r: int(r["shape"].split()[0][2:]) >= 4096, 0.7,
                 "INT8 GEMM >= 70% of torch._int_mm, M >= 4096")
    return out
