"""python -m tkd_core.train: train a teacher, a student, or distill one into the other.

With no arguments it runs the whole pipeline on the built-in offline task (CPU-sized presets):
a 12-layer teacher, a 2-layer student distilled from it, and that student's INT8 form; then it
prints accuracy, parameters, size and CPU latency of each.

One device:
    python -m tkd_core.train                                              # the default pipeline
    python -m tkd_core.train --mode teacher --task sst2 --data-dir ../shared/data/glue/SST-2 \\
        --preset cpu-teacher --out runs/sst2-teacher
    python -m tkd_core.train --mode distill --teacher runs/sst2-teacher/checkpoint.pt \\
        --task sst2 --data-dir ../shared/data/glue/SST-2 --preset cpu-student-4 --out runs/sst2-kd
    python -m tkd_core.train --mode distill ... --resume              # continue where it stopped
torchrun (NCCL on CUDA, gloo on CPU; --batch-size is the global batch, split over the ranks):
    torchrun --nproc_per_node 2 -m tkd_core.train --mode teacher ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m tkd_core.train --mode teacher ...
    (or `python -m torch.distributed.run` in place of `torchrun`)

Modes: teacher (hard labels), student (hard labels), distill (kd_loss against a frozen teacher's
logits: alpha * T^2 * KL + (1 - alpha) * CE), pipeline (teacher -> distill -> INT8).
Outputs in --out: checkpoint.pt (everything to resume), model.safetensors, tokenizer.json /
vocab.txt, log.jsonl (every step and evaluation), summary.json, and trace_rank<r>.json
(--profile).
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as gdata
from . import ops
from .model import (ARCHS, PRESETS, ModelConfig, build_model, clean_state_dict, median_ms,
                    param_count, quantize, size_bytes, unwrap)

# the non-Transformer students (BiLSTM, RNN, LSTM, CNN) register in ARCHS on import
if importlib.util.find_spec(f"{__package__}.baselines") is not None:
    from . import baselines  # noqa: F401

MODES = ("pipeline", "teacher", "student", "distill")
DEFAULT_PRESET = {"teacher": "cpu-teacher", "student": "cpu-student-2",
                  "distill": "cpu-student-2"}
CHECKPOINT = "checkpoint.pt"
_DEFAULT_THREADS = torch.get_num_threads()  # before any set_num_threads


class TrainingDiverged(RuntimeError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tkd_core.train",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--mode", default="pipeline", choices=MODES)
    a("--task", default="synthetic", help=f"one of {list(gdata.TASKS)}")
    a("--data-dir", default=None, help="GLUE task directory (train.tsv, dev.tsv); without it "
      "GLUE tasks load through datasets.load_dataset('glue', task)")
    a("--vocab", default=None, help="vocab.txt or tokenizer.json (default: train WordPiece on "
      "the training split; saved with the run)")
    a("--vocab-size", type=int, default=8000)
    a("--max-len", type=int, default=64, help="tokens per example (truncation)")
    a("--arch", default=None, choices=sorted(ARCHS),
      help="model architecture (default: the preset's, e.g. bilstm for cpu-bilstm)")
    a("--preset", default=None, help=f"model preset {sorted(PRESETS)} (default: "
      f"{DEFAULT_PRESET})")
    a("--set", action="append", default=[], metavar="KEY=VALUE",
      help="override a ModelConfig field, e.g. --set pre_ln=true --set hidden_dropout=0")
    a("--teacher", default=None, help="teacher checkpoint.pt (distill)")
    a("--teacher-logits", default=None, metavar="FILE", help="the teacher's logits on every "
      "training example, computed once and shared by distillation runs: distill reads FILE "
      "(or computes and writes it when absent or made by another teacher/data); teacher writes "
      "it after training")
    a("--epochs", type=float, default=10)
    a("--max-steps", type=int, default=0, help="optimizer steps (0: from --epochs)")
    a("--batch-size", type=int, default=64, help="global batch (all ranks, one micro-step)")
    a("--accum", type=int, default=1, help="gradient accumulation micro-steps")
    a("--group-by-length", action="store_true", help="batch examples of similar length "
      "together (less padding; the order stays seeded-random per epoch)")
    a("--lr", type=float, default=None, help="peak learning rate (default: 5e-4; pipeline: "
      "its own per stage)")
    a("--weight-decay", type=float, default=0.01)
    a("--warmup", type=float, default=0.1, help="warmup steps: fraction (<1) or count")
    a("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--alpha", type=float, default=0.5, help="KD weight of the soft loss")
    a("--temperature", type=float, default=1.0)
    a("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
      help="auto: fp16 autocast + GradScaler on CUDA, fp32 on CPU")
    a("--device", default=None, help="cuda or cpu (default: cuda if available)")
    a("--threads", type=int, default=0, help="CPU threads (0: all cores, or 1 when the machine is busy)")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="run directory (default: runs/<mode>-<task>)")
    a("--resume", nargs="?", const="auto", default=None,
      help="continue from <out>/checkpoint.pt (or the given checkpoint)")
    a("--eval-every", type=int, default=0, help="also evaluate every N steps (0: per epoch)")
    a("--save-every", type=int, default=0, help="also checkpoint every N steps (0: per epoch)")
    a("--stop-at-step", type=int, default=0, help="stop (checkpointed) at this step as if "
      "interrupted, keeping the full schedule; resume with --resume")
    a("--max-train-examples", type=int, default=0)
    a("--max-dev-examples", type=int, default=0)
    a("--eval-batch-size", type=int, default=256)
    a("--profile", action="store_true", help="write a torch.profiler trace (steps 2-4)")
    a("--no-progress", action="store_true", help="no progress bar")
    # pipeline
    a("--teacher-preset", default="cpu-teacher")
    a("--student-preset", default="cpu-student-2")
    a("--teacher-epochs", type=float, default=None, help="pipeline (default: CPU budget)")
    a("--student-epochs", type=float, default=None, help="pipeline (default: CPU budget)")
    args = p.parse_args(argv)
    gdata.get_task(args.task)  # unknown task -> the valid ones, before any work
    for kv in args.set:
        _parse_override(kv)
    return args


def _parse_override(kv):
    if "=" not in kv:
        raise ValueError(f"--set expects KEY=VALUE, got {kv!r}")
    k, v = kv.split("=", 1)
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    if k not in fields:
        raise ValueError(f"--set: unknown ModelConfig key {k!r}; valid: {sorted(fields)}")
    default = getattr(ModelConfig(), k)
    if isinstance(default, bool):
        return k, v.lower() in ("1", "true", "yes", "on")
    return k, type(default)(v)


# ------------------------------------------------------------------------------ distributed


def setup_distributed(args):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, else gloo."""
    want_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return rank, world, device


