"""The shared bench harness: error against a float64 reference, time, bandwidth, resources.

On a GPU every provider is timed with `triton.testing.do_bench` (median ms) and reported in GB/s
(memory-bound ops: every input read once + every output written once) or TFLOP/s / GOP/s.
On CPU the Triton kernels run in Triton's interpreter: they are checked for correctness only and
never timed as performance (`Provider(time_on_cpu=False)`); real CPU paths (torch, our INT8
extension) are timed with a median of repeated runs. On CPU the harness also prints each kernel's
static GPU resource use (registers, shared memory, spills on sm_80 / sm_90), compiled ahead of
time, and the op's GPU targets, which are targets, not measurements.
"""
import contextlib
import csv
import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Provider:
    fn: Callable                 # fn(*inputs) -> tensor or tuple of tensors
    time_on_cpu: bool = True     # False for interpreted Triton kernels
    check: bool = True           # compare its outputs against the float64 reference


@dataclasses.dataclass
class Case:
    op: str                      # "layer_norm", "kd_loss", ... (one name per op)
    shape: str                   # "M=4096 N=768"
    dtype: torch.dtype
    make_inputs: Callable        # () -> tuple of fresh inputs
    providers: dict              # name -> Provider ("ours" first)
    reference64: Callable        # (*inputs) -> outputs in float64 (or exact int64)
    nbytes: int = 0              # bytes one call must move (0: not memory-bound)
    flops: int = 0               # flops (or int ops) one call performs
    flop_unit: str = "TFLOP/s"   # "TFLOP/s" or "GOP/s"
    mode: str = "fwd"            # "fwd", "fwd+bwd", ...


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def errors(out, ref):
    """max abs error and relative error max|a-b| / max|b| over all outputs."""
    max_abs, max_ref = 0.0, 0.0
    for a, b in zip(_as_tuple(out), _as_tuple(ref)):
        if a is None or b is None:
            continue
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.numel() == 0:
            continue
        if not torch.isfinite(a).all():
            return float("nan"), float("nan")
        max_abs = max(max_abs, (a - b).abs().max().item())
        max_ref = max(max_ref, b.abs().max().item())
    return max_abs, (max_abs / max_ref if max_ref > 0 else max_abs)


def time_ms(fn, inputs, device, reps=20, warmup=3):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=100)
    from tkd_core.measure import median_ms
    return median_ms(lambda: fn(*inputs), reps, warmup)


def interleaved(fns, reps, device, warmup=2, block=1, lead_s=0.0, clock=None):
    """{name: median seconds} of fns' calls over `reps` rounds, each round one turn of each fn,
    the order rotated every round (what runs after what is not always the same).

    A turn is `block` timed calls in a row; with lead_s > 0 they follow untimed calls of the
    same fn for at least lead_s seconds (one at least). The lead absorbs what the previous fn
    left behind (another runtime's worker threads still spinning on the cores, evicted
    caches), which a process serving one model never sees. clock: what a call's time is read
    from (default time.perf_counter; time.thread_time: the calling thread's CPU time,
    scheduling waits left out)."""
    clock = clock or time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):  # each round starts one provider later: no fixed position in a round
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if lead_s > 0:
                t_end = time.perf_counter() + lead_s
                fn()
                while time.perf_counter() < t_end:
                    fn()
            for _ in range(block):
                sync()
                t0 = clock()
                fn()
                sync()
                times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}c-{torch.backends.cpu.get_cpu_capability()}"


