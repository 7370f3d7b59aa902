"""The study (tkd_core.study): plan, scheduler, resumability, targets, and a tiny study end to end
on a slice of real SST-2 (the built-in synthetic task when ../shared is absent)."""
import json
import os
import sys
import types

import pytest
import torch

from conftest import SST2_DIR
from tkd_core.study import jobs, measurements, plan, report, run, stats
from tkd_core.study.__main__ import main as study_main
from tkd_core import data
from tkd_core.models import ModelConfig, build_model
from tkd_core.measure import param_count

HAVE_SST2 = os.path.isfile(os.path.join(SST2_DIR, "train.tsv"))
DATA = ["--task", "sst2", "--data-dir", SST2_DIR] if HAVE_SST2 else ["--task", "synthetic"]
TINY = DATA + ["--jobs", "0", "--max-train-examples", "192", "--max-dev-examples", "96",
               "--teacher-preset", "tiny", "--teacher-set", "pre_ln=true", "hidden_size=48",
               "--student-preset", "tiny", "--baseline-prefix",
               "tiny", "--vocab-size", "1000", "--teacher-epochs", "1", "--student-epochs", "1",
               "--baseline-epochs", "1", "--temperatures", "1", "2", "--latency-reps", "2",
               "--latency-threads", "1", "--threads", "1", "--seeds", "0", "1"]
LABELS = ["Teacher", "TKD-NLP", "TKD-NLP (T=2)", "T-NLP", "KD-NLP (BiLSTM)", "RNN", "LSTM",
          "CNN (Kim 2014)", "TF-IDF + LR", "TKD-NLP INT8"]


def test_default_plan_is_the_issues_study():
    a = run.parse_args(["--out", "x"])
    jobs_ = plan.make_plan(a)
    by_group = {}
    for j in jobs_:
        by_group.setdefault(j.group, []).append(j)
    assert {g: len(js) for g, js in by_group.items()} == {
        "teacher": 1, "tfidf": 1, "tnlp": 3, "rnn": 1, "lstm": 1, "cnn": 1, "tkd": 3,
        "tkd-T2": 3, "tkd-T4": 3, "kd-bilstm": 3}
    assert jobs_[0].name == "teacher"
    assert {j.arch for j in by_group["kd-bilstm"]} == {"bilstm"}
    assert all(j.needs_teacher for j in by_group["tkd"] + by_group["kd-bilstm"])
    assert not any(j.needs_teacher for j in by_group["tnlp"] + by_group["rnn"])
    assert [j.temperature for g in ("tkd", "tkd-T2", "tkd-T4") for j in by_group[g]] == \
        [1, 1, 1, 2, 2, 2, 4, 4, 4]
    # the teacher has >= 5x the student's parameters at the study's vocabulary, as the trainer
    # builds them from each job's command line
    from tkd_core import data, train

    class Tok:
        def get_vocab_size(self):
            return 8000

    def built(job):
        args = train.parse_args(plan.train_argv(job, a, "tok.json"))
        return build_model(train.model_config(args, data.get_task("sst2"), Tok()))
    t, s = built(jobs_[0]), built(by_group["tkd"][0])
    assert t.config.num_layers == 12 and s.config.num_layers < 12
    assert param_count(t) >= 5 * param_count(s)


def test_every_job_is_a_valid_trainer_command_line():
    """The paper's recipe reaches the trainer: KD weight 0.5, batch 64, the temperature."""
    from tkd_core import train
    a = run.parse_args(DATA + ["--out", "runs/x"])
    for job in plan.make_plan(a):
        if job.mode == "tfidf":
            continue
        t = train.parse_args(plan.train_argv(job, a, "tok.json"))
        assert (t.mode, t.arch, t.preset, t.seed) == (job.mode, job.arch, job.preset, job.seed)
        assert (t.alpha, t.batch_size, t.temperature) == (0.5, 64, job.temperature)
        assert t.out == os.path.join("runs/x", job.name)
        assert (t.teacher is not None) == job.needs_teacher
        assert t.set == list(job.overrides)


