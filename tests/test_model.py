"""The BERT-style model (tkd_core.models): presets, shapes, our ops on the hot path, the padding
mask, per-layer outputs and attention probabilities against a float64 reference, checkpoints'
keys, INT8 conversion. Runs on the reference path (fast CPU); the convergence test in
test_train.py covers the Triton kernels in the interpreter."""
import math

import pytest
import torch

import tkd_core
from helpers import rel_err
from tkd_core import models as M
from tkd_core.checkpoint import clean_state_dict
from tkd_core.measure import param_count, size_bytes


@pytest.fixture(autouse=True)
def _one_thread(reference_backend):
    # tiny matmuls: one thread is faster, and immune to other processes' OpenMP contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    return M.ModelConfig.preset("tiny", vocab_size=50, **kw)


def batch(B=3, S=9, vocab=50, pad_from=(9, 5, 2)):
    ids = torch.randint(5, vocab, (B, S))
    mask = torch.arange(S)[None, :] < torch.tensor(pad_from)[:, None]  # (B, S)
    types = (torch.arange(S)[None, :] >= 3).long().expand(B, S) * mask
    return ids.masked_fill(~mask, 0), mask, types


def test_presets(monkeypatch):
    base = M.ModelConfig.preset("bert-base")
    assert (base.num_layers, base.hidden_size, base.num_heads, base.ffn_size) == (12, 768, 12,
                                                                                 3072)
    assert not base.pre_ln and base.type_vocab_size == 2
    monkeypatch.setattr(M.TransformerClassifier, "_init", lambda self, m: None)
    with torch.device("meta"):  # shapes only: no memory, no init
        bert = M.build_model(base)
    # BERT-base (uncased): 109,482,240 parameters incl. the pooler, + a 2-way classifier
    assert param_count(bert) == 109_482_240 + 768 * 2 + 2
    teacher = M.ModelConfig.preset("cpu-teacher")
    assert teacher.num_layers == 12
    assert {M.ModelConfig.preset(s).num_layers for s in ("cpu-student-2", "cpu-student-4")} == {
        2, 4}
    with pytest.raises(ValueError, match="unknown model preset 'huge'; valid:"):
        M.ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        M.ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown model config keys"):
        M.ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="unknown arch 'gru'"):
        M.build_model(tiny(arch="gru"))