def run_cases(op_name, cases, device, targets=(), resources=True):
    """Run every case and provider; print a table; write a CSV; return the rows."""
    rows = []
    for case in cases:
        inputs = case.make_inputs()
        ref = case.reference64(*inputs)
        base_ms = None
        for name, prov in case.providers.items():
            row = dict(op=case.op, mode=case.mode, shape=case.shape,
                       dtype=str(case.dtype).replace("torch.", ""), provider=name)
            if prov.check:
                out = prov.fn(*inputs)
                row["max_abs_err"], row["rel_err"] = errors(out, ref)
            timed = device.type == "cuda" or prov.time_on_cpu
            if timed:
                ms = time_ms(prov.fn, inputs, device)
                row["ms"] = ms
                if case.nbytes:
                    row["GB/s"] = case.nbytes / ms / 1e6
                if case.flops:
                    scale = 1e9 if case.flop_unit == "TFLOP/s" else 1e6
                    row[case.flop_unit] = case.flops / ms / scale
                if base_ms is None and name != "ours":
                    base_ms = ms
            else:
                row["ms"] = "n/a (interpreter)"
            row["nbytes"] = case.nbytes
            rows.append(row)
        # speed ratio of ours against the first timed peer, in the same run
        ours = [r for r in rows[-len(case.providers):] if r["provider"] == "ours"]
        if ours and isinstance(ours[0].get("ms"), float) and base_ms:
            ours[0]["speedup_vs_ref"] = base_ms / ours[0]["ms"]
    _print_table(op_name, rows)
    res_rows = []
    if resources and device.type != "cuda":
        res_rows = _print_resources(op_name)
    if targets:
        print("GPU targets (targets, not measurements):")
        for t in targets:
            print(f"  - {t}")
    path = _write_csv(op_name, rows + res_rows, device)
    print(f"wrote {os.path.relpath(path)}\n")
    return rows


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5)) else f"{v:.3f}"
    return str(v)


def print_table(title, rows, cols):
    """`rows` as one markdown table under `== title ==`: the columns of `cols` that any row has,
    floats in 4 significant digits (scientific when tiny or huge), ints with separators."""
    from tkd_core.measure import format_table
    cols = [c for c in cols if any(c in r for r in rows)]
    cells = [{c: (f"{r[c]:,}" if isinstance(r[c], int) and not isinstance(r[c], bool)
                  else _fmt(r[c])) for c in cols if c in r} for r in rows]
    print(f"\n== {title} ==")
    print(format_table(cells, cols))


def _print_table(op_name, rows):
    print_table(op_name, rows, ["mode", "shape", "dtype", "provider", "max_abs_err", "rel_err",
                                "ms", "GB/s", "TFLOP/s", "GOP/s", "speedup_vs_ref", "nbytes"])


def _print_resources(op_name):
    from tkd_core.kernels import aot
    if op_name not in aot.OPS:
        return []
    try:
        usage = aot.resource_usage((op_name,))
    except Exception as e:  # a missing CUDA toolchain is reported, not fatal for the bench
        print(f"(static GPU resources unavailable: {e})")
        return []
    print(f"static GPU resources of {op_name} kernels (compiled ahead of time, no GPU):")
    for u in usage:
        if u["ok"]:
            print(f"  sm_{u['cc']} {u['label']:<44} regs={u['regs']:<4} smem={u['shared']:<7} "
                  f"spills={u['spills']} warps={u['num_warps']} mma={u['mma']}")
        else:
            print(f"  sm_{u['cc']} {u['label']:<44} COMPILE FAILED: {u['error'][:200]}")
    return [dict(op=op_name, mode="aot", shape=u["label"], provider=f"sm_{u['cc']}",
                 regs=u.get("regs"), shared=u.get("shared"), spills=u.get("spills"), ok=u["ok"])
            for u in usage]


def _write_csv(op_name, rows, device):
    import triton
    os.makedirs(RESULTS_DIR, exist_ok=True)
    dev = device_name(device).replace(" ", "_").replace("/", "_")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(RESULTS_DIR, f"{op_name}_{dev}_{stamp}.csv")
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        f.write(f"# device={device_name(device)} torch={torch.__version__} "
                f"triton={triton.__version__} python={platform.python_version()}\n")
        w = csv.DictWriter(f, fieldnames=keys + ["device", "torch", "triton"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, device=device_name(device), torch=torch.__version__,
                            triton=triton.__version__))
    return path


@contextlib.contextmanager
def cpu_reference_ops(device, threads: int = 0):
    """On CPU, for the timed model benches: our ops take their torch-reference path (the fast
    CPU path; interpreted Triton kernels are for correctness, not speed) and torch runs on
    `cpu_threads(threads)` threads; TRITON_INTERPRET is restored afterwards."""
    old = os.environ.get("TRITON_INTERPRET")
    if device.type == "cpu":
        from tkd_core.measure import cpu_threads
        os.environ["TRITON_INTERPRET"] = "0"
        torch.set_num_threads(cpu_threads(threads))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def default_device(name: Optional[str] = None):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
