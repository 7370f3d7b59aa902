"""The default run of `python -m tkd_core.train`: teacher -> distilled student -> INT8 student.

The smallest experiment of the trainer's machinery: two `train()` stages with the CPU schedule
below, `quantize_model` on the student, and one table of accuracy, parameters, size and CPU
latency (`tkd_core.measure`: batch 1, 64 random tokens). Stage directories are
<out>/teacher and <out>/student; `--resume` continues each stage from its checkpoint.
"""
import argparse
import copy
import json
import os
import time

import torch

from .checkpoint import CHECKPOINT
from .measure import evaluate, format_table, latency_ms, param_count, size_bytes

# The default CPU run (teacher + distilled student + INT8 within a few minutes on 2 cores):
# shorter schedules than the paper's 10 epochs; --teacher-epochs / --student-epochs / --lr win.
SCHEDULE = {"teacher": dict(epochs=4, lr=2e-3), "student": dict(epochs=6, lr=2e-3)}
TABLE_COLS = ["model", "metric", "score", "params", "size_mb", "cpu_latency_ms"]
TABLE_FMT = {"score": "{:.4f}", "size_mb": "{:.3f}", "cpu_latency_ms": "{:.2f}"}


def report_row(name, model, metrics, spec, params=None) -> dict:
    """One table row; params: pass the float model's count for an INT8 model (its weights are
    int8 buffers, not parameters)."""
    model = copy.deepcopy(model).cpu().eval()
    return dict(model=name, metric=spec.metrics[0], score=metrics[spec.metrics[0]],
                params=params or param_count(model), size_mb=size_bytes(model) / 2**20,
                cpu_latency_ms=latency_ms(model, batch=1))


def pipeline(args) -> int:
    from . import quantize_model
    from .train import train
    root = args.out or os.path.join("runs", f"pipeline-{args.task}")
    if args.out is None and not os.path.exists("runs"):
        os.makedirs("runs")
        with open(os.path.join("runs", ".gitignore"), "w") as f:
            f.write("*\n")  # run outputs never land in git
    t0 = time.perf_counter()

    def stage(name, mode, preset, epochs, **extra):  # one stage's args: schedule + overrides
        ck = os.path.join(root, name, CHECKPOINT)
        resume = "auto" if args.resume and os.path.exists(ck) else None  # per-stage --resume
        a = argparse.Namespace(**dict(vars(args), **SCHEDULE[name], mode=mode, preset=preset,
                                      out=os.path.join(root, name), resume=resume, **extra))
        a.epochs = epochs or a.epochs
        a.lr = a.lr if args.lr is None else args.lr
        return a

    t = train(stage("teacher", "teacher", args.teacher_preset, args.teacher_epochs), tag="teacher")
    s = train(stage("student", "distill", args.student_preset, args.student_epochs,
                    teacher=t["checkpoint"]), tag="student-kd")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    spec, items = s["spec"], s["dev_items"]
    rows = [report_row(f"teacher ({t['config']['num_layers']}L)", t["model"], t["metrics"], spec),
            report_row(f"student KD ({s['config']['num_layers']}L)", s["model"], s["metrics"],
                       spec)]
    q = copy.deepcopy(s["model"]).cpu()
    report = quantize_model(q, skip=("pooler", "classifier"))
    print(f"INT8 student: {str(report).splitlines()[0]}")
    m = evaluate(q, items, spec, torch.device("cpu"), args.eval_batch_size)
    rows.append(report_row("student KD INT8", q, m, spec, params=param_count(s["model"])))
    print(f"\npipeline on {spec.name} ({len(items)} dev examples), "
          f"{time.perf_counter() - t0:.0f} s:")
    print(format_table(rows, TABLE_COLS, TABLE_FMT))
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.perf_counter() - t0}, f, indent=1)
    return 0