@pytest.mark.parametrize("argv, match", [
    (["--task", "mrpc"], "single-sentence"),
    (["--baseline-seeds", "4"], "baseline-seeds"),
    (["--temperatures", "2", "4"], "temperatures"),
    (["--jobs", "-1"], "jobs"),
    (["--latency-reps", "0"], "latency-reps"),
    (["--student-epochs", "-1"], "student-epochs must be positive"),
    (["--teacher-lr", "nan"], "teacher-lr must be positive"),
    (["--alpha", "2"], "alpha must be in"),
    (["--temperatures", "1", "-2"], "temperatures must be positive"),
    (["--augment", "-1"], "augment must be >= 0"),
    (["--pretrained", "/nonexistent"], "not a Hugging Face model folder"),
    (["--task", "nope"], "unknown task"),
])
def test_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        run.parse_args(argv)
    assert study_main(argv) == 1


def test_run_state(tmp_path):
    d = str(tmp_path)
    assert jobs.run_state(d) == "new"
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert jobs.run_state(d) == "partial"
    (tmp_path / "summary.json").write_text(json.dumps({"finished": False}))
    assert jobs.run_state(d) == "partial"
    (tmp_path / "summary.json").write_text(json.dumps({"finished": True}))
    assert jobs.run_state(d) == "done"
    (tmp_path / "summary.json").write_text("{truncated")
    assert jobs.run_state(d) == "partial"


def test_run_tasks_order_dependencies_failures(tmp_path):
    py = sys.executable
    mark = tmp_path / "a.done"
    done = {}

    def task(name, code, deps=()):
        return jobs.Task(name, [py, "-c", code], str(tmp_path / name / "log"), deps,
                          on_done=lambda ok, w, c: done.__setitem__(name, (ok, w, c)))
    tasks = [task("a", f"import time; time.sleep(0.3); open({str(mark)!r}, 'w').write('1')"),
             task("b", f"import os, sys; sys.exit(0 if os.path.exists({str(mark)!r}) else 5)",
                  deps=("a",)),
             task("c", "import sys; print('boom'); sys.exit(3)"),
             task("d", "pass", deps=("c",)),
             task("e", "x = sum(range(10**6))")]
    status = jobs.run_tasks(tasks, jobs=2, poll=0.02)
    assert status == {"a": "ok", "b": "ok", "c": "failed", "d": "skipped", "e": "ok"}
    assert {k: v[0] for k, v in done.items()} == {"a": True, "b": True, "c": False, "d": False,
                                                   "e": True}
    assert done["a"][1] >= 0.3 and done["e"][2] >= 0.0
    log_c = (tmp_path / "c" / "log").read_text()
    assert "boom" in log_c and "$ " in log_c
    with pytest.raises(ValueError, match="unknown task"):
        jobs.run_tasks([task("x", "pass", deps=("y",))], jobs=1)
    with pytest.raises(ValueError, match="jobs"):
        jobs.run_tasks([], jobs=0)


def _group(acc, params=1000, lat1=1.0, accs=None, **kw):
    accs = accs or [acc]
    sd = (max(accs) - min(accs)) / 2 ** 0.5 if len(accs) > 1 else 0.0
    return dict(label="x", accuracy=acc, accuracy_std=sd, accuracies=accs, n=len(accs),
                params=params, latency_ms={1: lat1, 32: 10 * lat1}, **kw)


