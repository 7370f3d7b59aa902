"""The run directory is the user's, and bad values are loud (issue: nothing lost, nothing
silently wrong). Each test names the audit item it covers."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from test_train import read_log, tiny_args, vocab, weights  # noqa: F401  (vocab: a fixture)
from tkd_core import checkpoint, rundir, train

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock(out, pid, host=None):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, rundir.LOCK), "w") as f:
        json.dump(dict(pid=pid, host=host or socket.gethostname()), f)


# -- item 1: one trainer per directory ------------------------------------------------------

def test_a_live_lock_refuses_a_second_trainer(tmp_path, vocab, reference_backend, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, other.pid)
        assert train.main(["--mode", "teacher", "--max-steps", "1"]
                          + tiny_args(vocab, tmp_path)) == 1
        err = capsys.readouterr().err
        assert f"in use by another trainer (pid {other.pid}" in err
        assert not os.path.exists(tmp_path / "checkpoint.pt")  # refused before any work
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, vocab, reference_backend):
    _lock(tmp_path, _dead_pid())
    assert train.main(["--mode", "teacher", "--max-steps", "1"] + tiny_args(vocab, tmp_path)) == 0
    assert not os.path.exists(tmp_path / rundir.LOCK)  # released on exit


def test_two_trainers_at_once_one_refused(tmp_path, vocab):
    """Two real processes into one --out: exactly one trains, the other refuses at start."""
    cmd = [sys.executable, "-m", "tkd_core.train", "--mode", "teacher", "--max-steps", "30"] + \
        tiny_args(vocab, tmp_path)
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    ps = [subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
          for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in ps]
    codes = sorted(p.returncode for p in ps)
    assert codes == [0, 1], errs
    assert any("in use by another trainer" in e or "already holds" in e for e in errs), errs
    steps = [r["step"] for r in read_log(tmp_path) if r["type"] == "step"]
    assert steps == list(range(1, 31))  # one run's log, not a mix


def _race_for_the_lock(out, go, results, done):
    """A child process: wait for the start signal, take the lock, hold it until every racer
    has reported."""
    go.wait()
    try:
        rd = rundir.RunDir(out).acquire()
    except RuntimeError as e:
        results.put("refused" if "in use by another trainer" in str(e) else f"error: {e}")
        return
    results.put("ok")
    done.wait(60)
    rd.release()


@pytest.mark.parametrize("stale", [False, True])
def test_racing_trainers_exactly_one_takes_the_lock(tmp_path, stale):
    """Four processes released at once on one --out, 10 times (with a stale lock of a dead
    trainer there first, or none): exactly one holds the lock each time. Before the lock was
    written whole, a racer could read it empty, take it for unreadable and remove it."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for trial in range(10):
        out = str(tmp_path / f"t{trial}")
        if stale:
            _lock(out, _dead_pid())
        go, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
        ps = [ctx.Process(target=_race_for_the_lock, args=(out, go, results, done))
              for _ in range(4)]
        for p in ps:
            p.start()
        go.set()
        got = sorted(results.get(timeout=60) for _ in ps)
        done.set()
        for p in ps:
            p.join(timeout=60)
        assert got == ["ok", "refused", "refused", "refused"], (trial, got)
        assert sorted(os.listdir(out)) == [], os.listdir(out)  # released, nothing left aside


# -- item 2: no silent overwrite -----------------------------------------------------------

def test_rerun_without_resume_is_refused_and_overwrite_is_consistent(tmp_path, vocab,
                                                                     reference_backend, capsys):
    argv = ["--mode", "teacher", "--max-steps", "6"] + tiny_args(vocab, tmp_path)
    assert train.main(argv) == 0
    before = checkpoint.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"]
    capsys.readouterr()
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--resume" in err and "--overwrite" in err
    assert checkpoint.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == before
    # --overwrite, then stopped early: checkpoint, summary, model and log are all the new run's
    assert train.main(argv + ["--overwrite", "--stop-at-step", "2"]) == 0
    s = json.load(open(tmp_path / "summary.json"))
    assert s["steps"] == 2 and not s["finished"]
    assert checkpoint.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 2
    assert [r["step"] for r in read_log(tmp_path) if r["type"] == "step"] == [1, 2]
    assert train.main(argv + ["--overwrite", "--resume"]) == 1  # contradictory


# -- item 3: the log matches the checkpoint after a resume ------------------------------------

def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path, vocab, reference_backend):
    common = ["--mode", "teacher", "--max-steps", "8"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(common + tiny_args(vocab, a)) == 0
    assert train.main(common + ["--stop-at-step", "4"] + tiny_args(vocab, b)) == 0
    saved = (b / "checkpoint.pt").read_bytes()
    assert train.main(common + ["--resume", "--stop-at-step", "6"] + tiny_args(vocab, b)) == 0
    (b / "checkpoint.pt").write_bytes(saved)  # as if killed after step 6, checkpoint at 4
    assert train.main(common + ["--resume"] + tiny_args(vocab, b)) == 0
    steps = [r["step"] for r in read_log(b) if r["type"] == "step"]
    assert steps == list(range(1, 9))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_truncate_log_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"type": "step", "step": 1}\n{"type": "step", "step": 2}\n{"type": "st')
    rundir.truncate_log(str(p), 1)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1]


