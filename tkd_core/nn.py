"""Drop-in nn.Modules over tkd ops: same constructors and state_dict keys as their torch twins."""
import torch
import torch.nn.functional as F
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


from . import int8_gemm  # noqa: E402  (the INT8 section's own import)


class Int8Linear(nn.Module):
    """Inference-only dynamic INT8 drop-in for nn.Linear over `tkd_core.int8_gemm`.

    Weights: int8 (out, in), quantized symmetrically per output channel (scale = absmax / 127)
    and, on CPU, widened + packed once into the kernel's panel layout. Activations: quantized
    per token at run time (fused with packing on CPU), then y = (q_x @ q_w.T) * s_x * s_w + bias
    in the GEMM's fused epilogue. Buffers (state_dict): `weight` int8, `weight_scale` float32,
    `bias` float32 or None. forward(x (..., in)) -> (..., out) in x.dtype. No gradients.
    """

    def __init__(self, in_features, out_features, bias=True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed = None  # CPU packed weight, rebuilt when `weight` changes

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize a float nn.Linear (per-channel symmetric int8 weights), packed once."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=w.device)
        q, scale = int8_gemm.quantize_per_token_ref(w.float())  # per output channel = per row
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        m._pack()
        return m

    def _pack(self):
        w = self.weight
        self._packed = (int8_gemm.pack_weight(w) if not w.is_cuda else None,
                        w.data_ptr(), w._version)

    def _packed_weight(self):
        w = self.weight
        if self._packed is None or self._packed[1:] != (w.data_ptr(), w._version):
            self._pack()  # weight was loaded, moved or modified since the last pack
        return self._packed[0]

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Int8Linear is inference only: it has no gradient. Run it under "
                               "torch.no_grad() / torch.inference_mode(), or use nn.Linear to train")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        if x.is_cuda != self.weight.is_cuda or (x.is_cuda and x.device != self.weight.device):
            raise ValueError(f"x is on {x.device} but Int8Linear's weight is on "
                             f"{self.weight.device}")
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x.is_cuda:
            q, s = ops.quantize_per_token(x2)
            y = ops.int8_gemm(q, self.weight, s, self.weight_scale, self.bias,
                              out_dtype=x.dtype if x.dtype in (torch.float16, torch.bfloat16)
                              else torch.float32)
        else:
            y = int8_gemm.quantized_linear_cpu(x2, self._packed_weight(), self.weight_scale,
                                               self.bias)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dynamic per-token int8 x per-channel int8")
