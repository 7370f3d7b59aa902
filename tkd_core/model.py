"""Compatibility shim: the models moved to `tkd_core.models` (config, transformer, baselines),
the measurements to `tkd_core.measure`, the state-dict helpers to `tkd_core.checkpoint`. Old
imports (`from tkd_core.model import ModelConfig, build_model, median_ms, ...`) keep working;
new code imports from those modules."""
from .checkpoint import clean_state_dict, unwrap  # noqa: F401
from .measure import median_ms, param_count, size_bytes  # noqa: F401
from .models import (ARCHS, PRESETS, ModelConfig, ModelOutput,  # noqa: F401
                     TransformerClassifier, build_model, quantize)
from .models.transformer import Embeddings, FeedForward, Layer  # noqa: F401
