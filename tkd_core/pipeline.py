"""The default run of `python -m tkd_core.train`: teacher -> distilled student -> INT8 student.

The smallest experiment of the trainer's machinery: two `train()` stages with the CPU schedule
below, `quantize_model` on the student, and one table of accuracy, parameters, size and CPU
latency (`tkd_core.measure`: batch 1 and 32, 64 random tokens, the median of 3 rounds
interleaved over the three models). Stage directories are
<out>/teacher and <out>/student; `--resume` continues each stage from its checkpoint.
"""
import argparse
import copy
import json
import os
import statistics
import time

import torch

from .checkpoint import CHECKPOINT
from .measure import evaluate, format_table, latency_rounds, param_count, size_bytes

# The default CPU run (teacher + distilled student + INT8 within a few minutes on 2 cores):
# shorter schedules than the paper's 10 epochs; --teacher-epochs / --student-epochs / --lr win.
SCHEDULE = {"teacher": dict(epochs=4, lr=2e-3), "student": dict(epochs=6, lr=2e-3)}
TABLE_COLS = ["model", "metric", "score", "params", "size_mb", "cpu_latency_ms",
              "cpu_latency_b32_ms"]
TABLE_FMT = {"score": "{:.4f}", "size_mb": "{:.3f}", "cpu_latency_ms": "{:.2f}",
             "cpu_latency_b32_ms": "{:.2f}"}


def report_row(name, model, metrics, spec, params=None) -> dict:
    """One table row (its latencies filled by `_finish`, in rounds over every row's model);
    params: pass the float model's count for an INT8 model (its weights are int8 buffers, not
    parameters)."""
    model = copy.deepcopy(model).cpu().eval()
    return dict(model=name, metric=spec.metrics[0], score=metrics[spec.metrics[0]],
                params=params or param_count(model), size_mb=size_bytes(model) / 2**20,
                _model=model)


LATENCY_REPS = {1: 30, 32: 5}  # forwards timed per round, by batch
LATENCY_ROUNDS = 3


def pipeline(args) -> int:
    """The default run, or with --init (or --teacher an HF folder) the pretrained one:
    fine-tune the teacher (or take it), distill a 2-layer student from two of its layers with a
    transfer set, quantize it, export it, and print the table."""
    from .warmstart import is_hf_folder
    if args.init or (args.teacher and is_hf_folder(args.teacher)):
        return pretrained_pipeline(args)
    from .train import train
    root = _root(args)
    t0 = time.perf_counter()
    t = train(_stage(args, root, "teacher", "teacher", SCHEDULE["teacher"],
                     preset=args.teacher_preset, epochs=args.teacher_epochs), tag="teacher")
    s = train(_stage(args, root, "student", "distill", SCHEDULE["student"],
                     preset=args.student_preset, epochs=args.student_epochs,
                     teacher=t["checkpoint"]), tag="student-kd")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    spec, items = s["spec"], s["dev_items"]
    rows = [report_row(f"teacher ({t['config']['num_layers']}L)", t["model"], t["metrics"], spec),
            report_row(f"student KD ({s['config']['num_layers']}L)", s["model"], s["metrics"],
                       spec)]
    q, _, _, m = _int8_student(s["model"], items, spec, args)
    rows.append(report_row("student KD INT8", q, m, spec, params=param_count(s["model"])))
    _finish(root, spec, items, rows, t0)
    return 0


def _int8_student(model, items, spec, args, embeddings=False):
    """(INT8 copy of the student on CPU, QuantizeReport, int8 embedding table names, its dev
    metrics). The pooler and classifier stay float (tiny; the logits' precision matters)."""
    from . import quantize_model
    from .int8 import quantize_embeddings
    q = copy.deepcopy(model).cpu()
    report = quantize_model(q, skip=("pooler", "classifier"))
    tables = [n for n, _, _ in quantize_embeddings(q)] if embeddings else []
    print(f"INT8 student: {str(report).splitlines()[0]}"
          + (f"; int8 embedding tables: {', '.join(tables)}" if tables else ""))
    return q, report, tables, evaluate(q, items, spec, torch.device("cpu"), args.eval_batch_size)


# --init: the recipe for a pretrained encoder (the pretrained SST-2 study's: teacher fine-tuned
# two epochs at 1e-4, batch 32 (MiniLM-L6 on SST-2: 89.91% dev, against 88.76% after one); a
# 2-layer student from the teacher's layers L/2 - 1 and L - 1, logits KD plus hidden-state MSE
# with one transfer-set copy per example, two epochs at 1e-4: 87.65 +- 0.54% over 3 seeds, 97.5%
# of the teacher; one epoch gave 87.16 +- 0.30%; logits KD alone, one seed each: 87.39% (two
# epochs), 86.96 +- 0.52% (one epoch, 3 seeds))
PRETRAINED = {"teacher": dict(epochs=2, lr=1e-4, batch_size=32, group_by_length=True),
              "student": dict(epochs=2, lr=1e-4, batch_size=32, group_by_length=True, augment=1,
                              hidden_loss="mse")}


