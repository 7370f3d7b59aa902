"""infer: CPU inference of a BERT student, tkd against the ways PyTorch users run one (issue 14).

    python -m bench infer [--quick]

Models (same weights for every provider): MiniLM-L6 (all-MiniLM-L6-v2 from ../shared/models,
6 layers, hidden 384, 12 heads, FFN 1536; random weights at that shape when the folder is
missing) with a 2-label head, MiniLM-L2 (a 2-layer student of it: layers 0 and 3), and the
default run's student shape (cpu-student-2: hidden 64, FFN 256, 2 layers; random weights), which
only tkd runs (the "quantize_model never makes a model slower" row).

Providers, each only when it imports (none is a dependency of tkd):
    hf            transformers BertForSequenceClassification, eager fp32 (its SDPA attention)
    hf_compile    torch.compile of it (inductor CPU)                           [not in --quick]
    hf_ao_int8    torch.ao.quantization.quantize_dynamic (fbgemm) of it, qint8
    torchao_int8  torchao Int8DynamicActivationInt8WeightConfig of it, eager
    ort_fp32      ONNX Runtime on torch.onnx.export of it (graph optimizations: all, no
                  spinning between runs)
    ort_int8      ONNX Runtime, onnxruntime.quantization.quantize_dynamic QInt8 of that export
    tkd_fp32      tkd TransformerClassifier (tkd_core.hf.load_pretrained of the same folder)
    tkd_int8      the same after tkd_core.quantize_model (its default size rule)
    tkd_lean_fp32 tkd_core.infer.InferenceModel(model): prepacked oneDNN linears, fused GELU
    tkd_lean_int8 tkd_core.infer.InferenceModel(model, int8=True): our INT8 kernels
    tkd_compile   torch.compile(tkd_lean_int8)                                  [not in --quick]

Cases: batch 1, 8, 32 x S 16, 64, 128 (--quick: batch 1 and 32 at S 64), 1 and 2 threads, and
a realistic padded batch: 32 SST-2 dev sentences (../shared/data/glue/SST-2; random lengths
5..60 when missing) tokenized by the model's tokenizer, padded to the longest. Rounds are
interleaved (a turn of each provider, repeated) and each provider's median is reported, so a
load change on a shared machine hits all of them alike; a turn is 20 ms of untimed calls, then
a few timed ones, so that no provider is timed while the previous one's threads still spin
(see _time_case); ratios are against transformers eager and against tkd_fp32 in the
same run. `max_abs_diff` is the largest logit difference to transformers eager on the case's
inputs, `agree` the argmax agreement on the padded batch.

    python -m bench infer --model FOLDER [--student FOLDER]

runs fine-tuned 2-label BERT folders instead (e.g. a tkd run exported with --export-hf) and
scores every provider on all of SST-2 dev at the last thread count: accuracy, and each INT8
provider's drift in points against its fp32 self.

Writes bench/results/infer_<device>_<time>.csv and a PNG (latency against batch per provider,
S = 64) next to it (and infer_accuracy_*.csv), then prints the issue's targets, each met or
not.
"""
import copy
import os
import random
import shutil
import tempfile
import time
import warnings

import torch

from bench import harness
from bench.bench_hf import MINILM

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SST2_DEV = os.path.join(REPO, "..", "shared", "data", "glue", "SST-2", "dev.tsv")
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
STUDENT_LAYERS = (0, 3)  # the 2-layer student keeps these layers of MiniLM-L6
BATCHES, SEQS, THREADS = (1, 8, 32), (16, 64, 128), (1, 2)
ROUND_S = 6.0  # seconds of rounds per case (at least 3, at most 15 rounds)
BLOCK, LEAD_S = 3, 0.02  # timed calls per provider's turn, after LEAD_S s of untimed calls


# ------------------------------------------------------------------------------ the models


