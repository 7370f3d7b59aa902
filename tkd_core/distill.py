"""Distillation: a frozen teacher, its cached logits, and the loss terms of a training step.

    objective = HardLabel(regression)                                  # teacher / student modes
    objective = Distiller(teacher, [LogitsKD(T, alpha, regression),    # distill
                                    HiddenLoss(pairs, 384, 384), AttentionKL(pairs)], cache)
    loss, parts = objective(student_out, batch, idx)                   # summed over the batch

Every term is an nn.Module returning `(loss, parts)`: the loss summed over the batch's examples
and a dict of detached parts for the log (`hard_loss`, `kd_loss`, `hidden_loss`,
`attention_loss`). Its parameters (a hidden-state projection) train with the student.

- `LogitsKD`, the paper's soft-target loss, through the fused `ops.kd_loss`:
      classification:  alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
      regression:      alpha * MSE(s, t) + (1 - alpha) * MSE(s, y)     (STS-B: no softmax)
  Transfer-set rows (`--augment`, label IGNORE / NaN) take the soft term alone.
- `HiddenLoss` (TinyBERT, DistilBERT): per mapped layer pair (s, t) of hidden-state indices
  (0 = the embeddings), the mean over real tokens of MSE(W h_s, h_t) (mean over the width) or of
  1 - cos(W h_s, h_t); W a learned projection when the widths differ, else none.
- `AttentionKL` (TinyBERT / MiniLM): per mapped layer pair, KL(p_t || p_s) of the attention
  distributions of each head and real query token, averaged over both. Our fused attention never
  materialises p; the model recomputes it with a reference path for this loss only
  (`model(..., attentions=True)`).

Each per-example value is weighted and summed over the batch, as the trainer expects.

The teacher is in eval mode, frozen, and never wrapped in DDP. Its logits on the training set
(and the transfer set) can be computed once (`all_teacher_logits`, fingerprinted with its weights
and the token ids) and shared by every student distilled from it. Hidden-state and attention
terms need the teacher's forward at every step instead (its cost is logged as the step time).
"""
import collections
import contextlib
import hashlib
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import data as gdata
from . import ops
from .checkpoint import save_checkpoint

Parts = Dict[str, torch.Tensor]
IGNORE = -100  # the label of a transfer-set (augmented) classification example: no hard loss
# What a forward gave: logits (B, C), and when asked the hidden states (L + 1 of (B, S, H)) and
# the attention probabilities (L of (B, heads, S, S)).
Outputs = collections.namedtuple("Outputs", "logits hidden_states attentions",
                                 defaults=(None, None))


def outputs(out) -> Outputs:
    """A model's return value (a logits tensor, or its output object) as Outputs."""
    if torch.is_tensor(out):
        return Outputs(out)
    return Outputs(out.logits, out.hidden_states, out.attentions)


def _ctx(factory):
    """factory() (an autocast context) or a no-op context."""
    return factory() if factory is not None else contextlib.nullcontext()


class HardLabel(nn.Module):
    """Cross-entropy to the label (classification) or MSE to the score (regression), summed."""

    def __init__(self, regression: bool):
        super().__init__()
        self.regression = regression

    def forward(self, out, batch: dict, idx=None) -> Tuple[torch.Tensor, Parts]:
        logits, y = outputs(out).logits.float(), batch["labels"]
        if self.regression:
            hard = F.mse_loss(logits.squeeze(-1), y, reduction="sum")
        else:
            hard = F.cross_entropy(logits, y, reduction="sum")
        return hard, {"hard_loss": hard.detach()}


class LogitsKD(nn.Module):
    """The soft-target loss on logits (module docstring), summed over the batch."""

    def __init__(self, temperature: float, alpha: float, regression: bool):
        super().__init__()
        self.temperature, self.alpha, self.regression = temperature, alpha, regression

    def forward(self, s: Outputs, t: Outputs, batch: dict) -> Tuple[torch.Tensor, Parts]:
        logits, tl, y = s.logits.float(), t.logits.float(), batch["labels"]
        if self.regression:
            pred, real = logits.squeeze(-1), ~torch.isnan(y)  # NaN: a transfer-set row
            hard = F.mse_loss(pred[real], y[real], reduction="sum")
            kd = F.mse_loss(pred, tl.squeeze(-1), reduction="sum")
            return self.alpha * kd + (1 - self.alpha) * hard, {"hard_loss": hard.detach(),
                                                                "kd_loss": kd.detach()}
        T = self.temperature
        # labelled rows: the fused soft + hard loss; transfer-set rows (IGNORE) count in neither
        # term there, and take alpha * the soft term alone here
        loss = ops.kd_loss(logits, tl, y, temperature=T, alpha=self.alpha, reduction="sum")
        aug = y == IGNORE
        if bool(aug.any()):
            loss = loss + self.alpha * ops.kd_loss(logits[aug], tl[aug], None, temperature=T,
                                                   alpha=1.0, reduction="sum")
        with torch.no_grad():  # the two parts, for the log
            hard = F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE)
            kd = ops.kd_loss(logits, tl, None, temperature=T, alpha=1.0, reduction="sum")
        return loss, {"hard_loss": hard, "kd_loss": kd}


