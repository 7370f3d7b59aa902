"""The trainer end to end at a tiny size: every mode, the default pipeline, exact resume, 2-process
DDP against one process, divergence handling, bad input, and a convergence check of the Triton
kernels (interpreter) against the torch references."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import SST2_DIR
from tkd_core import checkpoint, data, distill, train, warmstart
from tkd_core.models import ModelConfig, build_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "glue")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A fixed tokenizer: WordPiece training breaks ties in a process-dependent order, so runs
    that must agree to the bit share one vocabulary."""
    d = tmp_path_factory.mktemp("vocab")
    tok = data.train_tokenizer(data.texts(data.load_split("synthetic", "train")[:2000]), 500)
    return data.save_tokenizer(tok, str(d))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(vocab, out, *extra, n_train=96):
    return ["--preset", "tiny", "--max-train-examples", str(n_train), "--max-dev-examples", "32",
            "--batch-size", "16", "--max-len", "32", "--no-progress", "--threads", "1",
            "--vocab", vocab, "--out", str(out), *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "model.safetensors"))


def test_each_mode(tmp_path, vocab, reference_backend):
    t, s, kd = tmp_path / "teacher", tmp_path / "student", tmp_path / "kd"
    assert train.main(["--mode", "teacher", "--epochs", "1"] + tiny_args(vocab, t)) == 0
    assert train.main(["--mode", "student", "--max-steps", "5", "--profile"]
                      + tiny_args(vocab, s)) == 0
    assert train.main(["--mode", "distill", "--teacher", str(t / "checkpoint.pt"),
                       "--max-steps", "4", "--accum", "2", "--warmup", "2"] + tiny_args(vocab, kd)) == 0
    # checkpoint: everything to resume, clean keys, loadable with weights_only=True
    ck = checkpoint.load_checkpoint(str(t / "checkpoint.pt"))
    for k in ("model", "optimizer", "scheduler", "scaler", "rng", "step", "epoch",
              "batch_in_epoch", "config", "tokenizer"):
        assert k in ck, k
    assert ck["step"] == 6 and ck["epoch"] == 1 and ck["batch_in_epoch"] == 0
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert not [f for f in os.listdir(t) if ".tmp" in f]  # atomic write left nothing behind
    model = build_model(ModelConfig.from_dict(ck["config"]))
    model.load_state_dict(weights(t))  # model.safetensors
    # the logs: every step's losses, lr and throughput, and the evaluations
    steps = [r for r in read_log(kd) if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["kd_loss"] is not None and r["hard_loss"] > 0 and r["tokens_per_s"] > 0
        # kd_loss(alpha=0.5) = 0.5 * KL + 0.5 * CE
        assert r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["hard_loss"], rel=1e-4)
    assert steps[0]["lr"] < steps[1]["lr"] > steps[3]["lr"]  # warmup, then decay
    assert [r for r in read_log(kd) if r["type"] == "eval"][-1]["accuracy"] >= 0
    assert all(r["kd_loss"] is None for r in read_log(s) if r["type"] == "step")
    summary = json.load(open(s / "summary.json"))
    assert summary["steps"] == 5 and summary["finished"] and "accuracy" in summary["metrics"]
    assert summary["peak_memory_mb"] > 10  # the process' peak resident set on CPU
    assert os.path.getsize(s / "trace_rank0.json") > 0  # --profile


def test_default_pipeline_at_tiny_size(tmp_path, vocab, reference_backend, capsys):
    rc = train.main(["--teacher-preset", "tiny", "--student-preset", "tiny", "--teacher-epochs",
                     "1", "--student-epochs", "1"] + tiny_args(vocab, tmp_path))
    assert rc == 0
    out = capsys.readouterr().out
    assert "teacher (2L)" in out and "student KD (2L)" in out
    assert "student KD INT8" in out or "INT8 student: not available" in out
    rows = json.load(open(tmp_path / "summary.json"))["rows"]
    for r in rows:
        assert r["params"] > 0 and r["size_mb"] > 0 and r["cpu_latency_ms"] > 0
        assert 0 <= r["score"] <= 1


