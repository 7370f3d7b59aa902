"""Hugging Face BERT-family folders in and out of `TransformerClassifier`.

    model, tok = load_pretrained("../shared/models/all-MiniLM-L6-v2", num_labels=2)
    logits = model(input_ids, attention_mask, token_type_ids)
    save_pretrained(model, tok, "runs/student-hf")   # AutoModelForSequenceClassification loads it

A folder holds `config.json`, the weights (`model.safetensors`, or `pytorch_model.bin` read with
`torch.load(weights_only=True)`: tensors only, a pickle's code never runs; sharded `*.index.json`
forms too) and the tokenizer (`tokenizer.json`, or a BERT `vocab.txt`). It is read with
`safetensors` and `tokenizers` alone: `transformers` is never imported.

Model types, and the ModelConfig fields that carry their differences (forward never asks which
type it runs; see tkd_core/models/config.py for each field's reason):

    bert        BertModel / BertFor*, MiniLM, TinyBERT: the defaults (erf GELU unless hidden_act
                says otherwise, pooler = dense + tanh on [CLS])
    distilbert  type_vocab_size=0 (no token types), pooler_activation=relu (pre_classifier),
                classifier_dropout=seq_classif_dropout, layer_norm_eps=1e-12. A
                sinusoidal_pos_embds table is stored in the checkpoint: it loads as a (trainable)
                learned table. DistilBERT has no dropout on the attention block's output; tkd
                applies hidden_dropout there (training only: eval outputs are identical).
    roberta     position_offset = pad_token_id + 1 (positions counted from the first token, as
                HF counts them for right-padded batches; padded positions differ, and are masked),
                pad_token_id=1, pooler_dropout=True (classifier.dense + tanh on <s>)

Weights map through the declarative tables below (HF key -> ours, `{i}` a layer, `{w}` weight or
bias); Q, K and V fuse into our `qkv` (rows [0:h] Q, [h:2h] K, [2h:3h] V) and split back on
export, so HF -> tkd -> HF is bit-identical. Every checkpoint tensor is used or reported as
ignored (heads of other tasks: MLM, NSP, a bare RoBERTa's pooler); every parameter of ours is
loaded or reported as newly initialised (the classification head only: a missing encoder tensor
is an error).
"""
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .config import ModelConfig
from .hf_tokenizer import load_tokenizer, read_json, save_tokenizer, write_json
from .transformer import TransformerClassifier

SUPPORTED_TYPES = ("bert", "distilbert", "roberta")
CONFIG, SAFETENSORS, BIN = "config.json", "model.safetensors", "pytorch_model.bin"

# ---------------------------------------------------------------------------------- config

# config.json key -> ModelConfig field (shared by loading and export)
_BERT_CONFIG = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "intermediate_size": "ffn_size", "hidden_act": "hidden_act",
                "hidden_dropout_prob": "hidden_dropout",
                "attention_probs_dropout_prob": "attention_dropout",
                "max_position_embeddings": "max_positions", "type_vocab_size": "type_vocab_size",
                "initializer_range": "initializer_range", "layer_norm_eps": "layer_norm_eps",
                "pad_token_id": "pad_token_id", "classifier_dropout": "classifier_dropout"}
_CONFIG_KEYS = {
    "bert": _BERT_CONFIG,
    "roberta": _BERT_CONFIG,
    "distilbert": {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_layers",
                   "n_heads": "num_heads", "hidden_dim": "ffn_size", "activation": "hidden_act",
                   "dropout": "hidden_dropout", "attention_dropout": "attention_dropout",
                   "max_position_embeddings": "max_positions",
                   "initializer_range": "initializer_range", "pad_token_id": "pad_token_id",
                   "seq_classif_dropout": "classifier_dropout"},
}
_SHAPE_KEYS = {"bert": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size", "max_position_embeddings"),
               "distilbert": ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim",
                              "max_position_embeddings")}
