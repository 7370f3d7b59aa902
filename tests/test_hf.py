"""tkd_core.hf load_pretrained / save_pretrained against transformers on tiny random models:
equivalence of logits and every layer's hidden states (bert, distilbert, roberta; 2 and 12
layers), heads and label counts, notices, export through AutoModelForSequenceClassification /
AutoTokenizer, the bit-identical HF -> tkd -> HF round trip, and bad folders."""
import json
import os
import pickle

import pytest
import torch

from helpers import rel_err
from hf_models import SENTENCES, padded_batch, tiny_hf, write_bert_vocab
from tkd_core import hf
from tkd_core.models import ModelConfig, build_model
from tkd_core.models import hf as mhf
from tkd_core.models.hf_tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("reference_backend", "one_thread")

TOL = 1e-5  # the bound (fp32, eval); measured: <= 1e-6


def lengths_batch(vocab, S, pad_id, types=True):
    """S rows of lengths 1..S (random real tokens, never the pad id), right-padded; token type
    1 on the second half of each row."""
    lengths = torch.arange(1, S + 1)
    mask = torch.arange(S)[None, :] < lengths[:, None]  # (S, S)
    ids = torch.randint(5, vocab, (S, S))
    ids[ids == pad_id] = 5
    ids = ids.masked_fill(~mask, pad_id)
    tt = ((torch.arange(S)[None, :] >= (lengths[:, None] + 1) // 2) & mask).long() if types \
        else torch.zeros_like(ids)
    return ids, mask, tt


def hf_forward(model, model_type, ids, mask, types):
    kw = dict(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    if model_type != "distilbert":  # DistilBERT takes no token types
        kw["token_type_ids"] = types
    with torch.no_grad():
        return model(**kw)


CASES = [("bert", {}), ("bert", {"hidden_act": "gelu_new"}), ("distilbert", {}),
         ("distilbert", {"sinusoidal_pos_embds": True, "activation": "relu"}), ("roberta", {})]


@pytest.mark.parametrize("layers", [2, 12])
@pytest.mark.parametrize("model_type,over", CASES)
def test_equivalence(tmp_path, model_type, over, layers):
    """Logits and the hidden states of every layer equal HF's (eager attention) within 1e-5 on
    a padded batch of lengths 1..S with token types. 12 layers: bert-base's depth and heads at
    hidden 48. Hidden states are compared on real tokens: RoBERTa numbers a padded position
    padding_idx, tkd counts on (a position no real token attends to)."""
    shape = dict(hidden=48, heads=12, ffn=192) if layers == 12 else {}
    ref_model = tiny_hf(model_type, str(tmp_path), layers=layers, num_labels=3, **shape, **over)
    model, tok = hf.load_pretrained(str(tmp_path))
    assert model.config.num_labels == 3 and not model.training
    pad = ref_model.config.pad_token_id
    ids, mask, types = lengths_batch(ref_model.config.vocab_size, 12, pad,
                                     types=model_type == "bert")
    ref = hf_forward(ref_model, model_type, ids, mask, types)
    with torch.no_grad():
        out = model(ids, mask, types, hidden_states=True)
    assert rel_err(out.logits, ref.logits) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == layers + 1
    for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert rel_err(a[mask], r[mask]) <= TOL, f"hidden_states[{i}]"
    if model_type != "roberta":  # every position, padding included
        assert rel_err(out.hidden_states[-1], ref.hidden_states[-1]) <= TOL
    # the comparison can fail: the type's distinguishing field set wrong moves the logits by
    # more than 10x the bound (erf GELU for the tanh one: 2e-4 at 2 layers, 1e-3 at 12)
    field = {"bert": ("hidden_act", "gelu" if over else "gelu_new"),
             "distilbert": ("pooler_activation", "tanh"), "roberta": ("position_offset", 0)}
    k, v = field[model_type]
    wrong = build_model(ModelConfig(**{**model.config.to_dict(), k: v})).eval()
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(wrong(ids, mask, types), ref.logits) > 10 * TOL


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
def test_export_round_trip(tmp_path, model_type):
    """HF -> tkd -> HF: every tensor bit-identical, same keys; transformers' Auto classes load the
    export with equal logits and equal token ids."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_hf(model_type, str(src), num_labels=2)
    model, tok = hf.load_pretrained(str(src))
    src_tok = transformers.AutoTokenizer.from_pretrained(str(src))  # the folder's own tokenizer
    for a, b in zip(SENTENCES, SENTENCES[::-1]):
        assert src_tok(a, b)["input_ids"] == tok.encode(a, b).ids, (a, b)
    hf.save_pretrained(model, tok, str(dst))
    from safetensors.torch import load_file
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(dst)).eval()
    assert type(loaded).__name__ == mhf._ARCHITECTURES[model_type]
    auto_tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    for s in SENTENCES:
        assert auto_tok(s)["input_ids"] == tok.encode(s).ids, s
    ids, mask, types = padded_batch(tok)
    ref = hf_forward(loaded, model_type, ids, mask, types)
    with torch.no_grad():
        assert rel_err(model(ids, mask, types), ref.logits) <= TOL


def test_tkd_student_exports(tmp_path):
    """A student trained from scratch (tkd's own WordPiece tokenizer, post-LN) exports as a BERT
    that transformers loads with equal logits; pre-LN or mean pooling refuse, naming the field."""
    from tkd_core import data
    tok = data.train_tokenizer([s.lower() for s in SENTENCES] * 3, vocab_size=200)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.get_vocab_size(), num_labels=3)
    model = build_model(cfg).eval()
    hf.save_pretrained(model, tok, str(tmp_path))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    auto_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    batch = auto_tok(SENTENCES, SENTENCES[1:] + SENTENCES[:1], padding=True, return_tensors="pt")
    ours = padded_batch(tok, pairs=True)
    assert torch.equal(batch["input_ids"], ours[0])
    assert torch.equal(batch["token_type_ids"], ours[2])
    with torch.no_grad():
        assert rel_err(model(*ours), loaded.eval()(**batch).logits) <= TOL
    back, _ = hf.load_pretrained(str(tmp_path))  # and back into tkd, bit-identical
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    for field, value in (("pre_ln", True), ("pooling", "mean")):
        bad = build_model(ModelConfig(**{**cfg.to_dict(), field: value}))
        with pytest.raises(ValueError, match=field):
            hf.save_pretrained(bad, tok, str(tmp_path / field))


def test_sharded_checkpoint(tmp_path):
    """A checkpoint saved in shards (model-0000i-of-0000n.safetensors + index.json) loads the
    same tensors as a single file."""
    ref = tiny_hf("bert", str(tmp_path / "one"))
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    for f in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / "sharded" / f).write_bytes((tmp_path / "one" / f).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    one, _ = hf.load_pretrained(str(tmp_path / "one"))
    sharded, _ = hf.load_pretrained(str(tmp_path / "sharded"))
    assert all(torch.equal(v, sharded.state_dict()[k]) for k, v in one.state_dict().items())


# ------------------------------------------------------------------------- heads and notices


def test_bare_encoder_gets_a_new_head_with_a_notice(tmp_path, capsys):
    ref = tiny_hf("bert", str(tmp_path), kind="bare")
    model, _ = hf.load_pretrained(str(tmp_path), num_labels=4)
    err = capsys.readouterr().err
    assert "newly initialised head tensors" in err and "classifier.weight" in err
    assert "pooler" not in err.split("newly initialised")[1].splitlines()[0]  # pooler loaded
    assert model.classifier.weight.shape == (4, 32)
    assert torch.equal(model.pooler.weight, ref.pooler.dense.weight)


def test_unused_tensors_are_reported(tmp_path, capsys):
    tiny_hf("bert", str(tmp_path), kind="pretraining")
    hf.load_pretrained(str(tmp_path))
    err = capsys.readouterr().err
    assert "checkpoint tensors not used" in err and "cls.predictions" in err
    assert "cls.seq_relationship" in err


def test_label_count_mismatch(tmp_path, capsys):
    ref = tiny_hf("distilbert", str(tmp_path), num_labels=2)
    with pytest.raises(ValueError, match="head has 2 labels, num_labels=5.*reinit_head=True"):
        hf.load_pretrained(str(tmp_path), num_labels=5)
    model, _ = hf.load_pretrained(str(tmp_path), num_labels=5, reinit_head=True)
    assert model.classifier.weight.shape[0] == 5
    assert torch.equal(model.pooler.weight, ref.pre_classifier.weight)  # kept
    assert "classifier.weight" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["id2label"] = {str(i): f"L{i}" for i in range(3)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="declares 3 labels.*'classifier.weight' has 2 rows"):
        hf.load_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------- bad input


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hf.load_pretrained(str(tmp_path / "missing"))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: "
                                         r"\['bert', 'distilbert', 'roberta'\]"):
        hf.load_pretrained(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "random"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_corrupt_weight_file(tmp_path, damage, fmt):
    m = tiny_hf("bert", str(tmp_path))
    name = "model.safetensors"
    if fmt == "bin":  # the same model as a pickle pytorch_model.bin
        os.remove(tmp_path / name)
        name = "pytorch_model.bin"
        torch.save(m.state_dict(), tmp_path / name)
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(ValueError, match=f"{name}: cannot read the weights"):
        hf.load_pretrained(str(tmp_path))


class _Payload:
    """Unpickling this calls open(path, 'w'): a file appears if the pickle's code runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_pickle_does_not_run(tmp_path):
    m = tiny_hf("bert", str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    marker = tmp_path / "pwned"
    sd = dict(m.state_dict(), evil=_Payload(str(marker)))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with open(tmp_path / "plain.pkl", "wb") as f:  # the payload works when unpickled plainly
        pickle.dump(_Payload(str(tmp_path / "control")), f)
    with open(tmp_path / "plain.pkl", "rb") as f:
        pickle.load(f).close()
    assert (tmp_path / "control").exists()
    with pytest.raises(ValueError, match="pytorch_model.bin: cannot read the weights"):
        hf.load_pretrained(str(tmp_path))
    assert not marker.exists()


def test_wrong_tensor_shape(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_hf("bert", str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "bert.encoder.layer.1.attention.self.key.weight"
    sd[key] = torch.zeros(32, 31)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"'{key}' has shape \\(32, 31\\), expected \\(32, 32\\)"):
        hf.load_pretrained(str(tmp_path))


def test_missing_encoder_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_hf("bert", str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["bert.encoder.layer.0.output.dense.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks encoder tensors for \\['layers.0.ffn.down.weight'"):
        hf.load_pretrained(str(tmp_path))


def test_vocabulary_smaller_than_the_embedding_table(tmp_path):
    tiny_hf("bert", str(tmp_path))
    n = write_bert_vocab(str(tmp_path))  # rewrite it without the last 3 words
    lines = (tmp_path / "vocab.txt").read_text().splitlines()[:-3]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"tokenizer has {n - 3} tokens but the word embedding "
                                         f"table has {n} rows"):
        hf.load_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("lower", [True, False])
def test_vocab_txt_tokenizer_matches_transformers(tmp_path, lower):
    """From vocab.txt alone, lower-casing (and accent stripping, which follows it) from
    tokenizer_config.json: the same ids and token types as AutoTokenizer, single and pairs."""
    write_bert_vocab(str(tmp_path), lower=lower)
    tok = load_tokenizer(str(tmp_path))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for a, b in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1]):
        assert tok.encode(a).ids == auto(a)["input_ids"], a
        e, r = tok.encode(a, b), auto(a, b)
        assert (e.ids, e.type_ids) == (r["input_ids"], r["token_type_ids"]), (a, b)
    cased = [tok.encode(s).ids for s in ("Good", "good")]
    assert (cased[0] == cased[1]) == lower  # the flag was applied, both ways