def all_reduce(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def cpu_threads(requested):
    """--threads, or (0) all cores unless the machine is already busy: OpenMP threads that get
    descheduled spin at every barrier, and small models then run many times slower than on one
    thread (measured: 13.7 s vs 0.36 s per teacher step on 2 busy cores)."""
    if requested:
        return requested
    n = _DEFAULT_THREADS
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
    except OSError:
        busy = False
    return 1 if busy else n


# --------------------------------------------------------------------------------- data


def load_data(args, tokenizer_json=None):
    """(spec, tokenizer, train items, dev items); items are (ids, type_ids, label)."""
    from tokenizers import Tokenizer
    spec, train, dev = gdata.load_task(args.task, args.data_dir, args.max_train_examples,
                                       args.max_dev_examples)
    if tokenizer_json is not None:  # the teacher's (distill) or a resumed run's
        tok = Tokenizer.from_str(tokenizer_json)
    elif args.vocab:
        tok = gdata.load_tokenizer(args.vocab)
    else:  # rank 0 trains it, every rank uses that one
        tok = gdata.train_tokenizer(gdata.texts(train), args.vocab_size)
        if dist.is_initialized():
            msg = [tok.to_str()]
            dist.broadcast_object_list(msg, src=0)
            tok = Tokenizer.from_str(msg[0])
    return spec, tok, gdata.encode(tok, train, args.max_len), gdata.encode(tok, dev, args.max_len)


def epoch_batches(lengths, epoch, args, rank, world):
    """This rank's batches of one epoch, as lists of example indices. lengths: (N,) tokens.

    DistributedSampler order: one permutation of all examples per epoch (seeded by seed+epoch,
    the same on every rank), dealt round-robin to the ranks. With local batch = global / world,
    step k's global batch is permutation[k*G:(k+1)*G] whatever the world size.

    --group-by-length: the permutation is cut into windows of GROUP_WINDOW global batches, each
    window sorted by length and cut into global batches, and the batch order shuffled again.
    Batches then hold similar lengths (SST-2: 3.4x padded/real tokens at random -> 1.05x) while
    every example is still seen once per epoch in a seeded random order."""
    n = len(lengths)
    if not args.group_by_length:
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                      shuffle=True, seed=args.seed,
                                                      drop_last=False)
        sampler.set_epoch(epoch)
        idx, bs = list(sampler), args.batch_size // world
        return [idx[i:i + bs] for i in range(0, len(idx), bs)]
    g = torch.Generator().manual_seed(args.seed + epoch)
    perm = torch.randperm(n, generator=g)
    lengths = torch.as_tensor(lengths)
    G, W = args.batch_size, args.batch_size * GROUP_WINDOW
    glob = []
    for w in range(0, n, W):
        win = perm[w:w + W]
        win = win[torch.sort(lengths[win], stable=True).indices].tolist()
        glob += [win[i:i + G] for i in range(0, len(win), G)]
    order = torch.randperm(len(glob), generator=g).tolist()
    out = []
    for k in order:
        b = glob[k]
        b = b + b[:(-len(b)) % world]  # a short last batch: pad as DistributedSampler does
        out.append(b[rank::world])
    return out


