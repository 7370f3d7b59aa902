"""Hugging Face interop: checkpoints in and out, and tkd's fused ops inside live HF models.

    from tkd_core import hf
    model, tok = hf.load_pretrained("../shared/models/all-MiniLM-L6-v2", num_labels=2)
    hf.save_pretrained(model, tok, "runs/student-hf")      # see tkd_core/models/hf.py

    report = tkd_core.patch_hf(bert)      # a transformers Bert* / DistilBert* / Roberta* model
    print(report)                         # what was replaced
    tkd_core.unpatch_hf(bert)             # or: with tkd_core.hf.patched(bert): ...

Why two files: converting folders builds *our* model and knows its keys, so it lives with the
models (tkd_core/models/hf.py); patching rewrites *their* model with our ops and never touches
tkd's model, so it lives here, beside ops and nn. This module is the one public HF namespace.

What patch_hf replaces, on the instance (its class, other instances, parameters and
state_dict keys stay as they are, so saving, loading and HF's Trainer keep working):

    self-attention (BertSelfAttention, RobertaSelfAttention, DistilBertSelfAttention)
        -> tkd_core.ops.attention(q, k, v, key_padding_mask, dropout_p in training). The key
           padding mask comes from the mask HF hands the layer: None, (B, S) 1 = attend, or the
           (B, 1, S_q, S_k) boolean / additive form of a padding mask (row 0 is read; BERT-family
           encoders build no other kind). output_attentions=True gets the probabilities from a
           reference softmax (the fused kernel never materialises them).
    residual add + LayerNorm (Bert/RobertaSelfOutput, Bert/RobertaOutput: dense, dropout,
    LN(x + input); DistilBERT's TransformerBlock: both of its add + LNs)
        -> tkd_core.ops.layer_norm(x, weight, bias, eps, residual=input), fused.

transformers is never imported here: the modules are recognised by class name and checked
against the forward signatures this code was written for (transformers 5.x), with an error
naming the class when they differ.
"""
import contextlib
import dataclasses
import inspect
import math
import sys
import types
from typing import List

import torch
from torch import nn

from . import ops
from .models.hf import load_pretrained, save_pretrained  # noqa: F401  (the public names)

__all__ = ["load_pretrained", "save_pretrained", "patch_hf", "unpatch_hf", "patched",
           "PatchReport"]


# ------------------------------------------------------------------------------ the forwards


def _key_padding(mask, B: int, S_k: int):
    """HF's attention mask -> (B, S_k) bool, True = attend (or None: attend everywhere)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"patch_hf: attention mask of type {type(mask).__name__} is not supported "
                        "(use attn_implementation='sdpa' or 'eager')")
    if mask.dim() == 4:  # (B, 1, S_q, S_k): every query row of a padding mask is the same
        mask = mask[:, 0, 0, :]
        mask = mask if mask.dtype == torch.bool else mask == 0  # additive: 0 = attend
    elif mask.dim() != 2:
        raise ValueError(f"patch_hf: attention mask of shape {tuple(mask.shape)}; expected (B, S) "
                         "or (B, 1, S_q, S_k)")
    mask = mask.bool()
    return mask.expand(B, S_k) if mask.shape[0] != B else mask


def _probs(q, k, mask, scale):
    """Reference softmax(c q k^T) with the padding mask: (B, H, S_q, S_k), fp32."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


def _attend(self, q_lin, k_lin, v_lin, hidden_states, attention_mask, kwargs):
    """(B, S, hidden) -> (context (B, S, hidden), probabilities or None) through ops.attention."""
    for name in ("encoder_hidden_states", "cache", "past_key_values"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"patch_hf: {name} (decoder use) is not supported: the "
                                      "patched attention is encoder self-attention")
    B, S, _ = hidden_states.shape
    shape = (B, S, -1, self.attention_head_size)
    q, k, v = (lin(hidden_states).view(shape).transpose(1, 2) for lin in (q_lin, k_lin, v_lin))
    mask = _key_padding(attention_mask, B, S)
    scale = 1.0 / math.sqrt(self.attention_head_size)
    o = ops.attention(q, k, v, key_padding_mask=mask, softmax_scale=scale,
                      dropout_p=self.dropout.p if self.training else 0.0)  # (B, H, S, D)
    probs = _probs(q, k, mask, scale) if kwargs.get("output_attentions") else None
    return o.transpose(1, 2).reshape(B, S, -1), probs


def bert_self_attention(self, hidden_states, attention_mask=None, **kwargs):
    return _attend(self, self.query, self.key, self.value, hidden_states, attention_mask, kwargs)


