"""The study's measurements of trained runs: dev metrics, parameters, bytes, CPU latency, the INT8
student, the TF-IDF baseline, and the machine they ran on.

Every number comes from `tkd_core.measure` (the evaluator, `latency_rounds`, `size_on_disk`), the
same code the trainer and bench use; latency is measured in rounds interleaved over the models.
"""
import copy
import json
import os
import platform
import shlex
import statistics
import time
from typing import List

import torch

from .. import data as gdata
from ..checkpoint import load_model
from ..distill import logits_pass_seconds
from ..measure import evaluate, latency_rounds, median_ms, param_count, size_on_disk
from .jobs import read_attempts
from .plan import GROUPS, PRETRAINED_GROUPS, train_argv

LATENCY_BATCHES = (1, 32)


def _metrics(m: dict) -> dict:
    """The report's two columns."""
    return {"accuracy": m["accuracy"], "f1": m.get("f1")}


def charged_wall(job, run_dir: str, out: str):
    """(train wall s, teacher-logit pass s charged) of a job: the study's wall over its attempts,
    less the time its trainer spent in `all_teacher_logits` (computing a cache, or waiting for
    another job computing it), plus the whole pass that wrote the cache it reads. The teacher is
    not charged for the logits it writes for the students; each student reading them is, as if
    it had run the pass alone. (None, None) without attempts; the charge is None when the cache
    predates recorded pass times."""
    attempts = read_attempts(run_dir)
    if not attempts:
        return None, None
    wall = sum(x["wall_s"] for x in attempts)
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            recs = [json.loads(line) for line in f if '"teacher_logits"' in line]
    except (OSError, ValueError):
        recs = []
    wall -= sum(r["seconds"] for r in recs if r.get("type") == "teacher_logits")
    charge = None
    if job.mode == "distill" and job.logits:
        charge = logits_pass_seconds(os.path.join(out, "teacher", job.logits))
    return wall + (charge or 0.0), charge


def int8_copy(model, embeddings: bool = False):
    """(INT8 copy, None) or (None, reason) through tkd_core.quantize_model."""
    from .. import quantize_model
    q = copy.deepcopy(model)
    try:  # the pooler and classifier stay float: tiny, and the logits' precision matters most
        quantize_model(q, skip=("pooler", "classifier"))
        if embeddings:
            from ..int8 import quantize_embeddings
            quantize_embeddings(q)
    except Exception as e:  # an architecture the INT8 path cannot take
        return None, f"{type(e).__name__}: {e}"
    return q, None


