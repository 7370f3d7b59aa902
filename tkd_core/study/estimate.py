"""--estimate N: time every job of the plan for one epoch on N training examples, then project the
full study's wall time on --jobs workers."""
import argparse
import json
import os
import time

import torch

from .. import data as gdata
from ..checkpoint import load_model
from .jobs import read_attempts
from .plan import make_plan
from .run import prepare, train_all

def estimate(a, argv) -> dict:
    """Run the plan for one epoch on a slice of --estimate examples with one job at a time (each
    job alone on its cores), then project every job to the full data and epochs and schedule the
    projection on --jobs workers. A distilled student's first epoch also runs the teacher over
    every training example (its logits are cached): that part is timed separately."""
    full = len(gdata.load_split(a.task, "train", a.data_dir))
    n = min(a.estimate, full)
    est = argparse.Namespace(**dict(vars(a), out=os.path.join(a.out, "estimate"),
                                    max_train_examples=n, teacher_epochs=1, student_epochs=1,
                                    baseline_epochs=1, jobs=1, estimate=0))
    spec, train, dev, tokenizer = prepare(est)
    plan = make_plan(est)
    status = train_all(est, plan, tokenizer, train, dev, spec)
    threads = torch.get_num_threads()
    teacher_fwd = _teacher_forward_cpu_s(est, train, tokenizer) if status.get("teacher") == "ok" \
        else 0.0
    torch.set_num_threads(threads)
    full_plan = {j.name: j for j in make_plan(a)}
    rows = []
    for job in plan:
        if job.mode == "tfidf":
            rows.append(dict(name=job.name, projected_s=30.0, note="scikit-learn: ~10 CPU s "
                             "on full SST-2, measured separately"))
            continue
        attempts = read_attempts(os.path.join(est.out, job.name))
        cpu = attempts[-1]["cpu_s"] if attempts else None
        if cpu is None:
            rows.append(dict(name=job.name, projected_s=None, note="not measured"))
            continue
        epochs = full_plan[job.name].epochs
        fwd = teacher_fwd if job.needs_teacher else 0.0
        # the optimizer steps' share of the job (the rest: start-up, data, one evaluation)
        step_s = _step_seconds(os.path.join(est.out, job.name), a.batch_size)
        frac = min(1.0, step_s / attempts[-1]["wall_s"])
        steps_cpu, other_cpu = cpu * frac, cpu * (1 - frac)
        per_epoch = max(steps_cpu - fwd, 0.0) * full / n  # this slice's epoch -> a full epoch
        proj = per_epoch * epochs + fwd * full / n + other_cpu * epochs
        rows.append(dict(name=job.name, slice_cpu_s=cpu, step_share=frac,
                         teacher_fwd_cpu_s=fwd, full_epoch_s=per_epoch, epochs=epochs,
                         projected_s=proj))
    by = {r["name"]: r for r in rows}
    wall = _simulate(plan, by, a.jobs)
    proj = dict(slice=n, full=full, jobs=a.jobs, threads=a.threads, rows=rows,
                evaluation_s=300.0, projected_wall_s=wall + 300.0,
                note="CPU seconds of 1-job-at-a-time runs scaled linearly by examples and "
                     "epochs; a loaded machine inflates them, a second job on the other core "
                     "may slow each job a little (memory bandwidth).")
    with open(os.path.join(a.out, "projection.json"), "w") as f:
        json.dump(proj, f, indent=1)
    print(f"[study] projection for {full:,} examples, {a.jobs} job(s) x {a.threads} thread(s):")
    for r in rows:
        s = r.get("projected_s")
        print(f"  {r['name']:<16} {'n/a' if s is None else f'{s / 60:7.1f} min'}")
    print(f"  total wall (list schedule + ~5 min evaluation): {proj['projected_wall_s'] / 60:.1f} "
          f"min", flush=True)
    return proj


def _step_seconds(run_dir, batch: int) -> float:
    """Wall seconds the trainer spent in optimizer steps (its log.jsonl step records; the last,
    partial batch is counted as full)."""
    total = 0.0
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("type") == "step" and r.get("examples_per_s"):
                total += batch / r["examples_per_s"]
    return total


def _simulate(plan, by, workers) -> float:
    """Wall time of list-scheduling the jobs on `workers` (the teacher before distillations)."""
    free = [0.0] * workers
    teacher_end = 0.0
    for job in plan:
        d = by.get(job.name, {}).get("projected_s") or 0.0
        i = min(range(workers), key=lambda k: free[k])
        start = max(free[i], teacher_end if job.needs_teacher else 0.0)
        free[i] = start + d
        if job.name == "teacher":
            teacher_end = free[i]
    return max(free)


@torch.inference_mode()
def _teacher_forward_cpu_s(a, train, tokenizer) -> float:
    """CPU seconds of the teacher's forward over the slice, as the distillation cache runs it."""
    from tokenizers import Tokenizer
    model, _ = load_model(os.path.join(a.out, "teacher"))
    torch.set_num_threads(a.threads)
    items = gdata.encode(Tokenizer.from_file(tokenizer), train, a.max_len)
    c0 = time.process_time()
    for i in range(0, len(items), a.batch_size):
        b = gdata.collate(items[i:i + a.batch_size])
        model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    return time.process_time() - c0
