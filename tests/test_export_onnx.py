"""tkd_core.export_onnx against ONNX Runtime: the fp32 graph gives the eager model's logits at
batch and sequence lengths other than the traced ones (padding included), the INT8 graph runs
and is smaller, and bad input is refused before any work. Skips without onnx / onnxscript /
onnxruntime (optional: none is a dependency of tkd)."""
import os

import pytest
import torch

import tkd_core
from tkd_core.models import ModelConfig, build_model

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional)")
pytest.importorskip("onnxscript", reason="onnxscript not installed (optional)")


def tiny(arch_preset="tiny", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig.preset(arch_preset, vocab_size=97, num_labels=3, **kw))


def feed_for(cfg, B, S, pad_from=None):
    ids = torch.randint(1, cfg.vocab_size, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    if pad_from is not None:  # the last row padded from pad_from on
        mask[-1, pad_from:] = 0
        ids[-1, pad_from:] = cfg.pad_token_id
    types = torch.randint(0, cfg.type_vocab_size, (B, S))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def ort_logits(path, feed):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return torch.from_numpy(s.run(None, {n: feed[n].numpy() for n in names})[0]), names


@pytest.mark.parametrize("types", [2, 1])
def test_fp32_graph_matches_eager(tmp_path, types):
    # a token_type_ids input only when the model has more than one token type
    model = tiny(type_vocab_size=types)
    model.train()  # export traces an eval copy and leaves the model as it was
    path = tkd_core.export_onnx(model, str(tmp_path / "sub" / "m.onnx"))
    assert model.training and os.path.isfile(path)
    assert sorted(os.listdir(tmp_path / "sub")) == ["m.onnx"]  # no temporary left behind
    model.eval()
    cfg = model.config
    for B, S, pad in [(1, 1, None), (3, 7, 3), (5, 64, 40), (2, 33, None)]:
        feed = feed_for(cfg, B, S, pad)
        got, names = ort_logits(path, feed)
        with torch.no_grad():
            want = model(**{n: feed[n] for n in names}).double()
        assert names == ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if cfg.type_vocab_size > 1 else [])
        assert got.shape == (B, 3)
        err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-3)
        assert err < 1e-4, f"types={types} B={B} S={S}: relative error {err:.2e}"


def test_int8_graph_runs_and_is_smaller(tmp_path):
    model = tiny(hidden_size=128, ffn_size=512, num_heads=4).eval()
    f32 = tkd_core.export_onnx(model, str(tmp_path / "f32.onnx"))
    i8 = tkd_core.export_onnx(model, str(tmp_path / "i8.onnx"), int8=True)
    assert os.path.getsize(i8) < 0.5 * os.path.getsize(f32)
    feed = feed_for(model.config, 4, 20, 9)
    got, names = ort_logits(i8, feed)
    with torch.no_grad():
        want = model(**{n: feed[n] for n in names})
    assert got.shape == want.shape and torch.isfinite(got).all()
    # dynamic per-token INT8 of a random model: close, not equal
    assert (got - want).abs().max() < 0.5 * want.abs().max() + 1e-3


def test_bad_input_is_refused(tmp_path, monkeypatch):
    model = tiny().eval()
    with pytest.raises(TypeError, match="model must be a tkd model"):
        tkd_core.export_onnx(torch.nn.Linear(2, 2), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="takes Transformer models .* got arch 'bilstm'"):
        tkd_core.export_onnx(tiny("tiny-bilstm"), str(tmp_path / "b.onnx"))
    with pytest.raises(TypeError, match="path must be a file path"):
        tkd_core.export_onnx(model, 3)
    q = tiny(hidden_size=128, ffn_size=512, num_heads=4).eval()
    tkd_core.quantize_model(q)
    with pytest.raises(ValueError, match="no ONNX form: export the fp32 model"):
        tkd_core.export_onnx(q, str(tmp_path / "q.onnx"))
    # a missing optional package: one line naming it, before any file is written
    import builtins
    real_import = builtins.__import__

    def no_onnxscript(name, *a, **k):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(ImportError, match="needs onnxscript: pip install onnxscript"):
        tkd_core.export_onnx(model, str(tmp_path / "y.onnx"))
    monkeypatch.undo()
    assert not os.listdir(tmp_path)


def test_failed_export_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def boom(*a, **k):
        raise RuntimeError("exporter failed")
    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(RuntimeError, match="exporter failed"):
        tkd_core.export_onnx(tiny(), str(path))
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]