# -- item 4: every flag checked before any work ---------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["--clip", "-1"], "--clip must be >= 0"),
    (["--lr", "0"], "--lr must be a positive"),
    (["--lr", "nan"], "--lr must be a positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--max-steps", "-5"], "--max-steps must be >= 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--vocab-size", "0"], "--vocab-size must be >= 6"),
    (["--batch-size", "-8"], "--batch-size must be >= 1"),
    (["--accum", "0"], "--accum must be >= 1"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--max-len", "0"], "--max-len must be >= 3"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--set", "pre_ln=ture"], "expected true/false"),
    (["--set", "hidden_size=abc"], "expected a int"),
    (["--set", "num_labels=3"], "comes from the task"),
    (["--set", "vocab_size=10"], "comes from the tokenizer"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda:0"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_bad_flags_fail_at_parse_time(tmp_path, flags, match, capsys):
    out = tmp_path / "run"
    assert train.main(["--mode", "teacher", "--out", str(out)] + flags) == 1
    assert match in capsys.readouterr().err
    assert not out.exists()  # no work done


def test_set_booleans_are_strict():
    from tkd_core.train_args import parse_override
    assert parse_override("pre_ln=Yes") == ("pre_ln", True)
    assert parse_override("pre_ln=0") == ("pre_ln", False)


def test_lr_is_used_as_given(tmp_path, vocab, reference_backend):
    assert train.main(["--mode", "teacher", "--max-steps", "3", "--lr", "1e-6", "--warmup", "0"]
                      + tiny_args(vocab, tmp_path)) == 0
    assert read_log(tmp_path)[0]["lr"] == pytest.approx(1e-6)  # not the 5e-4 default


# -- item 5: a resume with other settings -----------------------------------------------------

def test_resume_with_changed_settings(tmp_path, vocab, reference_backend, capsys):
    base = ["--mode", "teacher", "--max-steps", "6"]
    assert train.main(base + ["--stop-at-step", "2"] + tiny_args(vocab, tmp_path)) == 0
    capsys.readouterr()
    for extra, match in [(["--batch-size", "8"], "--batch-size was 16, now 8"),
                         (["--seed", "3"], "--seed was 0, now 3"),
                         (["--set", "pre_ln=true"], "--set was [], now ['pre_ln=true']"),
                         (["--preset", "cpu-student-2"], "--preset was 'tiny'")]:
        assert train.main(base + ["--resume"] + tiny_args(vocab, tmp_path) + extra) == 1
        err = capsys.readouterr().err
        assert "cannot change" in err and match in err, err
    assert train.main(base + ["--resume", "--lr", "1e-3", "--max-steps", "4"]
                      + tiny_args(vocab, tmp_path)) == 0
    err = capsys.readouterr().err
    assert "WARNING: --lr 0.001 is ignored on resume" in err
    assert "--max-steps changed on resume (6 -> 4)" in err
    assert json.load(open(tmp_path / "summary.json"))["steps"] == 4


# -- end to end: kill -9, refused rerun, resume ----------------------------------------------

def test_kill_refuse_resume_end_to_end(tmp_path, vocab):
    common = ["--mode", "teacher", "--max-steps", "40", "--save-every", "3", "--seed", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tkd_core.train"]
    r = subprocess.run(cmd + common + tiny_args(vocab, a), env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    kill_at = random.Random(os.environ.get("TKD_TEST_SEED")).randint(5, 30)
    p = subprocess.Popen(cmd + common + tiny_args(vocab, b), env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        try:
            if sum('"type": "step"' in x for x in open(b / "log.jsonl")) >= kill_at:
                break
        except OSError:
            pass
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(b / rundir.LOCK)  # left behind by the killed trainer
    r = subprocess.run(cmd + common + tiny_args(vocab, b), env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--resume" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(cmd + common + ["--resume"] + tiny_args(vocab, b), env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"killed at step ~{kill_at}"
    steps = [x["step"] for x in read_log(b) if x["type"] == "step"]
    assert steps == list(range(1, 41)), f"killed at step ~{kill_at}"


# -- item 9: a corrupt teacher-logits cache is recomputed -------------------------------------

@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 50, b"PK\x03\x04truncated"])
def test_corrupt_teacher_logits_cache_is_recomputed(tmp_path, vocab, reference_backend, content,
                                                    capsys):
    t, cache = tmp_path / "t", tmp_path / "logits.pt"
    assert train.main(["--mode", "teacher", "--max-steps", "1"] + tiny_args(vocab, t)) == 0
    cache.write_bytes(content)
    assert train.main(["--mode", "distill", "--teacher", str(t / "checkpoint.pt"),
                       "--max-steps", "1", "--teacher-logits", str(cache)]
                      + tiny_args(vocab, tmp_path / "s")) == 0
    assert "unreadable" in capsys.readouterr().out
    assert torch.load(cache, weights_only=True)["logits"].shape == (96, 2)


# -- item 11: a rank whose peers never start stops, naming them ------------------------------

def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank, match", [(0, "rank(s) [1, 2] of WORLD_SIZE=3 did not start"),
                                         (2, "could not reach rank 0's store")])
def test_missing_ranks_time_out_with_their_names(tmp_path, vocab, rank, match):
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="3",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), TRITON_INTERPRET="0")
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "tkd_core.train", "--mode", "teacher",
                        "--max-steps", "1", "--dist-timeout", "3"]
                       + tiny_args(vocab, tmp_path) + ["--batch-size", "15"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and match in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 60


def test_a_missing_dependency_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "safetensors" else real(name, *a))
    out = tmp_path / "run"
    assert train.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: python -m tkd_core.train needs safetensors: pip install " \
                          "safetensors" and not out.exists()