def test_resume_gives_identical_weights(tmp_path, vocab, reference_backend):
    # dropout on (RNG state restored), accumulation, an epoch boundary after the resume point
    common = ["--mode", "teacher", "--max-steps", "8", "--accum", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(common + tiny_args(vocab, a)) == 0
    assert train.main(common + ["--stop-at-step", "4"] + tiny_args(vocab, b)) == 0
    assert checkpoint.load_checkpoint(str(b / "checkpoint.pt"))["step"] == 4
    assert train.main(common + ["--resume"] + tiny_args(vocab, b)) == 0
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [r["loss"] for r in read_log(a) if r["type"] == "step"]
    lb = [r["loss"] for r in read_log(b) if r["type"] == "step"]
    assert la == lb and len(la) == 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("task", ["synthetic", "stsb"])
def test_ddp_two_processes_match_one(tmp_path, vocab, reference_backend, task):
    """torchrun, 2 gloo processes, half the batch each, vs one process with the whole global
    batch: same global batches, losses and metrics within 1e-5 (dropout off; accumulation and an
    uneven last batch included). STS-B: regression, the sharded predictions are gathered."""
    args = ["--mode", "teacher", "--max-steps", "4", "--accum", "2", "--set", "hidden_dropout=0",
            "--set", "attention_dropout=0"]
    if task == "stsb":  # 6 train / 4 dev fixture rows, global batch 2
        args += ["--task", "stsb", "--data-dir", os.path.join(FIXTURES, "STS-B"),
                 "--batch-size", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(tiny_args(vocab, one, n_train=112) + args) == 0
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "tkd_core.train"] + tiny_args(vocab, two, n_train=112) + args
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = read_log(one), read_log(two)
    assert [x["type"] for x in l1] == [x["type"] for x in l2]
    assert sum(x["type"] == "eval" for x in l1) >= 1
    # correlations of a 4-step model's nearly constant predictions amplify float noise (the
    # eval batches pad differently per shard): looser tolerance for them only
    tol = {"loss": 1e-5, "accuracy": 1e-5, "pearson": 1e-3, "spearman": 1e-3}
    for x, y in zip(l1, l2):
        for k, t in tol.items():
            if k in x:
                assert abs(x[k] - y[k]) <= t, (k, x, y)
    assert json.load(open(two / "summary.json"))["world"] == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, vocab, reference_backend,
                                                       monkeypatch, capsys):
    real, calls = distill.HardLabel.forward, []

    def poisoned(*a, **k):
        calls.append(1)
        loss, parts = real(*a, **k)
        return (loss * float("nan"), parts) if len(calls) == 4 else (loss, parts)
    monkeypatch.setattr(distill.HardLabel, "forward", poisoned)
    rc = train.main(["--mode", "teacher", "--max-steps", "6", "--save-every", "1"]
                    + tiny_args(vocab, tmp_path))
    assert rc == 1
    err = capsys.readouterr().err
    assert "loss became nan at step 4" in err and "last good checkpoint" in err
    assert checkpoint.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 3
    assert read_log(tmp_path)[-1]["type"] == "diverged"