def _hf_folders(tmp, model=None, student=None):
    """{name: (HF BertForSequenceClassification in eval, folder tkd loads the same weights
    from)} for MiniLM-L6 (or `model`, a fine-tuned 2-label HF folder) and its 2-layer student
    (layers STUDENT_LAYERS of it, or `student`, a fine-tuned 2-layer folder)."""
    import transformers
    torch.manual_seed(0)  # the new 2-label head
    load = transformers.BertForSequenceClassification.from_pretrained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model is not None:
            l6, src = load(model), model
            if l6.config.num_labels != 2:
                raise ValueError(f"--model {model}: a 2-label classifier is needed, it has "
                                 f"{l6.config.num_labels} labels")
        elif os.path.isdir(MINILM):
            l6 = load(MINILM, num_labels=2)
            src = MINILM
        else:  # the shape with random weights, and a placeholder vocabulary for the tokenizer
            print(f"infer: {MINILM} not found: MiniLM's shape with random weights")
            l6 = transformers.BertForSequenceClassification(
                transformers.BertConfig(num_labels=2, **MINILM_SHAPE))
            src = None
        if student is not None:
            l2 = load(student)
            if l2.config.num_labels != 2:
                raise ValueError(f"--student {student}: a 2-label classifier is needed")
            return _save_pair(tmp, l6, src, l2, student)
    cfg = copy.deepcopy(l6.config)
    cfg.num_hidden_layers = len(STUDENT_LAYERS)
    l2 = transformers.BertForSequenceClassification(cfg)
    sd = l6.state_dict()
    for k in l2.state_dict():
        parts = k.split(".")
        if parts[:3] == ["bert", "encoder", "layer"]:
            parts[3] = str(STUDENT_LAYERS[int(parts[3])])
        l2.state_dict()[k].copy_(sd[".".join(parts)])
    return _save_pair(tmp, l6, src, l2, src)


def _save_pair(tmp, l6, src6, l2, src2):
    out = {}
    for name, m, src in (("MiniLM-L6", l6, src6), ("MiniLM-L2", l2, src2)):
        folder = os.path.join(tmp, name)
        m.eval().save_pretrained(folder)
        _tokenizer_files(src, folder, m.config.vocab_size)
        out[name] = (m, folder)
    return out


def _tokenizer_files(src, folder, vocab_size):
    if src is not None:
        for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                  "special_tokens_map.json"):
            if os.path.exists(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), folder)
        return
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(specials + [f"tok{i}" for i in range(vocab_size - len(specials))]))


def _onnx(hf_model, folder):
    """(fp32 path, int8 path) of the HF model exported by torch.onnx.export, or the reason."""
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        return None, f"onnxruntime not installed ({e.name})"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(1000, 2000, (2, 16))
    f32, i8 = os.path.join(folder, "model.onnx"), os.path.join(folder, "model_int8.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(hf_model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), f32,
                          input_names=names, output_names=["logits"], dynamo=False,
                          opset_version=17,
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                        "logits": {0: "batch"}})
        import logging
        logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
        quantize_dynamic(f32, i8, weight_type=QuantType.QInt8)
    return (f32, i8), None


def _ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no spinning between runs: spinning ORT threads would take the cores from the provider
    # timed next (and on a shared machine ORT itself ran faster without it)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]

    def run(ids, mask, types):
        feed = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return torch.from_numpy(s.run(None, {n: feed[n].numpy() for n in names})[0])
    return run


def _hf_call(m):
    return lambda ids, mask, types: m(input_ids=ids, attention_mask=mask,
                                      token_type_ids=types).logits


