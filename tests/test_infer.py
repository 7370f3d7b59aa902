"""tkd_core.infer.InferenceModel (the lean CPU inference path) against the model it was built
from, for every architecture variant the model has; torch.compile of the model, of a quantized
model and of the lean path against eager (the issue's "compiled vs eager logits within 1e-5"),
with a padding mask that includes a fully padded sequence."""
import copy

import pytest
import torch

from helpers import assert_close, sqnr_db

import tkd_core
from tkd_core import int8 as G
from tkd_core.infer import FloatLinear, InferenceModel
from tkd_core.models import ModelConfig, build_model
from tkd_core.nn import Int8Linear

VOCAB = 97


def model_of(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, **{
        "num_layers": 3, "hidden_size": 64, "num_heads": 4, "ffn_size": 256, **overrides})
    m = build_model(cfg).eval()
    with torch.no_grad():  # weights away from the init's near-zero scale: real signal everywhere
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def batch(B=4, S=13, fully_padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, S * 2 // 3:] = False
    if B > 2:
        mask[2, 3:] = False
    if fully_padded:
        mask[-1] = False  # a sequence with no real token: zero attention rows, as the model
    types = torch.randint(0, 2, (B, S), generator=g)
    return ids, mask, types


VARIANTS = {
    "post-ln": {},
    "pre-ln": dict(pre_ln=True),
    "mean-pooling": dict(pooling="mean"),
    "sinusoidal": dict(positions="sinusoidal"),
    "no-token-types": dict(type_vocab_size=0),
    "gelu-tanh": dict(hidden_act="gelu_new"),
    "relu-ffn": dict(hidden_act="relu"),
    "relu-pooler": dict(pooler_activation="relu"),
    "roberta-positions": dict(position_offset=2, pad_token_id=1),
}


def left_padded():
    ids, mask, types = batch(fully_padded=False)
    mask[0, :2] = False  # a sequence whose first positions are padding
    return ids, mask, types


def paths(lean, monkeypatch):
    """Count the batches InferenceModel runs on packed tokens."""
    calls = []
    packed = lean.forward_packed
    monkeypatch.setattr(lean, "forward_packed", lambda *a: calls.append(1) or packed(*a))
    return calls


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_fp32_equals_the_model(variant, monkeypatch):
    model = model_of(**VARIANTS[variant])
    lean = InferenceModel(model)
    packed = paths(lean, monkeypatch)
    cases = {"padded, one sequence all padding": (batch(), False),  # the padded path
             "padded": (batch(fully_padded=False), True),            # real tokens only
             "mask only": (batch(fully_padded=False)[:2], True),
             "no mask, no types": (batch()[:1], True),
             "first positions padded": (left_padded(), VARIANTS[variant].get("pooling") == "mean")}
    for what, (args, expect_packed) in cases.items():
        n = len(packed)
        assert_close(lean(*args), model(*args), 1e-5, f"{variant}, {what}")
        assert len(packed) - n == expect_packed, f"{variant}, {what}: path"


@pytest.mark.parametrize("variant", ["post-ln", "pre-ln", "gelu-tanh", "relu-ffn"])
@torch.no_grad()
def test_int8_is_close_to_the_model(variant):
    model = model_of(**VARIANTS[variant])
    lean8 = InferenceModel(model, int8=True, min_weights=0)
    ids, mask, types = batch(fully_padded=False)
    ref = model(ids, mask, types)
    assert sqnr_db(lean8(ids, mask, types), ref) > 25
    assert isinstance(lean8.layers[0].up, Int8Linear) and lean8.layers[0].up.activation
    # the size rule decides by default: hidden 64 x FFN 256 converts, 64 x 64 stays float
    lean = InferenceModel(model, int8=True)
    assert isinstance(lean.layers[0].up, Int8Linear) and isinstance(lean.layers[0].out,
                                                                    FloatLinear)


@torch.no_grad()
def test_a_quantized_model_keeps_its_int8_layers():
    model = model_of()
    q = copy.deepcopy(model)
    tkd_core.quantize_model(q, skip=("pooler", "classifier"), min_weights=0)
    lean = InferenceModel(q)  # fp32 elsewhere, q's own Int8Linear layers (GELU applied after)
    assert lean.layers[0].qkv is q.layers[0].attn.qkv and lean.layers[1].up_act == "gelu"
    args = batch()
    assert_close(lean(*args), q(*args), 1e-5, "InferenceModel of a quantized model")


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu", "tanh"])
def test_float_linear(act):
    lin = torch.nn.Linear(257, 7)
    f = FloatLinear(lin, act)
    x = torch.randn(3, 5, 257)
    with torch.no_grad():
        y = lin(x).double()
        ref = torch.tanh(y) if act == "tanh" else G.activation_ref(y, G.activation_code(act))
        assert_close(f(x), ref, 1e-5, f"FloatLinear {act}")
        f.onednn = False  # the F.linear path (torch without oneDNN, and under torch.compile)
        assert_close(f(x), ref, 1e-5, f"FloatLinear {act} (F.linear)")
    with pytest.raises(ValueError, match="activation"):
        FloatLinear(lin, "swish")


def test_rejects_other_architectures_and_long_inputs():
    with pytest.raises(ValueError, match="transformer"):
        InferenceModel(build_model(ModelConfig.preset("tiny-lstm", vocab_size=VOCAB)))
    lean = InferenceModel(model_of())
    with pytest.raises(ValueError, match="max_positions"):
        lean(torch.randint(5, VOCAB, (1, 65)))


# ------------------------------------------------------------------------------ encoder ops

def attention_packed_ref(qkv, lens, H, D):
    """float64 softmax(Q K^T / sqrt(D)) V per sequence and head, packed (T, H * D)."""
    q64 = qkv.double().view(-1, 3, H, D)
    out, t0 = torch.zeros(q64.shape[0], H * D, dtype=torch.float64), 0
    for n in lens:
        q, k, v = (q64[t0:t0 + n, i].transpose(0, 1) for i in range(3))  # (H, n, D)
        p = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1)
        out[t0:t0 + n] = (p @ v).transpose(0, 1).reshape(n, H * D)
        t0 += n
    return out


