"""python -m tkd_core.train: train a teacher, a student, or distill one into the other.

With no arguments it runs the whole pipeline on the built-in offline task (CPU-sized presets):
a 12-layer teacher, a 2-layer student distilled from it, and that student's INT8 form; then it
prints accuracy, parameters, size and CPU latency of each (tkd_core/pipeline.py).

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
logits: alpha * T^2 * KL + (1 - alpha) * CE; tkd_core/distill.py), pipeline (teacher -> distill
-> INT8). Outputs in --out: checkpoint.pt (everything to resume; tkd_core/checkpoint.py),
model.safetensors, tokenizer.json / vocab.txt, log.jsonl (every step and evaluation),
summary.json, and trace_rank<r>.json (--profile).

The file reads top to bottom: arguments, setup (devices, data, model, optimizer), the train state,
one optimizer step, evaluate-and-checkpoint, and `train()` which strings them together.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from . import data as gdata
from .augment import augment
from .distributed import all_reduce, setup_distributed
from .checkpoint import (CHECKPOINT, clean_state_dict, export_safetensors, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state, unwrap)
from .distill import IGNORE, all_teacher_logits, build_objective, forward_flags
from .warmstart import init_from_hf, load_teacher, same_vocabulary, student_from_teacher
from .measure import cpu_threads, evaluate, format_table, param_count, size_bytes
from .models import ModelConfig, build_model
from .rundir import RunDir
from .train_args import (DEFAULT_LR, DEFAULT_PRESET, check_resume, parse_args, parse_override,
                         recorded)


PARTS = ("hard_loss", "kd_loss", "hidden_loss", "attention_loss")  # logged loss terms


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- setup


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
    train_items = gdata.encode(tok, train, args.max_len)
    if args.mode == "distill" and args.augment:  # the transfer set: teacher-labelled copies
        train_items += augment(tok, train, args.augment, args.seed, args.max_len,
                                     label=float("nan") if spec.labels is None else IGNORE)
    return spec, tok, train_items, gdata.encode(tok, dev, args.max_len)


def _overrides(args) -> dict:
    return dict(parse_override(kv) for kv in args.set)


def model_config(args, spec, tok) -> ModelConfig:
    """Preset + --set overrides; the task sets the labels, the tokenizer the vocabulary."""
    over = _overrides(args)
    if args.arch is not None:  # an explicit --arch wins over the preset's
        over.setdefault("arch", args.arch)
    return ModelConfig.preset(args.preset or DEFAULT_PRESET[args.mode],
                              vocab_size=tok.get_vocab_size(), num_labels=spec.num_labels, **over)


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


def warmup_steps(args, total):
    return int(args.warmup * total) if args.warmup < 1 else int(args.warmup)


def make_optimizer(model, args, device, total_steps, objective=None):
    """AdamW (no decay on biases and LayerNorm) over the model's parameters and the objective's
    (a hidden-state projection), and a linear warmup + linear decay schedule."""
    named = list(model.named_parameters()) + (list(objective.named_parameters())
                                              if objective is not None else [])
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over every tensor; on CPU 5.7x faster than the default per-tensor loop
    # (a 2-layer student with MiniLM's 30,522 x 384 embedding: 14 ms against 79 ms a step)
    opt = torch.optim.AdamW(groups, lr=DEFAULT_LR if args.lr is None else args.lr,
                            fused=True if device.type in ("cuda", "cpu") else None)
    warm = warmup_steps(args, total_steps)

    def schedule(step):  # linear warmup, then linear decay to 0
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# ----------------------------------------------------------------------------- train state


@dataclasses.dataclass
class TrainState:
    """What a step changes and a checkpoint saves; everything else is rebuilt from the args."""
    model: torch.nn.Module         # possibly DDP-wrapped
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0                  # optimizer steps done
    epoch: int = 0
    pos: int = 0                   # micro-batches done in this epoch
    skipped: int = 0               # fp16 steps skipped for inf/NaN gradients
    last_eval: dict = None
    objective: torch.nn.Module = None  # the loss; its parameters (a projection) train too

    def to_checkpoint(self, cfg, spec, tok, args, world) -> dict:
        """The checkpoint dict; collective under DDP (every rank's RNG state is gathered)."""
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        return {"model": clean_state_dict(unwrap(self.model).state_dict()),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs, "step": self.step,
                "epoch": self.epoch, "batch_in_epoch": self.pos, "skipped_steps": self.skipped,
                "config": cfg.to_dict(), "task": spec.name, "tokenizer": tok.to_str(),
                "metrics": self.last_eval, "args": recorded(args),
                "objective": self.objective.state_dict() if self.objective is not None else {}}

    def load(self, ck, rank, world):
        unwrap(self.model).load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.step, self.epoch, self.pos = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        self.skipped, self.last_eval = ck.get("skipped_steps", 0), ck.get("metrics")
        if self.objective is not None and ck.get("objective"):
            self.objective.load_state_dict(ck["objective"])
        rngs = ck["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])


# -------------------------------------------------------------------------------- one step


def train_step(ts: TrainState, window, items, objective, device, amp_dtype, world, clip):
    """One optimizer step over `window` (the accumulated micro-batches: lists of example
    indices). Returns the step's log record (losses are global means over the window)."""
    t0 = time.perf_counter()
    model, ddp = ts.model, world > 1
    # global example count of the window: each rank's summed loss / n * world, averaged by DDP,
    # is the global mean whatever the split, as in a one-process run
    n_global = all_reduce(torch.tensor([float(sum(len(b) for b in window))]), world).item()
    sums = torch.zeros(2 + len(PARTS), dtype=torch.float64)  # loss, tokens, parts
    seen = set()
    flags = forward_flags(objective)
    for i, idx in enumerate(window):
        b = {k: v.to(device, non_blocking=True)
             for k, v in gdata.collate([items[j] for j in idx]).items()}
        # no_sync before the forward: DDP skips the gradient all-reduce on all but the last
        sync = model.no_sync() if ddp and i < len(window) - 1 else contextlib.nullcontext()
        with sync:
            with autocast(device, amp_dtype):
                out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], **flags)
            loss, parts = objective(out, b, idx)
            ts.scaler.scale(loss / n_global * world).backward()
        seen.update(parts)
        sums += torch.tensor([loss.item(), b["attention_mask"].sum().item()] +
                             [parts[k].item() if k in parts else 0.0 for k in PARTS],
                             dtype=torch.float64)
    all_reduce(sums, world)
    extra = [p for p in objective.parameters() if p.grad is not None]
    if ddp:  # the objective's own parameters (a projection) are outside DDP: average them here
        for p in extra:
            all_reduce(p.grad, world).div_(world)
    loss_mean = sums[0].item() / n_global
    if not math.isfinite(loss_mean):
        return dict(type="diverged", step=ts.step, loss=loss_mean)
    use_scaler = ts.scaler.is_enabled()
    ts.scaler.unscale_(ts.opt)
    gnorm = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + extra,
                                           clip or float("inf"))
    scale_before = ts.scaler.get_scale() if use_scaler else 1.0
    ts.scaler.step(ts.opt)
    ts.scaler.update()
    was_skipped = use_scaler and ts.scaler.get_scale() < scale_before  # inf/NaN grads
    ts.skipped += int(was_skipped)
    lr = ts.sched.get_last_lr()[0]
    if not was_skipped:  # the schedule follows the optimizer's real updates
        ts.sched.step()
    ts.opt.zero_grad(set_to_none=True)
    ts.step, ts.pos = ts.step + 1, ts.pos + len(window)
    dt = time.perf_counter() - t0
    losses = {k: sums[2 + j].item() / n_global for j, k in enumerate(PARTS) if k in seen}
    return dict(type="step", step=ts.step, epoch=ts.epoch, loss=loss_mean,
                hard_loss=losses["hard_loss"], kd_loss=losses.get("kd_loss"),
                **{k: v for k, v in losses.items() if k not in ("hard_loss", "kd_loss")},
                lr=lr, grad_norm=float(gnorm), tokens_per_s=sums[1].item() / dt,
                examples_per_s=n_global / dt, skipped=bool(was_skipped),
                skipped_steps=ts.skipped, tokens=sums[1].item())