def _peers(hf_model, onnx_paths, threads, quick):
    """name -> callable(ids, mask, types) -> logits, for every peer that imports."""
    peers, skipped = {"hf": _hf_call(hf_model)}, {}
    if not quick:
        peers["hf_compile"] = _hf_call(torch.compile(hf_model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(hf_model), {torch.nn.Linear},
                                                    dtype=torch.qint8)
    peers["hf_ao_int8"] = _hf_call(ao)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        tao = copy.deepcopy(hf_model)
        quantize_(tao, Int8DynamicActivationInt8WeightConfig())
        peers["torchao_int8"] = _hf_call(tao)
    except ImportError as e:
        skipped["torchao_int8"] = f"torchao not installed ({e.name})"
    if onnx_paths is not None:
        peers["ort_fp32"] = _ort_session(onnx_paths[0], threads)
        peers["ort_int8"] = _ort_session(onnx_paths[1], threads)
    return peers, skipped


def _ours(model, quick, with_compile=True):
    """tkd's providers over one TransformerClassifier."""
    import tkd_core
    from tkd_core.infer import InferenceModel
    q = copy.deepcopy(model)
    tkd_core.quantize_model(q)
    lean8 = InferenceModel(model, int8=True)
    ours = {"tkd_fp32": model, "tkd_int8": q, "tkd_lean_fp32": InferenceModel(model),
            "tkd_lean_int8": lean8}
    if with_compile and not quick:
        ours["tkd_compile"] = torch.compile(lean8)
    return ours


# ------------------------------------------------------------------------------ the inputs


def _full(B, S, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (B, S), generator=g)
    return ids, torch.ones(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)


def _sst2_dev(folder):
    """SST-2 dev as (token ids of each sentence by the folder's tokenizer, at most 128; labels),
    read by tkd_core.data's GLUE reader."""
    from tokenizers import Tokenizer

    from tkd_core import data
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.no_padding()  # MiniLM's tokenizer.json pads every sentence to 128
    tok.no_truncation()
    dev = data.read_tsv(SST2_DEV, data.get_task("sst2"))
    return [tok.encode(e.text_a).ids[:128] for e in dev], [int(e.label) for e in dev]


def _pad(seqs):
    """(ids, mask, token types) of the sequences padded to the longest."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, :len(q)], mask[i, :len(q)] = torch.tensor(q), 1
    return ids, mask, torch.zeros_like(ids)


def _padded(folder, vocab, B=32):
    """B SST-2 dev sentences (a fixed random pick) tokenized and padded to the longest."""
    rng = random.Random(0)
    try:
        seqs = rng.sample(_sst2_dev(folder)[0], B)
        what = f"{B} SST-2 dev sentences"
    except (OSError, ValueError, ImportError):  # no data or tokenizer: lengths only
        seqs = [[101] + [rng.randrange(1000, vocab) for _ in range(rng.randint(5, 60))] + [102]
                for _ in range(B)]
        what = f"{B} random-length sequences"
    inputs = _pad(seqs)
    B, S = inputs[0].shape
    real = int(inputs[1].sum())
    return inputs, f"{what}, S={S}, {real / (B * S):.0%} real tokens"


def _dev_batches(folder, B=32):
    """SST-2 dev in batches of B, each padded to its longest: [((ids, mask, types), labels)]."""
    seqs, labels = _sst2_dev(folder)
    return [(_pad(seqs[i:i + B]), torch.tensor(labels[i:i + B])) for i in range(0, len(seqs), B)]


# fp32 self of each INT8 provider: its accuracy drift is against this one
FP32_OF = {"hf_ao_int8": "hf", "torchao_int8": "hf", "ort_int8": "ort_fp32",
           "tkd_int8": "tkd_fp32", "tkd_lean_int8": "tkd_lean_fp32"}


def _dev_accuracy(model_name, fns, folder):
    """Rows of SST-2 dev accuracy per provider on a fine-tuned model, and each INT8 provider's
    drift in points against its fp32 self."""
    if not os.path.isfile(SST2_DEV):
        print(f"infer: {SST2_DEV} not found: no accuracy")
        return []
    batches = _dev_batches(folder)
    n = sum(len(y) for _, y in batches)
    acc = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            right = sum(int((fn(*x).argmax(-1) == y).sum()) for x, y in batches)
            acc[name] = right / n
    return [dict(model=model_name, provider=name, accuracy=a, examples=n,
                 drift_vs_fp32_points=(100 * (a - acc[FP32_OF[name]])
                                       if name in FP32_OF and FP32_OF[name] in acc else None))
            for name, a in acc.items()]


# ------------------------------------------------------------------------------ timing


def _time_case(fns, inputs):
    """{name: median ms} over interleaved rounds, each provider's logits (one call), and the
    number of timed calls per provider. Each round gives every provider a turn: untimed calls
    for LEAD_S (one at least), then BLOCK timed calls in a row (1 when a call of each takes
    0.25 s or more), as a process serving one model runs. Call-by-call interleaving measured
    the previous runtime instead: libgomp's workers (torch's OpenMP) spin on the cores for
    milliseconds after each parallel region, and our INT8 forward at batch 1 on 2 threads took
    5.4 ms right after torch peers' calls against 2.5 ms with OMP_WAIT_POLICY=PASSIVE. (A sleep
    between turns does not do: after 20 ms idle every provider's 2-thread batch-1 call slowed,
    transformers' from 13.9 to 19.3 ms.)"""
    outs = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name, fn in fns.items():
            outs[name] = fn(*inputs).float()
        for fn in fns.values():  # a second warm-up call (compiled graphs, caches)
            fn(*inputs)
        one_round = (time.perf_counter() - t0) / 2  # one call of each provider
        block = BLOCK if one_round < 0.25 else 1
        per_round = one_round * (block + 1) + LEAD_S * len(fns)
        reps = max(3, min(15, int(ROUND_S / per_round)))
        med = harness.interleaved({n: (lambda f=f: f(*inputs)) for n, f in fns.items()}, reps,
                                  torch.device("cpu"), warmup=0, block=block, lead_s=LEAD_S)
    return {n: s * 1e3 for n, s in med.items()}, outs, reps * block


