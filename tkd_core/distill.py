"""Distillation: a frozen teacher, its cached logits, and the loss terms of a training step.

    objective = HardLabel(regression)                       # teacher / student modes
    objective = Distiller(teacher, [LogitsKD(T, alpha, regression)], cache=logits)   # distill
    loss, parts = objective(logits, batch, idx)             # summed over the batch

Every term is a callable returning `(loss, parts)`: the summed loss to backpropagate and a dict
of detached summed parts for the log (`hard_loss`, `kd_loss`, ...). `LogitsKD` is the paper's
soft-target loss through the fused `ops.kd_loss`:

    classification:  alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
    regression:      alpha * MSE(s, t) + (1 - alpha) * MSE(s, y)      (STS-B: a score, no softmax)

The teacher is in eval mode, frozen, and never wrapped in DDP. Its logits on the training set can
be computed once (`all_teacher_logits`, fingerprinted with its weights and the token ids) and
shared by every student distilled from it; without such a file they are computed on first use
and kept per example.
"""
import contextlib
import hashlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import data as gdata
from . import ops
from .checkpoint import load_model, save_checkpoint

Parts = Dict[str, torch.Tensor]


def _ctx(factory):
    """factory() (an autocast context) or a no-op context."""
    return factory() if factory is not None else contextlib.nullcontext()


class HardLabel:
    """Cross-entropy to the label (classification) or MSE to the score (regression), summed."""

    def __init__(self, regression: bool):
        self.regression = regression

    def __call__(self, logits: torch.Tensor, batch: dict, idx=None) -> Tuple[torch.Tensor, Parts]:
        logits, y = logits.float(), batch["labels"]
        if self.regression:
            hard = F.mse_loss(logits.squeeze(-1), y, reduction="sum")
        else:
            hard = F.cross_entropy(logits, y, reduction="sum")
        return hard, {"hard_loss": hard.detach()}


class LogitsKD:
    """The soft-target loss on logits (module docstring), summed over the batch."""

    def __init__(self, temperature: float, alpha: float, regression: bool):
        self.temperature, self.alpha, self.regression = temperature, alpha, regression

    def __call__(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor) -> Tuple[torch.Tensor, Parts]:
        logits, t = logits.float(), teacher_logits.float()
        if self.regression:
            pred = logits.squeeze(-1)
            hard = F.mse_loss(pred, labels, reduction="sum")
            kd = F.mse_loss(pred, t.squeeze(-1), reduction="sum")
            return self.alpha * kd + (1 - self.alpha) * hard, {"hard_loss": hard.detach(),
                                                                "kd_loss": kd.detach()}
        loss = ops.kd_loss(logits, t, labels, temperature=self.temperature, alpha=self.alpha,
                           reduction="sum")
        with torch.no_grad():  # the two parts, for the log
            hard = F.cross_entropy(logits, labels, reduction="sum")
            kd = ops.kd_loss(logits, t, None, temperature=self.temperature, alpha=1.0,
                             reduction="sum")
        return loss, {"hard_loss": hard, "kd_loss": kd}


class Distiller:
    """Owns the frozen teacher, its logits cache and the loss terms on the teacher's logits.

    cache: the (N, C) tensor of `all_teacher_logits` over the training items, or None to compute
    the teacher's logits on first use of each example (kept per example index)."""

    def __init__(self, teacher: nn.Module, terms: List[Callable],
                 cache: Optional[torch.Tensor] = None, autocast: Optional[Callable] = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.terms = terms
        self.cache = cache if cache is not None else {}
        self.autocast = autocast

    @torch.no_grad()
    def teacher_logits(self, idx: Sequence[int], batch: dict) -> torch.Tensor:
        """(B, C) float logits of the teacher on the examples `idx` (rows of `batch`)."""
        device = batch["input_ids"].device
        if torch.is_tensor(self.cache):
            return self.cache[torch.tensor(idx)].to(device)
        todo = [j for j, i in enumerate(idx) if i not in self.cache]
        if todo:
            sub = {k: v[todo] for k, v in batch.items()}
            S = int(sub["attention_mask"].sum(1).max())  # drop the padding columns
            with _ctx(self.autocast):
                out = self.teacher(sub["input_ids"][:, :S], sub["attention_mask"][:, :S],
                                   sub["token_type_ids"][:, :S]).float()
            for j, row in zip(todo, out):
                self.cache[idx[j]] = row
        return torch.stack([self.cache[i] for i in idx])

    def __call__(self, logits: torch.Tensor, batch: dict, idx: Sequence[int]
                 ) -> Tuple[torch.Tensor, Parts]:
        t = self.teacher_logits(idx, batch)
        total, parts = None, {}
        for term in self.terms:
            loss, p = term(logits, t, batch["labels"])
            total = loss if total is None else total + loss
            parts.update(p)
        return total, parts


def load_teacher(path: str, spec: gdata.TaskSpec, device) -> Tuple[nn.Module, dict]:
    """(frozen teacher on `device`, its checkpoint) from a tkd checkpoint.pt; its label count must
    be the task's."""
    teacher, ck = load_model(path, device)
    if teacher.config.num_labels != spec.num_labels:
        raise ValueError(f"teacher {path!r} has {teacher.config.num_labels} label(s) but task "
                         f"{spec.name} (the student) has {spec.num_labels}: teacher and student "
                         "label counts must match")
    return teacher, ck


# ------------------------------------------------------------------ teacher logits, cached


def logits_fingerprint(teacher: nn.Module, items: Sequence) -> str:
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
def all_teacher_logits(teacher: nn.Module, items: Sequence, path: str, device,
                       autocast: Optional[Callable] = None, write: bool = True,
                       batch_size: int = 256) -> torch.Tensor:
    """(N, C) float32 CPU logits of the frozen teacher on every item: read from `path` when it
    was made by this teacher on these items, else computed (length-sorted batches, eval mode)
    and written there atomically."""
    fp = logits_fingerprint(teacher, items)
    if os.path.isfile(path):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            ok = isinstance(ck, dict) and ck.get("fingerprint") == fp and \
                torch.is_tensor(ck.get("logits")) and ck["logits"].shape[0] == len(items)
        except Exception as e:  # truncated, random bytes, not a torch file
            print(f"note: {path} is unreadable ({type(e).__name__}); recomputing it")
            ok, ck = False, None
        if ok:
            return ck["logits"]
        if ck is not None:
            print(f"note: {path} was made by another teacher or data; recomputing it")
    was_training = teacher.training
    teacher.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out = None
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = {k: v.to(device) for k, v in gdata.collate([items[i] for i in idx]).items()}
        with _ctx(autocast):
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
