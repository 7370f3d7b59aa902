"""int8_gemm: our INT8 GEMM (tkd_core._C) against fbgemm, fp32 matmul and torch._int_mm, in one run.

Two tables:
- "int8_gemm" (the GEMM): y = (a @ b.T) * a_scale * b_scale, int8 a (M, K) already quantized,
  the weight packed once (`ours`, its output from the output pool when >= 8 MiB; `ours_out`
  into a preallocated out=; `ours_fresh` into a new torch.empty each call). Peers: fbgemm
  `quantized::linear` with prepacked weights (quint8 in, quint8 out, its own requantizing
  epilogue), fbgemm dynamic linear (`quantize_dynamic`, float in and out, so it also quantizes
  x), fp32 `torch.matmul`, and `torch._int_mm` (int32 out).
- "int8_linear" (end to end, float x in, float y out): our dynamic `tkd_core.nn.Int8Linear` vs
  fbgemm's dynamic quantized Linear (`torch.ao.quantization.quantize_dynamic`) and fp32 nn.Linear;
  the error column is against the float64 Linear (quantization error included).
GOP/s = 2 * M * N * K / time. On CPU `torch._int_mm` is a slow reference loop: it is timed in the
harness only where M <= 128, and once (a single call) at M = 4096.
"""
import os
import time
import warnings

import torch

from bench.harness import Case, Provider, run_cases
from tkd_core import int8 as G
from tkd_core.nn import Int8Linear

SHAPES = [(4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768),
          (128, 768, 768), (128, 768, 3072), (128, 3072, 768), (1, 768, 768)]
QUICK_SHAPES = [(4096, 768, 768), (128, 768, 768), (1, 768, 768)]
TARGETS = {"fbgemm": 1.1, "fp32_matmul": 1.8}  # ours / peer at M = 4096, CPU


def _fbgemm_static(w, bias):
    """fbgemm quantized::linear with a prepacked per-channel int8 weight."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale = w.abs().amax(1) / 127
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        qw = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, bias)


def _fbgemm_dynamic(lin):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def gemm_case(M, K, N, device):
    """The GEMM itself: int8 a (already quantized) @ packed int8 weight, scaled float32 out."""
    torch.manual_seed(0)
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device) * 0.05
    qa, sa = G.quantize_per_token(x)
    qb, sb = G.quantize_per_token(w)
    providers = {}
    if device.type == "cuda":
        providers["ours"] = Provider(lambda a, b, s1, s2: G.int8_gemm(a, b, s1, s2))
    else:
        packed = G.pack_weight(qb)
        providers["ours"] = Provider(lambda a, b, s1, s2: G.int8_gemm_packed(a, packed, s1, s2))
        buf = torch.empty(M, N)  # into a preallocated output: no page faults in the call
        providers["ours_out"] = Provider(
            lambda a, b, s1, s2: G.int8_gemm_packed(a, packed, s1, s2, out=buf))
        # into a new torch.empty output at every call, as before the output pool: >= 32 MiB
        # is mapped anew and faulted in inside the call
        providers["ours_fresh"] = Provider(
            lambda a, b, s1, s2: G.int8_gemm_packed(a, packed, s1, s2, out=torch.empty(M, N)))
        pw = _fbgemm_static(w, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = torch.quantize_per_tensor(x, float(x.abs().max() / 127), 128, torch.quint8)
        out_scale = float((x @ w.T).abs().max() / 127)
        providers["fbgemm"] = Provider(
            lambda *_: torch.ops.quantized.linear(qx, pw, out_scale, 128), check=False)
        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        dq = _fbgemm_dynamic(lin)
        providers["fbgemm_dynamic"] = Provider(lambda *_: dq(x), check=False)
    xf, wt = x, w.T.contiguous()
    providers["fp32_matmul"] = Provider(lambda *_: torch.matmul(xf, wt), check=False)  # (M,K)@(K,N)
    qbt = qb.T  # (K, N) column-major view: _int_mm's preferred layout
    if device.type == "cuda" or M <= 128:
        providers["torch_int_mm"] = Provider(lambda a, *_: torch._int_mm(a, qbt), check=False)

    def ref64(a, b, s1, s2):
        return (a.double() @ b.double().T) * s1.double()[:, None] * s2.double()[None, :]

    return Case(op="int8_gemm", shape=f"M={M} K={K} N={N}", dtype=torch.int8,
                make_inputs=lambda: (qa, qb, sa, sb), providers=providers, reference64=ref64,
                flops=2 * M * N * K, flop_unit="GOP/s", mode="gemm")


def linear_case(M, K, N, device):
    """End to end: float x -> dynamic int8 Linear -> float y."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N).to(device)
    ours = Int8Linear.from_float(lin)
    x = torch.randn(M, K, device=device)
    providers = {"ours": Provider(lambda x: ours(x))}
    if device.type != "cuda":
        dq = _fbgemm_dynamic(lin)  # a quantized copy of the same Linear
        providers["fbgemm_dynamic"] = Provider(lambda x: dq(x))
    providers["fp32_linear"] = Provider(lambda x: lin(x))

    def ref64(x):
        return torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())

    return Case(op="int8_linear", shape=f"M={M} K={K} N={N}", dtype=torch.float32,
                make_inputs=lambda: (x,), providers=providers, reference64=ref64,
                flops=2 * M * N * K, flop_unit="GOP/s", mode="e2e")