GROUP_WINDOW = 50  # global batches per length-sorted window (--group-by-length)


# -------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state):
    """Atomic: write a temporary file beside it, then rename over it."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load(weights_only=True): tensors and plain containers only, never pickled code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path!r} is corrupt or not a tkd checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [k for k in ("model", "config", "step", "task") if not isinstance(ck, dict)
               or k not in ck]
    if missing:
        raise RuntimeError(f"checkpoint {path!r} is not a tkd checkpoint: missing {missing}")
    return ck


def rng_state():
    """Every RNG state as plain Python (ints and lists): gatherable across ranks and loadable
    with weights_only=True."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "cuda": [t.tolist() for t in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in s["cuda"]])


def export_safetensors(model, path):
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(model.state_dict()).items()}
    save_file(sd, path)


# ------------------------------------------------------------------------------- training


def precision_of(args, device):
    """(autocast dtype or None, GradScaler enabled)."""
    p = args.precision
    if p == "auto":
        p = "fp16" if device.type == "cuda" else "fp32"
    return {"fp16": (torch.float16, True), "bf16": (torch.bfloat16, False),
            "fp32": (None, False)}[p]


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def batch_loss(logits, batch, teacher_logits, args, regression):
    """Summed over the batch: (loss to backprop, hard-label loss, KD loss or None)."""
    logits, y = logits.float(), batch["labels"]
    if regression:  # STS-B: MSE to the label, and to the teacher's score when distilling
        pred = logits.squeeze(-1)
        hard = F.mse_loss(pred, y, reduction="sum")
        if teacher_logits is None:
            return hard, hard.detach(), None
        kd = F.mse_loss(pred, teacher_logits.squeeze(-1).float(), reduction="sum")
        return args.alpha * kd + (1 - args.alpha) * hard, hard.detach(), kd.detach()
    if teacher_logits is None:
        hard = F.cross_entropy(logits, y, reduction="sum")
        return hard, hard.detach(), None
    loss = ops.kd_loss(logits, teacher_logits.float(), y, temperature=args.temperature,
                       alpha=args.alpha, reduction="sum")
    with torch.no_grad():  # the two parts, for the log
        hard = F.cross_entropy(logits, y, reduction="sum")
        kd = ops.kd_loss(logits, teacher_logits.float(), None, temperature=args.temperature,
                         alpha=1.0, reduction="sum")
    return loss, hard, kd


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, items, spec, args, device, rank, world, amp_dtype=None):
    """Sharded over the ranks; confusion matrices (or regression predictions) are all-reduced."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    shard = items[rank::world]
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (loss sum, count)
    cm = torch.zeros(spec.num_labels, spec.num_labels, dtype=torch.float64)
    preds, golds = [], []
    for i in range(0, len(shard), args.eval_batch_size):
        b = to_device(gdata.collate(shard[i:i + args.eval_batch_size]), device)
        with autocast(device, amp_dtype):
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).float()
        y = b["labels"]
        if spec.labels is None:
            loss_sum[0] += F.mse_loss(logits.squeeze(-1), y, reduction="sum").item()
            preds.append(logits.squeeze(-1).cpu())
            golds.append(y.cpu())
        else:
            loss_sum[0] += F.cross_entropy(logits, y, reduction="sum").item()
            cm += gdata.confusion(logits.argmax(-1).cpu(), y.cpu(), spec.num_labels)
        loss_sum[1] += len(y)
    model.train(was_training)
    all_reduce(loss_sum, world)
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
        m = gdata.metrics_from_confusion(all_reduce(cm, world))
    m = {k: m[k] for k in spec.metrics + (("accuracy",) if "accuracy" in m else ())}
    m["loss"] = loss_sum[0].item() / max(loss_sum[1].item(), 1)
    return m


def warmup_steps(args, total):
    return int(args.warmup * total) if args.warmup < 1 else int(args.warmup)


def make_optimizer(model, args, device, total_steps):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases, LayerNorm
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr or 5e-4,
                            fused=True if device.type == "cuda" else None)
    warm = warmup_steps(args, total_steps)

    def schedule(step):  # linear warmup, then linear decay to 0
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def load_teacher(path, spec, device):
    ck = load_checkpoint(path)
    cfg = ModelConfig.from_dict(ck["config"])
    if cfg.num_labels != spec.num_labels:
        raise ValueError(f"teacher {path!r} has {cfg.num_labels} label(s) but task {spec.name} "
                         f"(the student) has {spec.num_labels}: teacher and student label counts "
                         "must match")
    teacher = build_model(cfg)
    teacher.load_state_dict(ck["model"])
    teacher.to(device).eval().requires_grad_(False)  # frozen; never wrapped in DDP
    return teacher, ck


class Logger:
    """JSONL log (rank 0): one line per step and per evaluation."""

    def __init__(self, path, enabled, append):
        self.f = open(path, "a" if append else "w") if enabled else None

    def __call__(self, **rec):
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


def train(args, tag=None):
    """Train one model (mode teacher / student / distill); returns its summary dict."""
    rank, world, device = setup_distributed(args)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))
    main = rank == 0
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size "
                         f"{world} (it is the global batch)")
    out = args.out or os.path.join("runs", f"{args.mode}-{args.task}")
    os.makedirs(out, exist_ok=True)
    ck_path = os.path.join(out, CHECKPOINT)
    resume = None
    if args.resume:
        resume = load_checkpoint(ck_path if args.resume == "auto" else args.resume)
    teacher, teacher_ck = None, None
    if args.mode == "distill":
        if not args.teacher:
            raise ValueError("--mode distill needs --teacher <checkpoint.pt>")
        teacher, teacher_ck = load_teacher(args.teacher, gdata.get_task(args.task), device)
    tok_json = (resume or teacher_ck or {}).get("tokenizer")
    spec, tok, train_items, dev_items = load_data(args, tok_json)
    train_lengths = [len(item[0]) for item in train_items]
    if teacher is not None and teacher_ck["task"] != spec.name:
        print(f"note: teacher was trained on {teacher_ck['task']}, distilling on {spec.name}")
    if main:
        gdata.save_tokenizer(tok, out)

    # model: preset + overrides; the task sets the labels, the tokenizer the vocabulary
    if resume is not None:
        cfg = ModelConfig.from_dict(resume["config"])
    else:
        over = dict(_parse_override(kv) for kv in args.set)
        if args.arch is not None:  # an explicit --arch wins over the preset's
            over.setdefault("arch", args.arch)
        cfg = ModelConfig.preset(args.preset or DEFAULT_PRESET[args.mode],
                                 vocab_size=tok.get_vocab_size(), num_labels=spec.num_labels,
                                 **over)
    if teacher is not None and teacher.config.num_labels != cfg.num_labels:
        raise ValueError(f"teacher has {teacher.config.num_labels} label(s), the student "
                         f"{cfg.num_labels}: teacher and student label counts must match")
    if cfg.max_positions < args.max_len:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's max_positions "
                         f"{cfg.max_positions}")
    torch.manual_seed(args.seed)  # identical init on every rank
    model = build_model(cfg).to(device)
    torch.manual_seed(args.seed + rank)  # per-rank dropout streams
    ddp = world > 1
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    batches_per_epoch = len(epoch_batches(train_lengths, 0, args, rank, world))
    steps_per_epoch = math.ceil(batches_per_epoch / args.accum)
    total = args.max_steps or max(1, int(round(args.epochs * steps_per_epoch)))
    opt, sched = make_optimizer(model, args, device, total)
    amp_dtype, use_scaler = precision_of(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    step, epoch, pos, skipped = 0, 0, 0, 0
    last_eval = None
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step, epoch, pos = resume["step"], resume["epoch"], resume["batch_in_epoch"]
        skipped, last_eval = resume.get("skipped_steps", 0), resume.get("metrics")
        rngs = resume["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    log = Logger(os.path.join(out, "log.jsonl"), main, append=resume is not None)
    name = tag or args.mode
    if main:
        print(f"[{name}] {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"{param_count(model) / 1e6:.2f}M params | task {spec.name}: "
              f"{len(train_items)} train / {len(dev_items)} dev | {total} steps, global batch "
              f"{args.batch_size} x accum {args.accum}, world {world}, {device.type} "
              f"({torch.get_num_threads()} threads), "
              f"precision {args.precision}" + (f" | resumed at step {step}" if resume else ""))

    def state():
        rngs = [rng_state()]
        if ddp:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        return {"model": clean_state_dict(unwrap(model).state_dict()),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "step": step, "epoch": epoch,
                "batch_in_epoch": pos, "skipped_steps": skipped, "config": cfg.to_dict(),
                "task": spec.name, "tokenizer": tok.to_str(), "metrics": last_eval,
                "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))
                         or v is None}}

    def checkpoint():
        s = state()  # collective under DDP: every rank takes part
        if main:
            save_checkpoint(ck_path, s)

    def run_eval():
        nonlocal last_eval
        m = evaluate(model, dev_items, spec, args, device, rank, world, amp_dtype)
        last_eval = dict(m, step=step, epoch=epoch)
        log(type="eval", step=step, epoch=epoch, **m)
        return m

    prof = None
    if args.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        trace = os.path.join(out, f"trace_rank{rank}.json")
        prof = torch.profiler.profile(
            activities=acts, schedule=torch.profiler.schedule(wait=1, warmup=1, active=3),
            on_trace_ready=lambda p: p.export_chrome_trace(trace), record_shapes=True)
        prof.start()

    bar = None
    if main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc=name, unit="step", dynamic_ncols=True,
                   leave=True)
    teacher_cache = {}  # example index -> teacher logits (frozen teacher, eval mode)
    if teacher is not None and args.teacher_logits:
        teacher_cache = all_teacher_logits(teacher, train_items, args.teacher_logits, device,
                                           amp_dtype, write=main)
    model.train()
    t_start, tokens_seen = time.perf_counter(), 0
    batches = epoch_batches(train_lengths, epoch, args, rank, world)
    while step < total:
        t0 = time.perf_counter()
        window = batches[pos:pos + args.accum]
        micro = [gdata.collate([train_items[i] for i in b]) for b in window]
        # global example count of the window: each rank's summed loss / n * world, averaged by
        # DDP, is the global mean whatever the split, as in a one-process run
        counts = all_reduce(torch.tensor([float(sum(len(b) for b in window))]), world)
        n_global = counts.item()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, hard, kd, tokens
        for i, (idx, b) in enumerate(zip(window, micro)):
            b = to_device(b, device)
            last = i == len(window) - 1
            # no_sync before the forward: DDP skips the gradient all-reduce on all but the last
            sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                t_logits = None
                if teacher is not None:
                    t_logits = teacher_logits(teacher, teacher_cache, idx, b, device, amp_dtype)
                with autocast(device, amp_dtype):
                    logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
                loss, hard, kd = batch_loss(logits, b, t_logits, args, cfg.regression)
                scaler.scale(loss / n_global * world).backward()
            sums += torch.tensor([loss.item(), hard.item(), kd.item() if kd is not None else 0.0,
                                  b["attention_mask"].sum().item()], dtype=torch.float64)
        all_reduce(sums, world)
        loss_mean = sums[0].item() / n_global
        if not math.isfinite(loss_mean):
            if bar:
                bar.close()
            log(type="diverged", step=step, loss=loss_mean)
            log.close()
            raise TrainingDiverged(
                f"[{name}] loss became {loss_mean} at step {step + 1} (epoch {epoch}); stopping. "
                f"The last good checkpoint is kept: "
                f"{ck_path if os.path.exists(ck_path) else '(none written yet)'}")
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip or float("inf"))
        scale_before = scaler.get_scale() if use_scaler else 1.0
        scaler.step(opt)
        scaler.update()
        was_skipped = use_scaler and scaler.get_scale() < scale_before  # inf/NaN grads
        skipped += int(was_skipped)
        lr = sched.get_last_lr()[0]
        if not was_skipped:  # the schedule follows the optimizer's real updates
            sched.step()
        opt.zero_grad(set_to_none=True)
        step, pos = step + 1, pos + len(window)
        dt = time.perf_counter() - t0
        tokens_seen += sums[3].item()
        rec = dict(type="step", step=step, epoch=epoch, loss=loss_mean,
                   hard_loss=sums[1].item() / n_global,
                   kd_loss=sums[2].item() / n_global if teacher is not None else None,
                   lr=lr, grad_norm=float(gnorm), tokens_per_s=sums[3].item() / dt,
                   examples_per_s=n_global / dt, skipped=bool(was_skipped),
                   skipped_steps=skipped)
        log(**rec)
        if bar:
            bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            refresh=False)
            bar.update(1)
        if prof is not None:
            prof.step()
        end_of_epoch = pos >= len(batches)
        if end_of_epoch:
            epoch, pos = epoch + 1, 0
            batches = epoch_batches(train_lengths, epoch, args, rank, world)
        if end_of_epoch or step == total or (args.eval_every and step % args.eval_every == 0):
            m = run_eval()
            if main:
                (bar.write if bar else print)(f"[{name}] step {step} epoch {epoch}: " +
                                              " ".join(f"{k} {v:.4f}" for k, v in m.items()))
        if end_of_epoch or step == total or (args.save_every and step % args.save_every == 0) \
                or step == args.stop_at_step:
            checkpoint()
        if step == args.stop_at_step and step < total:
            break
    if bar:
        bar.close()
    if prof is not None:
        prof.stop()
    elapsed = time.perf_counter() - t_start
    raw = unwrap(model)
    summary = dict(name=name, mode=args.mode, task=spec.name, steps=step, total_steps=total,
                   finished=step >= total, epochs=epoch, world=world, skipped_steps=skipped,
                   params=param_count(raw), size_bytes=size_bytes(raw), config=cfg.to_dict(),
                   metrics=last_eval, train_seconds=elapsed,
                   tokens_per_s=tokens_seen / elapsed if elapsed else 0.0,
                   checkpoint=os.path.abspath(ck_path))
    if main and args.mode == "teacher" and args.teacher_logits and step >= total:
        all_teacher_logits(raw.eval(), train_items, args.teacher_logits, device, amp_dtype)
    if main:
        export_safetensors(raw, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if prof is not None:
            print(f"[{name}] profiler trace: {os.path.join(out, f'trace_rank{rank}.json')}")
    log.close()
    return dict(summary, model=raw, dev_items=dev_items, spec=spec)


def logits_fingerprint(teacher, items) -> str:
    """sha256 of the teacher's weights and the training token ids: a cache made by another
    teacher, tokenizer or data slice never matches."""
    h = hashlib.sha256()
    for k, v in sorted(teacher.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for ids, types, _ in items:
        h.update(torch.tensor(list(ids) + [-1] + list(types) + [-2], dtype=torch.int32)
                 .numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def all_teacher_logits(teacher, items, path, device, amp_dtype, write=True, batch_size=256):
    """(N, C) float32 CPU logits of the frozen teacher on every item: read from `path` when it
    was made by this teacher on these items, else computed (length-sorted batches, eval mode)
    and written there atomically."""
    fp = logits_fingerprint(teacher, items)
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("fingerprint") == fp:
            return ck["logits"]
        print(f"note: {path} was made by another teacher or data; recomputing it")
    was_training = teacher.training
    teacher.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out = None
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = to_device(gdata.collate([items[i] for i in idx]), device)
        with autocast(device, amp_dtype):
            y = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"]).float().cpu()
        if out is None:
            out = torch.empty(len(items), y.shape[1])
        out[idx] = y
    teacher.train(was_training)
    if out is None:
        out = torch.empty(0, 0)
    if write:
        save_checkpoint(path, dict(fingerprint=fp, logits=out))
    return out


@torch.no_grad()
def teacher_logits(teacher, cache, idx, batch, device, amp_dtype):
    """The frozen teacher's logits for the examples `idx`, computed once per example. cache:
    dict (filled here) or the (N, C) tensor of all_teacher_logits."""
    if torch.is_tensor(cache):
        return cache[torch.tensor(idx)].to(device)
    todo = [j for j, i in enumerate(idx) if i not in cache]
    if todo:
        sub = {k: v[todo] for k, v in batch.items()}
        S = int(sub["attention_mask"].sum(1).max())  # drop the padding columns
        with autocast(device, amp_dtype):
            out = teacher(sub["input_ids"][:, :S], sub["attention_mask"][:, :S],
                          sub["token_type_ids"][:, :S]).float()
        for j, row in zip(todo, out):
            cache[idx[j]] = row
    return torch.stack([cache[i] for i in idx])


# ------------------------------------------------------------------------------- reporting


@torch.no_grad()
def cpu_latency_ms(model, items, reps=30):
    """Median ms of one forward of one example (batch 1) on CPU."""
    model = copy.deepcopy(model).cpu().eval()
    b = gdata.collate(items[:1])
    args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
    return median_ms(lambda: model(*args), reps, warmup=3)


def report_row(name, model, metrics, items, spec, params=None):
    """params: pass the float model's count for an INT8 model (its weights are int8 buffers)."""
    return dict(model=name, metric=spec.metrics[0], score=metrics[spec.metrics[0]],
                params=params or param_count(model), size_mb=size_bytes(model) / 2**20,
                cpu_latency_ms=cpu_latency_ms(model, items))


