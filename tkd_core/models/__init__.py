"""tkd's models: the config, the architecture registry and the one builder.

    from tkd_core.models import ModelConfig, build_model
    model = build_model(ModelConfig.preset("cpu-student-2", vocab_size=8000, num_labels=2))

    config.py       ModelConfig (one dataclass for every architecture) and PRESETS
    transformer.py  TransformerClassifier (BERT-style, on tkd's fused ops) and its ModelOutput
    baselines.py    BiLSTM / RNN / LSTM / CNN students and baselines
    hf.py           Hugging Face BERT-family folders in and out (load_pretrained, save_pretrained)
    hf_tokenizer.py their tokenizers (tokenizer.json / vocab.txt), with `tokenizers`

Every model takes forward(input_ids, attention_mask=None, token_type_ids=None) -> logits
(B, num_labels). The registry is written out here, once: model files never register themselves.
"""
import torch.nn as nn

from .baselines import BASELINES
from .config import PRESETS, ModelConfig
from .transformer import ModelOutput, TransformerClassifier

__all__ = ["ARCHS", "PRESETS", "ModelConfig", "ModelOutput", "TransformerClassifier",
           "build_model", "quantize"]

# arch name (ModelConfig.arch, the trainer's --arch) -> model class taking a ModelConfig
ARCHS = {"transformer": TransformerClassifier, **BASELINES}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown arch {cfg.arch!r}; valid: {sorted(ARCHS)}")
    return ARCHS[cfg.arch](cfg)


def quantize(model: nn.Module):
    """INT8 form of a trained model, in place, through `tkd_core.quantize_model`: every Linear
    but the pooler and the classifier (tiny, and the logits' precision matters most).
    Returns (model, report)."""
    import tkd_core
    return model, tkd_core.quantize_model(model, skip=("pooler", "classifier"))
