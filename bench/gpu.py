"""python -m bench gpu: one command that checks every CUDA claim of tkd on a GPU and leaves its
results as files.

    python -m bench gpu                       # everything: <= 8 min on an H100/H200 (budgets below)
    python -m bench gpu --quick               # fewer shapes, steps and tests: <= 4 min
    python -m bench gpu --dry-run             # what would run, and where; needs no GPU
    python -m bench gpu --only tests,bench    # some sections (env and summary always run)
    python -m bench gpu --data-dir DIR        # SST-2 TSVs for the training run

Run it after `pip install -r requirements-test.txt && pip install -e .` on the GPU machine. On a
machine without CUDA it stops at once and says so. Sections, in order; each has a time budget it
cannot overrun (a section past its budget is stopped and recorded, and the next one runs):

  env      GPU, compute capability, driver, CUDA, torch, triton, nvcc, and whether tkd_core._C
           has its CUDA part; if not, and nvcc is here, it is built for this GPU's arch only
  tests    the op test files on CUDA tensors (`pytest --device cuda`): the compiled Triton
           kernels and the CUDA INT8 kernel against float64 references, forward and every
           gradient, every dtype, the CPU suite's awkward shapes; one pytest process per file
  compile  torch.compile(fullgraph=True) with inductor (forward, and a training step),
           CUDA-graph capture of a model forward, autocast fp16 / bf16 (with kd_loss)
  train    the bert-base-shaped model (random init), N steps on SST-2 (or the synthetic task),
           fp16 autocast + GradScaler, bf16, and fp16 on the torch reference ops (TKD_OPS=
           reference): tokens/s, peak memory, loss curves side by side, no NaN
  bench    every kernel against its peers in one process (bench/gpu_bench.py)
  summary  summary.md: the sections' status, every target met or not, the numbers, the CSVs

Outputs go under --out (default: $OUT when set, else bench/results/gpu-<device>-<date>/), each
section in its own folder, written as it goes: summary.md is rewritten after every section, so
a killed run still leaves what it finished. Every section but env runs in a child process (a
CUDA fault or a hang in one section cannot take the others down); its traceback, if any, is in
<section>/error.txt.
"""
import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILES = ("tests/test_layer_norm.py", "tests/test_kd_loss.py", "tests/test_attention.py",
              "tests/test_int8_gemm.py", "tests/test_nn.py")
# seconds per section (build only when tkd_core._C lacks its CUDA part): full <= 480, quick <= 240
BUDGETS = {"full": dict(build=100, tests=140, compile=40, train=120, bench=80),
           "quick": dict(build=90, tests=45, compile=25, train=50, bench=30)}
TRAIN_STEPS = {"full": 200, "quick": 50}
TRAIN_RUNS = (("fp16", "fp16", {}), ("bf16", "bf16", {}),
              ("fp16_reference_ops", "fp16", {"TKD_OPS": "reference"}))
SST2_CANDIDATES = ("data/glue/SST-2", "../shared/data/glue/SST-2")  # relative to the checkout
GRACE_S = 15  # a child past its budget gets this long to stop by itself before it is killed


# ------------------------------------------------------------------------------------------
# The plan: one list drives both --dry-run and the run
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Ctx:
    out: str                 # the run's output folder
    quick: bool
    data_dir: Optional[str]  # SST-2 folder, or None: the synthetic task
    only: Optional[List[str]]

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    def budget(self, section: str) -> int:
        return BUDGETS[self.mode][section]


@dataclasses.dataclass
class Section:
    name: str
    describe: Callable[[Ctx], List[str]]   # what it will run, for --dry-run
    run: Callable[[Ctx, str], dict]        # (ctx, its folder) -> result (written as result.json)


def test_commands(ctx: Ctx) -> List[List[str]]:
    return [[sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--device", "cuda",
             f] for f in TEST_FILES]