def distilbert_self_attention(self, hidden_states, attention_mask=None, **kwargs):
    o, probs = _attend(self, self.q_lin, self.k_lin, self.v_lin, hidden_states,
                       attention_mask, kwargs)
    return self.out_lin(o), probs


def _add_ln(ln: nn.LayerNorm, x, residual):
    return ops.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=residual)[0]


def bert_add_layer_norm(self, hidden_states, input_tensor):
    """Bert/Roberta SelfOutput and Output: LN(dropout(dense(x)) + input), the add fused."""
    return _add_ln(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)


def distilbert_block(self, hidden_states, attention_mask=None, **kwargs):
    """DistilBERT's TransformerBlock with both residual add + LayerNorms fused."""
    a, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    a = _add_ln(self.sa_layer_norm, a, hidden_states)
    return _add_ln(self.output_layer_norm, self.ffn(a), a)


# class name -> (replacement, kind, the leading forward parameters it was written for)
_SELF_ATTN = ("hidden_states", "attention_mask")
PATCHES = {
    "BertSelfAttention": (bert_self_attention, "attention", _SELF_ATTN),
    "RobertaSelfAttention": (bert_self_attention, "attention", _SELF_ATTN),
    "DistilBertSelfAttention": (distilbert_self_attention, "attention", _SELF_ATTN),
    "BertSelfOutput": (bert_add_layer_norm, "add_layer_norm", ("hidden_states", "input_tensor")),
    "BertOutput": (bert_add_layer_norm, "add_layer_norm", ("hidden_states", "input_tensor")),
    "RobertaSelfOutput": (bert_add_layer_norm, "add_layer_norm",
                          ("hidden_states", "input_tensor")),
    "RobertaOutput": (bert_add_layer_norm, "add_layer_norm", ("hidden_states", "input_tensor")),
    "TransformerBlock": (distilbert_block, "add_layer_norm", _SELF_ATTN),
}
_OURS = {fn for fn, _, _ in PATCHES.values()}


# ------------------------------------------------------------------------------ the patcher


@dataclasses.dataclass
class PatchReport:
    """Module names replaced by patch_hf (or restored by unpatch_hf), per kind."""
    attention: List[str] = dataclasses.field(default_factory=list)
    add_layer_norm: List[str] = dataclasses.field(default_factory=list)

    def __str__(self):
        return (f"tkd patch_hf: {len(self.attention)} self-attention modules -> "
                f"ops.attention, {len(self.add_layer_norm)} residual add + LayerNorm modules -> "
                f"fused ops.layer_norm")


def _is_hf(module) -> bool:
    return type(module).__module__.startswith("transformers.models.")


def _check_signature(name: str, module, leading) -> None:
    params = list(inspect.signature(type(module).forward).parameters)[1:]
    if tuple(params[:len(leading)]) != leading or "head_mask" in params:
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
        raise RuntimeError(f"patch_hf: {name}.forward{tuple(params)} (transformers {version}) "
                           f"is not the signature tkd patches ({', '.join(leading)}, **kwargs; "
                           "transformers 5.x)")


def patch_hf(model: nn.Module) -> PatchReport:
    """Run tkd's fused attention and add + LayerNorm inside a live transformers BERT-family
    model (BertModel / BertFor*, DistilBert*, Roberta*), in place. Returns a PatchReport.
    Patching twice is a no-op for modules already patched."""
    if getattr(getattr(model, "config", None), "is_decoder", False):
        raise ValueError("patch_hf patches encoders; this model is configured as a decoder")
    report = PatchReport()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls not in PATCHES or not _is_hf(module):
            continue
        fn, kind, leading = PATCHES[cls]
        _check_signature(cls, module, leading)
        if getattr(module.__dict__.get("forward"), "__func__", None) not in _OURS:
            module.forward = types.MethodType(fn, module)
        getattr(report, kind).append(name)
    if not report.attention:
        raise ValueError(f"patch_hf: no BERT-family self-attention found in "
                         f"{type(model).__name__} (supported classes: {sorted(PATCHES)})")
    return report


def unpatch_hf(model: nn.Module) -> PatchReport:
    """Undo patch_hf: the classes' own forwards again. Returns what was restored."""
    report = PatchReport()
    for name, module in model.named_modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) in _OURS:
            del module.forward
            getattr(report, PATCHES[type(module).__name__][1]).append(name)
    return report


@contextlib.contextmanager
def patched(model: nn.Module):
    """with patched(model) as report: ... (unpatched on exit, even on an error)."""
    report = patch_hf(model)
    try:
        yield report
    finally:
        unpatch_hf(model)
