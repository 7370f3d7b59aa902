"""Checkpoints: atomic save, safe load, RNG state, safetensors export, and loading a trained model.

One home for the on-disk formats, used by the trainer, the study, the pipeline and HF export:

    save_checkpoint(path, state)          # atomic (temp file + rename): never a half-written file
    ck = load_checkpoint(path)            # weights_only=True: tensors and plain containers only
    model, ck = load_model(path)          # a trained tkd model from its checkpoint.pt, eval mode
    export_safetensors(model, path)       # clean keys, contiguous CPU tensors

A checkpoint is a dict with at least `model` (state_dict), `config` (ModelConfig.to_dict()), `step`
and `task`; the trainer adds the optimizer, scheduler, scaler, every rank's RNG states, the data
position, the tokenizer (JSON) and the run's settings.
"""
import os
import random

import numpy as np
import torch
from torch import nn

CHECKPOINT = "checkpoint.pt"  # the file name inside a run directory


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: write a temporary file beside `path`, then rename over it."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never pickled code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path!r} is corrupt or not a tkd checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [k for k in ("model", "config", "step", "task") if not isinstance(ck, dict)
               or k not in ck]
    if missing:
        raise RuntimeError(f"checkpoint {path!r} is not a tkd checkpoint: missing {missing}")
    return ck


def load_model(path: str, device=None):
    """(model in eval mode without grads, checkpoint dict) from a tkd checkpoint.pt, or from a
    run directory holding one."""
    from .models import ModelConfig, build_model
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    ck = load_checkpoint(path)
    model = build_model(ModelConfig.from_dict(ck["config"]))
    if ck.get("int8"):  # an INT8 model: the same layers quantized before its weights load
        from . import quantize_model
        from .int8 import quantize_embeddings
        converted = set(ck["int8"]["converted"])
        quantize_model(model, skip=lambda name, m: name not in converted, min_weights=0)
        tables = set(ck["int8"].get("embeddings", ()))
        quantize_embeddings(model, skip=[n for n, m in model.named_modules()
                                         if isinstance(m, nn.Embedding) and n not in tables])
    model.load_state_dict(ck["model"])
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False), ck


def save_int8(path: str, model: nn.Module, report, task: str, tokenizer_json: str,
              embeddings=()) -> None:
    """An INT8 model (after `quantize_model`, whose report names the converted layers, and
    `quantize_embeddings`, whose converted table names are `embeddings`) as a tkd checkpoint
    that `load_model` reads back."""
    save_checkpoint(path, dict(model=clean_state_dict(model.state_dict()),
                               config=model.config.to_dict(), step=0, task=task,
                               tokenizer=tokenizer_json,
                               int8=dict(converted=[n for n, _, _ in report.converted],
                                         embeddings=list(embeddings))))


def rng_state() -> dict:
    """Every RNG state as plain Python (ints and lists): gatherable across ranks and loadable
    with weights_only=True."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "cuda": [t.tolist() for t in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in s["cuda"]])


def export_safetensors(model: nn.Module, path: str) -> None:
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(model.state_dict()).items()}
    save_file(sd, path)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_state_dict(sd: dict) -> dict:
    """Drop `module.` / `_orig_mod.` prefixes so checkpoints load into a plain model."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out
