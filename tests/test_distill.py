"""Distillation terms (tkd_core/distill.py) against float64 references, the layer map, gradient
flow, the transfer set (data.augment), and layer-wise distillation through the trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from test_train import read_log, tiny_args, vocab, weights  # noqa: F401  (vocab: a fixture)
from tkd_core import augment, data, distill, train
from tkd_core.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _seed() -> int:
    """A fresh seed from the test's seeded torch stream (reproducible with TKD_TEST_SEED)."""
    return int(torch.randint(0, 2**31 - 1, ()))


def _batch(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = torch.arange(S)[None] < lengths[:, None]
    return dict(attention_mask=mask, labels=torch.randint(0, 3, (B,), generator=g)), g


# ------------------------------------------------------------------- float64 references


def _hidden_ref(hs, ht, mask, pairs, W=None, b=None, kind="mse"):
    total = torch.zeros((), dtype=torch.float64)
    m = mask.double()
    for si, ti in pairs:
        x, y = hs[si].double(), ht[ti].double()
        if W is not None:
            x = x @ W.double().T + b.double()
        if kind == "mse":
            per = ((x - y) ** 2).mean(-1)
        else:
            per = 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        total += ((per * m).sum(1) / m.sum(1)).sum()
    return total


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("proj", [False, True])
def test_hidden_loss_matches_float64(kind, proj):
    B, S, Hs, Ht, L = 5, 7, 6 if proj else 8, 8, 3
    batch, g = _batch(B, S, _seed())
    hs = [torch.randn(B, S, Hs, generator=g) for _ in range(L + 1)]
    ht = [torch.randn(B, S, Ht, generator=g) for _ in range(L + 1)]
    pairs = [(0, 0), (1, 2), (3, 3)]
    term = distill.HiddenLoss(pairs, Hs, Ht, kind, proj, weight=0.7)
    loss, parts = term(distill.Outputs(None, hs), distill.Outputs(None, ht), batch)
    ref = 0.7 * _hidden_ref(hs, ht, batch["attention_mask"], pairs,
                            term.proj.weight if proj else None, term.proj.bias if proj else None,
                            kind)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert parts["hidden_loss"].item() == loss.item()
    # padding does not count: changing padded positions leaves the loss unchanged
    for h in hs:
        h[~batch["attention_mask"]] = 1e3
    assert term(distill.Outputs(None, hs), distill.Outputs(None, ht), batch)[0].item() == \
        pytest.approx(loss.item(), rel=1e-6)


def test_hidden_loss_needs_a_projection_for_other_widths():
    with pytest.raises(ValueError, match="--hidden-proj"):
        distill.HiddenLoss([(0, 0)], 6, 8)


def _probs(g, B, H, S, mask):
    scores = torch.randn(B, H, S, S, generator=g) * 3
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def test_attention_kl_matches_float64():
    B, H, S, L = 4, 3, 9, 2
    batch, g = _batch(B, S, _seed())
    mask = batch["attention_mask"]
    ps = [_probs(g, B, H, S, mask) for _ in range(L)]
    pt = [_probs(g, B, H, S, mask) for _ in range(L)]
    pairs = [(0, 0), (1, 2), (2, 1)]  # (0, 0): embeddings, no attention: skipped
    loss, _ = distill.AttentionKL(pairs, weight=2.0)(distill.Outputs(None, None, ps),
                                                     distill.Outputs(None, None, pt), batch)
    ref = torch.zeros((), dtype=torch.float64)
    m = mask.double()
    for si, ti in [(1, 2), (2, 1)]:
        p, q = pt[ti - 1].double(), ps[si - 1].double()
        kl = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1).mean(1)
        ref += ((kl * m).sum(1) / m.sum(1)).sum()
    ref *= 2.0
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item() + 1e-7
    same, _ = distill.AttentionKL([(1, 1), (2, 2)])(distill.Outputs(None, None, pt),
                                         distill.Outputs(None, None, pt), batch)
    assert abs(same.item()) < 1e-6  # KL(p || p) = 0
    with pytest.raises(ValueError, match="no encoder layers"):
        distill.AttentionKL([(0, 0)])