@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_forward_backward_shapes(pre_ln, num_labels):
    model = M.build_model(tiny(pre_ln=pre_ln, num_labels=num_labels))
    ids, mask, types = batch()
    logits = model(ids, mask, types)
    assert logits.shape == (3, num_labels) and logits.dtype == torch.float32
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # the [PAD] word embedding row and unused token types have zero but present gradients
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("pooling,positions", [("cls", "learned"), ("mean", "sinusoidal")])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_padding_mask_reaches_attention(pre_ln, pooling, positions):
    """Appending padding (with garbage token ids) must not change a sequence's logits (mean
    pooling: the padded positions are out of the mean too)."""
    model = M.build_model(tiny(pre_ln=pre_ln, initializer_range=0.5, pooling=pooling,
                               positions=positions)).eval()
    ids, mask, types = batch(B=2, S=6, pad_from=(6, 4))
    ref = model(ids, mask, types)
    ids2 = torch.cat([ids, torch.randint(5, 50, (2, 5))], 1)  # (B, 11): garbage after the end
    mask2 = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)
    types2 = torch.cat([types, torch.ones(2, 5, dtype=torch.long)], 1)
    out = model(ids2, mask2, types2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and without the mask the garbage does change them (the check above can fail)
    assert (model(ids2, None, types2) - ref).abs().max() > 1e-2


def spy_ops(monkeypatch) -> dict:
    """Count the calls of ops.attention (and those with a mask) and ops.layer_norm (and those
    with a residual) from now on; returns the live counts."""
    calls = {"attention": 0, "layer_norm": 0, "layer_norm_residual": 0, "mask": 0}
    attn, ln = tkd_core.ops.attention, tkd_core.ops.layer_norm

    def attention(q, k, v, key_padding_mask=None, **kw):
        calls["attention"] += 1
        calls["mask"] += key_padding_mask is not None
        return attn(q, k, v, key_padding_mask=key_padding_mask, **kw)

    def layer_norm(x, w, b, eps=1e-5, residual=None):
        calls["layer_norm"] += 1
        calls["layer_norm_residual"] += residual is not None
        return ln(x, w, b, eps, residual)
    monkeypatch.setattr(tkd_core.ops, "attention", attention)
    monkeypatch.setattr(tkd_core.ops, "layer_norm", layer_norm)
    return calls


@pytest.mark.parametrize("pre_ln", [False, True])
def test_runs_on_our_ops(monkeypatch, pre_ln):
    """Attention, add+LayerNorm (residual argument) go through tkd_core.ops."""
    calls = spy_ops(monkeypatch)
    cfg = tiny(pre_ln=pre_ln, num_layers=3)
    ids, mask, types = batch()
    M.build_model(cfg)(ids, mask, types)
    L = cfg.num_layers
    assert calls["attention"] == calls["mask"] == L
    # embeddings (position add fused) + 2 per layer (+ the final one with pre-LN)
    assert calls["layer_norm"] == 1 + 2 * L + pre_ln
    # post-LN: every LN fuses a residual add; pre-LN: all but layer 0's first LN
    assert calls["layer_norm_residual"] == (1 + 2 * L if not pre_ln else 2 * L + 1)


def test_mean_pooling_is_the_masked_mean():
    model = M.build_model(tiny(pooling="mean")).eval()
    ids, mask, types = batch(B=3, S=9, pad_from=(9, 5, 1))
    seen = {}
    model.pooler.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    model(ids, mask, types)
    for b, n in enumerate((9, 5, 1)):
        h = model.embeddings(ids[b:b + 1, :n], types[b:b + 1, :n])
        for layer in model.layers:
            h = layer(h, None, None)[0]
        torch.testing.assert_close(seen["x"][b], h[0].mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        M.ModelConfig(pooling="max")


def test_sinusoidal_positions():
    """Fixed sin/cos table at the learned tables' init scale; no parameters; order matters."""
    cfg = tiny(positions="sinusoidal")
    model = M.build_model(cfg).eval()
    t = model.embeddings.sinusoid.double() / (cfg.initializer_range * 2 ** 0.5)
    p, i = 5, 3  # position 5, pair i: sin / cos of 5 / 10000^(2i / hidden)
    w = 5 / 10000 ** (2 * i / cfg.hidden_size)
    torch.testing.assert_close(t[p, 2 * i], torch.tensor(w).sin().double())
    torch.testing.assert_close(t[p, 2 * i + 1], torch.tensor(w).cos().double())
    assert "embeddings.sinusoid" not in model.state_dict()
    ids = torch.randint(5, 50, (1, 6))
    assert not torch.allclose(model(ids), model(ids.flip(1)))
    with pytest.raises(ValueError, match="positions"):
        M.ModelConfig(positions="rotary")


def test_sequence_longer_than_positions_fails_clearly():
    model = M.build_model(tiny())
    ids = torch.ones(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_positions 64"):
        model(ids)


def test_state_dict_keys_are_clean_and_round_trip():
    model = M.build_model(tiny())
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    wrapped.update({"_orig_mod.module.x": torch.zeros(1)})
    clean = clean_state_dict(wrapped)
    assert "x" in clean and not any(k.startswith(("module.", "_orig_mod.")) for k in clean)
    clean.pop("x")
    twin = M.build_model(tiny())
    twin.load_state_dict(clean)
    ids, mask, types = batch()
    torch.testing.assert_close(twin.eval()(ids, mask, types), model.eval()(ids, mask, types))
    assert size_bytes(model) == 4 * sum(t.numel() for t in model.state_dict().values())


@torch.no_grad()
def test_int8_student():
    """Every encoder Linear becomes INT8 (width 256: each has >= 65,536 weights, where
    quantize_model's size rule lets INT8 pay); pooler and classifier stay float."""
    cfg = tiny(hidden_size=256, num_heads=4, ffn_size=512)
    model = M.build_model(cfg).eval()
    ids, mask, types = batch()
    ref = model(ids, mask, types)
    q, report = M.quantize(model)
    out = q(ids, mask, types)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert sum(isinstance(m, tkd_core.nn.Int8Linear) for m in q.modules()) == 4 * cfg.num_layers
    assert not isinstance(q.classifier, tkd_core.nn.Int8Linear)
    # INT8 weights: logits stay close to the float model's
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max() + 1e-2
    assert size_bytes(q) < size_bytes(M.build_model(cfg))


# ------------------------------------------------------------- per-layer outputs (ModelOutput)


def reference_forward(model, ids, mask, types):
    """The whole classifier in float64, written from the math (not from the module code): returns
    (logits, [embeddings, every layer's output], [every layer's attention probabilities])."""
    cfg, P = model.config, {k: v.double() for k, v in model.state_dict().items()}
    S, H = ids.shape[1], cfg.num_heads

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_eps) * P[name + ".weight"] + P[
            name + ".bias"]

    def lin(x, name):
        return x @ P[name + ".weight"].T + P[name + ".bias"]

    def attend(x, name):
        B = x.shape[0]
        q, k, v = lin(x, name + ".qkv").view(B, S, 3, H, -1).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = torch.softmax(s, -1)
        return lin((p @ v).transpose(1, 2).reshape(B, S, -1), name + ".out"), p

    def ffn(x, name):
        return lin(0.5 * (u := lin(x, name + ".up")) * (1 + torch.erf(u / math.sqrt(2))),
                   name + ".down")

    x = ln(P["embeddings.word.weight"][ids] + P["embeddings.token_type.weight"][types]
           + P["embeddings.position.weight"][:S], "embeddings.ln")
    states, probs = [x], []
    for i in range(cfg.num_layers):
        name = f"layers.{i}"
        if cfg.pre_ln:  # x + Attn(LN1(x)), then + FFN(LN2(.))
            a, p = attend(ln(x, name + ".ln1"), name + ".attn")
            x = x + a
            x = x + ffn(ln(x, name + ".ln2"), name + ".ffn")
        else:  # LN1(x + Attn(x)), then LN2(. + FFN(.))
            a, p = attend(x, name + ".attn")
            x = ln(x + a, name + ".ln1")
            x = ln(x + ffn(x, name + ".ffn"), name + ".ln2")
        states.append(x)
        probs.append(p)
    y = ln(x, "final_ln") if cfg.pre_ln else x
    logits = lin(torch.tanh(lin(y[:, 0], "pooler")), "classifier")
    return logits, states, probs


@pytest.mark.parametrize("pre_ln", [False, True])
def test_hidden_states_and_attentions_match_float64(pre_ln):
    """Every layer's output and attention probabilities, and the logits, against a float64
    computation from the math, on a padded batch (lengths 9, 5, 1). Tolerance: fp32 rounding
    through L layers of sums over at most ffn_size terms, 4 eps32 sqrt(ffn_size) per layer, at
    a weight scale (0.2) where the layers do not squash their inputs."""
    cfg = tiny(pre_ln=pre_ln, num_layers=3, initializer_range=0.2)
    model = M.build_model(cfg).eval()
    ids, mask, types = batch(B=3, S=9, pad_from=(9, 5, 1))
    out = model(ids, mask, types, hidden_states=True, attentions=True)
    ref_logits, ref_states, ref_probs = reference_forward(model, ids, mask, types)
    tol = cfg.num_layers * 4 * torch.finfo(torch.float32).eps * math.sqrt(cfg.ffn_size)
    assert isinstance(out, M.ModelOutput)
    assert len(out.hidden_states) == cfg.num_layers + 1 and len(out.attentions) == cfg.num_layers
    for i, (h, r) in enumerate(zip(out.hidden_states, ref_states)):
        assert h.shape == (3, 9, cfg.hidden_size)
        assert rel_err(h, r) <= tol, f"hidden_states[{i}]: {rel_err(h, r):.2e} > {tol:.1e}"
    for i, (p, r) in enumerate(zip(out.attentions, ref_probs)):
        assert p.shape == (3, cfg.num_heads, 9, 9)
        assert rel_err(p, r) <= tol, f"attentions[{i}]: {rel_err(p, r):.2e} > {tol:.1e}"
        assert (p.masked_select(~mask[:, None, None, :]) == 0).all()  # padded keys: exactly 0
        torch.testing.assert_close(p.sum(-1), torch.ones(3, cfg.num_heads, 9))
    assert rel_err(out.logits, ref_logits) <= tol
    last = ref_states[-1] if not pre_ln else out.last_hidden_state  # post-LN: the last state
    assert rel_err(out.last_hidden_state, last) <= tol
    # the layers differ from each other (a test that collected one tensor L times would pass
    # the shape checks above)
    assert min(rel_err(a, b) for a, b in zip(ref_states, ref_states[1:])) > 100 * tol


@pytest.mark.parametrize("pre_ln", [False, True])
def test_output_flags_leave_the_logits_alone(pre_ln):
    """forward(...) -> logits exactly as before; the flags return a ModelOutput whose logits are
    bit-identical, in eval and in training mode (same dropout draws: the probabilities' reference
    path draws no random numbers), and gradients flow from hidden states and probabilities."""
    model = M.build_model(tiny(pre_ln=pre_ln))
    ids, mask, types = batch()
    for train in (False, True):
        model.train(train)
        torch.manual_seed(3)
        plain = model(ids, mask, types)
        assert isinstance(plain, torch.Tensor) and plain.shape == (3, 2)
        for flags in ({"hidden_states": True}, {"attentions": True},
                      {"hidden_states": True, "attentions": True}):
            torch.manual_seed(3)
            out = model(ids, mask, types, **flags)
            assert torch.equal(out.logits, plain), (train, flags)
            assert (out.hidden_states is None) != flags.get("hidden_states", False)
            assert (out.attentions is None) != flags.get("attentions", False)
    out = model(ids, mask, types, hidden_states=True, attentions=True)
    (out.hidden_states[1].square().sum() + out.attentions[-1].square().sum()).backward()
    assert model.layers[0].ffn.up.weight.grad.abs().sum() > 0  # hidden_states[1] = layer 0 out
    assert model.layers[-1].attn.qkv.weight.grad.abs().sum() > 0  # from the probabilities