def test_bad_input_is_reported_clearly(tmp_path, vocab, reference_backend, capsys):
    def fails(argv, match):
        assert train.main(argv) == 1
        err = capsys.readouterr().err
        assert match in err, err

    fails(["--task", "imdb"], "valid tasks: cola, sst2")
    fails(["--mode", "teacher", "--task", "sst2", "--data-dir", str(tmp_path / "nope")],
          "does not exist")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    fails(["--mode", "teacher", "--resume", str(bad)] + tiny_args(vocab, tmp_path / "r"),
          "is corrupt or not a tkd checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        checkpoint.load_checkpoint(str(bad))
    # a 2-label teacher cannot teach the 3-label MNLI student
    t = tmp_path / "t"
    assert train.main(["--mode", "teacher", "--max-steps", "1"] + tiny_args(vocab, t)) == 0
    fails(["--mode", "distill", "--teacher", str(t / "checkpoint.pt"), "--task", "mnli",
           "--data-dir", os.path.join(FIXTURES, "MNLI")] + tiny_args(vocab, tmp_path / "s"),
          "label counts must match")
    fails(["--mode", "teacher", "--set", "hiden_size=3"], "unknown ModelConfig key 'hiden_size'")


def test_glue_fixture_pair_task_trains(tmp_path, reference_backend):
    out = tmp_path / "stsb"
    assert train.main(["--mode", "teacher", "--task", "stsb", "--data-dir",
                       os.path.join(FIXTURES, "STS-B"), "--preset", "tiny", "--max-steps", "2",
                       "--batch-size", "4", "--no-progress", "--threads", "1", "--out",
                       str(out)]) == 0
    m = json.load(open(out / "summary.json"))["metrics"]
    assert {"pearson", "spearman", "loss"} <= set(m)
    assert os.path.isfile(out / "vocab.txt")  # the tokenizer trained on the split is saved


def test_interpreter_kernels_follow_the_reference_loss_curve(tmp_path, vocab, monkeypatch):
    """The same tiny distillation run with the Triton kernels (interpreter: attention, add+LN,
    KD loss) and with the torch references: the loss curves agree within tolerance. Sized for
    the interpreter (1 layer, batch 4, <= 16 tokens)."""
    small = ["--set", "num_layers=1", "--set", "hidden_dropout=0", "--set", "attention_dropout=0",
             "--batch-size", "4", "--max-len", "16", "--max-dev-examples", "4"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = tmp_path / "t"
    assert train.main(["--mode", "teacher", "--max-steps", "2"] + tiny_args(vocab, t) + small) == 0
    curves = {}
    for backend in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", backend)
        out = tmp_path / f"run{backend}"
        # (argparse: the last occurrence of an option wins)
        assert train.main(["--mode", "distill", "--teacher", str(t / "checkpoint.pt"),
                           "--max-steps", "4", "--warmup", "1"]
                          + tiny_args(vocab, out, n_train=16) + small) == 0
        curves[backend] = [r["loss"] for r in read_log(out) if r["type"] == "step"]
    ref, ours = curves["0"], curves["1"]
    assert len(ref) == len(ours) == 4
    assert ref[0] != ref[-1]  # it trains
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (ours, ref)


def test_fp16_skipped_steps_are_counted(tmp_path, vocab, reference_backend, monkeypatch):
    """GradScaler steps skipped for inf/NaN gradients are counted and logged (fp16 autocast; on
    CPU here). A huge initial scale makes the first steps overflow for sure."""
    real = torch.amp.GradScaler

    def huge_scale(device, enabled=True):
        return real(device, init_scale=2.0 ** 100, enabled=enabled)
    monkeypatch.setattr(train.torch.amp, "GradScaler", huge_scale)
    out = tmp_path / "fp16"
    assert train.main(["--mode", "teacher", "--max-steps", "3", "--precision", "fp16"]
                      + tiny_args(vocab, out)) == 0
    steps = [r for r in read_log(out) if r["type"] == "step"]
    assert [r["skipped"] for r in steps] == [True, True, True]
    assert steps[-1]["skipped_steps"] == 3
    assert json.load(open(out / "summary.json"))["skipped_steps"] == 3
    ck = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert ck["scaler"]["scale"] == 2.0 ** 97  # halved once per skipped step


@pytest.mark.skipif(not os.path.isdir(SST2_DIR), reason=f"GLUE SST-2 not present at {SST2_DIR}")
def test_real_sst2_trains(tmp_path, reference_backend):
    out = tmp_path / "sst2"
    assert train.main(["--mode", "student", "--task", "sst2", "--data-dir", SST2_DIR, "--preset",
                       "tiny", "--max-train-examples", "256", "--max-dev-examples", "64",
                       "--max-steps", "3", "--batch-size", "32", "--vocab-size", "1000",
                       "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    s = json.load(open(out / "summary.json"))
    assert s["task"] == "sst2" and 0 <= s["metrics"]["accuracy"] <= 1


def test_preset_chooses_the_architecture(tmp_path, vocab, reference_backend):
    """`--preset tiny-bilstm` alone builds a BiLSTM (the preset's arch); `--arch` overrides it."""
    for extra, want in ((["--preset", "tiny-bilstm"], "bilstm"),
                        (["--preset", "tiny-bilstm", "--arch", "cnn"], "cnn")):
        out = tmp_path / want
        assert train.main(["--mode", "student", "--max-steps", "1"] + tiny_args(vocab, out)
                          + extra) == 0
        assert checkpoint.load_checkpoint(str(out / "checkpoint.pt"))["config"]["arch"] == want


def test_resume_with_group_by_length_is_exact(tmp_path, vocab, reference_backend):
    common = ["--mode", "teacher", "--max-steps", "8", "--group-by-length"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(common + tiny_args(vocab, a)) == 0
    assert train.main(common + ["--stop-at-step", "3"] + tiny_args(vocab, b)) == 0
    assert train.main(common + ["--resume"] + tiny_args(vocab, b)) == 0
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_teacher_logits_file_is_shared_and_checked(tmp_path, vocab, reference_backend):
    """--teacher-logits: the teacher writes its train-set logits once; a distill run reading
    them trains like one computing them itself; a file from another teacher is recomputed."""
    t, t2 = tmp_path / "teacher", tmp_path / "teacher2"
    cache = tmp_path / "logits.pt"
    # a wide init: the teacher's logits differ per example, so a row mix-up would show
    assert train.main(["--mode", "teacher", "--max-steps", "3", "--set", "initializer_range=0.5",
                       "--teacher-logits", str(cache)] + tiny_args(vocab, t)) == 0
    ck = torch.load(cache, weights_only=True)
    teacher, _ = warmstart.load_teacher(str(t / "checkpoint.pt"), data.get_task("synthetic"),
                                    torch.device("cpu"))
    items = data.encode(data.load_tokenizer(vocab),
                        data.load_split("synthetic", "train")[:96], 32)
    b = data.collate(items[:5])
    with torch.no_grad():
        want = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert ck["logits"].shape == (96, 2)
    assert (ck["logits"] - ck["logits"].mean(0)).abs().max() > 1e-2  # rows tell examples apart
    torch.testing.assert_close(ck["logits"][:5], want, rtol=1e-5, atol=1e-6)

    common = ["--mode", "distill", "--teacher", str(t / "checkpoint.pt"), "--max-steps", "4",
              "--set", "hidden_dropout=0", "--set", "attention_dropout=0"]
    a, c = tmp_path / "a", tmp_path / "c"
    mtime = os.path.getmtime(cache)
    assert train.main(common + tiny_args(vocab, a)) == 0
    assert train.main(common + ["--teacher-logits", str(cache)] + tiny_args(vocab, c)) == 0
    assert os.path.getmtime(cache) == mtime  # read, not rewritten
    la = [r["kd_loss"] for r in read_log(a) if r["type"] == "step"]
    lc = [r["kd_loss"] for r in read_log(c) if r["type"] == "step"]
    assert la == pytest.approx(lc, rel=1e-4, abs=1e-7)  # teacher logits equal to fp32 rounding

    # another teacher: the stale file is detected and replaced by this teacher's logits
    assert train.main(["--mode", "teacher", "--max-steps", "2", "--seed", "5"]
                      + tiny_args(vocab, t2)) == 0
    assert train.main(["--mode", "distill", "--teacher", str(t2 / "checkpoint.pt"),
                       "--max-steps", "1", "--teacher-logits", str(cache)]
                      + tiny_args(vocab, tmp_path / "d")) == 0
    assert not torch.equal(torch.load(cache, weights_only=True)["logits"], ck["logits"])