def test_logits_kd_with_transfer_rows_matches_float64():
    g = torch.Generator().manual_seed(_seed())
    s, t = torch.randn(6, 3, generator=g) * 2, torch.randn(6, 3, generator=g) * 2
    y = torch.tensor([0, 2, distill.IGNORE, 1, distill.IGNORE, 0])
    T, alpha = 2.0, 0.3
    loss, parts = distill.LogitsKD(T, alpha, False)(distill.Outputs(s), distill.Outputs(t),
                                                   dict(labels=y))
    sd, td = s.double(), t.double()
    kl = (F.softmax(td / T, -1) * (F.log_softmax(td / T, -1) - F.log_softmax(sd / T, -1))).sum(-1)
    lab = y != distill.IGNORE
    ce = F.cross_entropy(sd[lab], y[lab], reduction="sum")
    ref = alpha * T * T * kl.sum() + (1 - alpha) * ce
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert abs(parts["hard_loss"].item() - ce.item()) <= 1e-5 * ce.item()
    # regression: NaN labels are transfer-set rows
    yr = torch.tensor([0.5, float("nan"), 1.0])
    sr, tr = torch.randn(3, 1, generator=g), torch.randn(3, 1, generator=g)
    loss, _ = distill.LogitsKD(T, alpha, True)(distill.Outputs(sr), distill.Outputs(tr),
                                              dict(labels=yr))
    ref = alpha * ((sr - tr) ** 2).sum() + (1 - alpha) * ((sr[[0, 2], 0] - yr[[0, 2]]) ** 2).sum()
    assert math.isfinite(loss.item()) and abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


@pytest.mark.parametrize("spec, want", [
    ("uniform", [(0, 0), (1, 3), (2, 6)]), ("last", [(2, 6)]), ("0:0,2:5", [(0, 0), (2, 5)])])
def test_layer_map(spec, want):
    assert distill.layer_map(spec, 2, 6) == want


@pytest.mark.parametrize("spec, match", [("0:7", "out of range"), ("3:1", "out of range"),
                                         ("1:1,1:2", "mapped twice"), ("a:b", "integer"),
                                         ("1-2", "integer")])
def test_layer_map_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        distill.layer_map(spec, 2, 6)


def test_gradient_flow_teacher_none_projection_some():
    tc = ModelConfig.preset("tiny", vocab_size=50, num_layers=4, hidden_size=32, num_heads=2,
                            hidden_dropout=0.0, attention_dropout=0.0)
    sc = ModelConfig.preset("tiny", vocab_size=50, num_layers=2, hidden_size=16, num_heads=2,
                            ffn_size=32, hidden_dropout=0.0, attention_dropout=0.0)
    teacher, student = build_model(tc), build_model(sc)
    pairs = distill.layer_map("uniform", 2, 4)
    d = distill.Distiller(teacher, [distill.LogitsKD(1.0, 0.5, False),
                                    distill.HiddenLoss(pairs, 16, 32, "mse", proj=True),
                                    distill.AttentionKL(pairs)])
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                 labels=torch.tensor([0, 1, 1]))
    out = student(ids, mask, batch["token_type_ids"], hidden_states=True, attentions=True)
    loss, parts = d(out, batch, [0, 1, 2])
    assert set(parts) == {"hard_loss", "kd_loss", "hidden_loss", "attention_loss"}
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    proj = d.terms[1].proj
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert [n for n, _ in d.named_parameters()] == ["terms.1.proj.weight", "terms.1.proj.bias"]
    assert all(p.grad is not None for p in student.parameters())


# ------------------------------------------------------------------------- transfer set


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(data.texts(data.load_split("synthetic", "train")[:2000]), 500)


