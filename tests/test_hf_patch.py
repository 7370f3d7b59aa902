"""tkd_core.patch_hf on live transformers models: a patched model against an unpatched copy
(logits and every parameter's gradient; eval, and train mode without dropout; on the torch
reference path and on the Triton interpreter), what it replaces, unpatch / the context manager,
state_dict keys, dropout in training, a short training loop, and torch.compile(fullgraph=True)."""
import copy

import pytest
import torch

import tkd_core
from helpers import rel_err
from hf_models import tiny_hf
from test_model import spy_ops
from tkd_core import hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread", "reference_backend")  # unless a test says

TYPES = ("bert", "distilbert", "roberta")
TOL = 1e-5       # fp32 logits (measured: <= 1e-6)
GRAD_TOL = 1e-4  # fp32 gradients: one backward through 2 layers (measured: <= 5e-6)
# Three of four labels agree: a random model's probabilities sit near 1/2, so balanced labels
# made classifier.bias's gradient (the batch mean of p - y) cancel to ~1e-4 and its relative
# error measure rounding noise (5e-4 in one CI run); here it is ~0.25 per class.
LABELS = torch.tensor([0, 1, 1, 1])


def hf_pair(tmp_path, model_type, dropout=0.0, **kw):
    """(patched, unpatched copy) of one random model; `dropout` everywhere."""
    over = ({"dropout": dropout, "attention_dropout": dropout, "seq_classif_dropout": dropout}
            if model_type == "distilbert" else
            {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout})
    ref = tiny_hf(model_type, str(tmp_path), **over, **kw)
    ref.config._attn_implementation = "sdpa"  # transformers' default; its boolean 4-D mask
    model = copy.deepcopy(ref)
    return model, ref


def batch(vocab, pad_id, B=4, S=11):
    lengths = torch.tensor([S, 7, 3, 1])[:B]
    mask = torch.arange(S)[None, :] < lengths[:, None]
    ids = torch.randint(5, vocab, (B, S))
    ids[ids == pad_id] = 5
    return ids.masked_fill(~mask, pad_id), mask.long()


