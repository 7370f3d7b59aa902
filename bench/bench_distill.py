"""Distillation step cost: what each loss term adds to a student's training step, in one run.

    python -m bench distill [--device cpu] [--quick]

The pretrained study's shapes: a MiniLM-L6-shaped teacher (6 layers, hidden 384, 12 heads, FFN
1536; random weights: the cost does not depend on them) and a 2-layer student of the same width,
one step = the student's forward, the objective, backward, AdamW. Objectives, timed in
interleaved rounds (median):
- hard labels (T-NLP);
- logits KD from cached teacher logits (`--teacher-logits`, the study's TKD-NLP: no teacher
  forward in the step; the one-off pass over the training set is timed separately below);
- logits KD + hidden-state MSE (`--hidden-loss mse`: the teacher's forward at every step);
- + attention KL (`--attention-loss`: both models' attention probabilities recomputed by the
  reference path for the mapped layers).
Batches: B=32 at S=16 (an SST-2 training phrase with its transfer-set copies is ~13 tokens) and
S=48. On CPU, 1 thread, as each job of the study. Ratios are against the cached logits row.
"""
import os
from types import SimpleNamespace

import torch

from bench import harness
from tkd_core.models import ModelConfig, build_model

TEACHER = dict(num_layers=6, hidden_size=384, num_heads=12, ffn_size=1536, vocab_size=30522,
               max_positions=512, pre_ln=False, hidden_dropout=0.0, attention_dropout=0.0,
               num_labels=2)  # MiniLM-L6 (BERT, post-LN); no dropout: the timing is the same


def _batch(B, S, device, seed=0):
    """Random ids with per-row lengths in [S/2, S] (the rest padding), labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(S // 2, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    ids = torch.randint(1000, TEACHER["vocab_size"], (B, S), generator=g) * mask
    return {k: v.to(device) for k, v in dict(
        input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
        labels=torch.randint(0, 2, (B,), generator=g)).items()}


def _objectives(teacher, cfg, B):
    from tkd_core.distill import build_objective
    base = dict(temperature=1.0, alpha=0.5, hidden_loss="none", hidden_proj=False,
                hidden_weight=1.0, attention_loss=False, attention_weight=1.0,
                layer_map="uniform")
    out = {"hard labels": build_objective(SimpleNamespace(**base), cfg, None, None)[0]}
    kd = build_objective(SimpleNamespace(**base), cfg, teacher, None)[0]
    kd.cache = torch.randn(B, cfg.num_labels)  # cached logits: rows 0..B-1 of the batch
    out["logits KD (cached)"] = kd
    out["+ hidden MSE"] = build_objective(SimpleNamespace(**dict(base, hidden_loss="mse")),
                                          cfg, teacher, None)[0]
    out["+ hidden MSE + attention KL"] = build_objective(
        SimpleNamespace(**dict(base, hidden_loss="mse", attention_loss=True)), cfg, teacher,
        None)[0]
    return out


def _step_fn(student, objective, batch, device):
    from tkd_core.distill import forward_flags
    from tkd_core.train import make_optimizer
    # the trainer's optimizer (fused AdamW, decay groups) over the student and the objective
    opt, _ = make_optimizer(student, SimpleNamespace(lr=1e-5, weight_decay=0.01, warmup=0.0),
                            device, 1000, objective)
    flags = forward_flags(objective)
    idx = list(range(batch["input_ids"].shape[0]))

    def step():
        out = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                      **flags)
        loss, _ = objective(out, batch, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(device, quick=False, threads=1):
    rows = []
    with harness.cpu_reference_ops(device, threads):
        torch.manual_seed(0)
        tcfg = ModelConfig(**TEACHER)
        teacher = build_model(tcfg).to(device).eval()
        scfg = ModelConfig(**dict(TEACHER, num_layers=2))
        for S in ((16,) if quick else (16, 48)):
            B = 32
            batch = _batch(B, S, device)
            fns = {}
            for name, objective in _objectives(teacher, scfg, B).items():
                torch.manual_seed(0)
                student = build_model(scfg).to(device).train()
                fns[name] = _step_fn(student, objective.to(device), batch, device)
            ms = {k: v * 1e3 for k, v in harness.interleaved(
                fns, 5 if quick else 15, device).items()}
            tokens = int(batch["attention_mask"].sum())
            for name, t in ms.items():
                rows.append(dict(op="distill", shape=f"2L student of 6L h384, B={B} S={S}",
                                 provider=name, ms=t, tokens_per_s=tokens / t * 1e3,
                                 cost_vs_cached_logits=t / ms["logits KD (cached)"]))
        # the one-off pass a logits cache costs: the teacher's forward per example (eval mode)
        batch = _batch(256, 16, device)
        with torch.no_grad():
            fwd = harness.interleaved({"t": lambda: teacher(
                batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])},
                3 if quick else 7, device)["t"]
        rows.append(dict(op="distill", shape="6L h384 teacher, B=256 S=16, no grad",
                         provider="teacher-logits pass (once)", ms=fwd * 1e3,
                         tokens_per_s=int(batch["attention_mask"].sum()) / fwd))
    th = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    harness.print_table(f"distill step ({harness.device_name(device)}{th})", rows,
                        ["shape", "provider", "ms", "tokens_per_s", "cost_vs_cached_logits"])
    print("cost_vs_cached_logits = the step's time / the cached-logits step's time")
    path = harness._write_csv("distill", rows, device)
    print(f"wrote {os.path.relpath(path)}\n")
    return rows