def test_targets_met_and_not_met():
    groups = dict(teacher=_group(0.84, params=6000, lat1=10.0), tfidf=_group(0.82),
                  tkd=_group(0.83, params=1000, accs=[0.829, 0.831]),
                  tnlp=_group(0.80, params=1000, accs=[0.799, 0.801]),
                  **{"kd-bilstm": _group(0.79, accs=[0.789, 0.791])},
                  int8=_group(0.826, lat1=1.2, fp32_accuracy=0.830))
    t = {x["target"].split()[0]: x["met"] for x in stats.targets(groups)}
    assert t == {"teacher": True, "TKD-NLP": True, "INT8": True, "ablation:": True}
    groups["tfidf"] = _group(0.85)                         # a stronger linear baseline
    groups["tkd"] = _group(0.82, params=1500, accs=[0.81, 0.83])  # 97.6% of the teacher, 4x
    groups["int8"] = _group(0.82, lat1=1.5, fp32_accuracy=0.83)   # -1 point, 6.7x
    t = {x["target"].split()[0]: x["met"] for x in stats.targets(groups)}
    assert t == {"teacher": False, "TKD-NLP": False, "INT8": False, "ablation:": False}
    c = stats.compare(groups, "tkd", "tnlp")  # +2 points, but the seeds spread 2 points
    assert abs(c["diff"] - 0.02) < 1e-12 and not c["beyond_noise"]
    del groups["int8"]
    assert [x["met"] for x in stats.targets(groups)][2] is None


def test_one_seed_ablation_is_judged_by_the_other_rows_noise():
    groups = dict(tkd=_group(0.870, accs=[0.868, 0.872, 0.870]),
                  hidden=_group(0.880, accs=[0.880]), attn=_group(0.869, accs=[0.869]),
                  other=_group(0.871, accs=[0.871]))
    c = stats.compare(groups, "hidden", "tkd")  # +1 point against std 0.28, spread 0.4 points
    assert c["beyond_noise"] is True and c["seeds"] == 3
    assert c["noise_std"] == groups["tkd"]["accuracy_std"] and abs(c["seed_spread"] - 0.004) < 1e-9
    assert stats.compare(groups, "attn", "tkd")["beyond_noise"] is False  # -0.1 points
    assert stats.compare(groups, "attn", "other")["beyond_noise"] is None  # no seeds at all


@pytest.fixture
def tiny_study(tmp_path_factory, reference_backend):
    out = str(tmp_path_factory.mktemp("study") / "sst2")
    argv = TINY + ["--out", out]
    threads = torch.get_num_threads()
    res = run.run_study(run.parse_args(argv), argv)
    assert torch.get_num_threads() == threads  # --latency-threads 1 does not leak
    return out, argv, res


def _attempts(out, name):
    with open(os.path.join(out, name, "study_time.json")) as f:
        return json.load(f)