def layer_map(spec: str, n_student: int, n_teacher: int, flag: str = "--layer-map"
              ) -> List[Tuple[int, int]]:
    """Pairs (student index, teacher index) of hidden states (0 = embeddings, i = layer i's
    output). uniform: i -> i * n_teacher // n_student for every student index (TinyBERT);
    last: the last layers; "s:t,s:t,...": explicit."""
    if spec == "uniform":
        return [(i, i * n_teacher // n_student) for i in range(n_student + 1)]
    if spec == "last":
        return [(n_student, n_teacher)]
    pairs = []
    for part in spec.split(","):
        try:
            si, ti = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"{flag}: expected uniform, last or 's:t,s:t,...' with integer "
                             f"layer indices, got {spec!r}") from None
        if not (0 <= si <= n_student and 0 <= ti <= n_teacher):
            raise ValueError(f"{flag}: pair {si}:{ti} is out of range: the student has hidden "
                             f"states 0..{n_student}, the teacher 0..{n_teacher} (0 = embeddings)")
        pairs.append((si, ti))
    if len({si for si, _ in pairs}) != len(pairs):
        raise ValueError(f"{flag}: a student layer is mapped twice in {spec!r}")
    return pairs


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean over each example's real tokens of a (B, S) value."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(1) / m.sum(1).clamp(min=1)


class HiddenLoss(nn.Module):
    """Hidden-state loss over mapped layers (module docstring); `proj` when widths differ."""

    def __init__(self, pairs, student_width: int, teacher_width: int, kind: str = "mse",
                 proj: bool = False, weight: float = 1.0):
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"hidden loss must be mse or cosine, got {kind!r}")
        if student_width != teacher_width and not proj:
            raise ValueError(f"the student's width {student_width} differs from the teacher's "
                             f"{teacher_width}: a hidden-state loss needs --hidden-proj")
        self.pairs, self.kind, self.weight = list(pairs), kind, weight
        self.proj = nn.Linear(student_width, teacher_width) if proj else None

    def forward(self, s: Outputs, t: Outputs, batch: dict) -> Tuple[torch.Tensor, Parts]:
        mask, total = batch["attention_mask"], 0.0
        for si, ti in self.pairs:
            hs, ht = s.hidden_states[si].float(), t.hidden_states[ti].float()
            if self.proj is not None:
                hs = self.proj(hs)
            if self.kind == "mse":
                per_token = (hs - ht).pow(2).mean(-1)
            else:
                per_token = 1 - F.cosine_similarity(hs, ht, dim=-1)
            total = total + _token_mean(per_token, mask).sum()
        loss = self.weight * total
        return loss, {"hidden_loss": loss.detach()}


class AttentionKL(nn.Module):
    """KL(teacher || student) of the attention distributions of mapped layers (docstring)."""

    def __init__(self, pairs, weight: float = 1.0):
        super().__init__()
        self.pairs = [(si, ti) for si, ti in pairs if si > 0 and ti > 0]  # embeddings: none
        if not self.pairs:
            raise ValueError("the layer map pairs no encoder layers: an attention loss needs at "
                             "least one pair s:t with s, t >= 1")
        self.weight = weight

    def forward(self, s: Outputs, t: Outputs, batch: dict) -> Tuple[torch.Tensor, Parts]:
        mask, total = batch["attention_mask"], 0.0
        for si, ti in self.pairs:
            ps, pt = s.attentions[si - 1].float(), t.attentions[ti - 1].float()  # (B, H, S, S)
            if ps.shape[1] != pt.shape[1]:
                raise ValueError(f"attention loss: student layer {si} has {ps.shape[1]} heads, "
                                 f"teacher layer {ti} {pt.shape[1]}: they must match")
            log_ps = torch.log(ps.clamp(min=torch.finfo(torch.float32).tiny))
            kl = torch.where(pt > 0, pt * (torch.log(pt.clamp(min=1e-45)) - log_ps), 0.0)
            per_token = kl.sum(-1).mean(1)  # (B, S): over keys, then heads
            total = total + _token_mean(per_token, mask).sum()
        loss = self.weight * total
        return loss, {"attention_loss": loss.detach()}


