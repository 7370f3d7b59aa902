"""The transfer set (Tang et al. 2019; TinyBERT's task augmentation): teacher-labelled copies of
the training examples, made at the level of WordPiece token ids so that [CLS]/[SEP] and the
token types stay exact.

    items += augment(tok, train_examples, n=4, seed=0, max_len=64)    # label -100: no hard label
"""
import random
from typing import List, Sequence

from .data import CLS, MASK, SEP, Example


def augment(tok, examples: Sequence[Example], n: int, seed: int, max_len: int = 128,
            p_mask: float = 0.1, p_replace: float = 0.1, p_ngram: float = 0.25,
            label=-100) -> List[tuple]:
    """A transfer set (Tang et al. 2019; TinyBERT's task augmentation): `n` copies of every
    example, as encoded items (input_ids, token_type_ids, label) with `label` (no hard label:
    the teacher labels them).

    Per copy and per sentence (both of a pair), word by word (a word = the WordPiece tokens of
    one pre-tokenized word): with p_mask the word becomes one [MASK]; else with p_replace it
    becomes another word of the task's training text (drawn by frequency); then with p_ngram the
    sentence is cut to a random n-gram of its words, n uniform in 1..5. [CLS] and [SEP] are never
    touched. Deterministic: each copy's random stream is seeded by (seed, example, copy)."""
    mask_id, cls_id, sep_id = (_special_id(tok, names) for names in _SPECIAL)
    tok.no_truncation()
    tok.no_padding()
    pairs = examples and examples[0].text_b is not None
    encs = tok.encode_batch([(e.text_a, e.text_b) if pairs else e.text_a for e in examples])
    sentences = [_words(enc) for enc in encs]  # per example: one or two lists of words
    pool = [w for segs in sentences for seg in segs for w in seg]  # every word occurrence
    if not pool:
        return []
    out = []
    for i, segs in enumerate(sentences):
        for c in range(n):
            rng = random.Random(f"{seed}/{i}/{c}")
            ids, types = [cls_id], [0]
            for t, words in enumerate(segs):
                new = []
                for w in words:
                    u = rng.random()
                    new.append([mask_id] if u < p_mask else
                               pool[rng.randrange(len(pool))] if u < p_mask + p_replace else w)
                if new and rng.random() < p_ngram:
                    k = rng.randint(1, 5)
                    start = rng.randrange(max(1, len(new) - k + 1))
                    new = new[start:start + k]
                piece = [x for w in new for x in w] + [sep_id]
                ids += piece
                types += [t] * len(piece)
            if len(ids) > max_len:  # longest first would need words; cut, keeping the last [SEP]
                ids, types = ids[:max_len - 1] + [sep_id], types[:max_len]
            out.append((ids, types, label))
    return out


# (mask, cls, sep) under their BERT and RoBERTa names
_SPECIAL = ((MASK, "<mask>"), (CLS, "<s>"), (SEP, "</s>"))


def _special_id(tok, names) -> int:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(f"the tokenizer has none of the special tokens {names}: --augment needs it")


def _words(enc) -> List[List[List[int]]]:
    """The encoding's words per sentence: [[token ids of word 0, of word 1, ...], (sentence B)],
    special tokens left out."""
    segs, last = {}, None
    for tid, seq, wid in zip(enc.ids, enc.sequence_ids, enc.word_ids):
        if seq is None or wid is None:  # [CLS], [SEP]
            last = None
            continue
        words = segs.setdefault(seq, [])
        if (seq, wid) != last:
            words.append([])
            last = (seq, wid)
        words[-1].append(tid)
    return [segs.get(s, []) for s in range(max(segs) + 1)] if segs else [[]]
