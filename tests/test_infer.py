"""tkd_core.infer.InferenceModel (the lean CPU inference path) against the model it was built
from, for every architecture variant the model has; torch.compile of the model, of a quantized
model and of the lean path against eager (the issue's "compiled vs eager logits within 1e-5"),
with a padding mask that includes a fully padded sequence."""
import copy

import pytest
import torch

from helpers import assert_close, sqnr_db

import tkd_core
from tkd_core import int8_gemm as G
from tkd_core.infer import FloatLinear, InferenceModel
from tkd_core.model import ModelConfig, build_model
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_fp32_equals_the_model(variant):
    model = model_of(**VARIANTS[variant])
    lean = InferenceModel(model)
    for args in (batch(), batch()[:2], batch()[:1]):  # with types, mask only, neither
        assert_close(lean(*args), model(*args), 1e-5, variant)


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