class Distiller(nn.Module):
    """Owns the frozen teacher, its logits cache and the loss terms.

    cache: the (N, C) tensor of `all_teacher_logits` over the training items, or None to compute
    the teacher's logits on first use of each example (kept per example index). Terms on hidden
    states or attentions run the teacher on every batch instead."""

    def __init__(self, teacher: nn.Module, terms: List[nn.Module],
                 cache: Optional[torch.Tensor] = None, autocast: Optional[Callable] = None):
        super().__init__()
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule
        self.terms = nn.ModuleList(terms)
        self.cache = cache if cache is not None else {}
        self.autocast = autocast
        self.hidden_states = any(isinstance(t, HiddenLoss) for t in terms)
        self.attentions = any(isinstance(t, AttentionKL) for t in terms)

    @torch.no_grad()
    def teacher_outputs(self, idx: Sequence[int], batch: dict) -> Outputs:
        """The teacher on the examples `idx` (the rows of `batch`): logits (B, C) float, and the
        hidden states / attentions when a term needs them."""
        teacher, device = self.teacher[0], batch["input_ids"].device
        if self.hidden_states or self.attentions:
            with _ctx(self.autocast):
                out = teacher(batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"], hidden_states=self.hidden_states,
                              attentions=self.attentions)
            return Outputs(out.logits.float(), out.hidden_states, out.attentions)
        if torch.is_tensor(self.cache):
            return Outputs(self.cache[torch.tensor(idx)].to(device))
        todo = [j for j, i in enumerate(idx) if i not in self.cache]
        if todo:
            sub = {k: v[todo] for k, v in batch.items()}
            S = int(sub["attention_mask"].sum(1).max())  # drop the padding columns
            with _ctx(self.autocast):
                out = teacher(sub["input_ids"][:, :S], sub["attention_mask"][:, :S],
                              sub["token_type_ids"][:, :S]).float()
            for j, row in zip(todo, out):
                self.cache[idx[j]] = row
        return Outputs(torch.stack([self.cache[i] for i in idx]))

    def forward(self, out, batch: dict, idx: Sequence[int]) -> Tuple[torch.Tensor, Parts]:
        s, t = outputs(out), self.teacher_outputs(idx, batch)
        total, parts = None, {}
        for term in self.terms:
            loss, p = term(s, t, batch)
            total = loss if total is None else total + loss
            parts.update(p)
        return total, parts


def forward_flags(objective) -> dict:
    """The student forward's keyword flags an objective needs: hidden_states / attentions."""
    return {k: True for k in ("hidden_states", "attentions") if getattr(objective, k, False)}


def build_objective(args, cfg, teacher, autocast_fn):
    """(loss objective, whether it has layer-wise terms): hard labels without a teacher; with
    one, logits KD plus the hidden-state and attention terms the flags ask for."""
    if teacher is None:
        return HardLabel(cfg.regression), False
    terms = [LogitsKD(args.temperature, args.alpha, cfg.regression)]
    if args.hidden_loss != "none" or args.attention_loss:
        if cfg.arch != "transformer" or teacher.config.arch != "transformer":
            raise ValueError("--hidden-loss / --attention-loss need Transformer teacher and "
                             f"student (the student is {cfg.arch!r})")
        pairs = layer_map(args.layer_map, cfg.num_layers, teacher.config.num_layers)
        if args.hidden_loss != "none":
            terms.append(HiddenLoss(pairs, cfg.hidden_size, teacher.config.hidden_size,
                                    args.hidden_loss, args.hidden_proj, args.hidden_weight))
        if args.attention_loss:
            terms.append(AttentionKL(pairs, args.attention_weight))
    d = Distiller(teacher, terms, autocast=autocast_fn)
    return d, d.hidden_states or d.attentions


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


def _read_logits(path: str, fp: str, n: int) -> Optional[dict]:
    """The cache file at `path` when it was made by this teacher (fingerprint `fp`) on these n
    items, else None (absent, unreadable, or another teacher's)."""
    if not os.path.isfile(path):
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, not a torch file
        print(f"note: {path} is unreadable ({type(e).__name__}); recomputing it")
        return None
    if isinstance(ck, dict) and ck.get("fingerprint") == fp and \
            torch.is_tensor(ck.get("logits")) and ck["logits"].shape[0] == n:
        return ck
    print(f"note: {path} was made by another teacher or data; recomputing it")
    return None


@contextlib.contextmanager
def _file_lock(path: str, enabled: bool = True):
    """An exclusive flock on `path`.lock: jobs started together (a study's students) wait for
    the one computing a cache instead of computing it again beside it."""
    if not enabled:
        yield
        return
    import fcntl
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def logits_pass_seconds(path: str) -> Optional[float]:
    """Wall seconds the teacher's pass that wrote the cache at `path` took (None: no such
    file, or one written before the time was recorded)."""
    try:
        s = torch.load(path, map_location="cpu", weights_only=True).get("seconds")
    except Exception:
        return None
    return float(s) if s is not None else None


@torch.no_grad()
def all_teacher_logits(teacher: nn.Module, items: Sequence, path: str, device,
                       autocast: Optional[Callable] = None, write: bool = True,
                       batch_size: int = 256) -> torch.Tensor:
    """(N, C) float32 CPU logits of the frozen teacher on every item: read from `path` when it
    was made by this teacher on these items, else computed (length-sorted batches, eval mode)
    and written there atomically, with the pass's wall seconds (`logits_pass_seconds`).
    Writers take a lock on `path`.lock, so that concurrent jobs compute it once."""
    fp = logits_fingerprint(teacher, items)
    with _file_lock(path, enabled=write):
        ck = _read_logits(path, fp, len(items))
        if ck is not None:
            return ck["logits"]
        t0 = time.perf_counter()
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
            save_checkpoint(path, dict(fingerprint=fp, logits=out,
                                       seconds=time.perf_counter() - t0))
    return out
