"""The command line of `python -m tkd_core.train`: its flags, their checks, and `--set` overrides.

    args = parse_args(["--mode", "teacher", "--set", "pre_ln=true"])
    key, value = parse_override("hidden_dropout=0")     # typed as the ModelConfig field

Every flag is checked here, before any work starts.
"""
import argparse
import dataclasses

from . import data as gdata
from .model import ARCHS, PRESETS, ModelConfig

MODES = ("pipeline", "teacher", "student", "distill")
DEFAULT_PRESET = {"teacher": "cpu-teacher", "student": "cpu-student-2",
                  "distill": "cpu-student-2"}
DEFAULT_LR = 5e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tkd_core.train",
                                description="train a teacher, a student, or distill one into the other",
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
    a("--lr", type=float, default=None, help=f"peak learning rate (default: {DEFAULT_LR}; "
      "pipeline: its own per stage)")
    a("--weight-decay", type=float, default=0.01)
    a("--warmup", type=float, default=0.1, help="warmup steps: fraction (<1) or count")
    a("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--alpha", type=float, default=0.5, help="KD weight of the soft loss")
    a("--temperature", type=float, default=1.0)
    a("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
      help="auto: fp16 autocast + GradScaler on CUDA, fp32 on CPU")
    a("--device", default=None, help="cuda or cpu (default: cuda if available)")
    a("--threads", type=int, default=0,
      help="CPU threads (0: all cores, or 1 when the machine is busy)")
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
        parse_override(kv)
    return args


def parse_override(kv: str):
    """--set KEY=VALUE -> (key, value typed as the ModelConfig field)."""
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
