"""Training throughput: our Transformer (tkd ops) against a plain PyTorch BERT of the same shape
(`torch.nn.TransformerEncoder`, post-LN, GELU), in one run: tokens/s of a full training step
(forward, backward, AdamW), and the ratio ours / torch.

    python -m bench train [--device cpu] [--quick]

On CPU our ops take their torch-reference path (the fast CPU path; the bench sets
TRITON_INTERPRET=0 for the timed runs: interpreted Triton kernels are for correctness, not speed).
On CUDA they run the Triton kernels. Tokens count real (non-padding) tokens.
"""
import os

import torch
from torch import nn

from bench import harness
from tkd_core.measure import param_count
from tkd_core.models import ModelConfig, build_model


class TorchBert(nn.Module):
    """BERT for classification on torch.nn.TransformerEncoder: the same shape as ours."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h, padding_idx=0)
        self.position = nn.Embedding(cfg.max_positions, h)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h)
        self.ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        layer = nn.TransformerEncoderLayer(h, cfg.num_heads, cfg.ffn_size, cfg.hidden_dropout,
                                           activation="gelu", layer_norm_eps=cfg.layer_norm_eps,
                                           batch_first=True, norm_first=cfg.pre_ln)
        final = nn.LayerNorm(h, eps=cfg.layer_norm_eps) if cfg.pre_ln else None  # as ours
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, norm=final,
                                             enable_nested_tensor=False)
        self.pooler = nn.Linear(h, h)
        self.classifier = nn.Linear(h, cfg.num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids):
        S = input_ids.shape[1]
        pos = torch.arange(S, device=input_ids.device)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(pos)
        x = self.encoder(self.drop(self.ln(x)), src_key_padding_mask=~attention_mask)
        return self.classifier(self.drop(torch.tanh(self.pooler(x[:, 0]))))


def make_batch(cfg, B, S, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = torch.arange(S)[None, :] < lengths[:, None]  # (B, S)
    ids = torch.randint(5, cfg.vocab_size, (B, S), generator=g).masked_fill(~mask, 0)
    types = torch.zeros(B, S, dtype=torch.long)
    labels = torch.randint(0, cfg.num_labels, (B,), generator=g)
    return [t.to(device) for t in (ids, mask, types, labels)]


def step_time(model, batch, device, amp_dtype, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, mask, types, labels = batch

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(ids, mask, types)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return harness.interleaved({"step": step}, steps, device)["step"]


def main(device, quick=False):
    shapes = [("cpu-teacher", 32, 64)] if quick else [("cpu-teacher", 32, 64),
                                                     ("cpu-student-4", 64, 64)]
    if device.type == "cuda":
        shapes.append(("bert-base", 32, 128))
    amp_dtype = torch.float16 if device.type == "cuda" else None
    rows = []
    with harness.cpu_reference_ops(device):  # 1 thread when other processes load the CPU
        for preset, B, S in shapes:
            cfg = ModelConfig.preset(preset, vocab_size=8000, hidden_dropout=0.0,
                                     attention_dropout=0.0)
            batch = make_batch(cfg, B, S, device)
            tokens = int(batch[1].sum())
            steps = 3 if quick else 5
            peers = {}
            for name, ctor in (("ours", build_model), ("torch.nn.TransformerEncoder", TorchBert)):
                torch.manual_seed(0)
                model = ctor(cfg).to(device).train()
                dt = step_time(model, batch, device, amp_dtype, steps)
                peers[name] = dt
                rows.append(dict(op="train", mode="fwd+bwd+AdamW", provider=name,
                                 shape=f"{preset} ({cfg.num_layers}L h{cfg.hidden_size}) "
                                       f"B={B} S={S}",
                                 dtype="fp16 autocast" if amp_dtype else "fp32",
                                 params=param_count(model), ms=dt * 1e3,
                                 tokens_per_s=tokens / dt))
            rows[-2]["ratio_vs_torch"] = peers["torch.nn.TransformerEncoder"] / peers["ours"]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    harness.print_table(f"train ({harness.device_name(device)}{threads})", rows,
                        ["shape", "dtype", "provider", "params", "ms", "tokens_per_s",
                         "ratio_vs_torch"])
    print("ratio_vs_torch = our tokens/s / torch's tokens/s (> 1: ours is faster)")
    if device.type == "cpu":
        print("CPU: our ops run their torch references here; the Triton kernels are GPU-only.")
    path = harness._write_csv("train", rows, device)
    print(f"wrote {os.path.relpath(path)}\n")
    return rows
