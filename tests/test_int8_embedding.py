"""Int8Embedding: per-row int8 tables, exact to the stored int8, against float64."""
import pytest
import torch
from torch import nn

from tkd_core.int8 import Int8Embedding, quantize_embeddings


@pytest.mark.parametrize("V, D", [(1, 1), (7, 3), (257, 64), (4099, 7)])
def test_lookup_is_exact_to_the_stored_int8(V, D):
    emb = nn.Embedding(V, D, padding_idx=0 if V > 1 else None)
    with torch.no_grad():
        emb.weight.mul_(torch.rand(V, 1) * 10)  # rows of very different scales
        if V > 2:
            emb.weight[2] = 0.0  # a zero row
    q = Int8Embedding.from_float(emb)
    ids = torch.randint(0, V, (5, 11))
    with torch.no_grad():
        y = q(ids)
    w = q.weight.double()
    s = q.weight_scale.double()
    ref = w[ids] * s[ids, None]  # float64 dequantisation of the stored int8
    assert y.dtype == torch.float32 and torch.equal(y.double(), ref.float().double())
    # within half a step of the fp32 table, per row, plus float32 rounding of x / scale and of
    # q * scale (2 ulp of x: a fixed 1e-7 was below one ulp of entries near 8, CI seed
    # 922932063); the padding and zero rows stay zero
    x = emb.weight.detach()[ids]
    err = (y - x).abs()
    assert (err <= q.weight_scale[ids, None] / 2 + 2.0 ** -22 * x.abs()).all()
    assert q.weight.dtype == torch.int8 and int(q.weight.abs().max()) <= 127
    if V > 2:
        assert q.weight_scale[2] == 0 and (q(torch.tensor([2])) == 0).all()


def test_quantize_embeddings_in_place_and_size():
    from tkd_core.measure import size_bytes
    from tkd_core.models import ModelConfig, build_model
    m = build_model(ModelConfig.preset("tiny", vocab_size=3000)).eval()
    before = size_bytes(m)
    ids = torch.randint(5, 3000, (2, 9))
    with torch.no_grad():
        want = m(ids)
    done = quantize_embeddings(m)
    assert [n for n, _, _ in done] == ["embeddings.word", "embeddings.position",
                                       "embeddings.token_type"]
    with torch.no_grad():
        got = m(ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max() + 1e-3
    assert size_bytes(m) < 0.6 * before  # the 3000 x 32 table now 1 byte per entry


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Embedding"):
        Int8Embedding.from_float(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_norm"):
        Int8Embedding.from_float(nn.Embedding(3, 2, max_norm=1.0))
    e = nn.Embedding(3, 2)
    with torch.no_grad():
        e.weight[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        Int8Embedding.from_float(e)
    with pytest.raises(ValueError, match="ids must be"):
        Int8Embedding.from_float(nn.Embedding(3, 2))(torch.tensor([0.5]))
