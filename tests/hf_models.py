"""Tiny random Hugging Face models saved as folders, for the tkd.hf tests (no download: built
with transformers' config classes and saved with save_pretrained)."""
import json
import os

import torch

WORDS = ("the a an movie film story plot actor acting good bad great awful not very is was it "
         "this that and but funny boring dull smart witty slow fast love hate").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SENTENCES = ["The movie was very good", "not a great film , but funny", "Dull .",
             "an awful, SLOW story", "it is smart and witty", "I love this acting!",
             "Héllo wörld café", "boring plot; bad actor"]


def write_bert_vocab(folder, lower=True, extra=()):
    """vocab.txt (+ tokenizer_config.json): special tokens, letters, ## letters, words."""
    letters = LETTERS + ("" if lower else LETTERS.upper())
    toks = SPECIAL + list(",.;!?'") + list(letters) + ["##" + c for c in letters] + list(WORDS)
    toks = list(dict.fromkeys(toks + list(extra)))  # "a" is a letter and a word
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("".join(t + "\n" for t in toks))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": lower, "tokenizer_class": "BertTokenizer",
                   "model_max_length": 64}, f)
    return len(toks)


def write_roberta_tokenizer(folder):
    """A byte-level BPE tokenizer.json trained on the test sentences, RoBERTa's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(SENTENCES * 4 + [" ".join(WORDS)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", model_max_length=64)
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def scramble(model, std=0.2):
    """Weights far from the init (std 0.02 leaves every layer near the identity, where a wrong
    activation or offset hides); LayerNorms near 1 / 0. Sinusoidal tables stay."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def tiny_hf(model_type, folder, layers=2, kind="seq", num_labels=2, hidden=32, heads=4, ffn=64,
            lower=True, **over):
    """Build a random `model_type` model (kind: seq = *ForSequenceClassification, bare =
    *Model, pretraining = BertForPreTraining), save it with its tokenizer into `folder`, and
    return it in eval mode."""
    import transformers as tf
    os.makedirs(folder, exist_ok=True)
    common = dict(num_labels=num_labels, attn_implementation="eager")  # HF's own math
    if model_type == "roberta":
        vocab = write_roberta_tokenizer(folder)
        cfg = tf.RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=ffn,
                               max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **common,
                               **over)
        cls = {"seq": tf.RobertaForSequenceClassification, "bare": tf.RobertaModel}[kind]
    elif model_type == "distilbert":
        vocab = write_bert_vocab(folder, lower)
        cfg = tf.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads,
                                  hidden_dim=ffn, max_position_embeddings=64, **common, **over)
        cls = {"seq": tf.DistilBertForSequenceClassification, "bare": tf.DistilBertModel}[kind]
    else:
        vocab = write_bert_vocab(folder, lower)
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ffn,
                            max_position_embeddings=64, **common, **over)
        cls = {"seq": tf.BertForSequenceClassification, "bare": tf.BertModel,
               "pretraining": tf.BertForPreTraining}[kind]
    model = scramble(cls(cfg)).eval()
    model.save_pretrained(folder)
    return model


def padded_batch(tok, n=None, pairs=False):
    """Our tokenizer's ids for the test sentences (pairs: sentence i with i+1), right-padded:
    (input_ids, attention_mask, token_type_ids), lengths all different."""
    sents = SENTENCES[:n] if n else SENTENCES
    encs = [tok.encode(s, sents[(i + 1) % len(sents)]) if pairs else tok.encode(s)
            for i, s in enumerate(sents)]
    S = max(len(e.ids) for e in encs)
    pad = tok.token_to_id("[PAD]") if tok.token_to_id("[PAD]") is not None else \
        tok.token_to_id("<pad>")
    ids = torch.full((len(encs), S), pad, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        types[i, :len(e.ids)] = torch.tensor(e.type_ids)
        mask[i, :len(e.ids)] = True
    return ids, mask, types
