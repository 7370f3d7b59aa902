"""Measuring models: one evaluator, one latency, one size, one table printer.

Shared by the trainer, the default pipeline, the study and bench, so that a number printed by any
of them means the same thing:

    m = evaluate(model, items, spec)            # dev metrics + mean loss (sharded under DDP)
    ms = latency_ms(model, batch=1)             # median ms of one forward, random tokens, S=64
    r = latency_rounds({"a": m1, "b": m2})      # the same, in rounds interleaved over models
    print(format_table(rows, cols))             # a markdown table

The latency every report quotes is `latency_ms`: a forward of (batch, SEQ_LEN=64) random tokens
of the model's vocabulary, no padding, in inference mode on the CPU threads in force; the median
of `reps` forwards after 2 warm-ups. Real sentences are shorter than 64 tokens, so this is the
cost of a full-length input, comparable across models and runs.
"""
import io
import os
import pickle
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data as gdata
from .checkpoint import unwrap

SEQ_LEN = 64  # latency inputs: (batch, SEQ_LEN) tokens
_DEFAULT_THREADS = torch.get_num_threads()  # before anyone calls set_num_threads


# ---------------------------------------------------------------------------------- timing


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms over `reps` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def latency_inputs(vocab_size: int, batch: int, seq_len: int = SEQ_LEN, seed: int = 0):
    """(input_ids, attention_mask, token_type_ids) of random tokens, no padding. Ids start at 5,
    past the special tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (batch, seq_len), generator=g)
    return ids, torch.ones(batch, seq_len, dtype=torch.bool), torch.zeros_like(ids)


@torch.inference_mode()
def latency_ms(model: nn.Module, batch: int = 1, reps: int = 30, seq_len: int = SEQ_LEN) -> float:
    """Median ms of one forward of (batch, seq_len) random tokens (see the module docstring)."""
    args = latency_inputs(model.config.vocab_size, batch, seq_len)
    return median_ms(lambda: model(*args), reps)


def latency_rounds(models: Dict[str, nn.Module], batches: Sequence[int] = (1, 32), reps=30,
                   rounds: int = 3) -> Dict[str, Dict[int, List[float]]]:
    """{name: {batch: [latency_ms of each round]}}. Each round times every model in turn, so a
    slow spell of a shared machine does not land on one model; report the rounds' median.
    reps: an int, or {batch: reps}."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    per = reps if isinstance(reps, dict) else {b: reps for b in batches}
    out = {name: {b: [] for b in batches} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for b in batches:
                out[name][b].append(latency_ms(model, b, per[b]))
    return out


def cpu_threads(requested: int) -> int:
    """`requested`, or (0) all cores unless the machine is already busy: OpenMP threads that get
    descheduled spin at every barrier, and small models then run many times slower than on one
    thread (measured: 13.7 s vs 0.36 s per teacher step on 2 busy cores)."""
    if requested:
        return requested
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
    except OSError:
        busy = False
    return 1 if busy else _DEFAULT_THREADS


# ------------------------------------------------------------------------------------ size


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state_dict (INT8 weights count 1 byte each)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()
               if isinstance(t, torch.Tensor))


def size_on_disk(obj) -> int:
    """Bytes of `torch.save(state_dict)` (a model) or of a pickle (anything else)."""
    buf = io.BytesIO()
    if isinstance(obj, nn.Module):
        torch.save(obj.state_dict(), buf)
    else:
        pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
    return buf.tell()


# ------------------------------------------------------------------------------ evaluation


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, items: Sequence, spec: gdata.TaskSpec, device="cpu",
             batch_size: int = 256, rank: int = 0, world: int = 1,
             autocast: Optional[Callable] = None) -> Dict[str, float]:
    """Metrics of `model` on encoded `items` ((ids, type_ids, label) tuples): the task's metrics,
    accuracy (and F1 on binary tasks) for classification, and the mean loss. Sharded over the
    ranks under DDP (every rank must call it); confusion matrices are all-reduced, regression
    predictions gathered. autocast: a context-manager factory for mixed precision, or None."""
    device = torch.device(device)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    shard = items[rank::world]
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (loss sum, count)
    cm = torch.zeros(spec.num_labels, spec.num_labels, dtype=torch.float64)
    preds, golds = [], []
    for i in range(0, len(shard), batch_size):
        b = {k: v.to(device) for k, v in gdata.collate(shard[i:i + batch_size]).items()}
        if autocast is not None:
            with autocast():
                logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        else:
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        logits, y = logits.float(), b["labels"]
        if spec.labels is None:
            loss_sum[0] += F.mse_loss(logits.squeeze(-1), y, reduction="sum").item()
            preds.append(logits.squeeze(-1).cpu())
            golds.append(y.cpu())
        else:
            loss_sum[0] += F.cross_entropy(logits, y, reduction="sum").item()
            cm += gdata.confusion(logits.argmax(-1).cpu(), y.cpu(), spec.num_labels)
        loss_sum[1] += len(y)
    model.train(was_training)
    _all_reduce(loss_sum, world)
    if spec.labels is None:
        p = torch.cat(preds) if preds else torch.zeros(0)
        g = torch.cat(golds) if golds else torch.zeros(0)
        if world > 1:  # Spearman needs every prediction: gather them (as plain lists)
            parts = [None] * world
            dist.all_gather_object(parts, (p.tolist(), g.tolist()))
            p = torch.tensor([v for x in parts for v in x[0]])
            g = torch.tensor([v for x in parts for v in x[1]])
        m = gdata.regression_metrics(p, g)
    else:
        m = gdata.metrics_from_confusion(_all_reduce(cm, world))
    keep = spec.metrics + tuple(k for k in ("accuracy", "f1") if k in m and k not in spec.metrics)
    m = {k: m[k] for k in keep}
    m["loss"] = loss_sum[0].item() / max(loss_sum[1].item(), 1)
    return m


# ---------------------------------------------------------------------------------- tables


def _cell(v, fmt: Optional[str]) -> str:
    if v is None:
        return "n/a"
    if fmt:
        return fmt.format(v)
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def format_table(rows: Iterable[dict], cols: List[str],
                 fmt: Optional[Dict[str, str]] = None) -> str:
    """A markdown table of `rows` (dicts) in the column order `cols`, padded to align.
    fmt: column -> format string; otherwise ints get thousands separators, floats 4 digits,
    None prints n/a and a missing key an empty cell."""
    fmt = fmt or {}
    table = [list(cols)] + [[_cell(r[c], fmt.get(c)) if c in r else "" for c in cols]
                            for r in rows]
    w = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = ["| " + " | ".join(s.ljust(n) for s, n in zip(t, w)) + " |" for t in table]
    lines.insert(1, "|" + "|".join("-" * (n + 2) for n in w) + "|")
    return "\n".join(lines)