def tfidf_baseline(train, dev, task: str, reps: int) -> dict:
    """Word 1-2-gram TF-IDF + logistic regression: the classic linear baseline."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    t0 = time.perf_counter()
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(C=4.0, max_iter=2000))
    pipe.fit([e.text_a for e in train], [e.label for e in train])
    wall = time.perf_counter() - t0
    preds = pipe.predict([e.text_a for e in dev])
    clf = pipe[-1]
    lat = {}
    texts = [e.text_a for e in dev] * (1 + max(LATENCY_BATCHES) // max(1, len(dev)))
    for b in LATENCY_BATCHES:
        lat[b] = median_ms(lambda b=b: pipe.predict(texts[:b]), reps)
    return dict(metrics=_metrics(gdata.compute_metrics(task, preds, [e.label for e in dev])),
                params=int(clf.coef_.size + clf.intercept_.size),
                size_fp32=size_on_disk(pipe), size_int8=None, latency_ms=lat,
                train_wall_s=wall, train_cpu_s=None,
                config=dict(ngram_range=[1, 2], min_df=2, sublinear_tf=True, C=4.0,
                            vocabulary=len(pipe[0].vocabulary_)))


def hardware(a) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info['model name']} (family {info.get('cpu family')}, model {info.get('model')})"
    except (OSError, KeyError, ValueError):
        pass
    import tkd_core
    return dict(cpu=cpu, cores=os.cpu_count(), isa=torch.backends.cpu.get_cpu_capability(),
                torch=torch.__version__, python=platform.python_version(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                train_threads_per_job=a.threads, parallel_jobs=a.jobs,
                latency_threads=a.latency_threads,
                load_average_at_latency=getattr(a, "load_at_latency", None),
                ops_backend=tkd_core.ops.backend(torch.zeros(1)))


def measure(a, plan, status, spec, train, dev, tokenizer) -> List[dict]:
    """Evaluate, size and time every model; one dict per job (+ the INT8 student)."""
    from tokenizers import Tokenizer
    torch.set_num_threads(a.latency_threads)
    a.load_at_latency = os.getloadavg()[0]  # other processes on the machine skew latency
    encoded = {}  # tokenizer JSON -> dev items: each run is evaluated with its own tokenizer

    def dev_items_of(tok_json):
        if tok_json not in encoded:
            encoded[tok_json] = gdata.encode(Tokenizer.from_str(tok_json), dev, a.max_len)
        return encoded[tok_json]
    runs, timed = [], {}  # timed: latency key -> model (one per architecture)
    for job in plan:
        label = ((PRETRAINED_GROUPS if a.pretrained else {}).get(job.group) or GROUPS.get(
            job.group, (f"TKD-NLP (T={job.temperature:g})",)))[0]
        row = dict(name=job.name, group=job.group, label=label, mode=job.mode, seed=job.seed,
                   temperature=job.temperature, epochs=job.epochs)
        if job.mode == "tfidf":
            path = os.path.join(a.out, "tfidf", "result.json")
            if os.path.isfile(path):
                with open(path) as f:
                    row.update(json.load(f))
            else:
                row.update(tfidf_baseline(train, dev, spec.name, a.latency_reps))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump({k: v for k, v in row.items() if k not in ("name", "group")}, f)
            row["latency_ms"] = {int(k): v for k, v in row["latency_ms"].items()}
            row["throughput"] = 32e3 / row["latency_ms"][32]
            runs.append(row)
            continue
        run_dir = os.path.join(a.out, job.name)
        row["command"] = "python -m tkd_core.train " + shlex.join(train_argv(job, a, tokenizer))
        if status.get(job.name) != "ok":
            row["error"] = f"training {status.get(job.name, 'not run')}"
            runs.append(row)
            continue
        model, ck = load_model(run_dir)
        ran = ck.get("args", {})  # the run's own record, not this command line
        row.update(epochs=ran.get("epochs", job.epochs),
                   temperature=ran.get("temperature", job.temperature))
        cfg = model.config
        row.update(config=cfg.to_dict(), train_args=ck.get("args", {}), params=param_count(model),
                   size_fp32=size_on_disk(model),
                   metrics=_metrics(evaluate(model, dev_items_of(ck["tokenizer"]), spec,
                                             batch_size=128)))
        q, why = int8_copy(model, embeddings=bool(a.pretrained))
        row["size_int8"] = size_on_disk(q) if q is not None else None
        key = json.dumps(cfg.to_dict(), sort_keys=True)  # same architecture: time it once
        timed.setdefault(key, model)
        row["_latency_key"] = key
        attempts = read_attempts(run_dir)
        row["train_wall_s"], row["teacher_logits_s"] = charged_wall(job, run_dir, a.out)
        row["train_cpu_s"] = sum(x["cpu_s"] for x in attempts) if attempts else None
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
        row["trainer_seconds_last_attempt"] = s.get("train_seconds")
        row["trainer_dev_metrics"] = s.get("metrics")
        runs.append(row)
        if job.int8:
            runs.append(int8_row(job, q, why, dev_items_of(ck["tokenizer"]), spec, row))
            if q is not None:
                timed["int8"] = q
        print(f"[study] measured {job.name}: acc {row['metrics']['accuracy']:.4f}", flush=True)
    rounds = latency_rounds(timed, LATENCY_BATCHES, a.latency_reps, a.latency_rounds)
    for row in runs:
        key = row.pop("_latency_key", None)
        if key in rounds:
            row["latency_ms"] = {b: statistics.median(v) for b, v in rounds[key].items()}
            row["latency_rounds_ms"] = rounds[key]
            row["throughput"] = 32e3 / row["latency_ms"][32]
    return runs


def int8_row(job, q, why, dev_items, spec, fp32_row) -> dict:
    row = dict(name=f"{job.name}_int8", group="int8", label=GROUPS["int8"][0], mode="int8",
               seed=job.seed, temperature=fp32_row["temperature"], epochs=fp32_row["epochs"],
               fp32_accuracy=fp32_row["metrics"]["accuracy"])
    if q is None:
        row["note"] = f"INT8 path unavailable: {why}"
        return row
    row.update(params=fp32_row["params"], size_fp32=fp32_row["size_fp32"],
               size_int8=fp32_row["size_int8"],
               metrics=_metrics(evaluate(q, dev_items, spec, batch_size=128)),
               train_wall_s=None, train_cpu_s=None,
               _latency_key="int8")  # latency: timed in measure()'s rounds with the others
    return row
