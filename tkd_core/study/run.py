"""python -m tkd_core.study: the TKD-NLP reproduction study (teacher, TKD-NLP, its ablations,
RNN/LSTM/CNN and TF-IDF baselines, the INT8 student) with accuracy and efficiency in one report.

    python -m tkd_core.study --task sst2 --data-dir ../shared/data/glue/SST-2 --out runs/sst2
    python -m tkd_core.study ... --estimate 2048     # time every job on a slice, project the run

Models (every neural one trained by `python -m tkd_core.train`, the architecture by --arch):
    teacher      the 12-layer Transformer (mode teacher, hard labels)
    TKD-NLP      a 2-layer Transformer distilled from the teacher (kd_loss), T in {1, 2, 4}
    T-NLP        the same student on hard labels only
    KD-NLP       a BiLSTM (Tang et al. 2019) distilled from the same teacher
    RNN/LSTM/CNN baselines on hard labels;  TF-IDF + logistic regression (scikit-learn)
    TKD-NLP INT8 the T=1 seed-0 student after `tkd_core.quantize_model`

Every job has its own run directory in --out. The study is resumable: a run whose summary.json
says finished is reused; a run with a checkpoint but no finished summary continues with
--resume; the rest start fresh. Jobs run as subprocesses, --jobs at a time with --threads each
(two 1-thread jobs use two cores better than one 2-thread job for models this small); the
distilled students wait for the teacher. Then every model is evaluated on dev (accuracy, F1),
sized (parameters, bytes of its saved state_dict in fp32 and after INT8 quantization) and timed
on CPU (median of repeated forwards, batch 1 and 32, sequence length 64, --latency-threads
threads, nothing else of the study running). Outputs in --out: report.md, results.json,
accuracy_vs_latency.png, accuracy_vs_size.png; each run's train.log beside its checkpoint.
"""
import argparse
import json
import os
import shlex
import sys
import time

import torch

