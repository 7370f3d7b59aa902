"""Pretrained starts through the trainer (issue 10's flags): --init an HF folder, --teacher an HF
folder, --student-init from a teacher's layers, --export-hf; end to end on a tiny random BERT."""
import os

import pytest
import torch

from test_train import read_log, tiny_args  # noqa: F401
from tkd_core import data, train, warmstart
from tkd_core.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    """A bare random BertModel (4 layers, hidden 32) with a WordPiece vocabulary of the built-in
    task, saved as a HF folder."""
    d = str(tmp_path_factory.mktemp("bert"))
    tok = data.train_tokenizer(data.texts(data.load_split("synthetic", "train")[:2000]), 400)
    data.save_tokenizer(tok, d)
    os.remove(os.path.join(d, "tokenizer.json"))  # vocab.txt alone, as many BERT folders
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                  num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    return d


def _args(out):
    # tiny_args without its --preset tiny and --vocab: --init brings both
    a = tiny_args("unused", out)
    for flag in ("--preset", "--vocab"):
        i = a.index(flag)
        del a[i:i + 2]
    return a


def test_init_student_init_export_end_to_end(tmp_path, hf_bert, reference_backend, capsys):
    t, s = tmp_path / "teacher", tmp_path / "student"
    assert train.main(["--mode", "teacher", "--init", hf_bert, "--max-steps", "3",
                       "--export-hf", str(tmp_path / "teacher-hf")] + _args(t)) == 0
    assert "newly initialised head" in capsys.readouterr().err  # a bare encoder: a fresh head
    teacher, _ = load_model(str(t))
    assert teacher.config.num_layers == 4 and teacher.config.hidden_size == 32
    assert train.main(["--mode", "distill", "--teacher", str(tmp_path / "teacher-hf"),
                       "--student-init", "teacher:1,3", "--max-steps", "3",
                       "--hidden-loss", "mse", "--export-hf", str(tmp_path / "student-hf")]
                      + _args(s)) == 0
    student, ck = load_model(str(s))
    assert student.config.num_layers == 2 and student.config.hidden_size == 32
    assert ck["args"]["student_init"] == "teacher:1,3"
    # the exported student loads in transformers with no custom code and gives our logits
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "student-hf")).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "student-hf"))
    enc = hf_tok(["the movie was not good", "a film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = hf(**enc).logits
        got = student(enc["input_ids"], enc["attention_mask"].bool(),
                      enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_student_init_takes_the_listed_layers(hf_bert):
    from tkd_core.hf import load_pretrained
    teacher, _ = load_pretrained(hf_bert, num_labels=2)
    s = warmstart.student_from_teacher(teacher, "teacher:3,0", {"hidden_dropout": 0.0})
    ts, ss = teacher.state_dict(), s.state_dict()
    assert s.config.num_layers == 2 and s.config.hidden_dropout == 0.0
    for k, v in ss.items():
        src = k.replace("layers.0.", "layers.3.").replace("layers.1.", "layers.0.") \
            if k.startswith("layers.") else k
        assert torch.equal(v, ts[src]), k
    assert warmstart.parse_student_init("teacher", 6) == [0, 2, 4]
    for bad in ("teacher:6", "teacher:1,1", "teacher:x", "layers:1"):
        with pytest.raises(ValueError, match="--student-init"):
            warmstart.parse_student_init(bad, 6)
    with pytest.raises(ValueError, match="changes the shape"):
        warmstart.student_from_teacher(teacher, "teacher", {"hidden_size": 16,
                                                            "num_heads": 2})


def test_pretrained_start_errors(tmp_path, hf_bert, capsys):
    def fails(argv, match):
        assert train.main(argv) == 1
        err = capsys.readouterr().err
        assert match in err, err

    fails(["--mode", "distill", "--teacher", hf_bert] + _args(tmp_path / "a"),
          "has no classification head")
    fails(["--mode", "teacher", "--init", hf_bert, "--preset", "tiny", "--out",
           str(tmp_path / "b")], "drop --preset")
    fails(["--mode", "teacher", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "c")],
          "not a folder")
    fails(["--mode", "student", "--student-init", "teacher", "--out", str(tmp_path / "d")],
          "needs --teacher")
    # --export-hf never replaces what is there (e.g. the pretrained folder itself), nor a file
    before = sorted(os.listdir(hf_bert))
    fails(["--mode", "teacher", "--init", hf_bert, "--export-hf", hf_bert, "--out",
           str(tmp_path / "e")], "already holds files; pass --overwrite")
    assert sorted(os.listdir(hf_bert)) == before and not (tmp_path / "e").exists()
    (tmp_path / "f.txt").write_text("mine")
    fails(["--mode", "teacher", "--export-hf", str(tmp_path / "f.txt"), "--out",
           str(tmp_path / "g")], "is a file, not a folder")


def test_pretrained_pipeline_one_command(tmp_path, hf_bert, reference_backend, capsys):
    """`python -m tkd_core.train --init <HF folder>`: fine-tune, distill a 2-layer student from
    two teacher layers with a transfer set, quantize, export both, print the table."""
    out = tmp_path / "p"
    assert train.main(["--init", hf_bert, "--teacher-epochs", "0.1", "--student-epochs", "0.1"]
                      + _args(out)) == 0
    text = capsys.readouterr().out
    assert "student KD (2L, teacher:1,3)" in text and "student KD INT8" in text
    assert os.path.isfile(out / "student-hf" / "model.safetensors")
    q, ck = load_model(str(out / "student-int8"))
    # the tiny model's Linear layers stay float under quantize_model's size rule; its embedding
    # tables are int8
    assert ck["int8"]["embeddings"] and type(q.embeddings.word).__name__ == "Int8Embedding"
    student, _ = load_model(str(out / "student"))
    ids = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        d = (q(ids) - student(ids)).abs().max().item()
    assert d < 0.1  # the INT8 checkpoint loads back as the quantized student, not random
    rows = __import__("json").load(open(out / "summary.json"))["rows"]
    assert [r["cpu_latency_b32_ms"] > 0 for r in rows] == [True] * 3
    steps = [r for r in read_log(out / "student") if r["type"] == "step"]
    assert steps and all(r["kd_loss"] is not None and r.get("hidden_loss") is not None
                         for r in steps)  # the study's recipe: logits KD + hidden MSE