# ------------------------------------------------------------------------------- the run


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
    rd = RunDir(out, resume=bool(args.resume), overwrite=args.overwrite, enabled=main)
    err = None
    if main:  # rank 0 owns the directory: lock it, refuse to clobber a run in it
        try:
            rd.acquire()
        except RuntimeError as e:
            err = str(e)
    if world > 1:  # every rank stops with rank 0's reason, none waits for it
        msg = [err]
        dist.broadcast_object_list(msg, src=0)
        err = msg[0]
    if err:
        raise RuntimeError(err)
    try:
        return _train(args, tag, rank, world, device, out, rd)
    finally:
        rd.release()


def _train(args, tag, rank, world, device, out, rd):
    main = rank == 0
    os.makedirs(out, exist_ok=True)
    ck_path = os.path.join(out, CHECKPOINT)
    resume = None
    if args.resume:
        resume = load_checkpoint(ck_path if args.resume == "auto" else args.resume)
        for note in check_resume(args, resume.get("args", {})):
            if main:
                print(note, file=sys.stderr)
    spec = gdata.get_task(args.task)
    teacher, teacher_ck = None, None
    needs_teacher = args.mode == "distill" or (args.student_init and not resume)
    if needs_teacher:  # (student mode with --student-init: the teacher's layers only)
        if not args.teacher:
            raise ValueError(f"--mode {args.mode}" + (" --student-init" if args.student_init
                             else "") + " needs --teacher (checkpoint.pt, run dir or HF folder)")
        teacher, teacher_ck = load_teacher(args.teacher, spec, device)
    torch.manual_seed(args.seed)  # identical init on every rank (fresh heads included)
    start, overrides = None, _overrides(args)  # start: the model to begin from, if not a preset
    if args.init and not resume:
        start, init_tok = init_from_hf(args.init, spec, overrides, args.reinit_head)
        if teacher_ck and not same_vocabulary(init_tok.to_str(), teacher_ck["tokenizer"]):
            raise ValueError(f"--init {args.init} and --teacher {args.teacher} have different "
                             "vocabularies: distillation feeds both the same token ids")
        teacher_ck = dict(teacher_ck or {}, tokenizer=init_tok.to_str())
    spec, tok, train_items, dev_items = load_data(
        args, (resume or teacher_ck or {}).get("tokenizer"))
    train_lengths = [len(item[0]) for item in train_items]
    if teacher is not None and teacher_ck.get("task") not in (None, spec.name):
        print(f"note: teacher was trained on {teacher_ck['task']}, distilling on {spec.name}")
    if main:
        gdata.save_tokenizer(tok, out)

    if resume:
        cfg = ModelConfig.from_dict(resume["config"])
    else:
        if start is None and args.student_init:
            start = student_from_teacher(teacher, args.student_init, overrides)
        cfg = start.config if start is not None else model_config(args, spec, tok)
    if teacher is not None and teacher.config.num_labels != cfg.num_labels:
        raise ValueError(f"teacher has {teacher.config.num_labels} label(s), the student "
                         f"{cfg.num_labels}: teacher and student label counts must match")
    if cfg.max_positions - cfg.position_offset < args.max_len:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's positions "
                         f"({cfg.max_positions - cfg.position_offset})")
    model = (start if start is not None else build_model(cfg)).to(device)
    torch.manual_seed(args.seed + rank)  # per-rank dropout streams
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def batches_of(epoch):
        return gdata.epoch_batches(train_lengths, epoch, args.batch_size, args.seed, rank, world,
                                   args.group_by_length)

    steps_per_epoch = math.ceil(len(batches_of(0)) / args.accum)
    total = args.max_steps or max(1, int(round(args.epochs * steps_per_epoch)))
    amp_dtype, use_scaler = precision_of(args, device)
    objective, layerwise = build_objective(args, cfg, teacher if args.mode == "distill" else None,
                                           lambda: autocast(device, amp_dtype))
    objective.to(device)
    ts = TrainState(model, *make_optimizer(model, args, device, total, objective),
                    torch.amp.GradScaler(device.type, enabled=use_scaler), objective=objective)
    if resume is not None:
        ts.load(resume, rank, world)
    log = rd.log(ts.step if resume is not None else None)
    name = tag or args.mode
    if main:
        print(f"[{name}] {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"{param_count(model) / 1e6:.2f}M params | task {spec.name}: "
              f"{len(train_items)} train / {len(dev_items)} dev | {total} steps, global batch "
              f"{args.batch_size} x accum {args.accum}, world {world}, {device.type} "
              f"({torch.get_num_threads()} threads), "
              f"precision {args.precision}" + (f" | resumed at step {ts.step}" if resume else ""))

    def checkpoint():
        s = ts.to_checkpoint(cfg, spec, tok, args, world)  # every rank takes part
        if main:
            save_checkpoint(ck_path, s)

    def run_eval():
        m = evaluate(model, dev_items, spec, device, args.eval_batch_size, rank, world,
                     lambda: autocast(device, amp_dtype))
        ts.last_eval = dict(m, step=ts.step, epoch=ts.epoch)
        log(type="eval", step=ts.step, epoch=ts.epoch, **m)
        return m

    if teacher is not None and args.teacher_logits and not layerwise:
        t0 = time.perf_counter()  # logged: a study charges the pass to the rows that read it
        objective.cache = all_teacher_logits(teacher, train_items, args.teacher_logits, device,
                                             lambda: autocast(device, amp_dtype), write=main)
        log(type="teacher_logits", path=args.teacher_logits, seconds=time.perf_counter() - t0)
    prof = _profiler(args, out, rank, device)
    bar = None
    if main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=ts.step, desc=name, unit="step", dynamic_ncols=True,
                   leave=True)
    model.train()
    t_start, tokens_seen = time.perf_counter(), 0
    batches = batches_of(ts.epoch)
    while ts.step < total:
        rec = train_step(ts, batches[ts.pos:ts.pos + args.accum], train_items, objective,
                         device, amp_dtype, world, args.clip)
        if rec["type"] == "diverged":
            if bar:
                bar.close()
            log(**rec)
            log.close()
            raise TrainingDiverged(
                f"[{name}] loss became {rec['loss']} at step {ts.step + 1} (epoch {ts.epoch}); "
                f"stopping. The last good checkpoint is kept: "
                f"{ck_path if os.path.exists(ck_path) else '(none written yet)'}")
        tokens_seen += rec.pop("tokens")
        log(**rec)
        if bar:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            refresh=False)
            bar.update(1)
        if prof is not None:
            prof.step()
        step = ts.step
        end_of_epoch = ts.pos >= len(batches)
        if end_of_epoch:
            ts.epoch, ts.pos = ts.epoch + 1, 0
            batches = batches_of(ts.epoch)
        if end_of_epoch or step == total or (args.eval_every and step % args.eval_every == 0):
            m = run_eval()
            if main:
                (bar.write if bar else print)(f"[{name}] step {step} epoch {ts.epoch}: " +
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
    summary = dict(name=name, mode=args.mode, task=spec.name, steps=ts.step, total_steps=total,
                   finished=ts.step >= total, epochs=ts.epoch, world=world,
                   skipped_steps=ts.skipped, params=param_count(raw), size_bytes=size_bytes(raw),
                   config=cfg.to_dict(), metrics=ts.last_eval, train_seconds=elapsed,
                   tokens_per_s=tokens_seen / elapsed if elapsed else 0.0,
                   checkpoint=os.path.abspath(ck_path), args=recorded(args),
                   peak_memory_mb=_peak_memory_mb(device))
    if main and args.mode == "teacher" and args.teacher_logits and ts.step >= total:
        t0 = time.perf_counter()
        all_teacher_logits(raw.eval(), train_items, args.teacher_logits, device,
                           lambda: autocast(device, amp_dtype))
        log(type="teacher_logits", path=args.teacher_logits, seconds=time.perf_counter() - t0)
    if main:
        export_safetensors(raw, os.path.join(out, "model.safetensors"))
        if args.export_hf:
            from .hf import save_pretrained
            save_pretrained(raw, tok, args.export_hf)
            print(f"[{name}] Hugging Face folder: {args.export_hf}")
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if prof is not None:
            print(f"[{name}] profiler trace: {os.path.join(out, f'trace_rank{rank}.json')}")
    log.close()
    return dict(summary, model=raw, dev_items=dev_items, spec=spec, tokenizer=tok)


def _peak_memory_mb(device) -> float:
    """CUDA: the peak of allocated tensor memory; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _profiler(args, out, rank, device):
    """A started torch.profiler (steps 2-4, a chrome trace per rank) with --profile, else None."""
    if not args.profile:
        return None
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace = os.path.join(out, f"trace_rank{rank}.json")
    prof = torch.profiler.profile(
        activities=acts, schedule=torch.profiler.schedule(wait=1, warmup=1, active=3),
        on_trace_ready=lambda p: p.export_chrome_trace(trace), record_shapes=True)
    prof.start()
    return prof


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.mode == "pipeline":
            from .pipeline import pipeline
            return pipeline(args)
        s = train(args)
        if int(os.environ.get("RANK", "0")) == 0:
            from .pipeline import report_row, TABLE_COLS, TABLE_FMT
            m = s["metrics"] or {}
            print(f"[{s['name']}] done: {s['steps']}/{s['total_steps']} steps, "
                  f"{s['train_seconds']:.1f} s, {s['tokens_per_s']:.0f} tokens/s, skipped "
                  f"{s['skipped_steps']} | " + " ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                        if isinstance(v, float)))
            if m:
                row = report_row(f"{s['name']} ({s['config']['num_layers']}L)", s["model"], m,
                                 s["spec"])
                print(format_table([row], TABLE_COLS, TABLE_FMT))
        if dist.is_initialized():  # the ranks leave together (gloo aborts a rank that tears
            dist.barrier()         # down its group while a peer still works)
        return 0
    except (TrainingDiverged, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