from .. import data as gdata
from .jobs import Invocations, Task, record_attempt, run_in_process, run_state, run_tasks
from .measurements import hardware, measure
from .plan import TEACHER_SET, make_plan, train_argv
from .report import write_plots, write_report
from .stats import aggregate, targets, targets_pretrained

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tkd_core.study",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--task", default="sst2", help=f"one of {list(gdata.TASKS)} (single-sentence, 2 labels)")
    a("--data-dir", default=None, help="GLUE task directory (train.tsv, dev.tsv)")
    a("--out", default=None, help="study directory (default: runs/<task>)")
    a("--jobs", type=int, default=2, help="training jobs at once, as subprocesses (0: one after "
      "the other inside this process)")
    a("--threads", type=int, default=1, help="CPU threads per training job")
    a("--latency-threads", type=int, default=0, help="threads for the latency runs "
      "(0: every core)")
    a("--latency-reps", type=int, default=100, help="timed forwards per latency (median)")
    a("--latency-rounds", type=int, default=3, help="rounds over all the models (interleaved, "
      "so that a slow spell of the machine does not land on one model); the latency is the "
      "median of the rounds' medians")
    a("--teacher-preset", default="cpu-teacher")
    a("--teacher-set", nargs="*", default=list(TEACHER_SET), metavar="KEY=VALUE",
      help="ModelConfig overrides of the teacher (the trainer's --set)")
    a("--student-preset", default="cpu-student-2")
    a("--student-set", nargs="*", default=[], metavar="KEY=VALUE",
      help="ModelConfig overrides of the Transformer students")
    a("--baseline-prefix", default="cpu", help="presets <prefix>-{bilstm,rnn,lstm,cnn}")
    a("--teacher-epochs", type=float, default=None, help="default 1; --pretrained: 2")
    a("--student-epochs", type=float, default=None, help="TKD-NLP, T-NLP, KD-BiLSTM (default: "
      "3; --pretrained: 1, the 2-layer students)")
    a("--baseline-epochs", type=float, default=3, help="RNN, LSTM, CNN (--pretrained: also "
      "TKD-NLP-small and KD-NLP)")
    a("--teacher-lr", type=float, default=None, help="default 5e-4; --pretrained: 1e-4")
    # the pretrained study
    a("--pretrained", default=None, metavar="HF_FOLDER", help="the pretrained study: the "
      "teacher is this folder fine-tuned on the task; students start from its layers")
    a("--student-layers", default="teacher:2,5", help="--pretrained: the 2-layer students' "
      "--student-init (TinyBERT's uniform map of 2 onto 6 layers: the 3rd and 6th)")
    a("--student-lr", type=float, default=1e-4, help="--pretrained: the teacher-initialised "
      "students' learning rate")
    a("--small-preset", default="cpu-student-4", help="--pretrained: TKD-NLP-small's preset")
    a("--augment", type=int, default=1, help="--pretrained: transfer-set copies per example")
    a("--hidden-loss", default=None, choices=["none", "mse", "cosine"], help="--pretrained: "
      "TKD-NLP's layer-wise term on top of logits KD and the transfer set (default: mse, "
      "the measured best; the trainer's --hidden-loss)")
    a("--ablations", nargs="*", default=["noaug", "logits", "attn"], metavar="NAME[:SEEDS]",
      help="--pretrained: rungs of the distillation ladder trained beside TKD-NLP, each on the "
      "first SEEDS of --seeds (default 1): noaug (logits KD, labelled set only), logits "
      "(+ transfer set), hidden (+ hidden MSE), attn (+ hidden MSE + attention KL); "
      "none: --ablations")
    a("--compare-with", default=os.path.join("docs", "results", "sst2", "results.json"),
      help="--pretrained: the from-scratch study's results.json, plotted beside")
    a("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a("--baseline-seeds", type=int, default=1, help="how many of --seeds the RNN/LSTM/CNN use")
    a("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    a("--alpha", type=float, default=0.5)
    a("--batch-size", type=int, default=None, help="default 64; --pretrained: 32")
    a("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
      help="length-grouped batches (SST-2: 1.05x padded/real tokens instead of 3.4x)")
    a("--max-len", type=int, default=64)
    a("--vocab-size", type=int, default=8000)
    a("--save-every", type=int, default=200, help="checkpoint every N steps (resumability)")
    a("--max-train-examples", type=int, default=0, help="a slice (tests, --estimate)")
    a("--max-dev-examples", type=int, default=0)
    a("--publish", default=None, metavar="DIR", help="also copy report.md, results.json and "
      "the plots there (e.g. docs/results/sst2)")
    a("--retrain-changed", action="store_true", help="train afresh the jobs whose finished "
      "or partial run in --out was made with other settings (default: stop and name them)")
    a("--estimate", type=int, default=0, metavar="N", help="time every job for one epoch on N "
      "training examples (in <out>/estimate) and project the full study's wall time")
    args = p.parse_args(argv)
    from ..train_args import require
    require("tokenizers", "safetensors", "matplotlib", "sklearn", what="python -m tkd_core.study")
    spec = gdata.get_task(args.task)
    if spec.is_pair or spec.num_labels != 2:
        raise ValueError(f"the study runs single-sentence binary tasks (sst2, synthetic); "
                         f"{spec.name} is not one")
    if args.jobs < 0:
        raise ValueError(f"--jobs must be >= 0, got {args.jobs}")
    args.batch_size = args.batch_size or (32 if args.pretrained else 64)
    for name in ("threads", "latency_reps", "latency_rounds", "batch_size", "max_len",
                 "vocab_size", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import math
    for name in ("teacher_epochs", "student_epochs", "baseline_epochs", "teacher_lr",
                 "student_lr"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
    for name in ("max_train_examples", "max_dev_examples", "estimate", "augment"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if any(not (math.isfinite(t) and t > 0) for t in args.temperatures):
        raise ValueError(f"--temperatures must be positive, got {args.temperatures}")
    if not 1 <= args.baseline_seeds <= len(args.seeds):
        raise ValueError(f"--baseline-seeds must be in [1, {len(args.seeds)}] (the number of "
                         f"--seeds), got {args.baseline_seeds}")
    if 1.0 not in args.temperatures:
        raise ValueError("--temperatures must include 1 (the paper's recipe: the TKD-NLP row)")
    if args.pretrained:
        from ..warmstart import is_hf_folder
        if not is_hf_folder(args.pretrained):
            raise ValueError(f"--pretrained {args.pretrained}: not a Hugging Face model folder "
                             "(config.json and weights)")
    pre = bool(args.pretrained)
    args.teacher_epochs = args.teacher_epochs or (2 if pre else 1)
    args.student_epochs = args.student_epochs or (1 if pre else 3)
    args.teacher_lr = args.teacher_lr or (1e-4 if pre else 5e-4)
    args.out = args.out or os.path.join("runs", spec.name + ("-pretrained" if pre else ""))
    args.hidden_loss = args.hidden_loss or ("mse" if pre else "none")
    if pre:
        from .plan import parse_ablations
        parse_ablations(args.ablations, args.hidden_loss, len(args.seeds))  # errors up front
    args.latency_threads = args.latency_threads or os.cpu_count() or 1
    return args


def prepare(a):
    """(spec, train examples, dev examples, tokenizer path): the shared WordPiece, made once."""
    spec, train, dev = gdata.load_task(a.task, a.data_dir, a.max_train_examples,
                                       a.max_dev_examples)
    tok_dir = os.path.join(a.out, "tokenizer")
    path = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.isfile(path):
        tok = gdata.train_tokenizer(gdata.texts(train), a.vocab_size)
        gdata.save_tokenizer(tok, tok_dir)
    return spec, train, dev, path


# Trainer settings that do not change what a run computes: a finished or partial run whose
# recorded settings differ from its job's only in these is still that job's run.
_NOT_COMPARED = {"out", "resume", "overwrite", "no_progress", "threads", "save_every",
                 "eval_every", "eval_batch_size", "profile", "stop_at_step", "device",
                 "dist_timeout", "data_dir", "vocab", "teacher", "teacher_logits"}


def changed_settings(job, a, tokenizer, run_dir, state) -> list:
    """The settings (as `--flag was -> now`) in which the run in run_dir, as its summary or
    checkpoint recorded them, differs from what the job asks for now."""
    from .. import train
    from ..checkpoint import load_checkpoint
    from ..train_args import recorded
    saved = {}
    if state == "done":
        with open(os.path.join(run_dir, "summary.json")) as f:
            saved = json.load(f).get("args") or {}
    if not saved:  # a partial run, or a summary from before settings were recorded there
        saved = load_checkpoint(os.path.join(run_dir, "checkpoint.pt")).get("args", {})
    want = recorded(train.parse_args(train_argv(job, a, tokenizer)))
    return [f"--{k.replace('_', '-')} was {saved[k]!r}, now {want[k]!r}" for k in sorted(want)
            if k not in _NOT_COMPARED and k in saved and saved[k] != want[k]]


def train_all(a, plan, tokenizer, train, dev, spec, tick=lambda: None) -> dict:
    """Trains what is not done yet; returns job name -> 'ok' | 'failed' | 'skipped'.

    A finished run is reused, and a partial one resumed, only when its recorded settings are the
    job's; otherwise the study stops and names the differences before training anything, or
    with --retrain-changed trains those jobs afresh (--overwrite). Students of a teacher that is
    trained in this invocation are trained afresh too."""
    tasks, status, changed, fresh = [], {}, [], set()
    states = {}
    for job in plan:
        if job.mode == "tfidf":
            continue
        run_dir = os.path.join(a.out, job.name)
        state = run_state(run_dir)
        diff = changed_settings(job, a, tokenizer, run_dir, state) if state != "new" else []
        teacher_fresh = job.needs_teacher and "teacher" in fresh
        if diff and not a.retrain_changed:
            changed.append(f"{job.name}: " + "; ".join(diff))
        if (diff and a.retrain_changed) or (teacher_fresh and state != "new"):
            state = "stale"
        if state != "done":
            fresh.add(job.name)
        states[job.name] = state
    if changed:
        raise ValueError("runs in --out were made with other settings than this command's:\n  "
                         + "\n  ".join(changed) + "\nRun the original command, use another "
                         "--out, or pass --retrain-changed to train these jobs afresh.")
    for job in plan:
        if job.mode == "tfidf":
            continue
        run_dir, state = os.path.join(a.out, job.name), states[job.name]
        if state == "done":
            status[job.name] = "ok"
            print(f"[study] {job.name}: done, reused", flush=True)
            continue
        argv = [sys.executable, "-m", "tkd_core.train"] + train_argv(job, a, tokenizer)
        argv += {"partial": ["--resume"], "stale": ["--overwrite"]}.get(state, [])
        print(f"[study] {job.name}: " + {"partial": "resuming", "stale": "retraining (settings "
              "or teacher changed)"}.get(state, "queued"), flush=True)
        deps = ("teacher",) if job.needs_teacher and "teacher" not in status else ()
        tasks.append(Task(job.name, argv, os.path.join(run_dir, "train.log"), deps,
                          on_done=lambda ok, w, c, d=run_dir, r=state == "partial":
                          (record_attempt(d, w, c, r, ok), tick(),
                           print(f"[study] {os.path.basename(d)}: {'done' if ok else 'failed'} "
                                 f"in {w:.0f} s", flush=True))))
    os.makedirs(a.out, exist_ok=True)
    if tasks:
        status.update(run_tasks(tasks, a.jobs) if a.jobs else run_in_process(tasks))
    return status


def study_config(a, plan, runs, tokenizer) -> dict:
    """The configurations table: each group's model and schedule as its first measured run
    recorded them (the checkpoint's config and trainer arguments), not as the current command
    line would build them."""
    from tokenizers import Tokenizer
    models, first = {}, {}
    for r in runs:
        if r.get("config") and r.get("train_args"):
            first.setdefault(r["group"], r)
    for job in plan:
        if job.mode == "tfidf" or job.group in models:
            continue
        r = first.get(job.group)
        c, t = (r["config"], r["train_args"]) if r else ({}, {})
        models[job.group] = dict(mode=job.mode, arch=c.get("arch", job.arch), preset=job.preset,
                                 overrides=list(job.overrides) + [
                                     " ".join(job.extra[i:i + 2]) for i in
                                     range(0, len(job.extra), 2)] if job.extra else
                                 list(job.overrides), pre_ln=c.get("pre_ln"),
                                 num_layers=c.get("num_layers"), hidden_size=c.get("hidden_size"),
                                 ffn_size=c.get("ffn_size"), epochs=t.get("epochs"),
                                 lr=t.get("lr"),
                                 temperature=f"{t['temperature']:g}" if job.needs_teacher and t
                                 else "-",
                                 seeds=[j.seed for j in plan if j.group == job.group])
    return dict(models=models, epochs=dict(teacher=a.teacher_epochs, student=a.student_epochs,
                                           baseline=a.baseline_epochs),
                temperatures=a.temperatures, seeds=a.seeds, alpha=a.alpha,
                batch_size=a.batch_size, max_len=a.max_len,
                vocab_size=Tokenizer.from_file(tokenizer).get_vocab_size(),
                latency_reps=a.latency_reps, latency_rounds=a.latency_rounds,
                max_train_examples=a.max_train_examples,
                max_dev_examples=a.max_dev_examples, pretrained=a.pretrained,
                augment=a.augment if a.pretrained else 0, student_layers=a.student_layers,
                hidden_loss=a.hidden_loss if a.pretrained else "none")


def command_line(argv) -> str:
    return "python -m tkd_core.study " + shlex.join(argv)


def run_study(a, argv) -> dict:
    t0 = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    clock = Invocations(a.out, command_line(argv))
    spec, train, dev, tokenizer = prepare(a)
    plan = make_plan(a)
    status = train_all(a, plan, tokenizer, train, dev, spec, tick=clock.tick)
    threads = torch.get_num_threads()
    try:
        runs = measure(a, plan, status, spec, train, dev, tokenizer)
    finally:
        torch.set_num_threads(threads)
    groups = aggregate(runs)
    res = dict(task=spec.name, command=command_line(argv), n_train=len(train), n_dev=len(dev),
               hardware=hardware(a), config=study_config(a, plan, runs, tokenizer), runs=runs,
               groups=groups, failed=[n for n, s in status.items() if s != "ok"])
    q = next((r for r in runs if r["group"] == "int8"), None)
    if q is not None:
        groups["int8"]["fp32_accuracy"] = q.get("fp32_accuracy")
        groups["int8"]["note"] = q.get("note")
    res["targets"] = (targets_pretrained if a.pretrained else targets)(groups)
    res["wall_s"] = time.perf_counter() - t0
    clock.tick(completed=True)
    res["invocations"], res["total_wall_s"] = clock.runs, clock.total_s
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    write_report(os.path.join(a.out, "report.md"), res)
    other = None
    if a.pretrained and a.compare_with and os.path.isfile(a.compare_with):
        with open(a.compare_with) as f:
            other = json.load(f)["groups"]
    res["plots"] = write_plots(a.out, groups, other)
    print(f"[study] wrote {a.out}/report.md, results.json and plots in "
          f"{res['wall_s'] / 60:.1f} min", flush=True)
    if a.publish:
        import shutil
        os.makedirs(a.publish, exist_ok=True)
        for name in ("report.md", "results.json", *map(os.path.basename, res["plots"])):
            shutil.copy2(os.path.join(a.out, name), os.path.join(a.publish, name))
        print(f"[study] copied them to {a.publish}", flush=True)
    return res