def _single_int_mm(M, K, N):
    """One timed call of CPU torch._int_mm (too slow for the harness's 23 calls at M = 4096)."""
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8).T
    t0 = time.perf_counter()
    torch._int_mm(a, b)
    ms = (time.perf_counter() - t0) * 1e3
    return ms, 2 * M * N * K / ms / 1e6


def _per_core(shapes):
    """Load-robust per-core comparison: 1 thread, best of 3 in process CPU time (a busy shared
    machine inflates wall-clock medians with scheduling waits; CPU time does not count them)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    print("per-core efficiency (1 thread, process CPU time, best of 3), GOP/s:")
    try:
        for M, K, N in shapes:
            if M < 4096:
                continue
            case = gemm_case(M, K, N, torch.device("cpu"))
            inputs = case.make_inputs()
            res = {}
            for name in ("ours", "fbgemm", "fp32_matmul"):
                fn = case.providers[name].fn
                fn(*inputs)
                best = float("inf")
                for _ in range(3):
                    t0 = time.process_time()
                    fn(*inputs)
                    best = min(best, time.process_time() - t0)
                res[name] = case.flops / best / 1e9
            print(f"  M={M} K={K} N={N}: ours {res['ours']:.1f}, fbgemm {res['fbgemm']:.1f}, "
                  f"fp32 {res['fp32_matmul']:.1f} -> {res['ours'] / res['fbgemm']:.2f}x fbgemm, "
                  f"{res['ours'] / res['fp32_matmul']:.2f}x fp32")
    finally:
        torch.set_num_threads(n)


def _vs_fbgemm(shapes, rounds=9):
    """Issue 14's comparison at M = 4096: ours / fbgemm as the GEMM (int8 in) and as the dynamic
    linear (float in and out), 1 and 2 threads; ratios are of medians over interleaved rounds
    (harness.interleaved). 1 thread: one call each a round, timed in the calling thread's CPU
    time (scheduling waits on a busy machine do not count). 2 threads: wall time over turns,
    each an untimed call and then 2 timed calls of one provider, as a process that runs one
    of them sees: call by call, fbgemm's OpenMP worker still spun on a core while ours
    ran (ratios 0.79 / 1.06 / 0.86x); a 20 ms sleep before each call instead let the idle
    vCPUs slow the next call down. `gemm`: ours with its output from the output pool
    (tkd_core.int8.cpu_output); `gemm_out`: into a preallocated out=; `gemm_fresh`: into a new
    torch.empty every call, where glibc maps blocks over 32 MiB anew and the kernel faults them
    in page by page (fbgemm's quint8 output is a quarter of ours)."""
    from bench.harness import interleaved
    threads0, cpu = torch.get_num_threads(), torch.device("cpu")
    print(f"ours / fbgemm at M=4096, median of {rounds} rounds (load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs):")
    try:
        for M, K, N in shapes:
            if M < 4096:
                continue
            cells = []
            for kind, make, peer in (("gemm", gemm_case, "fbgemm"),
                                     ("linear", linear_case, "fbgemm_dynamic")):
                case = make(M, K, N, cpu)
                inputs = case.make_inputs()
                mine = ("ours", "ours_out", "ours_fresh") if kind == "gemm" else ("ours",)
                fns = {n: case.providers[n].fn for n in mine + (peer,)}
                bound = {name: (lambda f=fn, x=inputs: f(*x)) for name, fn in fns.items()}
                torch.set_num_threads(1)
                med = interleaved(bound, rounds, cpu, warmup=1, clock=time.thread_time)
                cells += [f"{kind}{n[4:]} 1T {med[peer] / med[n]:.2f}x" for n in mine]
                torch.set_num_threads(2)  # turns: one untimed call (any lead_s > 0), 2 timed
                med = interleaved(bound, rounds, cpu, warmup=1, block=2, lead_s=1e-9)
                cells += [f"{kind}{n[4:]} 2T {med[peer] / med[n]:.2f}x" for n in mine]
            print(f"  M={M} K={K} N={N}: " + ", ".join(cells))
    finally:
        torch.set_num_threads(threads0)


def _gops(rows, shape, provider):
    for r in rows:
        if r["shape"] == shape and r["provider"] == provider and isinstance(r.get("ms"), float):
            return r["GOP/s"]
    return None


def _summary(rows, shapes, device):
    print(f"ratios in this run (ours / peer, GOP/s); CPU ISA of ours: {G.cpu_isa()}, "
          f"threads: {torch.get_num_threads()}")
    for M, K, N in shapes:
        shape = f"M={M} K={K} N={N}"
        ours = _gops(rows, shape, "ours")
        parts = []
        for peer in ("fbgemm", "fbgemm_dynamic", "fp32_matmul", "fp32_linear", "torch_int_mm"):
            p = _gops(rows, shape, peer)
            if ours and p:
                need = TARGETS.get(peer) if (M == 4096 and device.type != "cuda") else None
                flag = "" if need is None else (" (target >= %.1fx: %s)" % (
                    need, "met" if ours / p >= need else "NOT met"))
                parts.append(f"{ours / p:.2f}x {peer}{flag}")
        print(f"  {shape:<22} ours {ours:8.1f} GOP/s | " + ", ".join(parts))


def main(device, quick=False):
    shapes = QUICK_SHAPES if quick else SHAPES
    if device.type == "cuda" and not G.cuda_built():
        print("(int8_gemm: tkd_core._C was built without CUDA; skipping the CUDA bench)")
        return []
    gemm_rows = run_cases("int8_gemm", [gemm_case(M, K, N, device) for M, K, N in shapes],
                          device, targets=["ours >= 70% of cuBLASLt int8 (torch._int_mm) at "
                                           "M=4096 (GPU target, not measured on CPU)"],
                          resources=False)
    _summary(gemm_rows, shapes, device)
    if device.type != "cuda":
        print("torch._int_mm on CPU at M=4096 (single call each):")
        for M, K, N in shapes:
            if M > 128:
                ms, gops = _single_int_mm(M, K, N)
                ours = _gops(gemm_rows, f"M={M} K={K} N={N}", "ours")
                print(f"  M={M} K={K} N={N}: {ms:.0f} ms, {gops:.2f} GOP/s "
                      f"(ours {ours / gops:.0f}x)")
        _per_core(shapes)
        _vs_fbgemm(shapes)
    lin_rows = run_cases("int8_linear", [linear_case(M, K, N, device) for M, K, N in shapes],
                         device, resources=False)
    _summary(lin_rows, shapes, device)
    return gemm_rows + lin_rows
