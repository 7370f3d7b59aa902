"""Non-Transformer students (tkd_core.models.baselines): registry, padding invariance, gradients,
bad inputs, old checkpoints' configs, and that each one learns a small task."""
import pytest
import torch

from helpers import assert_close
from tkd_core.measure import param_count
from tkd_core.models import ARCHS, PRESETS, ModelConfig, baselines, build_model

ARCH_NAMES = ("bilstm", "rnn", "lstm", "cnn")
V = 50


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch, **over):
    cfg = ModelConfig.preset(f"tiny-{arch}", vocab_size=V, num_labels=over.pop("num_labels", 2),
                             **over)
    return build_model(cfg)


def padded_batch(seqs, extra=0):
    """(input_ids, attention_mask) right-padded to the longest + `extra` columns."""
    S = max(len(s) for s in seqs) + extra
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return ids, mask


def test_registered_with_presets():
    for arch in ARCH_NAMES:
        assert ARCHS[arch] is baselines.BASELINES[arch]
        cfg = ModelConfig.preset(f"cpu-{arch}", vocab_size=8000, num_labels=2)
        assert cfg.arch == arch
        m = build_model(cfg)
        assert isinstance(m, baselines.SequenceClassifier)
        assert param_count(m) > 8000 * cfg.hidden_size  # embeddings plus the reader
    assert "cpu-bilstm" in PRESETS


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_shape_and_padding_invariance(arch, num_labels):
    """Every row's logits equal those of the row alone without padding (lengths 1, 2, 7, 4)."""
    m = tiny(arch, num_labels=num_labels).eval()
    seqs = [torch.randint(1, V, (n,)).tolist() for n in (1, 2, 7, 4)]
    ids, mask = padded_batch(seqs, extra=3)
    types = torch.zeros_like(ids)
    with torch.no_grad():
        out = m(ids, mask, types)
        assert out.shape == (4, num_labels) and out.dtype == torch.float32
        for i, s in enumerate(seqs):
            alone = m(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool), None)
            # floor: a 1-label logit of an untrained model can cancel to ~1e-5 (failed once at
            # rel 1.02e-5 on a 7.4e-5 logit: an absolute error of 8e-10)
            assert_close(out[i:i + 1], alone, 1e-5, f"{arch} row {i} (length {len(s)})",
                         floor=1e-3)
        # garbage token ids under the padding must not leak in either
        ids2 = ids.masked_fill(~mask, 7)
        assert_close(m(ids2, mask, types), out, 1e-5, f"{arch} non-zero padding ids", floor=1e-3)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_reads_order(arch):
    """Sequence readers, not bags of words: reversing a sentence changes its logits."""
    m = tiny(arch).eval()
    s = torch.randint(1, V, (1, 9))
    with torch.no_grad():
        a, b = m(s, None, None), m(s.flip(1), None, None)
    assert (a - b).abs().max().item() > 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_gradients_reach_every_parameter(arch):
    m = tiny(arch).train()
    ids, mask = padded_batch([torch.randint(1, V, (n,)).tolist() for n in (3, 8, 5)])
    out = m(ids, mask, torch.zeros_like(ids))
    (out * torch.randn_like(out)).sum().backward()  # a grad_output other than ones
    for name, p in m.named_parameters():
        if name == "token_type.weight":  # only type 0 occurs: row 1 gets no gradient
            assert p.grad is not None and p.grad[0].abs().sum() > 0
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{arch}: no gradient reaches {name}"
    assert m.word.weight.grad[0].abs().sum() == 0  # [PAD] never contributes


def test_bad_inputs_name_the_argument():
    m = tiny("lstm")
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randint(1, V, (5,)))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.rand(2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randint(1, V, (2, 5)), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_type_ids"):
        m(torch.randint(1, V, (2, 5)), None, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="num_layers"):
        tiny("cnn", num_layers=2)
    with pytest.raises(ValueError, match="unknown arch"):
        build_model(ModelConfig(arch="gru"))


# ModelConfig.to_dict() of a bilstm / cnn checkpoint written before rnn_size / cnn_maps existed
# (their widths were in ffn_size, num_heads was 1)
OLD_KEYS = dict(vocab_size=V, hidden_size=16, num_layers=1, num_heads=1, max_positions=128,
                type_vocab_size=2, hidden_dropout=0.1, attention_dropout=0.1, layer_norm_eps=1e-12,
                pre_ln=False, num_labels=2, initializer_range=0.02, pooling="cls",
                positions="learned")


@pytest.mark.parametrize("arch,field", [("bilstm", "rnn_size"), ("rnn", "rnn_size"),
                                        ("lstm", "rnn_size"), ("cnn", "cnn_maps")])
def test_old_checkpoint_configs_load(arch, field):
    """An old config dict (width in ffn_size) maps to the baseline's own field, and the old
    checkpoint's tensors load into the model it builds; a new dict is taken as written."""
    width = 12  # neither field's default
    old = dict(OLD_KEYS, arch=arch, ffn_size=width)
    cfg = ModelConfig.from_dict(old)
    assert getattr(cfg, field) == width
    old_model = build_model(ModelConfig.from_dict(dict(old, **{field: width})))
    model = build_model(cfg)
    model.load_state_dict(old_model.state_dict())  # strict: same keys and shapes
    ids = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), old_model.eval()(ids))
    new = ModelConfig.from_dict(dict(cfg.to_dict(), ffn_size=99))
    assert getattr(new, field) == width  # today's dicts carry the field: ffn_size is not read
    # the Transformer's own ffn_size is never remapped
    assert ModelConfig.from_dict(dict(OLD_KEYS, arch="transformer", ffn_size=width,
                                      num_heads=2)).rnn_size == ModelConfig().rnn_size


def test_all_padding_row_is_read_as_one_token():
    """A row whose mask is all False (empty sentence) still gives finite logits."""
    m = tiny("bilstm").eval()
    ids, mask = padded_batch([[3, 4, 5], [0]])
    mask[1] = False
    assert torch.isfinite(m(ids, mask, None)).all()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_learns_an_order_task(arch):
    """Label = whether token 3 comes before token 4 (both present, among random fillers): a
    bag-of-words model stays at chance; each reader must exceed 90% on fresh data."""
    torch.manual_seed(0)

    def make(n):
        ids = torch.randint(5, V, (n, 8))
        a, b = torch.rand(n, 8).argsort(1)[:, :2].unbind(1)  # two distinct positions
        ids[torch.arange(n), a], ids[torch.arange(n), b] = 3, 4
        return ids, (a < b).long()

    m = tiny(arch, hidden_dropout=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    for _ in range(150):
        x, y = make(64)
        loss = torch.nn.functional.cross_entropy(m(x, None, None), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = make(512)
    with torch.no_grad():
        acc = (m.eval()(x, None, None).argmax(-1) == y).float().mean().item()
    assert acc > 0.9, f"{arch}: accuracy {acc:.3f}"


def test_trainer_flag_accepts_each_arch():
    train = pytest.importorskip("tkd_core.train")
    for arch in ARCH_NAMES:
        args = train.parse_args(["--mode", "student", "--arch", arch, "--preset", f"cpu-{arch}"])
        assert args.arch == arch
