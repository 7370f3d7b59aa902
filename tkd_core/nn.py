"""Drop-in nn.Modules over tkd ops: same constructors and state_dict keys as their torch twins."""
from torch import nn

from . import ops

# -- modules (one section each, kept in this order) --


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same constructor, same `weight`/`bias` state_dict keys)
    running `tkd_core.ops.layer_norm`. Only the last dimension may be normalized.

    forward(x) -> y;  forward(x, residual) -> (y, x + residual), y = LN(x + residual).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError("tkd_core.nn.LayerNorm normalizes the last dimension only: "
                             f"normalized_shape must be an int or 1-tuple, got {normalized_shape}")

    def forward(self, x, residual=None):
        if x.shape[-1:] != self.normalized_shape:
            raise ValueError(f"x must end in normalized_shape {tuple(self.normalized_shape)}, "
                             f"got shape {tuple(x.shape)}")
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual)


class KDLoss(nn.Module):
    """Knowledge-distillation loss module over `tkd_core.ops.kd_loss`.

    forward(student_logits (N, V), teacher_logits (N, V), labels (N,) or None) ->
    alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, label), reduced.
    """

    def __init__(self, temperature=1.0, alpha=0.5, ignore_index=-100, reduction="mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
        self.temperature, self.alpha = temperature, alpha
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, student_logits, teacher_logits, labels=None):
        return ops.kd_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha,
                           self.ignore_index, self.reduction)

    def extra_repr(self):
        return f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction}"


class MultiHeadAttention(nn.Module):
    """BERT self-attention with fused QKV weights over `tkd_core.ops.attention`.

    forward(x (B, S, hidden), key_padding_mask (B, S) bool, True = attend) -> (B, S, hidden).
    `qkv.weight` is (3 * hidden, hidden): rows [0:h] are Q, [h:2h] K, [2h:3h] V.
    Matches `F.scaled_dot_product_attention` on the same weights (softmax scale 1/sqrt(D));
    `dropout` applies to the attention probabilities in training mode only; `causal` is
    bottom-right aligned (see kernels/attention.py). q, k, v stay strided views of the fused
    projection: the kernels take strides, no copy.
    """

    def __init__(self, hidden_size, num_heads, dropout=0.0, bias=True, causal=False,
                 device=None, dtype=None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads "
                             f"({num_heads})")
        self.hidden_size, self.num_heads, self.dropout, self.causal = (
            hidden_size, num_heads, dropout, causal)
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, **kw)
        self.out = nn.Linear(hidden_size, hidden_size, **kw)

    def forward(self, x, key_padding_mask=None):
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.num_heads, -1)  # (B, S, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D)
        o = ops.attention(q, k, v, key_padding_mask=key_padding_mask, causal=self.causal,
                          dropout_p=self.dropout if self.training else 0.0)  # (B, H, S, D)
        return self.out(o.transpose(1, 2).reshape(B, S, self.hidden_size))


# Int8Linear (inference-only dynamic INT8 drop-in for nn.Linear) lives with its op in
# tkd_core/int8/linear.py, next to quantize_model; re-exported here with the other modules.
from .int8 import Int8Linear  # noqa: E402,F401
