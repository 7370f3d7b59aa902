"""Lean CPU inference for tkd's Transformer classifiers (fp32 or INT8), eager or compiled.

    from tkd_core.infer import InferenceModel
    fast = InferenceModel(model)                 # fp32
    fast8 = InferenceModel(model, int8=True)     # INT8 linears where they pay
    logits = fast8(input_ids, attention_mask, token_type_ids)       # (B, num_labels)
    compiled = torch.compile(fast8)              # inductor on CPU, our ops included

What it does differently from `TransformerClassifier.forward` (same weights, same math, logits
equal to fp32 rounding; `model` is read, not modified, and must not change afterwards):
- Linears run prepacked. fp32: oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op
  inductor's CPU freezing pass emits) with the weight reordered once: on this AMD CPU 2x the
  GFLOP/s of nn.Linear's MKL sgemm, which takes its AVX2 path on non-Intel CPUs. INT8:
  `Int8Linear` (per-token dynamic activations, the AVX-512 VNNI kernel where the CPU has it)
  for every Linear that `int8_pays` (quantize_model's size rule), fp32 for the others.
- The FFN activation is fused into the up projection (oneDNN post-op, or the INT8 epilogue),
  and the pooler's tanh / ReLU into the pooler (fp32).
- Padding is removed: the real tokens of the batch are packed into one (T, hidden) matrix
  after the embeddings (T = the real token count: a padded SST-2 batch is about half padding),
  every Linear and LayerNorm runs on those T rows only, and attention runs per sequence on its
  own tokens (tkd_core._C.attention_fwd: per (sequence, head) work items, AVX-512 where the
  CPU has it; no mask, no S x S matrix kept), straight from the fused QKV projection into the
  layout the output projection reads. The residual add is fused into each LayerNorm
  (_C.add_layer_norm). The head reads each sequence's first token (cls) or its token mean.
  Batches this cannot express (a sequence without any real token, or cls pooling over a first
  position that is padding) take the padded path below, as does torch.compile.
- One flat forward, no per-op validation. The padded path (torch.compile, the rare batches
  above, CPUs / builds without the extension): torch's LayerNorm, `tkd_core.ops.attention`
  (SDPA on CPU, padded keys masked, a sequence with no real token gives zero rows, as in the
  model).
Inference only: no dropout, no gradients, no hidden_states / attentions outputs.

Threads: torch.get_num_threads(). Our kernels (INT8 GEMM, attention, add + LayerNorm) run on
our own pool (work items claimed from a counter, never waiting for a thread the OS has not
run: on a busy machine an OpenMP team stalls at every fork and join), and small problems on
fewer threads (about 1 M multiply-adds per thread at least). With int8=True torch's own ops
left on the packed path (the embedding gather, the float head) run on 1 thread for the call,
so no OpenMP team is involved at all; fp32 linears are oneDNN's, on torch's OpenMP threads.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .int8 import gemm as int8_gemm
from .int8 import Int8Linear, activation_code, activation_ref, int8_pays

_HIDDEN_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}
# oneDNN post-op (attr, algorithm) of an activation
_ONEDNN_ACT = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
               "relu": ("relu", ""), "tanh": ("tanh", "")}


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


class FloatLinear(nn.Module):
    """fp32 nn.Linear (+ a fused activation) through oneDNN with the weight reordered once;
    F.linear (+ the activation) where torch has no oneDNN. Inference only."""

    def __init__(self, linear: nn.Linear, activation: Optional[str] = None):
        super().__init__()
        if activation not in _ONEDNN_ACT:
            raise ValueError(f"activation must be one of {sorted(map(str, _ONEDNN_ACT))}, got "
                             f"{activation!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = activation
        self.attr, self.algorithm = _ONEDNN_ACT[activation]
        self.register_buffer("weight", linear.weight.detach().float().contiguous())
        self.register_buffer("bias", linear.bias.detach().float().contiguous()
                             if linear.bias is not None else None)
        self.onednn = onednn_available()
        # the weight in oneDNN's blocked layout, reordered once
        self._reordered = (torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)
                           if self.onednn else None)

    def forward(self, x):
        if self.onednn and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self._reordered, self.bias, self.attr,
                                                      [], self.algorithm)
        # traced: plain math, which inductor lowers itself (and fuses the activation into)
        return _act(F.linear(x, self.weight, self.bias), self.activation)

    def extra_repr(self):
        act = f", activation={self.activation}" if self.activation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{act}, " \
               f"{'oneDNN' if self.onednn else 'F.linear'}"


def _linear(lin: nn.Module, activation: Optional[str], int8: bool, min_weights: Optional[int]):
    """The inference form of one of the model's Linears: Int8Linear where INT8 pays (or the layer
    already is one, then without a fused activation), FloatLinear otherwise. Returns (module,
    activation left to apply)."""
    if isinstance(lin, Int8Linear):  # a model quantize_model converted: its packed weights
        return lin, activation
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"InferenceModel: expected nn.Linear or Int8Linear, got "
                        f"{type(lin).__name__}")
    rule = {} if min_weights is None else {"min_weights": min_weights}
    if int8 and activation != "tanh" and int8_pays(lin.in_features, lin.out_features, **rule):
        return Int8Linear.from_float(lin, activation=activation), None
    return FloatLinear(lin, activation), None


def _act(y, activation):
    """An activation left unfused (after a Linear quantize_model had already converted)."""
    if activation is None:
        return y
    if activation == "tanh":
        return torch.tanh(y)
    return activation_ref(y, activation_code(activation))


def _ln_params(ln):
    """(weight, bias, eps) of a LayerNorm: float32 contiguous copies (the kernels read them)."""
    return (ln.weight.detach().float().contiguous().clone(),
            ln.bias.detach().float().contiguous().clone(), float(ln.eps))


class _Layer(nn.Module):
    def __init__(self, layer, act, int8, min_weights):
        super().__init__()
        self.num_heads = layer.attn.num_heads
        self.qkv, _ = _linear(layer.attn.qkv, None, int8, min_weights)
        self.out, _ = _linear(layer.attn.out, None, int8, min_weights)
        self.up, self.up_act = _linear(layer.ffn.up, act, int8, min_weights)
        self.down, _ = _linear(layer.ffn.down, None, int8, min_weights)
        self.ln1, self.ln2 = _ln_params(layer.ln1), _ln_params(layer.ln2)

    def attention(self, x, mask):
        B, S, hidden = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.num_heads, -1)  # (B, S, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D), strided views
        o = ops.attention(q, k, v, key_padding_mask=mask)  # (B, H, S, D)
        return self.out(o.transpose(1, 2).reshape(B, S, hidden))

    def ffn(self, x):
        return self.down(_act(self.up(x), self.up_act))


def _ln(x, p):
    return F.layer_norm(x, x.shape[-1:], p[0], p[1], p[2])


def _add_ln(x, r, p, out=None):
    """LayerNorm(x + r) of (T, N) float32 rows through the extension (r may be None; out may be
    x itself)."""
    out = torch.empty_like(x) if out is None else out
    int8_gemm._ext().add_layer_norm(x.data_ptr(), r.data_ptr() if r is not None else 0,
                                    p[0].data_ptr(), p[1].data_ptr(), p[2], out.data_ptr(),
                                    x.shape[0], x.shape[1], int8_gemm._threads())
    return out


def _attention_packed(qkv, offsets, num_heads):
    """(T, 3 hidden) fused projections of packed sequences -> (T, hidden) attention outputs."""
    T, hidden = qkv.shape[0], qkv.shape[1] // 3
    D = hidden // num_heads
    out = torch.empty(T, hidden)
    int8_gemm._ext().attention_fwd(qkv.data_ptr(), qkv.stride(0), offsets.data_ptr(),
                                   offsets.shape[0] - 1, num_heads, D, D ** -0.5,
                                   out.data_ptr(), int8_gemm._threads())
    return out


class InferenceModel(nn.Module):
    """The inference forward of a `TransformerClassifier` (see the module docstring).

    model: a TransformerClassifier, float or after quantize_model (its Int8Linear layers are
    used as they are). int8: convert its float Linears to Int8Linear where `int8_pays` (the
    classifier always stays float), min_weights: the size rule's threshold (default: the
    rule's). forward(input_ids (B, S) long, attention_mask (B, S) bool/int or None,
    token_type_ids (B, S) long or None) -> logits (B, num_labels) float32.
    """

    def __init__(self, model: nn.Module, int8: bool = False, min_weights: Optional[int] = None):
        super().__init__()
        cfg = model.config
        if cfg.arch != "transformer":
            raise ValueError(f"InferenceModel takes the transformer architecture, got "
                             f"{cfg.arch!r}")
        self.config, self.int8 = cfg, int8
        emb = model.embeddings
        self.word = emb.word.weight.detach()
        self.token_type = emb.token_type.weight.detach() if emb.token_type is not None else None
        self.position = (emb.position.weight.detach() if emb.position is not None
                         else emb.sinusoid)
        self.emb_ln = _ln_params(emb.ln)
        act = _HIDDEN_ACT[cfg.hidden_act]
        self.layers = nn.ModuleList(_Layer(layer, act, int8, min_weights)
                                    for layer in model.layers)
        self.final_ln = _ln_params(model.final_ln) if model.final_ln is not None else None
        self.pooler, self.pooler_act = _linear(model.pooler, cfg.pooler_activation, int8,
                                               min_weights)
        self.classifier, _ = _linear(model.classifier, None, False, None)

    def _check_length(self, S):
        off = self.config.position_offset
        if S + off > self.position.shape[0]:
            raise ValueError(f"sequence length {S} exceeds max_positions "
                             f"{self.position.shape[0]}" + (f" - position_offset {off}"
                                                            if off else ""))

    def embed(self, input_ids, token_type_ids):
        S, off = input_ids.shape[1], self.config.position_offset
        self._check_length(S)
        x = F.embedding(input_ids, self.word)
        if self.token_type is not None:
            x = x + (F.embedding(token_type_ids, self.token_type) if token_type_ids is not None
                     else self.token_type[0])
        return _ln(x + self.position[off:off + S], self.emb_ln)  # (B, S, hidden)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = attention_mask.bool() if attention_mask is not None else None  # (B, S)
        if not torch.compiler.is_compiling() and self._can_pack(input_ids, mask):
            return self.forward_packed(input_ids, mask, token_type_ids)
        x = self.embed(input_ids, token_type_ids)
        if self.final_ln is None:  # post-LN (BERT)
            for layer in self.layers:
                x = _ln(layer.attention(x, mask) + x, layer.ln1)
                x = _ln(layer.ffn(x) + x, layer.ln2)
            y = x
        else:  # pre-LN: h is the residual stream, each sublayer reads LN(h)
            h = x
            for layer in self.layers:
                n = _ln(h, layer.ln1)
                h = h + layer.attention(n, mask)
                h = h + layer.ffn(_ln(h, layer.ln2))
            y = _ln(h, self.final_ln)
        return self.head(y, mask)

    def _can_pack(self, input_ids, mask) -> bool:
        """The packed path takes the batch: our extension, float32 CPU weights, every sequence
        with a real token, and (cls pooling) every first position real."""
        if input_ids.is_cuda or self.word.dtype != torch.float32 or int8_gemm._C is None:
            return False
        if mask is None:
            return True
        return bool(mask.any(1).all()) and (self.config.pooling == "mean"
                                            or bool(mask[:, 0].all()))

    def forward_packed(self, input_ids, mask, token_type_ids=None):
        """The forward on the real tokens only (see the module docstring). INT8: our kernels on
        torch.get_num_threads() threads of their pool, torch's remaining small ops (the
        embedding gather, the float head) on 1 thread meanwhile, so that no OpenMP team is ever
        waited for."""
        if not self.int8:
            return self._packed(input_ids, mask, token_type_ids)
        threads = torch.get_num_threads()
        with int8_gemm.kernel_threads(threads):
            torch.set_num_threads(1)
            try:
                return self._packed(input_ids, mask, token_type_ids)
            finally:
                torch.set_num_threads(threads)

    def _packed(self, input_ids, mask, token_type_ids):
        B, S = input_ids.shape
        self._check_length(S)
        off = self.config.position_offset
        pos = torch.arange(off, off + S).repeat(B)  # (B * S,) position of every token
        ids, types = input_ids.reshape(-1), token_type_ids
        if mask is None or bool(mask.all()):
            lens = torch.full((B,), S, dtype=torch.long)
        else:  # the real tokens only, in order
            keep = mask.reshape(-1).nonzero()[:, 0]
            ids, pos = ids.index_select(0, keep), pos.index_select(0, keep)
            types = types.reshape(-1).index_select(0, keep) if types is not None else None
            lens = mask.sum(1)
        offsets = torch.zeros(B + 1, dtype=torch.long)
        torch.cumsum(lens, 0, out=offsets[1:])
        x = F.embedding(ids, self.word)  # (T, hidden)
        if self.token_type is not None:
            x += (F.embedding(types.reshape(-1), self.token_type) if types is not None
                  else self.token_type[0])
        tokens = _add_ln(x, F.embedding(pos, self.position), self.emb_ln, out=x)
        hidden = tokens.shape[1]
        if self.final_ln is None:  # post-LN
            for layer in self.layers:
                a = layer.out(_attention_packed(layer.qkv(tokens), offsets, layer.num_heads))
                tokens = _add_ln(a, tokens, layer.ln1, out=a)
                f = layer.down(_act(layer.up(tokens), layer.up_act))
                tokens = _add_ln(f, tokens, layer.ln2, out=f)
            y = tokens
        else:  # pre-LN
            h = tokens
            for layer in self.layers:
                n = _add_ln(h, None, layer.ln1)
                h = layer.out(_attention_packed(layer.qkv(n), offsets, layer.num_heads)).add_(h)
                n = _add_ln(h, None, layer.ln2)
                h = layer.down(_act(layer.up(n), layer.up_act)).add_(h)
            y = _add_ln(h, None, self.final_ln)
        if self.config.pooling == "mean":
            seg = torch.repeat_interleave(torch.arange(B), lens)  # (T,) sequence of each token
            x0 = torch.zeros(B, hidden).index_add_(0, seg, y) / lens[:, None].float()
        else:
            x0 = y.index_select(0, offsets[:-1])  # each sequence's first token: [CLS]
        return self.classifier(_act(self.pooler(x0), self.pooler_act))

    def head(self, x, mask):
        """(B, S, hidden) final states -> (B, num_labels) logits."""
        if self.config.pooling == "mean":
            if mask is None:
                x0 = x.mean(1)
            else:
                w = mask.unsqueeze(-1).to(x.dtype)
                x0 = (x * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            x0 = x[:, 0]  # the [CLS] token
        return self.classifier(_act(self.pooler(x0), self.pooler_act))