def _rows_for_case(model_name, threads, shape, padded, fns, inputs):
    ms, outs, reps = _time_case(fns, inputs)
    ref = outs.get("hf")
    rows = []
    for name, t in ms.items():
        row = dict(model=model_name, threads=threads, batch=inputs[0].shape[0],
                   seq=inputs[0].shape[1], padded=padded, shape=shape, provider=name, ms=t,
                   reps=reps)
        if "hf" in ms:
            row["vs_hf"] = ms["hf"] / t
        if "tkd_fp32" in ms:
            row["vs_tkd_fp32"] = ms["tkd_fp32"] / t
        if ref is not None:
            row["max_abs_diff"] = (outs[name] - ref).abs().max().item()
            if padded:
                row["agree"] = (outs[name].argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ main


def main(device, quick=False, model=None, student=None):
    if device.type != "cpu":
        print("infer: a CPU benchmark; run it with --device cpu")
        return []
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("infer: skipped, transformers not installed")
        return []
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # our ops' torch-reference path (the fast CPU path)
    threads0 = torch.get_num_threads()
    try:
        return _run(device, quick, model, student)
    finally:
        torch.set_num_threads(threads0)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _run(device, quick, model=None, student=None):
    from tkd_core import hf
    from tkd_core.models import ModelConfig, build_model
    batches, seqs = ((1, 32), (64,)) if quick else (BATCHES, SEQS)
    rows, notes = [], []
    print(f"infer: load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"{'quick' if quick else 'full'} grid")
    with tempfile.TemporaryDirectory() as tmp:
        folders = _hf_folders(tmp, model, student)
        scored = {n for n, given in (("MiniLM-L6", model), ("MiniLM-L2", student)) if given}
        onnx_paths, tkd_models, padded, accuracy = {}, {}, {}, []
        for name, (hf_model, folder) in folders.items():
            paths, why = _onnx(hf_model, folder)
            onnx_paths[name] = paths
            if why:
                notes.append(f"ort_fp32 / ort_int8: {why}")
            tkd_models[name] = hf.load_pretrained(folder, num_labels=2)[0].eval()
            padded[name] = _padded(folder, hf_model.config.vocab_size)
        student = build_model(ModelConfig.preset("cpu-student-2", vocab_size=8000)).eval()
        for threads in THREADS:
            torch.set_num_threads(threads)
            torch._dynamo.reset()  # compiled graphs are built for the thread count in use
            for name, (hf_model, _) in folders.items():
                peers, skipped = _peers(hf_model, onnx_paths[name], threads, quick)
                notes += [f"{p}: {why}" for p, why in skipped.items()]
                fns = {**peers, **_ours(tkd_models[name], quick)}
                vocab = hf_model.config.vocab_size
                for B in batches:
                    for S in seqs:
                        rows += _rows_for_case(name, threads, f"B={B} S={S}", False, fns,
                                               _full(B, S, vocab))
                        _progress(rows)
                inputs, what = padded[name]
                rows += _rows_for_case(name, threads, what, True, fns, inputs)
                _progress(rows)
                if name in scored and threads == THREADS[-1]:
                    accuracy += _dev_accuracy(name, fns, folders[name][1])
            fns = _ours(student, quick, with_compile=False)
            for B in batches:
                rows += _rows_for_case("default-student", threads, f"B={B} S=64", False, fns,
                                       _full(B, 64, 8000))
                _progress(rows)
    harness.print_table("infer (ms: median of interleaved rounds)", rows,
                        ["model", "threads", "shape", "provider", "ms", "vs_hf", "vs_tkd_fp32",
                         "max_abs_diff", "agree"])
    for n in dict.fromkeys(notes):
        print(f"  skipped {n}")
    path = harness._write_csv("infer", rows, device)
    print(f"wrote {os.path.relpath(path)}")
    _plot(rows, path[:-4] + ".png")
    if accuracy:
        harness.print_table("infer: SST-2 dev accuracy (fine-tuned weights)", accuracy,
                            ["model", "provider", "accuracy", "drift_vs_fp32_points"])
        print(f"wrote {os.path.relpath(harness._write_csv('infer_accuracy', accuracy, device))}")
    _targets(rows, accuracy)
    return rows


def _progress(rows):
    last = rows[-1]
    print(f"  {last['model']} {last['threads']}t {last['shape']}: "
          + " ".join(f"{r['provider']} {r['ms']:.1f}" for r in rows
                     if (r['model'], r['threads'], r['shape']) ==
                     (last['model'], last['threads'], last['shape'])), flush=True)


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("infer: no plot (matplotlib not installed)")
        return
    groups = sorted({(r["model"], r["threads"]) for r in rows if not r["padded"]})
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    color = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(provs)}  # one per provider
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False)
    for ax, (model, threads) in zip(axes[0], groups):
        sel = [r for r in rows if (r["model"], r["threads"]) == (model, threads)
               and not r["padded"] and r["seq"] == 64]
        for prov in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r["batch"], r["ms"]) for r in sel if r["provider"] == prov)
            ax.plot(*zip(*pts), marker="o", label=prov, color=color[prov],
                    linestyle="-" if prov.startswith("tkd") else "--")
        ax.set(xscale="log", yscale="log", xlabel="batch (S = 64)", ylabel="ms",
               title=f"{model}, {threads} thread{'s' if threads > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {os.path.relpath(path)}")