def train_commands(ctx: Ctx, folder: str, vocab: Optional[str] = None) -> List[tuple]:
    """(name, env overrides, trainer argv) of each training run."""
    data = (["--task", "sst2", "--data-dir", ctx.data_dir] if ctx.data_dir
            else ["--task", "synthetic"])
    runs = []
    for name, precision, env in TRAIN_RUNS:
        argv = ["--mode", "teacher", "--preset", "bert-base", *data,
                "--max-steps", str(TRAIN_STEPS[ctx.mode]), "--batch-size", "32",
                "--precision", precision, "--device", "cuda", "--seed", "0", "--no-progress",
                "--max-dev-examples", "256", "--out", os.path.join(folder, name)]
        if vocab:
            argv += ["--vocab", vocab]
        runs.append((name, env, argv))
    return runs


def _describe_env(ctx):
    return ["GPU name, compute capability, memory, SMs, driver, CUDA, torch, triton, nvcc, "
            "tkd commit -> env/env.json",
            "if tkd_core._C lacks its CUDA part and nvcc is here: TKD_CUDA_ARCHS=<this GPU> "
            f"pip install -e . --no-deps --no-build-isolation (budget {ctx.budget('build')} s)"]


def _describe_tests(ctx):
    return [f"in parallel, budget {ctx.budget('tests')} s, logs in tests/<file>.log:"] + [
        "  python " + " ".join(c[1:]) for c in test_commands(ctx)]


def _describe_compile(ctx):
    return [f"budget {ctx.budget('compile')} s: " + ", ".join(name for name, _ in CHECKS)]


def _describe_train(ctx):
    src = f"SST-2 from {ctx.data_dir}" if ctx.data_dir else "the synthetic task (no SST-2 found)"
    lines = [f"budget {ctx.budget('train')} s, {TRAIN_STEPS[ctx.mode]} steps each, on {src}:"]
    for name, env, argv in train_commands(ctx, os.path.join(ctx.out, "train")):
        pre = " ".join(f"{k}={v}" for k, v in env.items())
        lines.append(f"  [{name}] {pre + ' ' if pre else ''}python -m tkd_core.train "
                     + " ".join(argv))
    return lines


def _describe_bench(ctx):
    from bench import gpu_bench
    return [f"budget {ctx.budget('bench')} s, bench/<op>.csv:"] + [
        "  " + line for line in gpu_bench.describe(ctx.quick)]


def plan() -> List[Section]:
    return [Section("env", _describe_env, run_env),
            Section("tests", _describe_tests, run_tests),
            Section("compile", _describe_compile, lambda ctx, d: run_child(ctx, d, "compile")),
            Section("train", _describe_train, run_train),
            Section("bench", _describe_bench, lambda ctx, d: run_child(ctx, d, "bench")),
            Section("summary", lambda ctx: ["summary.md (also rewritten after every section)"],
                    lambda ctx, d: {"ok": True})]


# ------------------------------------------------------------------------------------------
# env (and the CUDA build when the extension lacks it)
# ------------------------------------------------------------------------------------------

