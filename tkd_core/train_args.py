"""The command line of `python -m tkd_core.train`: its flags, their checks, `--set` overrides.

    args = parse_args(["--mode", "teacher", "--set", "pre_ln=true"])
    key, value = parse_override("hidden_dropout=0")     # typed as the ModelConfig field

Every flag is checked here, before any work starts.
"""
import argparse
import dataclasses

from . import data as gdata
from .models import ARCHS, PRESETS, ModelConfig

MODES = ("pipeline", "teacher", "student", "distill")
DEFAULT_PRESET = {"teacher": "cpu-teacher", "student": "cpu-student-2",
                  "distill": "cpu-student-2"}
DEFAULT_LR = 5e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tkd_core.train",
                                description="train a teacher, a student, or distill one into "
                                            "the other",
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
    a("--teacher", default=None, help="the teacher (distill; --student-init): a tkd "
      "checkpoint.pt or run directory, or a Hugging Face folder with a fine-tuned head")
    a("--init", default=None, metavar="HF_FOLDER", help="start the trained model from a Hugging "
      "Face BERT / DistilBERT / RoBERTa folder: architecture, weights and tokenizer (--set may "
      "still change dropout and other weightless settings)")
    a("--reinit-head", action="store_true", help="with --init: a fresh classifier when the "
      "folder's head has another label count")
    a("--student-init", default=None, metavar="teacher[:i,j,...]", help="the student takes the "
      "teacher's embeddings, the listed encoder layers (default: every other one) and its head; "
      "its width, heads and FFN are the teacher's")
    a("--export-hf", default=None, metavar="DIR", help="also write the final model as a Hugging "
      "Face folder (transformers' AutoModelForSequenceClassification loads it)")
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
    a("--lr", type=float, default=None, help=f"peak learning rate (default: {DEFAULT_LR}; "
      "pipeline: its own per stage)")
    a("--weight-decay", type=float, default=0.01)
    a("--warmup", type=float, default=0.1, help="warmup steps: fraction (<1) or count")
    a("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--alpha", type=float, default=0.5, help="KD weight of the soft loss")
    a("--temperature", type=float, default=1.0)
    # layer-wise distillation and the transfer set (tkd_core/distill.py; distill mode)
    a("--hidden-loss", default="none", choices=("none", "mse", "cosine"),
      help="hidden-state loss between mapped student and teacher layers (embeddings included)")
    a("--hidden-weight", type=float, default=1.0, help="weight of the hidden-state loss")
    a("--hidden-proj", action="store_true", help="a learned linear projection of the student's "
      "hidden states to the teacher's width (needed when they differ)")
    a("--attention-loss", action="store_true", help="KL between the teacher's and the student's "
      "attention distributions of mapped layers (probabilities recomputed by a reference path)")
    a("--attention-weight", type=float, default=1.0, help="weight of the attention loss")
    a("--layer-map", default="uniform", help="student:teacher hidden-state pairs for the "
      "layer-wise losses: uniform, last, or 's:t,s:t,...' (0 = the embeddings)")
    a("--augment", type=int, default=0, metavar="N", help="a transfer set: N augmented copies "
      "of every training example (mask p=0.1, same-task word replacement p=0.1, n-gram "
      "sampling p=0.25), labelled by the teacher alone")
    a("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
      help="auto: fp16 autocast + GradScaler on CUDA, fp32 on CPU")
    a("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    a("--threads", type=int, default=0,
      help="CPU threads (0: all cores, or 1 when the machine is busy)")
    a("--seed", type=int, default=0)
    a("--overwrite", action="store_true", help="replace the run already in --out (its "
      "checkpoint, model, summary and log are deleted first)")
    a("--dist-timeout", type=float, default=300, help="seconds the ranks wait for each other "
      "(rendezvous and collectives) before stopping with the missing ranks named")
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
    check_args(args)
    return args


# flag -> (lowest allowed, whether the lowest itself is allowed, what it means in words)
_AT_LEAST = {
    "lr": (0, False, "a positive learning rate"), "epochs": (0, False, "positive"),
    "max_steps": (0, True, ">= 0 (0: from --epochs)"), "warmup": (0, True, ">= 0"),
    "clip": (0, True, ">= 0 (0: off)"), "weight_decay": (0, True, ">= 0"),
    "temperature": (0, False, "positive"), "batch_size": (1, True, ">= 1"),
    "accum": (1, True, ">= 1"), "max_len": (3, True, ">= 3 ([CLS] x [SEP])"),
    "vocab_size": (len(gdata.SPECIAL_TOKENS) + 1, True,
                   f">= {len(gdata.SPECIAL_TOKENS) + 1} (the special tokens and one more)"),
    "threads": (0, True, ">= 0 (0: automatic)"), "seed": (0, True, ">= 0"),
    "eval_every": (0, True, ">= 0 (0: per epoch)"), "save_every": (0, True, ">= 0"),
    "stop_at_step": (0, True, ">= 0 (0: never)"), "max_train_examples": (0, True, ">= 0"),
    "max_dev_examples": (0, True, ">= 0"), "eval_batch_size": (1, True, ">= 1"),
    "teacher_epochs": (0, False, "positive"), "student_epochs": (0, False, "positive"),
    "dist_timeout": (0, False, "positive seconds"),
    "hidden_weight": (0, True, ">= 0"), "attention_weight": (0, True, ">= 0"),
    "augment": (0, True, ">= 0"),
}


