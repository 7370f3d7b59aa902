"""Fused multi-head attention (FlashAttention-2 style).

PLACEHOLDER (being replaced by the Triton implementation): only the torch reference path exists.
"""
import math

import torch


def attention_ref(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, softmax_scale=None,
                  dropout_mask=None):
    """q (B, H, Sq, D), k/v (B, H, Sk, D), key_padding_mask (B, Sk) bool, True = attend."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, H, Sq, Sk)
    Sq, Sk = q.shape[-2], k.shape[-2]
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned: query i sees keys j <= i + Sk - Sq
        keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    keep = keep.expand(q.shape[0], 1, Sq, Sk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1 - dropout_p)
    return torch.matmul(p.to(v.dtype), v)


def attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, softmax_scale=None):
    return attention_ref(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale)


def aot_specs():
    return []