def test_augment_is_deterministic_and_keeps_special_tokens(tok):
    ex = data.load_split("synthetic", "train")[:50]
    a = augment.augment(tok, ex, 3, seed=7)
    assert a == augment.augment(tok, ex, 3, seed=7) and a != augment.augment(tok, ex, 3, seed=8)
    assert len(a) == 150 and all(y == -100 for _, _, y in a)
    cls, sep, mask = (tok.token_to_id(t) for t in (data.CLS, data.SEP, data.MASK))
    for ids, types, _ in a:
        assert ids[0] == cls and ids[-1] == sep and ids.count(sep) == 1
        assert cls not in ids[1:] and len(types) == len(ids)


def test_augment_rates_within_5_sigma(tok):
    """Word-level rates on >= 10k words with n-gram sampling off: mask 0.1, replace 0.1."""
    ex = data.load_split("synthetic", "train")[:1500]
    orig = augment.augment(tok, ex, 1, seed=0, p_mask=0, p_replace=0, p_ngram=0)
    aug = augment.augment(tok, ex, 1, seed=0, p_ngram=0)
    mask_id = tok.token_to_id(data.MASK)
    masked = changed = words = 0
    for (o, _, _), (a, _, _) in zip(orig, aug):
        enc_o = augment._words(_enc(tok, o))[0]
        enc_a = augment._words(_enc(tok, a))[0]
        assert len(enc_o) == len(enc_a)
        for wo, wa in zip(enc_o, enc_a):
            words += 1
            masked += wa == [mask_id]
            changed += wa != wo and wa != [mask_id]
    assert words >= 10000
    sd = math.sqrt(0.1 * 0.9 / words)
    assert abs(masked / words - 0.1) < 5 * sd
    # a replacement may draw the same word: the observed change rate is at most 0.1
    assert changed / words < 0.1 + 5 * sd and changed / words > 0.05


def _enc(tok, ids):
    """Re-encode ids (space-joined tokens) to recover word boundaries."""
    class E:  # minimal Encoding: one word per non-## token run
        pass
    e = E()
    toks = [tok.id_to_token(i) for i in ids]
    wid, w, seq = [], -1, []
    for t in toks:
        if t in (data.CLS, data.SEP):
            wid.append(None)
            seq.append(None)
            continue
        if not t.startswith("##"):
            w += 1
        wid.append(w)
        seq.append(0)
    e.ids, e.word_ids, e.sequence_ids = ids, wid, seq
    return e


def test_augment_ngram_and_pairs(tok):
    ex = [data.Example("the movie was not good at all", "but the actors were fine", 1)] * 40
    a = augment.augment(tok, ex, 1, seed=1, p_mask=0, p_replace=0, p_ngram=1.0)
    sep = tok.token_to_id(data.SEP)
    for ids, types, _ in a:
        assert ids.count(sep) == 2  # both sentences kept their [SEP]
        first, second = ids[1:ids.index(sep)], ids[ids.index(sep) + 1:-1]
        for seg, text in ((first, ex[0].text_a), (second, ex[0].text_b)):  # an n-gram of each
            words = tok.decode(seg).split()
            assert 1 <= len(words) <= 5 and " ".join(words) in text
        assert types[:ids.index(sep) + 1] == [0] * (ids.index(sep) + 1)
        assert set(types[ids.index(sep) + 1:]) == {1}
    b = augment.augment(tok, ex, 1, seed=1, p_mask=1.0, p_ngram=0)
    m = tok.token_to_id(data.MASK)
    for ids, _, _ in b:  # every word of both sentences masked, specials kept
        assert ids[1:-1].count(m) == 7 + 5 and ids.count(sep) == 2


# -------------------------------------------------------------------------- the trainer


