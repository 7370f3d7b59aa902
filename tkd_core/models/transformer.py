"""The hand-written BERT-style encoder for sequence classification (teacher and students).

    cfg = ModelConfig.preset("cpu-teacher", vocab_size=tok.get_vocab_size(), num_labels=2)
    model = build_model(cfg)                                     # tkd_core.models.ARCHS
    logits = model(input_ids, attention_mask, token_type_ids)    # (B, num_labels)
    out = model(input_ids, attention_mask, token_type_ids, hidden_states=True, attentions=True)
    out.logits, out.hidden_states, out.attentions                # ModelOutput (below)

Every layer runs on our ops: self-attention through `tkd_core.nn.MultiHeadAttention`
(`ops.attention`, the padding mask flows into the kernel), every residual add fused into its
LayerNorm (`tkd_core.nn.LayerNorm(x, residual)` -> `ops.layer_norm`). On CUDA tensors the Triton
kernels run; on CPU the ops' torch references (see `tkd_core.ops.backend`).

Post-LN (BERT, the default):   x = LN(x + Drop(Attn(x)));  x = LN(x + Drop(FFN(x)))
Pre-LN: a residual stream h and the pending sublayer output d travel together, and each LayerNorm
does the add:  (n, h) = LN(d, residual=h);  d = Drop(Sublayer(n)); the final LN closes the stream.

Per-layer outputs (for layer-wise distillation). A pre-LN layer's output h + d is never computed
inside that layer: its add is fused into the next LayerNorm (the next layer's ln1, or final_ln),
whose second output is exactly that sum. So every layer reports its *input* as a tensor (`Layer`
returns it), and the encoder collects: hidden_states[0] = the embeddings, hidden_states[i] = the
input of layer i = the output of layer i - 1, hidden_states[L] = the last layer's output (from
final_ln's fused add in pre-LN). No extra add, the same tensors the forward uses, both layouts.

Attention probabilities: the fused attention kernel never materialises the (S, S) matrix, so
`attentions=True` recomputes, per layer, the Q/K projections and softmax(Q K^T / sqrt(D)) with the
padding mask in plain torch (`attention_probs`): one more QKV GEMM and an S x S softmax per layer,
paid only when asked. They are the probabilities before attention dropout; gradients flow from
them into the QKV weights.
"""
import dataclasses
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as tnn
from .config import ModelConfig

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclasses.dataclass
class ModelOutput:
    """What `TransformerClassifier.forward(..., hidden_states=True / attentions=True)` returns.

    logits             (B, num_labels)
    last_hidden_state  (B, S, hidden): what the head reads (pre-LN: after final_ln)
    hidden_states      L + 1 tensors (B, S, hidden): the embeddings, then every layer's output
                       (pre-LN: the residual stream, before final_ln); None unless asked
    attentions         L tensors (B, heads, S, S): softmax probabilities before dropout, padded
                       keys 0, a row with no visible key all 0; None unless asked
    """
    logits: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


class LayerOutput(NamedTuple):
    x: torch.Tensor                  # post-LN: the layer's output; pre-LN: the stream h
    pending: Optional[torch.Tensor]  # pre-LN: the FFN output still to add to h; post-LN: None
    input: torch.Tensor              # the layer's input (pre-LN: made by ln1's fused add)
    probs: Optional[torch.Tensor]    # (B, heads, S, S) when asked


