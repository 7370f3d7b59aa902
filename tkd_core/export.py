"""export_onnx: a tkd model as an ONNX graph, for users who serve with ONNX Runtime.

    tkd_core.export_onnx(student, "student.onnx")              # fp32 graph
    tkd_core.export_onnx(student, "student_int8.onnx", int8=True)  # + ORT dynamic INT8

The graph takes input_ids and attention_mask (and token_type_ids when the model has more than
one token type), int64 (batch, seq), and gives logits (batch, num_labels); batch and sequence
length are dynamic. It is traced by `torch.onnx.export(dynamo=True)` (torch.export, then
onnxscript) from our ops' torch reference math (`reference_ops()`, whatever TRITON_INTERPRET
says), which ONNX Runtime then fuses itself.

int8=True then runs `onnxruntime.quantization.quantize_dynamic` on that graph (QInt8 weights,
activations quantized at run time), the way CPU users deploy BERT students with ORT. tkd's
own INT8 modules (Int8Linear, Int8Embedding) are C++ kernels with no ONNX form, so a model
already through `quantize_model` is refused: export its fp32 form.

Neither onnx, onnxscript nor onnxruntime is a dependency of tkd: without them this raises an
ImportError naming what to install, before any work.
"""
import copy
import logging
import os
import warnings

import torch
from torch import nn

from .checkpoint import unwrap
from .kernels import utils

EXAMPLE_SHAPE = (2, 16)  # (batch, seq) traced; both dims exported as dynamic


def _require(int8: bool):
    missing = []
    for mod in ("onnx", "onnxscript") + (("onnxruntime",) if int8 else ()):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"export_onnx{'(int8=True)' if int8 else ''} needs "
                          f"{', '.join(missing)}: pip install {' '.join(missing)}")


def example_inputs(config, batch: int = EXAMPLE_SHAPE[0], seq: int = EXAMPLE_SHAPE[1]) -> dict:
    """Inputs the graph is traced with: random ids, the last row padded past half its length
    (the padding path is traced), token type 0."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0
    ids[-1, seq // 2:] = config.pad_token_id
    feed = {"input_ids": ids, "attention_mask": mask}
    if config.type_vocab_size > 1:
        feed["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return feed


def export_onnx(model: nn.Module, path: str, *, int8: bool = False, opset: int = 18) -> str:
    """Writes `model` (a tkd TransformerClassifier, any device, any mode)
    to `path` as ONNX; returns path. The model is not changed (an eval-mode CPU copy is traced).
    The file appears whole or not at all: it is written beside `path`, then renamed over it."""
    from .int8 import Int8Embedding, Int8Linear
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a tkd model (tkd_core.models.build_model, "
                        f"load_pretrained, load_model), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"path must be a file path, got {path!r}")
    if getattr(model.config, "arch", None) != "transformer":
        raise ValueError(f"export_onnx takes Transformer models (arch 'transformer'), got arch "
                         f"{getattr(model.config, 'arch', None)!r}: the recurrent baselines' "
                         "length-packed sequences do not trace into a static graph")
    if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()):
        raise ValueError("model holds tkd INT8 modules (quantize_model / quantize_embeddings), "
                         "which have no ONNX form: export the fp32 model, with int8=True for "
                         "ONNX Runtime's dynamic INT8")
    _require(int8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    net = copy.deepcopy(unwrap(model)).cpu().eval().requires_grad_(False)
    feed = example_inputs(net.config)
    names = list(feed)
    dims = {0: torch.export.Dim("batch"),
            1: torch.export.Dim("seq", max=net.config.max_positions)}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with warnings.catch_warnings(), torch.no_grad(), utils.reference_ops():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                net, (), kwargs=feed, input_names=names, output_names=["logits"],
                dynamo=True, opset_version=opset, verbose=False,
                dynamic_shapes={n: dims for n in names})
            onnx_program.save(tmp)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            level = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # its pre-processing advice
            try:
                q = f"{tmp}.int8"
                quantize_dynamic(tmp, q, weight_type=QuantType.QInt8)
                os.replace(q, tmp)
            finally:
                logging.getLogger().setLevel(level)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, f"{tmp}.int8"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path
