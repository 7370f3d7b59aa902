"""Knowledge-distillation loss: softened KL to the teacher plus hard-label cross-entropy.

PLACEHOLDER (being replaced by the Triton implementation): only the torch reference path exists.
"""
import torch
import torch.nn.functional as F


def kd_loss_ref(student_logits, teacher_logits, labels=None, temperature=1.0, alpha=0.5,
                ignore_index=-100, reduction="mean"):
    s = student_logits.float()
    t = teacher_logits.float()
    T = temperature
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    pt = log_pt.exp()
    kl = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1) * T * T
    if labels is None:
        rows, keep = kl, torch.ones_like(kl, dtype=torch.bool)
    else:
        keep = labels != ignore_index
        ce = F.cross_entropy(s, torch.where(keep, labels, 0), reduction="none")
        rows = torch.where(keep, alpha * kl + (1 - alpha) * ce, torch.zeros_like(kl))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp(min=1)


def kd_loss(student_logits, teacher_logits, labels=None, temperature=1.0, alpha=0.5,
            ignore_index=-100, reduction="mean"):
    return kd_loss_ref(student_logits, teacher_logits.detach(), labels, temperature, alpha,
                       ignore_index, reduction)


def aot_specs():
    return []