def test_tiny_study_end_to_end_and_resume(tiny_study, reference_backend):
    out, argv, res = tiny_study
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["failed"] == [] and saved["n_dev"] == 96
    assert saved["hardware"]["ops_backend"] == "reference"  # timed on the fast CPU path
    groups = saved["groups"]
    assert sorted(g["label"] for g in groups.values()) == sorted(LABELS)
    for name, g in groups.items():
        assert 0.0 <= g["accuracy"] <= 1.0 and g["f1"] is not None, name
        assert g["params"] > 0 and g["size_fp32"] > 0, name
        lat = {int(k): v for k, v in g["latency_ms"].items()}
        assert lat[1] > 0 and lat[32] > 0, name
        assert abs(g["throughput"] - 32e3 / lat[32]) < 1e-6 * g["throughput"], name
    assert groups["tkd"]["n"] == 2 and groups["tkd-T2"]["n"] == 2 and groups["rnn"]["n"] == 1
    # quantize_model's size rule keeps these tiny layers float (INT8 would make them slower)
    assert groups["int8"]["size_int8"] <= groups["tkd"]["size_fp32"]
    assert groups["int8"]["fp32_accuracy"] in groups["tkd"]["accuracies"]
    teacher = next(r for r in saved["runs"] if r["name"] == "teacher")
    assert teacher["config"]["pre_ln"] and teacher["config"]["hidden_size"] == 48
    # our evaluation of every checkpoint agrees with the trainer's own
    for r in saved["runs"]:
        if r["mode"] in ("teacher", "student", "distill"):
            assert r["train_wall_s"] > 0 and r["command"].startswith("python -m tkd_core.train")
            assert abs(r["metrics"]["accuracy"] - r["trainer_dev_metrics"]["accuracy"]) <= \
                1.0 / 96 + 1e-9, r["name"]
            m = build_model(ModelConfig.from_dict(r["config"]))
            assert r["params"] == param_count(m)
    assert len(saved["targets"]) == 4 and all(t["met"] in (True, False)
                                              for t in saved["targets"])
    report = open(os.path.join(out, "report.md")).read()
    for needle in ["| model | runs | dev acc %", "## Hardware", "## Targets", "## Temperature",
                   "## Ablation", "98.32", "92.7", "91.3", "92.6", "No pretraining",
                   torch.__version__, "python -m tkd_core.study", "Wall time",
                   "tiny `pre_ln=true` `hidden_size=48` (pre-LN)"] + LABELS:
        assert needle in report, needle
    for png in ("accuracy_vs_latency.png", "accuracy_vs_size.png"):
        import matplotlib.image
        img = matplotlib.image.imread(os.path.join(out, png))
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0, png

    # resumability: a job killed mid-run (checkpoint, no finished summary) continues with
    # --resume; every finished job is reused, not retrained
    from tkd_core import train
    a = run.parse_args(argv)
    job = next(j for j in plan.make_plan(a) if j.name == "tnlp_s1")
    run_dir = os.path.join(out, job.name)
    for f in os.listdir(run_dir):
        os.remove(os.path.join(run_dir, f))
    tok = os.path.join(out, "tokenizer", "tokenizer.json")
    assert train.main(plan.train_argv(job, a, tok) + ["--stop-at-step", "2"]) == 0
    assert jobs.run_state(run_dir) == "partial"
    teacher_ck = os.path.getmtime(os.path.join(out, "teacher", "checkpoint.pt"))
    pub = os.path.join(out, "published")
    a.publish = pub
    res2 = run.run_study(a, argv)
    assert sorted(os.listdir(pub)) == ["accuracy_vs_latency.png", "accuracy_vs_size.png",
                                       "report.md", "results.json"]
    assert res2["failed"] == []
    assert os.path.getmtime(os.path.join(out, "teacher", "checkpoint.pt")) == teacher_ck
    assert len(_attempts(out, "teacher")) == 1 and len(_attempts(out, "tkd_T2_s1")) == 1
    att = _attempts(out, "tnlp_s1")
    assert len(att) == 1 and att[0]["resumed"] and att[0]["ok"]
    steps = [json.loads(x)["step"] for x in open(os.path.join(run_dir, "log.jsonl"))
             if '"type": "step"' in x]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == 3  # 192 / 64 steps, once
    assert jobs.run_state(run_dir) == "done"
    inv = res2["invocations"]
    assert len(inv) == 2 and all(x["completed"] for x in inv)
    assert res2["total_wall_s"] == pytest.approx(inv[0]["wall_s"] + inv[1]["wall_s"])


def test_report_survives_failed_jobs(tmp_path):
    """A failed teacher (so no distilled students) and no INT8 path still give a report that
    says so, with every target 'not measured' where its runs are missing."""
    ok = dict(metrics={"accuracy": 0.8, "f1": 0.79}, params=10, size_fp32=100, size_int8=None,
              latency_ms={1: 1.0, 32: 4.0}, throughput=8000.0, train_wall_s=3.0)
    runs = [dict(name="teacher", group="teacher", label="Teacher", error="training failed"),
            dict(name="tnlp_s0", group="tnlp", label="T-NLP", **ok),
            dict(name="tfidf", group="tfidf", label="TF-IDF + LR", **ok),
            dict(name="tkd_T1_s0_int8", group="int8", label="TKD-NLP INT8",
                 note="INT8 path unavailable: no kernel")]
    groups = stats.aggregate(runs)
    groups["int8"]["note"] = runs[-1]["note"]
    a = run.parse_args(DATA + ["--out", str(tmp_path)])
    cfg = dict(models={"teacher": dict(mode="teacher", arch="transformer", preset="p",
                                       overrides=[], pre_ln=True, num_layers=12, hidden_size=128,
                                       ffn_size=512, epochs=1.5, lr=5e-4, temperature="-",
                                       seeds=[0])},
               epochs=dict(teacher=1.5, student=2, baseline=2), temperatures=[1.0], seeds=[0],
               alpha=0.5, batch_size=64, max_len=64, vocab_size=8000, latency_reps=3)
    res = dict(task="sst2", command="python -m tkd_core.study", n_train=10, n_dev=5,
               hardware=measurements.hardware(a), config=cfg, runs=runs, groups=groups,
               failed=["teacher"], targets=stats.targets(groups), wall_s=1.0, total_wall_s=2.0,
               invocations=[{}, {}])
    report.write_report(str(tmp_path / "report.md"), res)
    text = (tmp_path / "report.md").read_text()
    assert "| Teacher | 0 | failed: teacher |" in text
    assert "| TKD-NLP INT8 | 0 | INT8 path unavailable: no kernel |" in text
    assert "## Failed jobs" in text and "teacher/train.log" in text
    assert [t["met"] for t in res["targets"]] == [None, None, None, None]
    assert len(report.write_plots(str(tmp_path), groups)) == 2