@pytest.mark.parametrize("lens,H,D", [([64], 12, 32), ([1, 7, 257, 3], 2, 7), ([17, 0, 33], 3, 64),
                                      ([4099], 1, 7), ([5, 100], 1, 100), ([1], 1, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_attention_against_float64(lens, H, D, threads):
    """The extension's attention over packed sequences (lengths 0 and 1 included, D not a
    multiple of 16, a query count not a multiple of the 4-row step)."""
    from tkd_core.infer import _attention_packed
    torch.manual_seed(0)
    qkv = torch.randn(sum(lens), 3 * H * D) * 2
    offsets = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.long)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _attention_packed(qkv, offsets, H)
    finally:
        torch.set_num_threads(n)
    # fp32 accumulation over D products and n exponentials
    assert_close(out, attention_packed_ref(qkv, lens, H, D), 4e-6, f"attention {lens} H={H}")


@pytest.mark.parametrize("rows,N", [(1, 1), (7, 257), (257, 7), (3, 4099)])
def test_add_layer_norm_against_float64(rows, N):
    from tkd_core.infer import _add_ln
    torch.manual_seed(0)
    x, r = torch.randn(rows, N) * 3 + 5, torch.randn(rows, N)
    p = (torch.randn(N), torch.randn(N), 1e-5)
    h = x.double() + r.double()
    ref = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    ref = ref * p[0].double() + p[1].double()
    assert_close(_add_ln(x, r, p), ref, 1e-5, "add + LayerNorm")
    assert_close(_add_ln(x.clone(), None, p), torch.nn.functional.layer_norm(
        x.double(), (N,), p[0].double(), p[1].double(), 1e-5), 1e-5, "LayerNorm")
    y = x.clone()
    _add_ln(y, r, p, out=y)  # in place, as the packed forward uses it
    assert_close(y, ref, 1e-5, "in place")


# ------------------------------------------------------------------------------ torch.compile

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("what", ["model", "quantized", "lean", "lean-int8"])
@torch.no_grad()
def test_compiled_equals_eager(what, fresh_dynamo):
    """torch.compile(fullgraph=True) on CPU, a 6-layer model with a padding mask (a fully padded
    sequence included), our custom ops inside: the same logits as eager within 1e-5."""
    model = model_of(num_layers=6)
    if what == "quantized":
        tkd_core.quantize_model(model, min_weights=0)
    elif what == "lean":
        model = InferenceModel(model)
    elif what == "lean-int8":
        model = InferenceModel(model, int8=True, min_weights=0)
    compiled = torch.compile(model, fullgraph=True)
    for args in (batch(), batch(B=2, S=7, fully_padded=False)[:2]):
        assert_close(compiled(*args), model(*args), 1e-5, f"compiled {what}")