def pretrained_pipeline(args) -> int:
    from .checkpoint import save_int8
    from .train import train
    from .warmstart import load_teacher
    root = _root(args)
    t0 = time.perf_counter()
    if args.init:
        t = train(_stage(args, root, "teacher", "teacher", PRETRAINED["teacher"], preset=None,
                         epochs=args.teacher_epochs, teacher=None, init=args.init),
                  tag="teacher")
        teacher_path, n_layers = t["checkpoint"], t["config"]["num_layers"]
    else:  # --teacher: a fine-tuned HF folder, taken as it is
        teacher_path, t = args.teacher, None
        with open(os.path.join(args.teacher, "config.json")) as f:
            hf = json.load(f)
        n_layers = hf.get("num_hidden_layers", hf.get("n_layers"))  # BERT / DistilBERT
    layers = "teacher:" + ",".join(map(str, sorted({max(n_layers // 2 - 1, 0), n_layers - 1})))
    export = args.export_hf or os.path.join(root, "student-hf")
    s = train(_stage(args, root, "student", "distill", PRETRAINED["student"], preset=None,
                     epochs=args.student_epochs, teacher=teacher_path, init=None,
                     student_init=layers, export_hf=export), tag="student-kd")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    spec, items = s["spec"], s["dev_items"]
    if t is None:
        teacher, _ = load_teacher(args.teacher, spec, torch.device("cpu"))
        t = dict(model=teacher, config=teacher.config.to_dict(),
                 metrics=evaluate(teacher, items, spec, "cpu", args.eval_batch_size))
    # the teacher's vocabulary is most of the student's bytes: its embedding tables go int8 too
    q, report, tables, m = _int8_student(s["model"], items, spec, args, embeddings=True)
    ck = os.path.join(root, "student-int8", CHECKPOINT)
    os.makedirs(os.path.dirname(ck), exist_ok=True)
    save_int8(ck, q, report, spec.name, s["tokenizer"].to_str(), tables)
    rows = [report_row(f"teacher ({t['config']['num_layers']}L)", t["model"], t["metrics"], spec),
            report_row(f"student KD ({s['config']['num_layers']}L, {layers})", s["model"],
                       s["metrics"], spec),
            report_row("student KD INT8", q, m, spec, params=param_count(s["model"]))]
    print(f"students: fp32 as a Hugging Face folder in {export}, INT8 as {ck}")
    _finish(root, spec, items, rows, t0)
    return 0


def _root(args) -> str:
    root = args.out or os.path.join("runs", f"pipeline-{args.task}")
    if args.out is None and not os.path.exists("runs"):
        os.makedirs("runs")
        with open(os.path.join("runs", ".gitignore"), "w") as f:
            f.write("*\n")  # run outputs never land in git
    return root


def _stage(args, root, name, mode, schedule, epochs=None, **extra):
    """One stage's arguments: the command line, the stage's schedule, then its overrides;
    --lr / --*-epochs on the command line win over the schedule."""
    ck = os.path.join(root, name, CHECKPOINT)
    resume = "auto" if args.resume and os.path.exists(ck) else None  # per-stage --resume
    a = argparse.Namespace(**dict(vars(args), **schedule, mode=mode,
                                  out=os.path.join(root, name), resume=resume, **extra))
    a.epochs = epochs or a.epochs
    a.lr = a.lr if args.lr is None else args.lr
    return a


def _finish(root, spec, items, rows, t0) -> None:
    # latency: the median of rounds interleaved over the rows' models (one after the other, a
    # busy spell of the machine landed on one model: 2.70 against 1.77 ms measured alone)
    models = {r["model"]: r.pop("_model") for r in rows}
    rounds = latency_rounds(models, tuple(LATENCY_REPS), LATENCY_REPS, LATENCY_ROUNDS)
    for r in rows:
        r["cpu_latency_ms"] = statistics.median(rounds[r["model"]][1])
        r["cpu_latency_b32_ms"] = statistics.median(rounds[r["model"]][32])
    print(f"\npipeline on {spec.name} ({len(items)} dev examples), "
          f"{time.perf_counter() - t0:.0f} s:")
    print(format_table(rows, TABLE_COLS, TABLE_FMT))
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.perf_counter() - t0}, f, indent=1)