def _targets(rows, accuracy=()):
    """The issue's targets at MiniLM-L6, S = 64, batch 1 and 32, per thread count, and the
    INT8 accuracy drift where fine-tuned weights were given."""
    def ms(model, threads, B, prov):
        r = [r for r in rows if (r["model"], r["threads"], r["batch"], r["seq"], r["provider"])
             == (model, threads, B, 64, prov) and not r["padded"]]
        return r[0]["ms"] if r else None

    print("\ntargets (MiniLM-L6, S = 64; ratio > 1: tkd faster):")
    checks = [("tkd fp32 >= 1.5x transformers eager", "hf", "tkd_lean_fp32", 1.5, "MiniLM-L6"),
              ("  (the plain TransformerClassifier)", "hf", "tkd_fp32", 1.5, "MiniLM-L6"),
              ("tkd INT8 >= 1.8x tkd fp32", "tkd_lean_fp32", "tkd_lean_int8", 1.8, "MiniLM-L6"),
              ("  (quantize_model vs the plain model)", "tkd_fp32", "tkd_int8", 1.8, "MiniLM-L6"),
              ("tkd INT8 <= ONNX Runtime INT8 latency", "ort_int8", "tkd_lean_int8", 1.0,
               "MiniLM-L6"),
              ("  (quantize_model)", "ort_int8", "tkd_int8", 1.0, "MiniLM-L6"),
              ("default student: quantize_model >= its fp32 self", "tkd_fp32", "tkd_int8", 1.0,
               "default-student")]
    for what, peer, ours, need, model in checks:
        cells = []
        for threads in THREADS:
            for B in (1, 32):
                a, b = ms(model, threads, B, peer), ms(model, threads, B, ours)
                if a is None or b is None:
                    continue
                ok = "met" if a / b >= need else "NOT met"
                cells.append(f"{threads}t B={B}: {a / b:.2f}x {ok}")
        print(f"  {what}: " + ("; ".join(cells) if cells else "not measured"))
    for r in accuracy:
        if r["provider"] in ("tkd_lean_int8", "tkd_int8") and r["drift_vs_fp32_points"] is not None:
            d = r["drift_vs_fp32_points"]
            print(f"  {r['model']} {r['provider']} loses <= 0.5 points vs fp32 on SST-2 dev: "
                  f"{d:+.2f} points ({100 * r['accuracy']:.2f}%) "
                  f"{'met' if d >= -0.5 else 'NOT met'}")