def test_changed_settings_are_not_reused(tiny_study, reference_backend):
    """Issue 'nothing silently wrong' item 6: a finished run is reused only when its recorded
    settings match the job's; otherwise the study names the differences before training, or
    retrains those jobs with --retrain-changed, and the report reads each row's epochs from the
    run itself."""
    out, argv, _ = tiny_study
    changed = list(argv)
    i = changed.index("--student-epochs")
    changed[i + 1] = "2"
    with pytest.raises(ValueError) as e:
        run.run_study(run.parse_args(changed), changed)
    msg = str(e.value)
    assert "tkd_T1_s0: --epochs was 1.0, now 2.0" in msg and "--retrain-changed" in msg
    assert "teacher:" not in msg and "rnn_s0" not in msg  # unchanged jobs are not named
    assert study_main(changed) == 1
    res = run.run_study(run.parse_args(changed + ["--retrain-changed"]), changed)
    rows = {r["name"]: r for r in res["runs"]}
    assert rows["tkd_T1_s0"]["epochs"] == 2.0 and rows["rnn_s0"]["epochs"] == 1.0
    assert len(_attempts(out, "tkd_T1_s0")) == 2 and len(_attempts(out, "rnn_s0")) == 1
    assert json.load(open(os.path.join(out, "tkd_T1_s0", "summary.json")))["args"]["epochs"] == 2


