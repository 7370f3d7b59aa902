"""INT8 embedding tables: one symmetric scale per row, looked up then dequantised.

    table = Int8Embedding.from_float(nn.Embedding(30522, 384))   # 4x smaller table
    y = table(ids)                        # (..., D) float32 = q[ids] * scale[ids, None]
    names = quantize_embeddings(model)    # every nn.Embedding in place (what quantize_model's
                                          # embeddings=True option does)

A pretrained student that keeps its teacher's vocabulary is mostly embedding (MiniLM's 30,522 x
384 table is 11.7M of a 2-layer student's 15.6M parameters), so INT8 Linear layers alone leave
it at ~3/4 of its fp32 bytes. Per row: scale = max|w_row| / 127, q = round(w_row / scale) in
[-127, 127] (a zero row keeps scale 0). The lookup is exact to the stored int8: y equals
q * scale computed in float32, and differs from the fp32 table by at most scale / 2 per entry.
Inference only (no gradient), like Int8Linear.
"""
from typing import List, Tuple

import torch
from torch import nn


class Int8Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(num_embeddings, device=device))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "Int8Embedding":
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"Int8Embedding.from_float expects an nn.Embedding, got "
                            f"{type(emb).__name__}")
        if emb.max_norm is not None:
            raise ValueError("Int8Embedding: an embedding with max_norm renormalises its rows "
                             "at lookup time; it cannot be stored in int8")
        w = emb.weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError("Int8Embedding: the table holds non-finite values")
        out = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device=w.device)
        scale = w.abs().amax(1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        out.weight.copy_(torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8))
        out.weight_scale.copy_(scale)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be int32/int64 token ids, got {ids.dtype}")
        if torch.is_grad_enabled() and self.weight_scale.requires_grad:
            raise RuntimeError("Int8Embedding is inference only")
        q = self.weight[ids].to(torch.float32)          # (..., D)
        return q * self.weight_scale[ids].unsqueeze(-1)  # exact: one fp32 product per entry

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))


def quantize_embeddings(model: nn.Module, skip=()) -> List[Tuple[str, int, int]]:
    """Replace every nn.Embedding of `model` (in place) by Int8Embedding, except the dotted
    names in `skip`; returns [(name, rows, dim)] of the converted tables."""
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Embedding) and name not in skip:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, Int8Embedding.from_float(mod))
            done.append((name, mod.num_embeddings, mod.embedding_dim))
    return done