def run(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference_backend", "interpreter_backend"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("model_type", TYPES)
def test_patched_matches_unpatched(tmp_path, request, model_type, train, backend):
    """Padded batch (lengths 11, 7, 3, 1); train mode with dropout 0 runs the same math."""
    request.getfixturevalue(backend)  # after the module's reference_backend: this one holds
    assert tkd_core.ops.backend(torch.zeros(1)) == backend.split("_")[0]
    model, ref = hf_pair(tmp_path, model_type)
    report = tkd_core.patch_hf(model)
    assert len(report.attention) == 2
    assert len(report.add_layer_norm) == (2 if model_type == "distilbert" else 4)
    ids, mask = batch(ref.config.vocab_size, ref.config.pad_token_id)
    labels = LABELS
    model.train(train)
    ref.train(train)
    logits, grads = run(model, ids, mask, labels)
    ref_logits, ref_grads = run(ref, ids, mask, labels)
    assert rel_err(logits, ref_logits) <= TOL
    assert_grads_close(grads, ref_grads)


def assert_grads_close(grads, ref_grads):
    """Every parameter's gradient within GRAD_TOL; the key biases' exact gradient is zero
    (softmax ignores a shift shared by every key), so theirs are only checked to be rounding
    noise against the largest gradient."""
    scale = max(g.abs().max().item() for g in ref_grads.values() if g is not None)
    for name, g in ref_grads.items():
        if g is None or not g.abs().sum():  # e.g. position rows never used
            continue
        if name.endswith(("key.bias", "k_lin.bias")):
            assert grads[name].abs().max() <= GRAD_TOL * scale, name
            continue
        assert rel_err(grads[name], g) <= GRAD_TOL, name


def test_patch_replaces_our_ops_and_keeps_state(tmp_path, monkeypatch):
    """The patched forward calls ops.attention with a key-padding mask and ops.layer_norm with
    a residual; parameters and state_dict keys are unchanged; unpatch restores the classes'
    forwards; patching twice is harmless; the context manager unpatches."""
    model, ref = hf_pair(tmp_path, "bert")
    keys = list(model.state_dict())
    calls = spy_ops(monkeypatch)
    ids, mask = batch(model.config.vocab_size, 0)
    with hf.patched(model) as report:
        assert tkd_core.patch_hf(model).attention == report.attention  # twice: same modules
        assert "patch_hf: 2 self-attention modules" in str(report)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert (calls["attention"], calls["mask"], calls["layer_norm_residual"]) == (2, 2, 4)
        assert list(model.state_dict()) == keys
        assert all("forward" in model.get_submodule(n).__dict__ for n in report.attention)
    assert not any("forward" in m.__dict__ for m in model.modules())  # unpatched on exit
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls["attention"] == 2  # no more calls once unpatched
    assert unpatch_count(model) == 0


def unpatch_count(model):
    r = tkd_core.unpatch_hf(model)
    return len(r.attention) + len(r.add_layer_norm)


def test_output_attentions_and_eager_masks(tmp_path):
    """output_attentions=True returns reference probabilities equal to HF's; the additive
    (eager) 4-D mask is read as the same key-padding mask as the boolean (sdpa) one."""
    model, ref = hf_pair(tmp_path, "roberta")
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = ref.config._attn_implementation = impl
        tkd_core.patch_hf(model)
        ids, mask = batch(ref.config.vocab_size, ref.config.pad_token_id)
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            b = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert rel_err(a.logits, b.logits) <= TOL, impl
        for p, r in zip(a.attentions, b.attentions):
            assert p is not None and rel_err(p, r) <= TOL, impl


def test_dropout_is_applied_in_training(tmp_path):
    """With attention dropout, training-mode outputs vary between calls and differ from eval;
    eval outputs equal the unpatched model's."""
    model, ref = hf_pair(tmp_path, "bert", dropout=0.3)
    tkd_core.patch_hf(model)
    ids, mask = batch(model.config.vocab_size, 0)
    with torch.no_grad():
        model.train()
        a, b = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
        model.eval()
        e = model(input_ids=ids, attention_mask=mask).logits
        assert rel_err(e, ref.eval()(input_ids=ids, attention_mask=mask).logits) <= TOL
    assert rel_err(a, b) > 1e-3 and rel_err(a, e) > 1e-3


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no BERT-family self-attention found in Linear"):
        tkd_core.patch_hf(torch.nn.Linear(2, 2))
    model, _ = hf_pair(tmp_path, "bert")
    model.config.is_decoder = True
    with pytest.raises(ValueError, match="decoder"):
        tkd_core.patch_hf(model)


STEPS = 80


def test_training_loop_on_a_patched_model(tmp_path):
    """A plain HF-style loop (AdamW, labels -> out.loss) on a patched model follows the unpatched
    one step for step (dropout 0) and learns a toy task: label = whether token 7 occurs."""
    model, ref = hf_pair(tmp_path, "distilbert")
    tkd_core.patch_hf(model)
    g = torch.Generator().manual_seed(0)
    losses = {}
    for name, m in (("patched", model), ("reference", ref)):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        g.manual_seed(0)
        losses[name] = []
        for _ in range(STEPS):
            ids = torch.randint(8, m.config.vocab_size, (16, 8), generator=g)
            y = (torch.rand(16, generator=g) < 0.5).long()
            ids[y == 1, torch.randint(0, 8, (1,), generator=g)] = 7
            loss = m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    p, r = torch.tensor(losses["patched"]), torch.tensor(losses["reference"])
    assert rel_err(p, r) <= 1e-3  # the AdamW steps amplify fp32 rounding
    assert p[-10:].mean() < 0.7 * p[:10].mean()  # it learns (from scrambled weights: slowly)


@pytest.mark.parametrize("backend", ["reference_backend", "interpreter_backend"])
def test_torch_compile_fullgraph(tmp_path, request, backend):
    """A patched model traces whole under torch.compile(fullgraph=True), on both CPU paths (the
    interpreter's ops are torch.library custom ops with fake implementations). Forward equals
    eager; the compiled backward's gradients too."""
    request.getfixturevalue(backend)
    assert tkd_core.ops.backend(torch.zeros(1)) == backend.split("_")[0]
    model, ref = hf_pair(tmp_path, "bert")
    tkd_core.patch_hf(model)
    ids, mask = batch(model.config.vocab_size, 0)
    labels = LABELS
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    ref_logits, ref_grads = run(ref, ids, mask, labels)
    assert rel_err(out.logits, ref_logits) <= TOL
    out.loss.backward()  # (attention_bwd's fake once kept q's permuted strides: it failed)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref_grads)