def test_tiny_pretrained_study_end_to_end(tmp_path, reference_backend):
    """--pretrained on a tiny random BERT folder and a data slice: every job type trains (the
    teacher from the folder, students from its layers, transfer set, ablations), and the report
    carries the pretrained targets, the published table and both studies' points."""
    import transformers
    d = str(tmp_path / "bert")
    tok = data.train_tokenizer(data.texts(data.load_split("synthetic", "train")[:2000]), 400)
    data.save_tokenizer(tok, d)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                  num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(d)
    out = str(tmp_path / "study")
    scratch = tmp_path / "scratch.json"
    scratch.write_text(json.dumps({"groups": {"teacher": dict(
        label="Teacher", accuracy=0.8, accuracy_std=0.0, latency_ms={"1": 1.0},
        size_fp32=1000, size_int8=None)}}))
    argv = DATA + ["--pretrained", d, "--student-layers", "teacher:1,3", "--jobs", "0",
                   "--max-train-examples", "96", "--max-dev-examples", "48", "--seeds", "0",
                   "--baseline-prefix", "tiny", "--small-preset", "tiny", "--vocab-size", "1000",
                   "--baseline-epochs", "1", "--latency-reps", "2", "--latency-rounds", "1",
                   "--latency-threads", "1", "--threads", "1", "--out", out,
                   "--compare-with", str(scratch)]
    res = run.run_study(run.parse_args(argv), argv)
    assert res["failed"] == []
    g = res["groups"]
    assert {"teacher", "tkd", "tnlp", "tkd-small", "kd-bilstm", "tkd-noaug", "tkd-logits",
            "tkd-attn", "int8", "lstm", "tfidf"} <= set(g) and "tkd-hidden" not in g
    assert g["tkd"]["params"] < g["teacher"]["params"]
    runs = {r["name"]: r for r in res["runs"]}
    assert runs["tkd_s0"]["config"]["num_layers"] == 2 and runs["tkd_s0"]["config"][
        "hidden_size"] == 32
    # TKD-NLP: logits KD + transfer set + hidden MSE (the default); the logits-only rung without
    assert "--augment 1 --hidden-loss mse" in runs["tkd_s0"]["command"]
    assert "--augment 1" in runs["tkd_logits_s0"]["command"] and "--hidden-loss" not in runs[
        "tkd_logits_s0"]["command"]
    # the logit passes move from the job that ran them to the rows that read them
    assert runs["teacher"]["teacher_logits_s"] is None
    assert runs["tkd_logits_s0"]["teacher_logits_s"] > 0 and runs["kd_bilstm_s0"][
        "teacher_logits_s"] == runs["tkd_logits_s0"]["teacher_logits_s"]
    assert runs["tkd_noaug_s0"]["teacher_logits_s"] > 0 and runs["tnlp_s0"][
        "teacher_logits_s"] is None and runs["tkd_s0"]["teacher_logits_s"] is None
    assert len(res["targets"]) == 7
    for t in res["targets"]:  # one seed: the comparisons against seed noise give no verdict
        assert t["met"] is None if "beyond the noise" in t["target"] else t["met"] in (True, False)
        assert t["met"] is not None or "no verdict" in t["detail"]
    report = open(os.path.join(out, "report.md")).read()
    for needle in ("TKD-NLP with a pretrained teacher", "MiniLM-L6-H384", "Tang et al. 2019",
                   "## Targets", "Teacher >= 90.0% dev", "../sst2/report.md",
                   "`train_logits_aug1.pt`: ", "plus hidden-state MSE (uniform layer map)",
                   "TKD-NLP (2L) - TKD-NLP, logits only: "):
        assert needle in report, needle
    import matplotlib.image
    img = matplotlib.image.imread(os.path.join(out, "accuracy_vs_size.png"))
    assert img.shape[0] > 200 and img.std() > 0


def _pretrained_args(**kw):
    a = dict(student_epochs=1, baseline_epochs=3, seeds=[0, 1, 2], student_layers="teacher:2,5",
             augment=1, teacher_epochs=2, teacher_lr=1e-4, pretrained="folder", student_lr=1e-4,
             baseline_seeds=1, baseline_prefix="cpu", small_preset="cpu-student-4",
             hidden_loss="mse", ablations=["noaug", "logits"])
    return types.SimpleNamespace(**{**a, **kw})


def test_pretrained_plan_recipes_and_ablation_seeds():
    """TKD-NLP's recipe follows --hidden-loss; an ablation runs on its first SEEDS seeds, each
    rung with its own flags and cached logits (none where the teacher runs at every step)."""
    jobs = {j.name: j for j in plan.make_pretrained_plan(_pretrained_args(
        ablations=["attn", "logits:3", "noaug"]))}
    tkd = [j for j in jobs.values() if j.group == "tkd"]
    assert [j.seed for j in tkd] == [0, 1, 2] and [j.int8 for j in tkd] == [True, False, False]
    assert tkd[0].extra[-2:] == ("--hidden-loss", "mse") and tkd[0].logits == ""
    assert {n for n in jobs if n.startswith("tkd_") and "small" not in n} == {
        "tkd_s0", "tkd_s1", "tkd_s2", "tkd_logits_s0", "tkd_logits_s1", "tkd_logits_s2",
        "tkd_noaug_s0", "tkd_attn_s0"}
    assert "--hidden-loss" not in jobs["tkd_logits_s2"].extra and jobs[
        "tkd_logits_s2"].logits == "train_logits_aug1.pt"
    assert "--augment" not in jobs["tkd_noaug_s0"].extra and jobs[
        "tkd_noaug_s0"].logits == "train_logits.pt"
    assert jobs["tkd_attn_s0"].extra[-3:] == ("--hidden-loss", "mse", "--attention-loss")
    # --hidden-loss none: the logits-only recipe is the row, + hidden MSE an ablation
    jobs = {j.name: j for j in plan.make_pretrained_plan(_pretrained_args(
        hidden_loss="none", ablations=["hidden:2"]))}
    assert "--hidden-loss" not in jobs["tkd_s0"].extra and jobs[
        "tkd_s0"].logits == "train_logits_aug1.pt"
    assert {"tkd_hidden_s0", "tkd_hidden_s1"} <= set(jobs) and "tkd_hidden_s2" not in jobs