def require(*modules: str, what: str = "python -m tkd_core.train") -> None:
    """A one-line error naming what to install when a run-time dependency is missing, before
    any work (a default job used to crash on `import safetensors` after training)."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pip = {"sklearn": "scikit-learn"}
        raise ValueError(f"{what} needs {', '.join(missing)}: pip install "
                         + " ".join(pip.get(m, m) for m in missing))


def check_args(args) -> None:
    """Every flag in its valid range, before any work (ValueError naming the flag)."""
    import math
    require("tokenizers", "safetensors", *(() if args.no_progress else ("tqdm",)))
    gdata.get_task(args.task)  # unknown task -> the valid ones
    for name, (low, inclusive, what) in _AT_LEAST.items():
        v = getattr(args, name)
        if v is None:  # not given: the default applies
            continue
        bad = (isinstance(v, float) and not math.isfinite(v)) or v < low or \
            (v == low and not inclusive)
        if bad:
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {v}")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1] (the soft loss' weight), got {args.alpha}")
    check_device(args.device)
    distill_only = [f for f, on in (("--hidden-loss", args.hidden_loss != "none"),
                                    ("--attention-loss", args.attention_loss),
                                    ("--augment", args.augment > 0)) if on]
    if distill_only and args.mode not in ("distill", "pipeline"):
        raise ValueError(f"{', '.join(distill_only)} need a teacher: --mode distill")
    if args.init and args.student_init:
        raise ValueError("--init and --student-init both say where the model starts: pick one")
    if args.init and (args.preset or args.arch) and args.mode != "pipeline":
        raise ValueError("--init takes the architecture from the folder: drop --preset / --arch")
    if args.student_init and args.mode not in ("student", "distill", "pipeline"):
        raise ValueError("--student-init makes a student: --mode student or distill")
    if args.export_hf:  # the folder is the user's: a file, or files there, are not replaced
        import os
        if os.path.exists(args.export_hf) and not os.path.isdir(args.export_hf):
            raise ValueError(f"--export-hf {args.export_hf} is a file, not a folder")
        if os.path.isdir(args.export_hf) and os.listdir(args.export_hf) and not (
                args.overwrite or args.resume):
            raise ValueError(f"--export-hf {args.export_hf} already holds files; pass "
                             "--overwrite to replace them, or choose another folder")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run in "
                         "--out, or replace it")
    for kv in args.set:
        parse_override(kv)


def check_device(device: str) -> None:
    """auto | cpu | cuda | cuda:N, and CUDA only where there is a CUDA device."""
    import re
    import torch
    if device in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", device or ""):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def parse_override(kv: str):
    """--set KEY=VALUE -> (key, value typed as the ModelConfig field)."""
    if "=" not in kv:
        raise ValueError(f"--set expects KEY=VALUE, got {kv!r}")
    k, v = kv.split("=", 1)
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    if k not in fields:
        raise ValueError(f"--set: unknown ModelConfig key {k!r}; valid: {sorted(fields)}")
    if k in _FROM_DATA:
        raise ValueError(f"--set {k}: {_FROM_DATA[k]}; it cannot be set")
    default = getattr(ModelConfig(), k)
    if isinstance(default, bool):
        if v.lower() not in _BOOLS:
            raise ValueError(f"--set {k}={v}: expected true/false (or 1/0, yes/no, on/off)")
        return k, _BOOLS[v.lower()]
    try:
        return k, type(default)(v)
    except ValueError:
        raise ValueError(f"--set {k}={v}: expected a {type(default).__name__} "
                         f"(like the default {default!r})") from None


_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}
_FROM_DATA = {"num_labels": "the label count comes from the task (--task)",
              "vocab_size": "the vocabulary size comes from the tokenizer (--vocab or "
                            "--vocab-size)"}


# Settings a resumed run must keep: they decide the model, the data and its order (the saved
# data position and RNG states only make sense for the same ones).
RESUME_FIXED = ("mode", "task", "batch_size", "accum", "max_len", "max_train_examples",
                "group_by_length", "seed", "preset", "arch", "set", "vocab_size", "augment",
                "hidden_loss", "hidden_proj", "attention_loss", "layer_map", "init",
                "student_init")
# Restored from the optimizer's saved state, so a new value would be silently ignored.
RESUME_IGNORED = ("lr", "weight_decay")
# Read afresh from the command line on resume (the schedule's length, clipping, the KD mix...).
RESUME_APPLIED = ("epochs", "max_steps", "warmup", "clip", "alpha", "temperature", "precision",
                  "hidden_weight", "attention_weight")


def recorded(args) -> dict:
    """The settings a checkpoint and summary.json record: plain values and the --set list."""
    return {k: v for k, v in vars(args).items()
            if isinstance(v, (int, float, str)) or v is None
            or (isinstance(v, list) and all(isinstance(x, str) for x in v))}


def check_resume(args, saved: dict) -> list:
    """Compare this command's settings with those `saved` in the checkpoint. Raises ValueError
    listing every fixed setting that differs; returns notes on the others (ignored ones named
    loudly, applied ones said)."""
    now = recorded(args)
    diff = lambda keys: [k for k in keys if k in saved and k in now  # noqa: E731
                         and saved[k] != now[k]]
    fixed = diff(RESUME_FIXED)
    if fixed:
        raise ValueError(
            "--resume with settings that cannot change: " + "; ".join(
                f"--{k.replace('_', '-')} was {saved[k]!r}, now {now[k]!r}" for k in fixed) +
            ". Resume with the original settings, or start over with --overwrite.")
    notes = [f"WARNING: --{k.replace('_', '-')} {now[k]!r} is ignored on resume: the optimizer "
             f"state restores {saved[k]!r}" for k in diff(RESUME_IGNORED)]
    notes += [f"note: --{k.replace('_', '-')} changed on resume ({saved[k]!r} -> {now[k]!r}); "
              "the new value applies from here" for k in diff(RESUME_APPLIED)]
    return notes