def attention_probs(attn: tnn.MultiHeadAttention, x: torch.Tensor,
                    mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference softmax(Q K^T / sqrt(D)) of `attn` on x (B, S, hidden), in fp32 or wider.
    mask (B, S) bool, True = attend. Returns (B, heads, S, S); a row with no visible key is 0."""
    B, S, _ = x.shape
    qkv = attn.qkv(x).view(B, S, 3, attn.num_heads, -1)  # (B, S, 3, H, D)
    q, k = qkv.permute(2, 0, 3, 1, 4)[:2]  # (B, H, S, D)
    ct = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is None:
        return torch.softmax(s, dim=-1)
    visible = mask[:, None, None, :]  # (B, 1, 1, S)
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return torch.softmax(s, dim=-1).masked_fill(~visible, 0.0)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.positions == "learned":
            self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        else:  # fixed sin/cos (Vaswani et al.), at the init scale of the learned tables
            pos = torch.arange(cfg.max_positions, dtype=torch.float64)[:, None]
            freq = 10000.0 ** (-torch.arange(0, cfg.hidden_size, 2, dtype=torch.float64)
                               / cfg.hidden_size)
            table = torch.zeros(cfg.max_positions, cfg.hidden_size, dtype=torch.float64)
            table[:, 0::2] = torch.sin(pos * freq)
            table[:, 1::2] = torch.cos(pos * freq)[:, :cfg.hidden_size // 2]
            self.register_buffer("sinusoid", (table * cfg.initializer_range * 2 ** 0.5).float(),
                                 persistent=False)
            self.position = None
        self.token_type = (nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
                           if cfg.type_vocab_size else None)  # None: token types are ignored
        self.ln = tnn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.max_positions, self.position_offset = cfg.max_positions, cfg.position_offset

    def forward(self, input_ids, token_type_ids):
        S = input_ids.shape[1]
        if S + self.position_offset > self.max_positions:
            raise ValueError(f"sequence length {S} exceeds max_positions {self.max_positions}"
                             + (f" - position_offset {self.position_offset}"
                                if self.position_offset else ""))
        pos = torch.arange(self.position_offset, self.position_offset + S,
                           device=input_ids.device)
        x = self.word(input_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        # (word + token type), then the position add fused into the LayerNorm (HF's order)
        x, _ = self.ln(x, residual=(self.position(pos) if self.position is not None
                                    else self.sinusoid[pos]).expand(input_ids.shape[0], S, -1))
        return self.drop(x)  # (B, S, hidden)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """One encoder layer; the residual adds happen inside the LayerNorms (fused add+LN)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = tnn.MultiHeadAttention(cfg.hidden_size, cfg.num_heads,
                                           dropout=cfg.attention_dropout)
        self.ln1 = tnn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ln2 = tnn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, mask, pending=None, attentions=False) -> LayerOutput:
        """Post-LN: x is the layer input. Pre-LN: x is the residual stream h and `pending` the
        previous sublayer's output still to be added (None before the first layer).
        Returns LayerOutput(x, pending, input, probs): see the class."""
        # Under autocast the sublayers return fp16/bf16; the residual stream keeps its own dtype
        # (fp32 from the embeddings), so each sublayer output is cast to it before the fused add.
        if not self.pre_ln:
            probs = attention_probs(self.attn, x, mask) if attentions else None
            y, _ = self.ln1(self.drop(self.attn(x, mask)).to(x.dtype), residual=x)
            y, _ = self.ln2(self.drop(self.ffn(y)).to(y.dtype), residual=y)
            return LayerOutput(y, None, x, probs)
        n, h = self.ln1(pending, residual=x) if pending is not None else (self.ln1(x), x)
        probs = attention_probs(self.attn, n, mask) if attentions else None
        x_in = h  # the previous layer's output, materialised by the fused add
        n, h = self.ln2(self.drop(self.attn(n, mask)).to(h.dtype), residual=h)
        return LayerOutput(h, self.drop(self.ffn(n)).to(h.dtype), x_in, probs)


class TransformerClassifier(nn.Module):
    """BERT for sequence classification: embeddings, encoder layers, head (see ModelConfig's
    pooler_* fields) + classifier.

    forward(input_ids (B, S) long, attention_mask (B, S) bool/int (True/1 = real token; None = no
    padding), token_type_ids (B, S) long or None) -> logits (B, num_labels) float.
    With hidden_states=True and/or attentions=True (keyword only) -> ModelOutput instead.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.final_ln = tnn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_ln \
            else None
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.head_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self.apply(self._init)

    def _init(self, m):
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *,
                hidden_states: bool = False, attentions: bool = False):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = attention_mask.bool() if attention_mask is not None else None  # (B, S)
        x, pending = self.embeddings(input_ids, token_type_ids), None  # (B, S, hidden)
        states, probs = [], []
        for layer in self.layers:
            x, pending, x_in, p = layer(x, mask, pending, attentions)
            if hidden_states:
                states.append(x_in)
            probs.append(p)
        y = x
        if self.final_ln is not None:
            y, x = self.final_ln(pending, residual=x) if pending is not None else \
                (self.final_ln(x), x)
        logits = self.head(y, mask)
        if not (hidden_states or attentions):
            return logits
        return ModelOutput(logits, y, tuple(states) + (x,) if hidden_states else None,
                           tuple(probs) if attentions else None)

    def head(self, x, mask):
        """(B, S, hidden) final states -> (B, num_labels) logits."""
        cfg = self.config
        if cfg.pooling == "mean":  # (B, hidden): mean over the real tokens
            w = mask.unsqueeze(-1).to(x.dtype) if mask is not None else None
            x0 = (x * w).sum(1) / w.sum(1).clamp(min=1) if w is not None else x.mean(1)
        else:
            x0 = x[:, 0]  # the [CLS] token
        if cfg.pooler_dropout:
            x0 = self.drop(x0)
        pooled = self.pooler(x0)
        pooled = torch.tanh(pooled) if cfg.pooler_activation == "tanh" else torch.relu(pooled)
        return self.classifier(self.drop(pooled))  # (B, num_labels)
