"""Tokenizers of Hugging Face folders, read and written with the `tokenizers` library alone
(tkd_core/models/hf.py uses these; transformers is never imported).

    tok = load_tokenizer(folder)           # tokenizer.json, or a BERT vocab.txt
    save_tokenizer(tok, folder, 512, True) # tokenizer.json (+ vocab.txt), tokenizer_config.json
"""
import json
import os

TOKENIZER_JSON, VOCAB_TXT, TOKENIZER_CONFIG = "tokenizer.json", "vocab.txt", "tokenizer_config.json"


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# tokenizer_config.json key -> BertNormalizer argument (what transformers' BertTokenizer does)
_NORMALIZER_KEYS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                    "tokenize_chinese_chars": "handle_chinese_chars"}
SPECIAL = {"cls_token": ("[CLS]", "<s>"), "sep_token": ("[SEP]", "</s>"),
           "pad_token": ("[PAD]", "<pad>"), "unk_token": ("[UNK]", "<unk>"),
           "mask_token": ("[MASK]", "<mask>")}


def load_tokenizer(folder: str):
    """A `tokenizers.Tokenizer` from tokenizer.json, or from a BERT vocab.txt; lower-casing,
    accent stripping and Chinese-character splitting from tokenizer_config.json when it sets
    them. No truncation, no padding (the data pipeline sets its own)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    tc_path = os.path.join(folder, TOKENIZER_CONFIG)
    tc = read_json(tc_path) if os.path.isfile(tc_path) else {}
    given = {arg: tc[k] for k, arg in _NORMALIZER_KEYS.items() if k in tc}
    path = os.path.join(folder, TOKENIZER_JSON)
    if os.path.isfile(path):
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a tokenizers file ({e})") from None
        n = tok.normalizer
        if isinstance(n, normalizers.BertNormalizer) and given:
            tok.normalizer = normalizers.BertNormalizer(**{
                "clean_text": n.clean_text, "handle_chinese_chars": n.handle_chinese_chars,
                "strip_accents": n.strip_accents, "lowercase": n.lowercase, **given})
    elif os.path.isfile(os.path.join(folder, VOCAB_TXT)):
        path = os.path.join(folder, VOCAB_TXT)
        special = {role: tc.get(role, names[0]) for role, names in SPECIAL.items()}
        tok = Tokenizer(models.WordPiece.from_file(path, unk_token=special["unk_token"]))
        tok.normalizer = normalizers.BertNormalizer(**{
            "clean_text": True, "handle_chinese_chars": True, "strip_accents": None,
            "lowercase": True, **given})
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        present = [t for t in special.values() if tok.token_to_id(t) is not None]
        tok.add_special_tokens(present)
        cls, sep = special["cls_token"], special["sep_token"]
        if cls not in present or sep not in present:
            raise ValueError(f"{path}: the vocabulary lacks {cls} or {sep}")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer ({TOKENIZER_JSON} or {VOCAB_TXT})")
    tok.no_truncation()
    tok.no_padding()
    return tok


def save_tokenizer(tok, folder: str, model_max_length: int, token_types: bool) -> None:
    """tokenizer.json (+ vocab.txt for WordPiece) and a tokenizer_config.json that
    transformers' AutoTokenizer reads as the same tokenizer (PreTrainedTokenizerFast), returning
    token_type_ids when `token_types` (the model reads them)."""
    from tokenizers import Tokenizer, models
    tok = Tokenizer.from_str(tok.to_str())
    tok.no_truncation()
    tok.no_padding()
    tok.save(os.path.join(folder, TOKENIZER_JSON))
    if isinstance(tok.model, models.WordPiece):
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(folder, VOCAB_TXT), "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t, _ in vocab))
    special = {role: next((n for n in names if tok.token_to_id(n) is not None), None)
               for role, names in SPECIAL.items()}
    special = {k: v for k, v in special.items() if v is not None}
    if special.get("cls_token") == "<s>":  # RoBERTa's <s> / </s> are also bos / eos
        special.update(bos_token="<s>", eos_token=special.get("sep_token", "</s>"))
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, TOKENIZER_CONFIG),
                dict(special, tokenizer_class="PreTrainedTokenizerFast",
                     model_max_length=model_max_length,
                     model_input_names=["input_ids"] + ["token_type_ids"] * token_types
                     + ["attention_mask"]))


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