def test_layerwise_distillation_logs_terms_and_resumes_exactly(tmp_path, vocab,
                                                               reference_backend):
    t = tmp_path / "t"
    assert train.main(["--mode", "teacher", "--max-steps", "2", "--set", "num_layers=4"]
                      + tiny_args(vocab, t)) == 0
    common = ["--mode", "distill", "--teacher", str(t / "checkpoint.pt"), "--max-steps", "6",
              "--hidden-loss", "mse", "--hidden-proj", "--attention-loss", "--augment", "1",
              "--set", "hidden_size=16", "--set", "ffn_size=32"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(common + tiny_args(vocab, a)) == 0
    steps = [r for r in read_log(a) if r["type"] == "step"]
    for r in steps:
        assert r["hidden_loss"] > 0 and r["attention_loss"] >= 0 and r["kd_loss"] > 0
    assert train.main(common + ["--stop-at-step", "3"] + tiny_args(vocab, b)) == 0
    assert train.main(common + ["--resume"] + tiny_args(vocab, b)) == 0
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [r["loss"] for r in read_log(a) if r["type"] == "step"]
    lb = [r["loss"] for r in read_log(b) if r["type"] == "step"]
    assert la == lb
    from tkd_core.checkpoint import load_checkpoint
    ck = load_checkpoint(str(b / "checkpoint.pt"))
    assert set(ck["objective"]) == {"terms.1.proj.weight", "terms.1.proj.bias"}
    assert not any(k.startswith("terms") for k in wb)  # the projection is not the model's


def test_layerwise_flags_need_a_teacher(tmp_path, capsys):
    assert train.main(["--mode", "student", "--hidden-loss", "mse", "--out",
                       str(tmp_path / "x")]) == 1
    assert "need a teacher" in capsys.readouterr().err


def test_augment_with_roberta_special_tokens():
    """A byte-level BPE tokenizer with RoBERTa's <s> </s> <mask>: the same transfer set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    ex = data.load_split("synthetic", "train")[:200]
    t.train_from_iterator([e.text_a for e in ex], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False))
    t.post_processor = processors.RobertaProcessing(("</s>", t.token_to_id("</s>")),
                                                    ("<s>", t.token_to_id("<s>")))
    a = augment.augment(t, ex[:30], 2, seed=0, p_mask=0.5, p_ngram=0)
    s, e, m = (t.token_to_id(x) for x in ("<s>", "</s>", "<mask>"))
    assert all(ids[0] == s and ids[-1] == e for ids, _, _ in a)
    assert sum(ids.count(m) for ids, _, _ in a) > 0


class _CountingTeacher(torch.nn.Module):
    """A 2-label 'teacher' whose logits are a fixed function of the ids; counts its forwards."""

    def __init__(self, delay=0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, generator=torch.Generator().manual_seed(_seed())))
        self.calls, self.delay = 0, delay

    def forward(self, ids, mask, types):
        import time
        self.calls += 1
        time.sleep(self.delay)  # long enough for the other caller to reach the lock
        return (ids * mask).sum(1, keepdim=True).float() * self.w


def _items(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [([2] + torch.randint(5, 50, (int(torch.randint(1, 9, (1,), generator=g)),),
                                 generator=g).tolist() + [3], [0] * 12, 0) for _ in range(n)]


def test_teacher_logits_pass_is_timed_and_computed_once_by_concurrent_jobs(tmp_path):
    """all_teacher_logits records the pass's seconds in the file; a second caller arriving while
    the first computes waits on the lock and reads its file instead of computing it again."""
    import threading
    items = _items(37, _seed())
    items = [(ids, [0] * len(ids), y) for ids, _, y in items]
    path = str(tmp_path / "logits.pt")
    a, b = _CountingTeacher(delay=0.05), _CountingTeacher(delay=0.05)
    b.load_state_dict(a.state_dict())  # the same weights: the same fingerprint
    out = {}
    ts = [threading.Thread(target=lambda t=t, k=k: out.__setitem__(
        k, distill.all_teacher_logits(t, items, path, "cpu", batch_size=8))) for k, t in
        (("a", a), ("b", b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted([a.calls, b.calls]) == [0, 5]  # one pass of ceil(37 / 8) batches, not two
    torch.testing.assert_close(out["a"], out["b"], rtol=0, atol=0)
    want = torch.tensor([sum(ids) for ids, _, _ in items], dtype=torch.float32)[:, None] * a.w
    torch.testing.assert_close(out["a"], want.detach(), rtol=1e-6, atol=1e-6)
    s = distill.logits_pass_seconds(path)
    assert s is not None and s >= 5 * 0.05
    assert distill.logits_pass_seconds(str(tmp_path / "absent.pt")) is None
