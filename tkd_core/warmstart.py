"""Where a trained model's weights start: a Hugging Face folder (--init), a teacher's layers
(--student-init), or a tkd checkpoint / HF folder as a frozen teacher (--teacher).

    model, tok = init_from_hf("../shared/models/all-MiniLM-L6-v2", spec, overrides)
    model = student_from_teacher(teacher, "teacher:0,2,4", overrides)   # DistilBERT-style
    teacher, info = load_teacher(path, spec, device)    # checkpoint.pt, run dir, or HF folder

`overrides` are the trainer's --set pairs: on a pretrained architecture they may change what
has no weights (dropout, pooling...); a change that reshapes a tensor is an error naming it.
"""
import dataclasses
import os
from typing import List, Tuple

from torch import nn

from . import data as gdata
from .checkpoint import load_model
from .models import build_model


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _rebuild(model: nn.Module, overrides: dict, state: dict, where: str) -> nn.Module:
    """A fresh model of model.config + overrides holding `state`."""
    cfg = dataclasses.replace(model.config, **overrides)
    out = build_model(cfg)
    ours = out.state_dict()
    for k, v in state.items():
        if k in ours and ours[k].shape != v.shape:
            raise ValueError(f"--set {overrides} changes the shape of {where}'s tensor {k!r}: "
                             f"{tuple(v.shape)} -> {tuple(ours[k].shape)}; only settings "
                             "without weights (dropout, ...) can change on a pretrained model")
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("classifier.")]:
        raise ValueError(f"--set {overrides} changes {where}'s architecture: "
                         f"missing {missing}, unexpected {unexpected}")
    return out


def init_from_hf(path: str, spec: gdata.TaskSpec, overrides: dict, reinit_head: bool = False):
    """(model, tokenizer) of a HF folder, its head sized for the task's labels."""
    from .hf import load_pretrained
    model, tok = load_pretrained(path, num_labels=spec.num_labels, reinit_head=reinit_head)
    if overrides:
        model = _rebuild(model, overrides, model.state_dict(), path)
    return model.train(), tok


def parse_student_init(spec: str, n_teacher: int) -> List[int]:
    """"teacher" (every other layer: 0, 2, 4, ..., as DistilBERT) or "teacher:i,j,..."."""
    if spec == "teacher":
        return list(range(0, n_teacher, 2))
    if not spec.startswith("teacher:"):
        raise ValueError(f"--student-init must be 'teacher' or 'teacher:i,j,...', got {spec!r}")
    try:
        layers = [int(x) for x in spec.split(":", 1)[1].split(",")]
    except ValueError:
        raise ValueError(f"--student-init {spec!r}: layer indices must be integers") from None
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ValueError(f"--student-init {spec!r}: expected distinct layers in 0..{n_teacher - 1} "
                         f"(the teacher has {n_teacher})")
    return layers


def student_from_teacher(teacher: nn.Module, spec: str, overrides: dict) -> nn.Module:
    """A student with the teacher's width, heads and FFN, its embeddings, the listed encoder
    layers (in order), and its pooler and classifier (the task head it was fine-tuned with)."""
    if teacher.config.arch != "transformer":
        raise ValueError("--student-init needs a Transformer teacher")
    layers = parse_student_init(spec, teacher.config.num_layers)
    state = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("layers."):
            i, rest = k.split(".", 2)[1:]
            if int(i) in layers:
                state[f"layers.{layers.index(int(i))}.{rest}"] = v
        else:
            state[k] = v
    small = build_model(dataclasses.replace(teacher.config, num_layers=len(layers)))
    small.load_state_dict(state)
    out = _rebuild(small, overrides, state, "the teacher") if overrides else small
    return out.train().requires_grad_(True)


def load_teacher(path: str, spec: gdata.TaskSpec, device) -> Tuple[nn.Module, dict]:
    """(frozen teacher on `device`, info: tokenizer JSON and task) from a tkd checkpoint.pt, a
    run directory, or a HF folder with a fine-tuned classification head for the task."""
    if is_hf_folder(path):
        from .hf import load_pretrained
        try:
            teacher, tok = load_pretrained(path, num_labels=spec.num_labels)
        except ValueError as e:
            raise ValueError(f"--teacher {path}: {e}") from None
        if not _has_head(path):
            raise ValueError(f"--teacher {path} has no classification head: fine-tune it first "
                             f"(python -m tkd_core.train --mode teacher --init {path} ...)")
        info = dict(tokenizer=tok.to_str(), task=None)
    else:
        teacher, info = load_model(path)
        if teacher.config.num_labels != spec.num_labels:
            raise ValueError(f"teacher {path!r} has {teacher.config.num_labels} label(s) but task "
                             f"{spec.name} (the student) has {spec.num_labels}: teacher and "
                             "student label counts must match")
    return teacher.to(device).eval().requires_grad_(False), info


def _has_head(path: str) -> bool:
    from .models.hf import read_weights
    sd, _ = read_weights(path)
    return any(k.startswith(("classifier.", "score.")) for k in sd)


def same_vocabulary(a_json: str, b_json: str) -> bool:
    from tokenizers import Tokenizer
    return Tokenizer.from_str(a_json).get_vocab() == Tokenizer.from_str(b_json).get_vocab()