def print_table(rows):
    cols = ["model", "metric", "score", "params", "size_mb", "cpu_latency_ms"]
    fmt = {"score": "{:.4f}", "size_mb": "{:.3f}", "cpu_latency_ms": "{:.2f}", "params": "{:,}"}
    table = [cols] + [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    w = [max(len(t[i]) for t in table) for i in range(len(cols))]
    for i, t in enumerate(table):
        print("| " + " | ".join(s.ljust(n) for s, n in zip(t, w)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (n + 2) for n in w) + "|")


# The default CPU run (teacher + distilled student + INT8 within 5 minutes on 2 cores): shorter
# schedules than the paper's 10 epochs; command-line --teacher-epochs / --student-epochs win.
PIPELINE = {"teacher": dict(epochs=4, lr=2e-3), "student": dict(epochs=6, lr=2e-3)}


def pipeline(args):
    """teacher -> distilled student -> INT8 student, then the comparison table."""
    root = args.out or os.path.join("runs", f"pipeline-{args.task}")
    if args.out is None and not os.path.exists("runs"):
        os.makedirs("runs")
        with open(os.path.join("runs", ".gitignore"), "w") as f:
            f.write("*\n")  # run outputs never land in git
    t0 = time.perf_counter()
    def stage(name, mode, preset, epochs, **extra):  # one stage's args: schedule + overrides
        ck = os.path.join(root, name, CHECKPOINT)
        resume = "auto" if args.resume and os.path.exists(ck) else None  # per-stage --resume
        a = argparse.Namespace(**dict(vars(args), **PIPELINE[name], mode=mode, preset=preset,
                                      out=os.path.join(root, name), resume=resume, **extra))
        a.epochs = epochs or a.epochs
        a.lr = args.lr or a.lr
        return a

    t = train(stage("teacher", "teacher", args.teacher_preset, args.teacher_epochs), tag="teacher")
    s_args = stage("student", "distill", args.student_preset, args.student_epochs,
                   teacher=t["checkpoint"])
    s = train(s_args, tag="student-kd")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    spec, items = s["spec"], s["dev_items"]
    rows = [report_row(f"teacher ({t['config']['num_layers']}L)", t["model"], t["metrics"],
                       items, spec),
            report_row(f"student KD ({s['config']['num_layers']}L)", s["model"], s["metrics"],
                       items, spec)]
    q, report = quantize(copy.deepcopy(s["model"]).cpu())
    if q is None:
        print(report)
    else:
        print(f"INT8 student: {str(report).splitlines()[0]}")
        m = evaluate(q, items, spec, args, torch.device("cpu"), 0, 1)
        rows.append(report_row("student KD INT8", q, m, items, spec,
                               params=param_count(s["model"])))
    print(f"\npipeline on {spec.name} ({len(items)} dev examples), "
          f"{time.perf_counter() - t0:.0f} s:")
    print_table(rows)
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.perf_counter() - t0}, f, indent=1)
    return 0


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.mode == "pipeline":
            return pipeline(args)
        s = train(args)
        if int(os.environ.get("RANK", "0")) == 0:
            m = s["metrics"] or {}
            print(f"[{s['name']}] done: {s['steps']}/{s['total_steps']} steps, "
                  f"{s['train_seconds']:.1f} s, {s['tokens_per_s']:.0f} tokens/s, skipped "
                  f"{s['skipped_steps']} | " + " ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                        if isinstance(v, float)))
            if m:
                print_table([report_row(f"{s['name']} ({s['config']['num_layers']}L)",
                                        s["model"], m, s["dev_items"], s["spec"])])
        return 0
    except (TrainingDiverged, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
