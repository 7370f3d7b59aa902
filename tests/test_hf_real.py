"""The real pretrained checkpoint in ../shared/models/all-MiniLM-L6-v2 (a 6-layer BERT, hidden
384, uncased WordPiece 30,522): our tokenizer against transformers' AutoTokenizer on the 872
SST-2 dev sentences and 500 sentence pairs, mean-pooled embeddings against transformers'
BertModel, and our CPU attention path against the Triton kernels in the interpreter. Skipped,
with the reason, when the folder or the SST-2 data are absent."""
import os

import pytest
import torch

from conftest import SST2_DIR
from helpers import rel_err
from tkd_core import data, hf

transformers = pytest.importorskip("transformers")
MINILM = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models",
                      "all-MiniLM-L6-v2")
pytestmark = [
    pytest.mark.skipif(not os.path.isfile(os.path.join(MINILM, "config.json")),
                       reason=f"the pretrained checkpoint {MINILM} is absent"),
    pytest.mark.usefixtures("reference_backend"),
]
TOL = 1e-5


@pytest.fixture(scope="module")
def minilm():
    return hf.load_pretrained(MINILM)


@pytest.fixture(scope="module")
def dev_sentences():
    if not os.path.isfile(os.path.join(SST2_DIR, "dev.tsv")):
        pytest.skip(f"SST-2 is absent ({SST2_DIR}/dev.tsv)")
    return [e.text_a for e in data.load_split("sst2", "dev", SST2_DIR)]


@pytest.fixture(scope="module")
def auto_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


def test_tokenizer_matches_transformers(minilm, dev_sentences, auto_tokenizer):
    """Same ids on the 872 dev sentences; same ids and token types on 500 pairs (sentence i
    with sentence 7i + 3 mod 872)."""
    _, tok = minilm
    assert len(dev_sentences) == 872
    ours = [e.ids for e in tok.encode_batch(dev_sentences)]
    assert ours == auto_tokenizer(dev_sentences)["input_ids"]
    n = len(dev_sentences)
    a = dev_sentences[:500]
    b = [dev_sentences[(7 * i + 3) % n] for i in range(500)]
    encs = tok.encode_batch(list(zip(a, b)))
    ref = auto_tokenizer(a, b)
    assert [e.ids for e in encs] == ref["input_ids"]
    assert [e.type_ids for e in encs] == ref["token_type_ids"]
    assert any(1 in e.type_ids for e in encs)  # the pairs carry sentence B


def encode(tok, sentences):
    encs = tok.encode_batch(sentences)
    S = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(encs), S, dtype=torch.long)
    mask = torch.zeros(len(encs), S, dtype=torch.bool)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = True
    return ids, mask


def mean_pool(h, mask):
    w = mask.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(1) / w.sum(1)


@torch.no_grad()
def test_mean_pooled_embeddings_match_transformers(minilm, dev_sentences):
    """The sentence-transformers embedding (mean over real tokens of the last layer) of 32 dev
    sentences of mixed lengths equals transformers' within 1e-5."""
    model, tok = minilm
    ids, mask = encode(tok, dev_sentences[:32])
    ref_model = transformers.AutoModel.from_pretrained(MINILM).eval()
    ref = mean_pool(ref_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask)
    out = mean_pool(model(ids, mask, hidden_states=True).last_hidden_state, mask)
    assert out.shape == (32, 384)
    assert rel_err(out, ref) <= TOL
    # and the embeddings tell sentences apart (not a constant that would match anything)
    assert (out[0] - out[1]).abs().max() > 100 * TOL * ref.abs().max()


@torch.no_grad()
def test_our_attention_path_matches_the_triton_interpreter(minilm, monkeypatch):
    """The same forward on the CPU reference path and on the Triton kernels (attention, fused
    add + LayerNorm) run by the interpreter: conftest sets TRITON_INTERPRET=1 before tkd_core
    is imported, so both paths exist in this process (a plain script needs it set first)."""
    import tkd_core
    model, tok = minilm
    ids, mask = encode(tok, ["a gorgeous , witty , seductive movie .", "bad", "it is not good"])
    ref = model(ids, mask, hidden_states=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tkd_core.ops.backend(ids) == "interpreter"
    out = model(ids, mask, hidden_states=True)
    for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert rel_err(a[mask], r[mask]) <= TOL, f"hidden_states[{i}]"
    assert rel_err(out.logits, ref.logits) <= TOL
