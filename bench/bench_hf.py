"""tkd against Hugging Face transformers at the same pretrained weights (all-MiniLM-L6-v2: 6
layers, hidden 384, 12 heads), in one run:

    ours        TransformerClassifier from tkd_core.hf.load_pretrained
    hf          transformers.BertForSequenceClassification (its default SDPA attention)
    hf+patch    the same HF model after tkd_core.patch_hf (our attention and add + LayerNorm)

Training tokens/s (forward, backward, AdamW; B=32, S=64, real tokens counted, dropout 0 for
all three) and inference latency (batch 1 and 32, S=64, no padding), with each provider's ratio
against plain HF (> 1: faster than HF). Calls are interleaved (one timed call of each provider
in turn, repeated) and the table shows each provider's median, so a load change on a shared
machine hits all of them alike.

    python -m bench hf [--device cpu|cuda] [--quick]

On CPU our ops take their torch-reference path (TRITON_INTERPRET=0 while timing) in fp32; on
CUDA the Triton kernels, under bf16 autocast. Skipped, with the reason, when transformers or the
checkpoint folder is missing.
"""
import copy
import os

import torch
from torch import nn

from bench import harness
from bench.bench_train import make_batch
from tkd_core.measure import param_count

MINILM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                      "models", "all-MiniLM-L6-v2")
B_TRAIN, S = 32, 64


class HFLogits(nn.Module):
    """forward(input_ids, attention_mask, token_type_ids) -> logits over a HF model, so HF and
    ours run the same step code."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


def load(device):
    """(ours, hf, hf patched): same weights (HF's new classifier copied from ours), dropout 0."""
    import transformers

    import tkd_core
    from tkd_core import hf
    ours, _ = hf.load_pretrained(MINILM, num_labels=2)
    ref = transformers.BertForSequenceClassification.from_pretrained(
        MINILM, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        ref.classifier.weight.copy_(ours.classifier.weight)
        ref.classifier.bias.copy_(ours.classifier.bias)
    for m in ours.modules():  # dropout 0, as the HF config above
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for layer in ours.layers:
        layer.attn.dropout = 0.0
    patched = copy.deepcopy(ref)
    tkd_core.patch_hf(patched)
    return {"ours": ours.to(device), "hf": HFLogits(ref).to(device),
            "hf+patch": HFLogits(patched).to(device)}


def train_step(model, batch, amp):
    """One forward + backward + AdamW step of `model` on `batch`, as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids, mask, types, labels = batch

    def step():
        with torch.autocast(batch[0].device.type, dtype=amp, enabled=amp is not None):
            logits = model(ids, mask, types)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def infer_call(model, batch, amp):
    ids, mask, types, _ = batch

    @torch.inference_mode()
    def call():
        with torch.autocast(ids.device.type, dtype=amp, enabled=amp is not None):
            return model(ids, mask, types)
    return call


def main(device, quick=False):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("\n== hf ==\nskipped: transformers is not installed (a test/bench dependency)\n")
        return []
    if not os.path.isfile(os.path.join(MINILM, "config.json")):
        print(f"\n== hf ==\nskipped: the checkpoint {os.path.normpath(MINILM)} is absent\n")
        return []
    amp = torch.bfloat16 if device.type == "cuda" else None
    reps = {"train": 3 if quick else 8, "infer b=1": 10 if quick else 40,
            "infer b=32": 3 if quick else 10}
    with harness.cpu_reference_ops(device):
        models = load(device)
        cfg = models["ours"].config
        train_batch = make_batch(cfg, B_TRAIN, S, device)
        tokens = int(train_batch[1].sum())
        infer = {b: make_batch(cfg, b, S, device, seed=1) for b in (1, 32)}
        for b in infer.values():
            b[1].fill_(True)  # no padding
        medians = {"train": harness.interleaved({n: train_step(m.train(), train_batch, amp)
                                         for n, m in models.items()}, reps["train"], device)}
        for bsz, batch in infer.items():
            medians[f"infer b={bsz}"] = harness.interleaved(
                {n: infer_call(m.eval(), batch, amp) for n, m in models.items()},
                reps[f"infer b={bsz}"], device)
    rows = []
    for mode, med in medians.items():
        for name, m in models.items():
            row = dict(op="hf", mode=mode, provider=name, params=param_count(m),
                       shape=f"MiniLM-L6 B={B_TRAIN if mode == 'train' else mode[8:]} S={S}",
                       dtype="bf16 autocast" if amp else "fp32", ms=med[name] * 1e3,
                       ratio_vs_hf=med["hf"] / med[name], reps=reps[mode])
            if mode == "train":
                row["tokens_per_s"] = tokens / med[name]
            rows.append(row)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    harness.print_table(f"hf: MiniLM-L6 ours vs transformers ({harness.device_name(device)}"
                        f"{threads}, medians of interleaved calls)", rows,
                        ["mode", "shape", "dtype", "provider", "params", "ms", "tokens_per_s",
                         "ratio_vs_hf", "reps"])
    print("ratio_vs_hf = HF's time / this provider's time (> 1: faster than plain HF); "
          "train = forward + backward + AdamW, dropout 0")
    path = harness._write_csv("hf", rows, device)
    print(f"wrote {os.path.relpath(path)}\n")
    return rows