_SHAPE_KEYS["roberta"] = _SHAPE_KEYS["bert"]
# the transformers defaults of the keys a config.json may omit
_DEFAULTS = {"bert": {"hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                      "attention_probs_dropout_prob": 0.1, "type_vocab_size": 2,
                      "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0},
             "distilbert": {"activation": "gelu", "dropout": 0.1, "attention_dropout": 0.1,
                            "initializer_range": 0.02, "pad_token_id": 0,
                            "seq_classif_dropout": 0.2}}
_DEFAULTS["roberta"] = dict(_DEFAULTS["bert"], type_vocab_size=1, pad_token_id=1)
# fields each type fixes (position_offset: RoBERTa's follows its pad id, set in config_from_hf)
_FIXED = {"bert": {}, "roberta": {"pooler_dropout": True},
          "distilbert": {"type_vocab_size": 0, "layer_norm_eps": 1e-12,
                         "pooler_activation": "relu"}}
_ARCHITECTURES = {"bert": "BertForSequenceClassification",
                  "distilbert": "DistilBertForSequenceClassification",
                  "roberta": "RobertaForSequenceClassification"}


def config_from_hf(hf: dict, num_labels: int, where: str) -> ModelConfig:
    """A ModelConfig from a parsed config.json (`where` names the file in errors)."""
    t = hf.get("model_type")
    if t not in SUPPORTED_TYPES:
        raise ValueError(f"{where}: model_type {t!r} is not supported; supported: "
                         f"{list(SUPPORTED_TYPES)}")
    missing = [k for k in _SHAPE_KEYS[t] if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing {missing} (needed for a {t} model's shapes)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} "
                         "is not supported (only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError(f"{where}: decoder / cross-attention models are not supported (tkd "
                         "loads encoders)")
    fields = {}
    for key, field in _CONFIG_KEYS[t].items():
        value = hf.get(key, _DEFAULTS[t].get(key))
        if field == "classifier_dropout":
            value = -1.0 if value is None else float(value)
        if value is not None:
            fields[field] = value
    fields.update(_FIXED[t], num_labels=num_labels)
    if t == "roberta":
        fields["position_offset"] = fields["pad_token_id"] + 1
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def export_type(cfg: ModelConfig) -> str:
    """The HF model type whose architecture `cfg` describes, or a ValueError naming the fields
    that no supported type has."""
    common = {"arch": "transformer", "pre_ln": False, "pooling": "cls"}
    bad = {k: getattr(cfg, k) for k, v in common.items() if getattr(cfg, k) != v}
    if bad:
        raise ValueError(f"no Hugging Face BERT-family model has {bad} (export needs "
                         f"{ {k: common[k] for k in bad} })")
    wants = {"bert": dict(position_offset=0, pooler_activation="tanh", pooler_dropout=False),
             "roberta": dict(position_offset=cfg.pad_token_id + 1, pooler_activation="tanh",
                             pooler_dropout=True),
             "distilbert": dict(position_offset=0, pooler_activation="relu",
                                pooler_dropout=False, layer_norm_eps=1e-12)}
    misses = {}
    for t, want in wants.items():
        diff = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
        if (cfg.type_vocab_size == 0) != (t == "distilbert"):  # only DistilBERT has no types
            diff["type_vocab_size"] = cfg.type_vocab_size
        if t == "distilbert" and cfg.hidden_act not in ("gelu", "relu"):
            diff["hidden_act"] = cfg.hidden_act
        if not diff:
            return t
        misses[t] = diff
    raise ValueError("no supported Hugging Face model type matches this ModelConfig; fields "
                     f"that differ, per type: {misses}")


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    hf = {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type}
    for key, field in _CONFIG_KEYS[model_type].items():
        value = getattr(cfg, field)
        if field == "classifier_dropout" and value < 0:
            value = cfg.hidden_dropout if model_type == "distilbert" else None
        hf[key] = value
    if model_type == "distilbert":
        hf["sinusoidal_pos_embds"] = False  # our table is a trainable one, whatever its values
    labels = {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
    hf.update(id2label=labels, label2id={v: k for k, v in labels.items()},
              problem_type="regression" if cfg.regression else "single_label_classification",
              dtype="float32")
    return hf


# --------------------------------------------------------------------------------- weights

# HF key -> our key. `{i}`: layer index, `{w}`: weight or bias; ":k" = slot k of our fused qkv.
# BASE keys sit under the model's prefix (`bert.`, ...) in a *For* checkpoint and at the top
# in a bare one; HEAD keys are the sequence-classification head's, at the top.
_BERT_BASE = {
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.{w}": "embeddings.ln.{w}",
    "encoder.layer.{i}.attention.self.query.{w}": "layers.{i}.attn.qkv.{w}:0",
    "encoder.layer.{i}.attention.self.key.{w}": "layers.{i}.attn.qkv.{w}:1",
    "encoder.layer.{i}.attention.self.value.{w}": "layers.{i}.attn.qkv.{w}:2",
    "encoder.layer.{i}.attention.output.dense.{w}": "layers.{i}.attn.out.{w}",
    "encoder.layer.{i}.attention.output.LayerNorm.{w}": "layers.{i}.ln1.{w}",
    "encoder.layer.{i}.intermediate.dense.{w}": "layers.{i}.ffn.up.{w}",
    "encoder.layer.{i}.output.dense.{w}": "layers.{i}.ffn.down.{w}",
    "encoder.layer.{i}.output.LayerNorm.{w}": "layers.{i}.ln2.{w}",
}
KEY_MAPS = {  # model type -> (prefix, BASE, HEAD, ignored key prefixes after the model prefix)
    "bert": ("bert.", {**_BERT_BASE, "pooler.dense.{w}": "pooler.{w}"},
             {"classifier.{w}": "classifier.{w}"}, ("cls.",)),
    "roberta": ("roberta.", _BERT_BASE,
                {"classifier.dense.{w}": "pooler.{w}", "classifier.out_proj.{w}": "classifier.{w}"},
                ("lm_head.", "pooler.")),
    "distilbert": ("distilbert.", {
        "embeddings.word_embeddings.weight": "embeddings.word.weight",
        "embeddings.position_embeddings.weight": "embeddings.position.weight",
        "embeddings.LayerNorm.{w}": "embeddings.ln.{w}",
        "transformer.layer.{i}.attention.q_lin.{w}": "layers.{i}.attn.qkv.{w}:0",
        "transformer.layer.{i}.attention.k_lin.{w}": "layers.{i}.attn.qkv.{w}:1",
        "transformer.layer.{i}.attention.v_lin.{w}": "layers.{i}.attn.qkv.{w}:2",
        "transformer.layer.{i}.attention.out_lin.{w}": "layers.{i}.attn.out.{w}",
        "transformer.layer.{i}.sa_layer_norm.{w}": "layers.{i}.ln1.{w}",
        "transformer.layer.{i}.ffn.lin1.{w}": "layers.{i}.ffn.up.{w}",
        "transformer.layer.{i}.ffn.lin2.{w}": "layers.{i}.ffn.down.{w}",
        "transformer.layer.{i}.output_layer_norm.{w}": "layers.{i}.ln2.{w}",
    }, {"pre_classifier.{w}": "pooler.{w}", "classifier.{w}": "classifier.{w}"},
        ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")),
}
HEAD_KEYS = ("pooler.", "classifier.")  # ours: may be freshly initialised; the rest may not
_BUFFERS = ("embeddings.position_ids",)  # non-parameters older checkpoints carry


def _pattern(template: str) -> "re.Pattern":
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
                      .replace(r"\{w\}", r"(?P<w>weight|bias)") + "$")


def _target(template: str, m: "re.Match") -> Tuple[str, Optional[int]]:
    key, _, slot = template.partition(":")
    key = key.format(**m.groupdict())
    return key, int(slot) if slot else None


def hf_to_tkd(hf_sd: Dict[str, torch.Tensor], model_type: str, ours: Dict[str, torch.Tensor],
              where: str, skip: Tuple[str, ...] = ()):
    """Map a HF state dict onto our keys. `ours`: our model's state dict (shapes); tensors whose
    key of ours starts with one of `skip` are left out (reported as ignored).
    Returns (state dict of the loaded tensors, ignored HF keys). Raises on a wrong shape, an
    unknown encoder tensor, or an encoder tensor of ours that the checkpoint lacks."""
    prefix, base, head, ignore = KEY_MAPS[model_type]
    rules = [(_pattern(t), dst) for t, dst in {**base, **head}.items()]
    out, slots, ignored = {}, {}, []
    for key, t in hf_sd.items():
        k = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")
        k = k[len(prefix):] if k.startswith(prefix) else k
        hit = next(((p.match(k), dst) for p, dst in rules if p.match(k)), None)
        if hit is None:
            if k.startswith(ignore) or k in _BUFFERS or not k.startswith(
                    ("embeddings.", "encoder.", "transformer.")):
                ignored.append(key)
                continue
            raise ValueError(f"{where}: tensor {key!r} belongs to the encoder but tkd has no "
                             f"place for it (a {model_type} variant tkd does not implement)")
        dst, slot = _target(hit[1], hit[0])
        if dst.startswith(skip):
            ignored.append(key)
            continue
        if dst not in ours:
            raise ValueError(f"{where}: tensor {key!r} maps to {dst!r}, which this model does "
                             f"not have (config.json disagrees with the weights?)")
        want = ours[dst].shape if slot is None else (ours[dst].shape[0] // 3,
                                                     *ours[dst].shape[1:])
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(want)} (config.json)")
        if slot is None:
            out[dst] = t
        else:
            slots.setdefault(dst, {})[slot] = t
    for dst, parts in slots.items():
        if len(parts) != 3:
            raise ValueError(f"{where}: {dst!r} needs the Q, K and V tensors; only slots "
                             f"{sorted(parts)} are present")
        out[dst] = torch.cat([parts[s] for s in range(3)])
    lacking = [k for k in ours if k not in out and not k.startswith(HEAD_KEYS)]
    if lacking:
        raise ValueError(f"{where}: the checkpoint lacks encoder tensors for {lacking[:6]}"
                         + (f" and {len(lacking) - 6} more" if len(lacking) > 6 else ""))
    return out, ignored


def tkd_to_hf(sd: Dict[str, torch.Tensor], model_type: str) -> Dict[str, torch.Tensor]:
    """Our state dict -> a HF *ForSequenceClassification state dict (QKV split back)."""
    prefix, base, head, _ = KEY_MAPS[model_type]
    rules = [(_pattern(dst.partition(":")[0]), src, dst, p) for table, p in ((base, prefix),
                                                                             (head, ""))
             for src, dst in table.items()]
    out = {}
    for key, t in sd.items():
        hits = [(m, src, dst, p) for r, src, dst, p in rules if (m := r.match(key))]
        if not hits:
            raise ValueError(f"tensor {key!r} has no place in a {model_type} checkpoint")
        for m, src, dst, p in hits:
            _, slot = _target(dst, m)
            part = t if slot is None else t.chunk(3)[slot]
            out[p + src.format(**m.groupdict())] = part.detach().contiguous().cpu()
    return out


def read_weights(folder: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, file name) from model.safetensors or pytorch_model.bin (or their sharded
    *.index.json forms), tensors only."""
    for name in (SAFETENSORS, BIN):
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            shards = sorted(set(read_json(index)["weight_map"].values()))
            sd = {}
            for s in shards:
                sd.update(_read_tensors(os.path.join(folder, s)))
            return sd, index
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _read_tensors(path), path
    raise FileNotFoundError(f"{folder}: no weights ({SAFETENSORS} or {BIN}, or a sharded "
                            f"*.index.json of either)")


def _read_tensors(path: str) -> Dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as e:
        raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:300]}); a truncated, corrupt or "
                         "non-tensor file (pickled code is refused)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


# ---------------------------------------------------------------------------------- public


def _notice(msg: str) -> None:
    print(f"tkd.hf: {msg}", file=sys.stderr)


def _summary(keys: List[str]) -> str:
    groups: Dict[str, int] = {}
    for k in keys:
        g = k.split(".")[0] + ("." + k.split(".")[1] if k.count(".") > 1 else "")
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g}.* ({n})" if n > 1 else next(k for k in keys if k.startswith(g))
                     for g, n in groups.items())


def load_pretrained(path: str, num_labels: Optional[int] = None, reinit_head: bool = False):
    """(TransformerClassifier in eval mode, tokenizers.Tokenizer) from a HF BERT-family folder.

    num_labels: None takes the checkpoint's head (or config.json's label count, 2 by default);
    a head with another label count is an error unless reinit_head=True, which gives a freshly
    initialised classifier (the pretrained pooler / pre_classifier / dense stays). A folder
    without a head (a bare encoder) gets a fresh one, with a one-line notice naming its tensors.
    """
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder (expected a Hugging Face model folder)")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no {CONFIG} (expected a Hugging Face model folder: "
                                f"{CONFIG}, {SAFETENSORS} or {BIN}, a tokenizer)")
    hf = read_json(cfg_path)
    config_from_hf(hf, 2, cfg_path)  # model type and keys, before reading any weights
    hf_sd, weights = read_weights(path)
    t = hf["model_type"]
    head_key = next(k for k, v in KEY_MAPS[t][2].items() if v == "classifier.{w}")
    head_w = hf_sd.get(head_key.format(w="weight"))  # (labels, hidden) or None: bare encoder
    cfg_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels")
    if head_w is not None and cfg_labels is not None and cfg_labels != head_w.shape[0]:
        raise ValueError(f"{cfg_path} declares {cfg_labels} labels but {weights} tensor "
                         f"{head_key.format(w='weight')!r} has {head_w.shape[0]} rows")
    ckpt_labels = head_w.shape[0] if head_w is not None else None
    labels = num_labels or ckpt_labels or cfg_labels or 2
    if ckpt_labels is not None and labels != ckpt_labels and not reinit_head:
        raise ValueError(f"{weights}: the checkpoint's classification head has {ckpt_labels} "
                         f"labels, num_labels={labels} was asked; pass reinit_head=True for a "
                         "freshly initialised classifier")
    cfg = config_from_hf(hf, labels, cfg_path)
    tok = load_tokenizer(path)
    if tok.get_vocab_size(with_added_tokens=True) != cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)}"
                         f" tokens but the word embedding table has {cfg.vocab_size} rows "
                         f"({CONFIG} vocab_size): the tokenizer does not belong to this model")
    model = TransformerClassifier(cfg)
    ours = model.state_dict()
    loaded, ignored = hf_to_tkd(hf_sd, t, ours, weights,
                                skip=("classifier.",) if reinit_head else ())
    model.load_state_dict({**ours, **loaded})
    new = [k for k in ours if k not in loaded]
    if new:
        _notice(f"{path}: newly initialised head tensors (not in the checkpoint): "
                f"{', '.join(new)}")
    if ignored:
        _notice(f"{path}: checkpoint tensors not used: {_summary(ignored)}")
    return model.eval(), tok


def save_pretrained(model, tokenizer, path: str) -> None:
    """Write `model` (a TransformerClassifier, possibly DDP / compile wrapped) and `tokenizer` as a
    HF folder: config.json (model_type from the config's fields, *ForSequenceClassification),
    model.safetensors, tokenizer.json (+ vocab.txt) and tokenizer_config.json."""
    from safetensors.torch import save_file

    from ..checkpoint import unwrap
    model = unwrap(model)
    cfg = model.config
    t = export_type(cfg)
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's embedding table has "
                         f"{cfg.vocab_size} rows: they do not belong together")
    sd = dict(model.state_dict())
    if cfg.positions == "sinusoidal":  # our fixed table, exported as the learned one it equals
        sd["embeddings.position.weight"] = model.embeddings.sinusoid
    os.makedirs(path, exist_ok=True)
    write_json(os.path.join(path, CONFIG), config_to_hf(cfg, t))
    save_file(tkd_to_hf(sd, t), os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
    save_tokenizer(tokenizer, path, cfg.max_positions - cfg.position_offset, t == "bert")