def _cmd_output(cmd, timeout=30) -> Optional[str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (p.stdout or p.stderr).strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _ext_has_cuda() -> Optional[bool]:
    """Whether tkd_core._C has its CUDA part, asked in a child (this process never imports
    tkd_core: a rebuild would replace the extension under it)."""
    out = _cmd_output([sys.executable, "-c", "import tkd_core.int8 as g; "
                       "print(g.cuda_built())"], timeout=120)
    return {"True": True, "False": False}.get((out or "").splitlines()[-1] if out else "")


def run_env(ctx: Ctx, folder: str) -> dict:
    import torch
    import triton
    p = torch.cuda.get_device_properties(0)
    env = dict(gpu=p.name, compute_capability=f"{p.major}.{p.minor}",
               memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
               driver=_cmd_output(["nvidia-smi", "--query-gpu=driver_version",
                                   "--format=csv,noheader"]),
               cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__,
               python=sys.version.split()[0], nvcc=_nvcc_version(),
               commit=_cmd_output(["git", "rev-parse", "--short", "HEAD"]))
    env["ext_cuda_before"] = _ext_has_cuda()
    env["ext_cuda"] = env["ext_cuda_before"]
    if env["ext_cuda_before"] is False and env["nvcc"]:
        arch = f"{p.major}{p.minor}" + ("a" if p.major == 9 else "")  # sm_90a: wgmma-era H100
        env["build"] = _build_ext(arch, folder, ctx.budget("build"))
        env["ext_cuda"] = _ext_has_cuda()
    env["ok"] = bool(env["ext_cuda"])
    if not env["ok"]:
        env["error"] = ("tkd_core._C has no CUDA part: the INT8 GEMM tests and bench fail "
                        "(nvcc missing or the build failed: env/build.log)")
    return env


def _nvcc_version() -> Optional[str]:
    out = _cmd_output(["nvcc", "--version"])
    m = re.search(r"release ([\d.]+)", out or "")
    return m.group(1) if m else None


def _build_ext(arch: str, folder: str, budget: int) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "-e", ".", "--no-deps", "--no-build-isolation",
           "-q"]
    env = dict(os.environ, TKD_CUDA_ARCHS=arch, TKD_WITH_CUDA="1")
    t0 = time.time()
    with open(os.path.join(folder, "build.log"), "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=budget).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return dict(arch=arch, returncode=rc, seconds=round(time.time() - t0, 1))


# ------------------------------------------------------------------------------------------
# tests: the op test files on CUDA, one pytest process per file
# ------------------------------------------------------------------------------------------

_RESULT = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def parse_pytest_log(text: str) -> dict:
    """Counts from a `pytest -v` log, complete or cut off: collected, each outcome, not reached,
    and the failing test ids."""
    m = re.search(r"collected (\d+) items?", text)
    collected = int(m.group(1)) if m else 0
    outcomes: Dict[str, str] = {}
    for test, outcome in _RESULT.findall(text):
        outcomes[test] = outcome  # a test's last word wins (ERROR in teardown after PASSED)
    counts = {k: sum(v == k for v in outcomes.values())
              for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    return dict(collected=collected, **{k.lower(): v for k, v in counts.items()},
                not_reached=max(0, collected - len(outcomes)),
                failures=sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR")))


def run_tests(ctx: Ctx, folder: str) -> dict:
    deadline = time.time() + ctx.budget("tests")
    procs = []
    for cmd in test_commands(ctx):
        log = open(os.path.join(folder, os.path.basename(cmd[-1]).replace(".py", ".log")), "w")
        procs.append((cmd[-1], log, subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                                     stderr=subprocess.STDOUT)))
    files, timed_out = {}, []
    for name, log, proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            timed_out.append(name)
        log.close()
        with open(log.name) as f:
            files[name] = dict(parse_pytest_log(f.read()), returncode=proc.returncode)
    total = {k: sum(r[k] for r in files.values())
             for k in ("collected", "passed", "failed", "error", "skipped", "not_reached")}
    ok = (not timed_out and total["failed"] == total["error"] == 0
          and all(r["returncode"] == 0 for r in files.values()))
    return dict(ok=ok, files=files, total=total, timed_out=timed_out,
                failures=[t for r in files.values() for t in r["failures"]])


# ------------------------------------------------------------------------------------------
# compile: inductor, CUDA graphs, autocast (each check also runs on CPU, for the tests here)
# ------------------------------------------------------------------------------------------

def _model(device, **overrides):
    """A small BERT-shaped TransformerClassifier (head dim 64), dropout off, eval mode."""
    from tkd_core.models import ModelConfig, TransformerClassifier
    cfg = ModelConfig.preset("tiny", vocab_size=120, num_labels=3, hidden_size=128, num_heads=2,
                             ffn_size=256, hidden_dropout=0.0, attention_dropout=0.0,
                             **overrides)
    return TransformerClassifier(cfg).to(device).eval()


def _batch(device, B=4, S=37):
    import torch
    ids = torch.randint(1, 120, (B, S), device=device)
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[1, S // 2:] = False  # a padded sequence
    labels = torch.randint(0, 3, (B,), device=device)
    return ids, mask, labels


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def check_compile(device, backend="inductor") -> dict:
    """torch.compile(fullgraph=True): the forward (logits vs eager) and a training step (grads)."""
    import torch
    import torch.nn.functional as F
    torch._dynamo.reset()
    model = _model(device)
    ids, mask, labels = _batch(device)
    with torch.no_grad():
        eager = model(ids, mask)
        got = torch.compile(model, fullgraph=True, backend=backend)(ids, mask)
    fwd = _rel(got, eager)

    def step(m):
        loss = F.cross_entropy(m(ids, mask), labels)
        return torch.autograd.grad(loss, list(m.parameters()))

    model.train()
    g_eager = step(model)
    g_comp = step(torch.compile(model, fullgraph=True, backend=backend))
    bwd = max(_rel(a, b) for a, b in zip(g_comp, g_eager) if b.abs().max() > 0)
    return dict(ok=fwd <= 1e-4 and bwd <= 1e-3, forward_rel_err=fwd, grad_rel_err=bwd,
                backend=backend, tolerance="forward 1e-4, grads 1e-3 (fp32)")


def check_cuda_graph(device) -> dict:
    """Capture one model forward in a CUDA graph, replay it on new inputs, compare to eager."""
    import torch
    model = _model(device)
    ids, mask, _ = _batch(device)
    static_ids, static_mask = ids.clone(), mask.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up outside the capture: Triton compiles, allocator settles
            model(static_ids, static_mask)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = model(static_ids, static_mask)
    new_ids, new_mask, _ = _batch(device)
    static_ids.copy_(new_ids)
    static_mask.copy_(new_mask)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        eager = model(new_ids, new_mask)
    err = _rel(static_out, eager)
    return dict(ok=err <= 1e-6, replay_rel_err=err, tolerance="1e-6 (same kernels)")


def check_autocast(device, dtype_name) -> dict:
    """A forward + backward under autocast, with kd_loss against fp32 teacher logits: finite,
    and within half precision of the fp32 model."""
    import torch
    import torch.nn.functional as F
    import tkd_core
    dtype = getattr(torch, dtype_name)
    model = _model(device).train()
    ids, mask, labels = _batch(device)
    with torch.no_grad():
        ref = model(ids, mask)
        teacher = ref.float() * 3
    with torch.autocast(device.type, dtype=dtype):
        logits = model(ids, mask)
        loss = F.cross_entropy(logits.float(), labels) + tkd_core.ops.kd_loss(logits, teacher,
                                                                              labels)
    loss.backward()
    finite = bool(torch.isfinite(loss)) and all(torch.isfinite(p.grad).all()
                                                for p in model.parameters() if p.grad is not None)
    tol = {"float16": 2e-2, "bfloat16": 6e-2}[dtype_name]
    err = _rel(logits.float(), ref)
    return dict(ok=finite and err <= tol, finite=finite, logits_rel_err=err, tolerance=tol,
                logits_dtype=str(logits.dtype).replace("torch.", ""))


CHECKS = (("inductor_fullgraph", lambda d: check_compile(d)),
          ("cuda_graph_capture", check_cuda_graph),
          ("autocast_fp16", lambda d: check_autocast(d, "float16")),
          ("autocast_bf16", lambda d: check_autocast(d, "bfloat16")))


def section_compile(ctx: Ctx, folder: str) -> dict:
    import torch
    device = torch.device("cuda")
    results = {}
    for name, fn in CHECKS:
        try:
            results[name] = fn(device)
        except Exception as e:  # recorded; the next check runs
            results[name] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        _write_json(os.path.join(folder, "checks.json"), results)
    return dict(ok=all(r["ok"] for r in results.values()), checks=results)


# ------------------------------------------------------------------------------------------
# train: bert-base shaped, fp16 / bf16 / fp16 on the reference ops
# ------------------------------------------------------------------------------------------

# runs the trainer in this child and then records its peak GPU memory (the trainer does not)
_TRAIN_WRAPPER = """
import json, runpy, sys, torch
peak_file = sys.argv[1]
sys.argv = ["tkd_core.train"] + sys.argv[2:]
try:
    runpy.run_module("tkd_core.train", run_name="__main__", alter_sys=True)
finally:
    if torch.cuda.is_available():
        with open(peak_file, "w") as f:
            json.dump({"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}, f)
"""


def read_run(run_dir: str) -> dict:
    """A training run's facts from its own files: summary.json, log.jsonl, peak.json."""
    out = {}
    for name in ("summary.json", "peak.json"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                out.update(json.load(f))
    losses = {}
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") == "step":
                    losses[rec["step"]] = rec["loss"]  # the last record of a step wins
    out["losses"] = [losses[k] for k in sorted(losses)]
    out["nan"] = any(not (v == v and abs(v) != float("inf")) for v in out["losses"])
    return out


def compare_curves(a: List[float], b: List[float], tail: int = 20) -> dict:
    n = min(len(a), len(b))
    if n == 0:
        return dict(steps=0)
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    k = min(tail, n)
    return dict(steps=n, mean_abs_diff=sum(diffs) / n,
                last_mean=(sum(a[n - k:n]) / k, sum(b[n - k:n]) / k))


def run_train(ctx: Ctx, folder: str) -> dict:
    deadline = time.time() + ctx.budget("train")
    runs, vocab = {}, None
    for name, env_over, argv in train_commands(ctx, folder):
        if vocab:
            argv = argv + ["--vocab", vocab]
        run_dir = argv[argv.index("--out") + 1]
        os.makedirs(run_dir, exist_ok=True)
        cmd = [sys.executable, "-c", _TRAIN_WRAPPER, os.path.join(run_dir, "peak.json"), *argv]
        env = dict(os.environ, **env_over)
        t0 = time.time()
        with open(os.path.join(folder, f"{name}.log"), "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=max(1.0, deadline - time.time())).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        runs[name] = dict(read_run(run_dir), returncode=rc, wall_s=round(time.time() - t0, 1))
        tok = os.path.join(run_dir, "tokenizer.json")
        vocab = vocab or (tok if os.path.exists(tok) else None)  # one vocabulary for all runs
    _write_curves(os.path.join(folder, "loss_curves.csv"), runs)
    base = runs.get("fp16", {}).get("losses", [])
    for name, r in runs.items():
        r["vs_fp16"] = compare_curves(r["losses"], base) if name != "fp16" else None
    ok = all(r["returncode"] == 0 and not r["nan"] and r["losses"] for r in runs.values())
    return dict(ok=ok, steps=TRAIN_STEPS[ctx.mode],
                task="sst2" if ctx.data_dir else "synthetic",
                runs={k: {kk: vv for kk, vv in v.items() if kk != "losses"}
                      for k, v in runs.items()})


def _write_curves(path, runs):
    names = list(runs)
    n = max((len(r["losses"]) for r in runs.values()), default=0)
    with open(path, "w") as f:
        f.write(",".join(["step", *names]) + "\n")
        for i in range(n):
            f.write(",".join([str(i + 1)] + [f"{runs[k]['losses'][i]:.6f}"
                                             if i < len(runs[k]["losses"]) else ""
                                             for k in names]) + "\n")


# ------------------------------------------------------------------------------------------
# Running sections: children with budgets, results as files, one summary
# ------------------------------------------------------------------------------------------

def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


CHILD_SECTIONS = {"compile": section_compile}


def run_child(ctx: Ctx, folder: str, name: str) -> dict:
    """Run section `name` in a child process (`python -m bench.gpu --child name`) with its budget;
    the child writes <folder>/result.json."""
    budget = ctx.budget(name)
    cmd = [sys.executable, "-m", "bench.gpu", "--child", name, "--out", ctx.out,
           "--deadline", str(time.time() + budget)] + (["--quick"] if ctx.quick else [])
    with open(os.path.join(folder, "log.txt"), "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=budget + GRACE_S).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    path = os.path.join(folder, "result.json")
    result = json.load(open(path)) if os.path.exists(path) else {"ok": False}
    if rc != 0:
        result.update(ok=False, error=result.get("error") or f"child exited with {rc} "
                      f"(its output: {name}/log.txt)")
    return result


def child_main(name: str, ctx: Ctx, deadline: float) -> int:
    folder = os.path.join(ctx.out, name)
    os.makedirs(folder, exist_ok=True)
    if name == "bench":
        from bench import gpu_bench
        result = gpu_bench.run(folder, ctx.quick, deadline)
    else:
        result = CHILD_SECTIONS[name](ctx, folder)
    _write_json(os.path.join(folder, "result.json"), result)
    return 0


def run_sections(sections: List[Section], ctx: Ctx, log=print) -> Dict[str, dict]:
    """Run each section in order, whatever happened to the previous ones; record status,
    seconds and result in <section>/result.json, and rewrite summary.md after each."""
    results: Dict[str, dict] = {}
    for s in sections:
        if ctx.only and s.name not in ctx.only and s.name not in ("env", "summary"):
            continue
        folder = os.path.join(ctx.out, s.name)
        os.makedirs(folder, exist_ok=True)
        log(f"[bench gpu] {s.name} ...")
        t0 = time.time()
        try:
            r = s.run(ctx, folder)
        except Exception as e:  # recorded; the next section runs
            with open(os.path.join(folder, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
            r = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        r["seconds"] = round(time.time() - t0, 1)
        results[s.name] = r
        _write_json(os.path.join(folder, "result.json"), r)
        write_summary(ctx, results)
        log(f"[bench gpu] {s.name}: {'ok' if r.get('ok') else 'FAILED'} ({r['seconds']} s)")
    return results


# ------------------------------------------------------------------------------------------
# summary.md
# ------------------------------------------------------------------------------------------

def _fmt(v, spec=".3g"):
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def write_summary(ctx: Ctx, results: Dict[str, dict]) -> str:
    env = results.get("env", {})
    lines = [f"# tkd on {env.get('gpu', 'a GPU')}: `python -m bench gpu"
             f"{' --quick' if ctx.quick else ''}`", "",
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}, commit {env.get('commit')}, "
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"driver {env.get('driver')}, sm {env.get('compute_capability')}, "
             f"extension built with CUDA: {env.get('ext_cuda')}.", "",
             "| section | status | seconds | notes |", "|---|---|---|---|"]
    for name, r in results.items():
        status = "ok" if r.get("ok") else "**FAILED**"
        lines.append(f"| {name} | {status} | {r.get('seconds', '')} | "
                     f"{str(r.get('error', '')).splitlines()[0][:160] if r.get('error') else ''} |")
    if "tests" in results and "total" in results["tests"]:
        t = results["tests"]["total"]
        lines += ["", "## Tests on CUDA", "",
                  f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
                  f"{t['skipped']} skipped (CPU-only), {t['not_reached']} not reached in the "
                  f"budget, of {t['collected']} collected. Logs: tests/*.log."]
        lines += [f"- FAILED {f}" for f in results["tests"]["failures"][:40]]
    if "compile" in results and "checks" in results["compile"]:
        lines += ["", "## torch.compile, CUDA graphs, autocast", "",
                  "| check | ok | numbers |", "|---|---|---|"]
        for name, c in results["compile"]["checks"].items():
            nums = ", ".join(f"{k} {_fmt(v)}" for k, v in c.items() if k != "ok")
            lines.append(f"| {name} | {'yes' if c.get('ok') else '**no**'} | {nums} |")
    if "train" in results and "runs" in results["train"]:
        tr = results["train"]
        lines += ["", f"## Training: bert-base shaped, {tr['steps']} steps on {tr['task']}", "",
                  "| run | exit | tokens/s | peak GiB | final loss | NaN | vs fp16 curve |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in tr["runs"].items():
            vs = r.get("vs_fp16") or {}
            cmp_ = (f"mean abs diff {_fmt(vs['mean_abs_diff'])}" if vs.get("steps") else "")
            peak = r.get("peak_memory_mb")
            lines.append(f"| {name} | {r['returncode']} | {_fmt(r.get('tokens_per_s'), '.0f')} | "
                         f"{_fmt(peak / 1024, '.2f') if peak else 'n/a'} | "
                         f"{_fmt((r.get('metrics') or {}).get('loss'))} | {r['nan']} | {cmp_} |")
        lines.append("\nLoss curves: train/loss_curves.csv; each run's own files in train/<run>/.")
    if "bench" in results and "targets" in results["bench"]:
        lines += ["", "## Targets", "", "| target | met | numbers |", "|---|---|---|"]
        for t in results["bench"]["targets"]:
            met = {True: "met", False: "**NOT met**", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {met} | {t['numbers']} |")
        lines.append("\nCSVs: " + ", ".join(f"bench/{c}" for c in results["bench"]["csvs"]))
    path = os.path.join(ctx.out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def find_sst2(flag: Optional[str]) -> Optional[str]:
    cands = [flag] if flag else [os.path.join(ROOT, c) for c in SST2_CANDIDATES]
    for d in cands:
        if d and all(os.path.exists(os.path.join(d, f)) for f in ("train.tsv", "dev.tsv")):
            return os.path.abspath(d)
    if flag:
        raise SystemExit(f"--data-dir {flag}: no train.tsv and dev.tsv there")
    return None


def default_out(gpu_name: str) -> str:
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    dev = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return os.path.join(ROOT, "bench", "results",
                        f"gpu-{dev}-{datetime.datetime.now():%Y%m%d-%H%M}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes, steps, tests (<= 4 min)")
    p.add_argument("--dry-run", action="store_true", help="list what would run; needs no GPU")
    p.add_argument("--out", help="output folder (default: $OUT, else "
                                 "bench/results/gpu-<device>-<date>/)")
    p.add_argument("--data-dir", help="SST-2 folder (train.tsv, dev.tsv) for the training run "
                                      f"(default: the first of {SST2_CANDIDATES} that exists, "
                                      "else the synthetic task)")
    p.add_argument("--only", help="comma-separated sections among tests, compile, train, bench")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [s.name for s in plan()]
    only = [o.strip() for o in args.only.split(",")] if args.only else None
    if only and not set(only) <= set(names):
        p.error(f"--only: unknown section(s) {sorted(set(only) - set(names))}; valid: {names}")
    if args.child:
        ctx = Ctx(args.out, args.quick, None, None)
        return child_main(args.child, ctx, args.deadline or time.time() + ctx.budget(args.child))
    import torch
    if args.dry_run:
        ctx = Ctx(args.out or default_out("<device>"), args.quick, find_sst2(args.data_dir), only)
        budget = sum(ctx.budget(s) for s in BUDGETS[ctx.mode])
        print(f"python -m bench gpu{' --quick' if args.quick else ''}: would write under "
              f"{ctx.out}\nbudget {budget} s at most ({budget / 60:.1f} min; build only when "
              "tkd_core._C lacks its CUDA part)")
        for s in plan():
            if only and s.name not in only and s.name not in ("env", "summary"):
                continue
            print(f"\n[{s.name}]")
            for line in s.describe(ctx):
                print(f"  {line}")
        return 0
    for var in ("TRITON_INTERPRET", "TKD_OPS"):  # compiled kernels in every child
        os.environ.pop(var, None)
    if not torch.cuda.is_available():
        print(f"python -m bench gpu: no CUDA device here (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda or 'none'}): this command checks tkd on a GPU. Run it on a "
              "CUDA machine, or add --dry-run to see what it would run.", file=sys.stderr)
        return 2
    ctx = Ctx(args.out or default_out(torch.cuda.get_device_name(0)), args.quick,
              find_sst2(args.data_dir), only)
    os.makedirs(ctx.out, exist_ok=True)
    print(f"[bench gpu] writing under {ctx.out}")
    results = run_sections(plan(), ctx)
    print(f"[bench gpu] summary: {os.path.join(ctx.out, 'summary.md')}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
