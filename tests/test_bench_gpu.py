"""`python -m bench gpu` without a GPU: it stops at once on a CPU-only machine, --dry-run lists
every section and needs no GPU, a failing section is recorded and the next one runs, and the
pieces that do not need CUDA (log parsing, run reading, targets, summary, the compile / autocast
checks and the bench section in a CPU smoke run) work."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu, gpu_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench_gpu(*args, env=None, timeout=300):
    env = dict(os.environ, **(env or {}))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "bench", "gpu", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p, time.time() - t0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cpu_only_machine_exits_at_once_with_a_clear_message(tmp_path):
    out = tmp_path / "out"
    p, seconds = run_bench_gpu(env={"OUT": str(out), "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA device here" in p.stderr and "--dry-run" in p.stderr
    assert not out.exists(), "nothing is written without a GPU"
    assert seconds < 60  # imports torch, then stops: no section ran


def test_dry_run_lists_every_section_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    p, _ = run_bench_gpu("--dry-run", "--out", str(out))
    assert p.returncode == 0, p.stderr
    text = p.stdout
    for name in ("env", "tests", "compile", "train", "bench", "summary"):
        assert f"[{name}]" in text
    for f in gpu.TEST_FILES:
        assert f"--device cuda {f}" in text
    assert "TKD_OPS=reference python -m tkd_core.train" in text
    assert "200 steps" in text and f"budget {sum(gpu.BUDGETS['full'].values())} s" in text
    assert not out.exists()


def test_budgets_fit_the_issue():
    assert sum(gpu.BUDGETS["full"].values()) <= 8 * 60
    assert sum(gpu.BUDGETS["quick"].values()) <= 4 * 60
    assert set(gpu.BUDGETS["full"]) == set(gpu.BUDGETS["quick"])


def test_dry_run_quick_and_only(tmp_path):
    p, _ = run_bench_gpu("--dry-run", "--quick", "--only", "bench", "--out", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr
    assert "[bench]" in p.stdout and "[env]" in p.stdout and "[tests]" not in p.stdout
    assert f"budget {sum(gpu.BUDGETS['quick'].values())} s" in p.stdout
    p, _ = run_bench_gpu("--dry-run", "--only", "nope")
    assert p.returncode == 2 and "unknown section" in p.stderr
    p, _ = run_bench_gpu("--dry-run", "--data-dir", str(tmp_path))
    assert p.returncode != 0 and "no train.tsv and dev.tsv" in p.stderr


def test_training_flags_exist_in_the_trainer(tmp_path):
    ctx = gpu.Ctx(str(tmp_path), False, "/data/SST-2", None)
    help_text = subprocess.run([sys.executable, "-m", "tkd_core.train", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120).stdout
    for _, env, argv in gpu.train_commands(ctx, str(tmp_path), vocab="tok.json"):
        for flag in (a for a in argv if a.startswith("--")):
            assert flag in help_text, f"python -m tkd_core.train has no {flag}"
        assert env in ({}, {"TKD_OPS": "reference"})


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    ran = []

    def boom(ctx, folder):
        raise RuntimeError("kernel fault")

    def fine(ctx, folder):
        ran.append(folder)
        return dict(ok=True)

    sections = [gpu.Section("env", lambda c: [], lambda c, d: dict(ok=True, gpu="fake")),
                gpu.Section("tests", lambda c: [], boom),
                gpu.Section("bench", lambda c: [], fine)]
    ctx = gpu.Ctx(str(tmp_path), True, None, None)
    results = gpu.run_sections(sections, ctx, log=lambda *a: None)
    assert results["tests"]["ok"] is False and "kernel fault" in results["tests"]["error"]
    assert "RuntimeError: kernel fault" in (tmp_path / "tests" / "error.txt").read_text()
    assert ran and results["bench"]["ok"]
    saved = json.loads((tmp_path / "tests" / "result.json").read_text())
    assert saved["ok"] is False and "seconds" in saved
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests | **FAILED** |" in summary and "| bench | ok |" in summary


def test_parse_pytest_log_of_a_run_cut_off():
    log = ("collected 5 items\n\n"
           "tests/test_x.py::test_a PASSED                [ 20%]\n"
           "tests/test_x.py::test_b[1-2] FAILED          [ 40%]\n"
           "tests/test_x.py::test_c SKIPPED (CPU-only)   [ 60%]\n"
           "tests/test_x.py::test_d PASSED               [ 80%]\n"
           "tests/test_x.py::test_d ERROR                [ 80%]\n")
    r = gpu.parse_pytest_log(log)
    assert (r["collected"], r["passed"], r["failed"], r["skipped"], r["error"]) == (5, 1, 1, 1, 1)
    assert r["not_reached"] == 1
    assert r["failures"] == ["tests/test_x.py::test_b[1-2]", "tests/test_x.py::test_d"]


def test_read_run_keeps_the_last_record_of_a_step_and_sees_nan(tmp_path):
    recs = [dict(type="step", step=1, loss=0.7), dict(type="step", step=2, loss=0.6),
            dict(type="eval", step=2, accuracy=0.5), dict(type="step", step=2, loss=0.5),
            dict(type="step", step=3, loss=float("nan"))]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "summary.json").write_text(json.dumps(dict(tokens_per_s=123.0)))
    r = gpu.read_run(str(tmp_path))
    assert r["losses"][:2] == [0.7, 0.5] and r["nan"] and r["tokens_per_s"] == 123.0
    c = gpu.compare_curves([1.0, 0.5, 0.25], [1.0, 0.75])
    assert c["steps"] == 2 and c["mean_abs_diff"] == pytest.approx(0.125)


def test_targets_met_and_not_met():
    rows = [dict(op="layer_norm", mode="fwd+bwd", shape="M=8192 N=768", provider="tkd", ms=1.0,
                 pct_hbm=85.0, **{"GB/s": 4000.0}),
            dict(op="layer_norm", mode="fwd+bwd", shape="M=8192 N=8192", provider="tkd", ms=1.0,
                 pct_hbm=70.0, **{"GB/s": 3300.0}),
            dict(op="int8_gemm", mode="gemm", shape="M=4096 K=768 N=768", provider="tkd", ms=1.0,
                 **{"TOP/s": 400.0}),
            dict(op="int8_gemm", mode="gemm", shape="M=4096 K=768 N=768", provider="torch_int_mm",
                 ms=1.0, **{"TOP/s": 500.0}),
            dict(op="int8_gemm", mode="gemm", shape="M=128 K=768 N=768", provider="tkd", ms=1.0,
                 **{"TOP/s": 1.0})]
    t = {x["target"].split()[0]: x for x in gpu_bench.targets(rows)}
    assert t["LayerNorm"]["met"] is False and "70-85%" in t["LayerNorm"]["numbers"]
    assert t["INT8"]["met"] is True and "0.80" in t["INT8"]["numbers"]  # M=128 not counted
    assert t["kd_loss"]["met"] is None and t["attention"]["met"] is None


def test_bench_section_smoke_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' torch references: fast on CPU
    r = gpu_bench.run(str(tmp_path), False, time.time() + 120, torch.device("cpu"), smoke=True)
    assert r["stopped"] is None and r["bandwidth_gbs"] > 0
    assert set(r["csvs"]) == {f"{op}.csv" for op in ("bandwidth", "layer_norm", "kd_loss",
                                                     "attention", "int8_gemm")}
    header = (tmp_path / "layer_norm.csv").read_text().splitlines()[0].split(",")
    assert header == gpu_bench.COLUMNS
    tkd_rows = [line for line in (tmp_path / "int8_gemm.csv").read_text().splitlines()
                if ",tkd," in line]
    assert tkd_rows and "exact on 16 rows: True" in tkd_rows[0]
    assert len(r["targets"]) == 4


def test_compile_and_autocast_checks_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = gpu.check_compile(torch.device("cpu"), backend="aot_eager")
    assert c["ok"], c
    a = gpu.check_autocast(torch.device("cpu"), "bfloat16")
    assert a["ok"] and a["logits_dtype"] == "bfloat16", a


def test_pytest_device_cuda_without_a_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "--device", "cuda",
                        "tests/test_nn.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 4 and "--device cuda: no CUDA device here" in p.stderr + p.stdout