@pytest.mark.parametrize("spec, hidden, match", [
    ("dropout", "mse", "the name must be one of"), ("logits:0", "mse", r"SEEDS must be .*\[1, 3\]"),
    ("logits:4", "mse", "SEEDS must be"), ("logits:x", "mse", "SEEDS must be"),
    ("hidden", "mse", "is the TKD-NLP row's own recipe with --hidden-loss mse"),
    ("logits", "none", "is the TKD-NLP row's own recipe with --hidden-loss none")])
def test_bad_ablations_are_refused(spec, hidden, match):
    with pytest.raises(ValueError, match=match):
        plan.parse_ablations([spec], hidden, 3)
    assert plan.parse_ablations(["hidden", "noaug:2"], "cosine", 3) == {"noaug": 2, "hidden": 1}


def test_charged_wall_moves_logit_passes_to_their_readers(tmp_path):
    """A job's train wall: its attempts, less its time in all_teacher_logits, plus the whole
    pass that wrote the cache it reads (None when the file predates recorded times)."""
    out = tmp_path / "study"
    (out / "teacher").mkdir(parents=True)
    torch.save(dict(fingerprint="x", logits=torch.zeros(3, 2), seconds=40.0),
               out / "teacher" / "aug.pt")
    torch.save(dict(fingerprint="x", logits=torch.zeros(3, 2)), out / "teacher" / "old.pt")

    def job_dir(name, walls, logit_seconds):
        d = out / name
        d.mkdir(exist_ok=True)
        for w in walls:
            jobs.record_attempt(str(d), w, w, False, True)
        (d / "log.jsonl").write_text("".join(
            json.dumps(dict(type="teacher_logits", path="p", seconds=x)) + "\n"
            for x in logit_seconds) + json.dumps(dict(type="step", step=1, loss=0.1)) + "\n")
        return str(d)

    J = plan.Job
    teacher = J("teacher", "teacher", "teacher", logits="aug.pt")
    reader = J("kd", "kd", "distill", logits="aug.pt")
    assert measurements.charged_wall(teacher, job_dir("teacher", [100.0], [40.0]),
                                     str(out)) == (60.0, None)
    # this reader computed the pass (35 s, one attempt of two) or waited for it: charged 40
    assert measurements.charged_wall(reader, job_dir("kd", [30.0, 50.0], [35.0]),
                                     str(out)) == (85.0, 40.0)
    old = J("kd2", "kd", "distill", logits="old.pt")
    assert measurements.charged_wall(old, job_dir("kd2", [50.0], []), str(out)) == (50.0, None)
    student = J("st", "st", "student")
    assert measurements.charged_wall(student, job_dir("st", [], []), str(out)) == (None, None)


def test_seeds_note_names_rows_short_of_their_planned_seeds():
    cfg = {"models": {"teacher": {"seeds": [0]}, "tkd": {"seeds": [0, 1, 2]},
                      "tkd-hidden": {"seeds": [0]}}}
    groups = dict(teacher=dict(_group(0.9), train_wall_s=600.0),
                  tkd=dict(_group(0.87, accs=[0.86, 0.88, 0.87]), train_wall_s=900.0),
                  **{"tkd-hidden": dict(_group(0.88), train_wall_s=1200.0)},
                  int8=_group(0.87))
    assert report._seeds_note(groups, cfg, 3) == \
        "Seeds: 3 for every student row but the one-seed ablations."
    groups["tkd"] = dict(_group(0.87, accs=[0.86, 0.88]), label="TKD", train_wall_s=960.0)
    assert report._seeds_note(groups, cfg, 3).endswith("and TKD (2: one run takes 16 min of "
                                                       "training wall time).")
