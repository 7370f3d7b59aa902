"""GLUE data: the nine tasks' TSV layouts, `datasets` loading, WordPiece, batching and metrics.

    spec = get_task("sst2")
    train = load_split("sst2", "train", data_dir=".../SST-2")   # [Example(a, b, label), ...]
    tok = train_tokenizer(texts(train), vocab_size=8000)        # or load_tokenizer("vocab.txt")
    ds = encode(tok, train, max_len=128)                        # token ids, unpadded
    batch = collate([ds[i] for i in idx], pad_id=tok.token_to_id(PAD))   # dynamic padding
    metrics = compute_metrics("sst2", preds, labels)            # {"accuracy": ...}

The task "synthetic" is the built-in offline task (`tkd_core.synthetic`), the default.

Evaluation under DDP is sharded: each rank reduces its predictions to sufficient statistics
(`confusion` for classification; the predictions themselves for regression, gathered), which are
summed across ranks before the metrics are computed (`metrics_from_confusion`,
`regression_metrics`).
"""
import dataclasses
import math
import os
from typing import List, Optional, Sequence, Union

import torch

from . import synthetic

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # [PAD] gets id 0 (the model's padding_idx)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    dirname: str                     # directory name in the GLUE distribution
    text_a: Union[str, int]          # column of sentence A (header name, or index if no header)
    text_b: Union[str, int, None]    # sentence B for pair tasks
    label: Union[str, int]           # label column
    labels: Optional[tuple]          # label strings in class-id order; None = regression
    metrics: tuple                   # reported metrics; the first is the headline
    header: bool = True
    dev_file: str = "dev.tsv"
    hf_columns: tuple = ()           # (text_a, text_b) in `datasets.load_dataset("glue", ...)`

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
TASKS = {t.name: t for t in [
    # CoLA has no header: source, label, original label, sentence
    TaskSpec("cola", "CoLA", 3, None, 1, _BIN, ("matthews",), header=False,
             hf_columns=("sentence", None)),
    TaskSpec("sst2", "SST-2", "sentence", None, "label", _BIN, ("accuracy",),
             hf_columns=("sentence", None)),
    TaskSpec("mrpc", "MRPC", "#1 String", "#2 String", "Quality", _BIN, ("f1", "accuracy"),
             hf_columns=("sentence1", "sentence2")),
    TaskSpec("stsb", "STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman"),
             hf_columns=("sentence1", "sentence2")),
    TaskSpec("qqp", "QQP", "question1", "question2", "is_duplicate", _BIN, ("f1", "accuracy"),
             hf_columns=("question1", "question2")),
    TaskSpec("mnli", "MNLI", "sentence1", "sentence2", "gold_label",
             ("contradiction", "entailment", "neutral"), ("accuracy",),
             dev_file="dev_matched.tsv", hf_columns=("premise", "hypothesis")),
    TaskSpec("qnli", "QNLI", "question", "sentence", "label", _NLI2, ("accuracy",),
             hf_columns=("question", "sentence")),
    TaskSpec("rte", "RTE", "sentence1", "sentence2", "label", _NLI2, ("accuracy",),
             hf_columns=("sentence1", "sentence2")),
    TaskSpec("wnli", "WNLI", "sentence1", "sentence2", "label", _BIN, ("accuracy",),
             hf_columns=("sentence1", "sentence2")),
    TaskSpec("synthetic", "", 0, None, 1, _BIN, ("accuracy",)),
]}
GLUE_TASKS = tuple(t for t in TASKS if t != "synthetic")


@dataclasses.dataclass
class Example:
    text_a: str
    text_b: Optional[str]
    label: Union[int, float]


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


# ---------------------------------------------------------------------------------- reading


def read_tsv(path: str, spec: TaskSpec) -> List[Example]:
    """Read one split in the GLUE TSV layout of `spec`; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{spec.name}: expected the file {path} (GLUE layout: "
                                f"train.tsv and {spec.dev_file})")
    out = []
    lines = _read_text(path).split("\n")
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path}: no examples (empty file)")
    cols = {}
    start = 0
    if spec.header:
        header = lines[0].rstrip("\r").split("\t")
        for c in (spec.text_a, spec.text_b, spec.label):
            if c is not None and c not in header:
                raise ValueError(f"{path}:1: header has no column {c!r} (got {header})")
        cols = {c: header.index(c) for c in (spec.text_a, spec.text_b, spec.label)
                if c is not None}
        if spec.name == "mnli":  # gold_label is the last column (the label1..5 count varies)
            cols[spec.label] = len(header) - 1
        start = 1
    idx = {c: cols.get(c, c) for c in (spec.text_a, spec.text_b, spec.label) if c is not None}
    need = max(idx.values()) + 1
    for lineno, line in enumerate(lines[start:], start=start + 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < need:
            raise ValueError(f"{path}:{lineno}: malformed line: expected at least {need} "
                             f"tab-separated columns, got {len(fields)}")
        raw = fields[idx[spec.label]].strip()
        out.append(Example(fields[idx[spec.text_a]].strip(),
                           fields[idx[spec.text_b]].strip() if spec.text_b is not None else None,
                           _parse_label(spec, raw, f"{path}:{lineno}")))
    if not out:
        raise ValueError(f"{path}: no examples" + (" (only a header line)" if spec.header
                                                    else ""))
    return out


def _read_text(path: str) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped (the GLUE MRPC files start
    with one), CRLF line ends left for the caller's rstrip. Bad bytes: an error naming the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                         f"{col}); save the file as UTF-8") from None


def _parse_label(spec: TaskSpec, raw: str, where: str):
    if spec.labels is None:
        try:
            v = float(raw)
        except ValueError:
            raise ValueError(f"{where}: label {raw!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"{where}: label {raw!r} is not finite")
        return v
    if raw not in spec.labels:
        raise ValueError(f"{where}: label {raw!r} is not one of {list(spec.labels)}")
    return spec.labels.index(raw)


def load_split(task: str, split: str, data_dir: Optional[str] = None) -> List[Example]:
    """Examples of `split` ("train" or "dev") from a GLUE directory, the built-in task, or
    (no data_dir) `datasets.load_dataset("glue", task)` when cached or reachable."""
    spec = get_task(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if spec.name == "synthetic":
        train, dev = synthetic.splits()
        return [Example(t, None, y) for t, y in (train if split == "train" else dev)]
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory {data_dir!r} does not exist (expected the "
                                    f"GLUE {spec.dirname} directory with train.tsv and "
                                    f"{spec.dev_file})")
        return read_tsv(os.path.join(data_dir, "train.tsv" if split == "train"
                                     else spec.dev_file), spec)
    return load_hf(spec, split)


def load_task(task: str, data_dir: Optional[str] = None, max_train: Optional[int] = None,
              max_dev: Optional[int] = None):
    """(spec, train examples, dev examples), each split cut to its first max_* examples."""
    spec = get_task(task)
    train = load_split(spec.name, "train", data_dir)
    dev = load_split(spec.name, "dev", data_dir)
    return spec, train[:max_train or None], dev[:max_dev or None]


def load_hf(spec: TaskSpec, split: str) -> List[Example]:
    """Through `datasets` (its cache, or the hub when reachable); labels mapped to ours."""
    try:
        import datasets
        hf_split = "train" if split == "train" else (
            "validation_matched" if spec.name == "mnli" else "validation")
        ds = datasets.load_dataset("glue", spec.name, split=hf_split)
    except Exception as e:
        raise RuntimeError(f"{spec.name}: no --data-dir given and datasets.load_dataset('glue', "
                           f"{spec.name!r}) failed ({type(e).__name__}: {e}). Pass --data-dir "
                           f"pointing at the GLUE {spec.dirname} directory.") from e
    a, b = spec.hf_columns
    names = ds.features["label"].names if spec.labels is not None else None
    out = []
    for row in ds:
        y = row["label"]
        if names is not None and names[y] in spec.labels:  # MNLI: HF order differs from ours
            y = spec.labels.index(names[y])
        out.append(Example(row[a], row[b] if b else None, float(y) if names is None else y))
    return out


def texts(examples: Sequence[Example]):
    for e in examples:
        yield e.text_a
        if e.text_b is not None:
            yield e.text_b


# -------------------------------------------------------------------------------- tokenizer


def _normalization(tok, lowercase=True):
    from tokenizers import decoders, normalizers, pre_tokenizers
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _bert_template(tok):
    """[CLS] A [SEP] (type 0) B [SEP] (type 1): the token type ids of sentence-pair tasks."""
    from tokenizers import processors
    for t in (CLS, SEP, PAD):
        if tok.token_to_id(t) is None:
            raise ValueError(f"tokenizer vocabulary lacks the special token {t}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))])
    return tok


def train_tokenizer(corpus, vocab_size: int = 8000):
    """A BERT-style WordPiece tokenizer trained on `corpus` (an iterable of strings).

    The vocabulary is a function of the corpus alone, so two runs on the same data agree in any
    process: `tokenizers`' own trainer breaks count ties in a hash-map order that changes between
    processes, so we learn the pieces ourselves (`_wordpiece_vocab`) and use `tokenizers` to
    normalise, pre-tokenize and tokenize."""
    from collections import Counter
    from tokenizers import Tokenizer, models
    tok = _normalization(Tokenizer(models.WordPiece(unk_token=UNK)))
    counts = Counter(w for text in corpus for w, _ in
                     tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    pieces = _wordpiece_vocab(counts, vocab_size - len(SPECIAL_TOKENS))
    if len(pieces) < vocab_size - len(SPECIAL_TOKENS):
        # Merges ran out: every word of the corpus is a whole token. Keep only the alphabet and
        # the whole words (the intermediate pieces would only lengthen the table).
        pieces = {t for t in pieces if t in counts or len(t) == 1
                  or (t.startswith("##") and len(t) == 3)}
    # canonical ids: special tokens first, then sorted
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(pieces - set(SPECIAL_TOKENS)))}
    tok = _normalization(Tokenizer(models.WordPiece(vocab, unk_token=UNK)))
    return _bert_template(tok)


def _wordpiece_vocab(word_counts: dict, size: int) -> set:
    """WordPiece pieces learnt by byte-pair merging, deterministically.

    Words start as characters (the first as is, the rest as `##c` continuations). Repeatedly the
    most frequent adjacent pair (ties: the lexicographically smallest) is merged into one piece,
    in every word holding it, until `size` pieces exist or no pair is left. Pair counts are kept
    incrementally with a lazy max-heap: an entry whose count changed since it was pushed is
    skipped, and every pair whose count changes is pushed again. Full SST-2: ~2 s."""
    import heapq
    from collections import defaultdict
    ordered = sorted(word_counts)
    words = [[w[0]] + ["##" + ch for ch in w[1:]] for w in ordered]
    freq = [word_counts[w] for w in ordered]
    vocab = {s for w in words for s in w} | {ch for w in ordered for ch in w}
    pairs, where = defaultdict(int), defaultdict(set)  # pair -> count, pair -> word indices

    def account(i, sign):
        w = words[i]
        for p in zip(w, w[1:]):
            pairs[p] += sign * freq[i]
            if sign > 0:
                where[p].add(i)

    for i in range(len(words)):
        account(i, +1)
    heap = [(-c, a, b) for (a, b), c in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < size and heap:
        c, a, b = heapq.heappop(heap)
        if c == 0 or pairs.get((a, b), 0) != -c:
            continue  # stale: the pair's count changed since this entry was pushed
        new = a + b[2:]  # b is a continuation piece: "##..."
        vocab.add(new)
        touched = set()
        for i in sorted(where.pop((a, b), ())):
            account(i, -1)
            touched.update(zip(words[i], words[i][1:]))
            w, out, k = words[i], [], 0
            while k < len(w):
                if k + 1 < len(w) and w[k] == a and w[k + 1] == b:
                    out.append(new)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            words[i] = out
            account(i, +1)
            touched.update(zip(out, out[1:]))
        pairs.pop((a, b), None)
        for p in touched:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], *p))
    return vocab


def load_tokenizer(path: str):
    """From a `tokenizer.json` (tokenizers format) or a BERT `vocab.txt`."""
    from tokenizers import Tokenizer, models
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist (expected a vocab.txt "
                                "or a tokenizer.json)")
    if path.endswith(".json"):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.WordPiece.from_file(path, unk_token=UNK))
    return _bert_template(_normalization(tok))


def save_tokenizer(tok, out_dir: str) -> str:
    """Writes tokenizer.json (everything) and vocab.txt (BERT format); returns the json path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t, _ in vocab))
    return path


# ------------------------------------------------------------------------------- batching


def encode(tok, examples: Sequence[Example], max_len: int = 128):
    """[(input_ids, token_type_ids, label)], unpadded, truncated to max_len (longest first)."""
    tok.enable_truncation(max_length=max_len)
    tok.no_padding()
    if examples and examples[0].text_b is not None:
        encs = tok.encode_batch([(e.text_a, e.text_b) for e in examples])
    else:
        encs = tok.encode_batch([e.text_a for e in examples])
    return [(enc.ids, enc.type_ids, e.label) for enc, e in zip(encs, examples)]


def collate(items, pad_id: int = 0):
    """Dynamic padding to the longest sequence of the batch.

    -> dict(input_ids (B, S) long, attention_mask (B, S) bool (True = token),
            token_type_ids (B, S) long, labels (B,) long or float32)."""
    B, S = len(items), max(len(ids) for ids, _, _ in items)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    types = torch.zeros((B, S), dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.bool)
    for i, (ids, tt, _) in enumerate(items):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        types[i, :len(tt)] = torch.tensor(tt)
        mask[i, :len(ids)] = True
    ys = [y for _, _, y in items]
    labels = torch.tensor(ys, dtype=torch.float32 if isinstance(ys[0], float) else torch.long)
    return dict(input_ids=input_ids, attention_mask=mask, token_type_ids=types, labels=labels)


# -------------------------------------------------------------------------------- sampling

GROUP_WINDOW = 50  # global batches per length-sorted window (group_by_length)


def epoch_batches(lengths: Sequence[int], epoch: int, batch_size: int, seed: int, rank: int = 0,
                  world: int = 1, group_by_length: bool = False) -> List[List[int]]:
    """This rank's batches of one epoch, as lists of example indices. lengths: (N,) tokens;
    batch_size: the global batch (all ranks).

    DistributedSampler order: one permutation of all examples per epoch (seeded by seed+epoch,
    the same on every rank), dealt round-robin to the ranks. With local batch = global / world,
    step k's global batch is permutation[k*G:(k+1)*G] whatever the world size.

    group_by_length: the permutation is cut into windows of GROUP_WINDOW global batches, each
    window sorted by length and cut into global batches, and the batch order shuffled again.
    Batches then hold similar lengths (SST-2: 3.4x padded/real tokens at random -> 1.05x) while
    every example is still seen once per epoch in a seeded random order."""
    n = len(lengths)
    if not group_by_length:
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                      shuffle=True, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
        idx, bs = list(sampler), batch_size // world
        return [idx[i:i + bs] for i in range(0, len(idx), bs)]
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    lengths = torch.as_tensor(lengths)
    G, W = batch_size, batch_size * GROUP_WINDOW
    glob = []
    for w in range(0, n, W):
        win = perm[w:w + W]
        win = win[torch.sort(lengths[win], stable=True).indices].tolist()
        glob += [win[i:i + G] for i in range(0, len(win), G)]
    order = torch.randperm(len(glob), generator=g).tolist()
    out = []
    for k in order:
        b = glob[k]
        b = b + b[:(-len(b)) % world]  # a short last batch: pad as DistributedSampler does
        out.append(b[rank::world])
    return out


# -------------------------------------------------------------------------------- metrics


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) float64 counts, rows = gold label, columns = prediction."""
    idx = labels.long() * num_labels + preds.long()
    return torch.bincount(idx, minlength=num_labels ** 2).double().view(num_labels, num_labels)


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """accuracy, F1 of class 1 and Matthews correlation (multi-class form; binary = phi)."""
    cm = cm.double()
    n = cm.sum().item()
    correct = cm.diag().sum().item()
    out = {"accuracy": correct / n if n else 0.0}
    if cm.shape[0] == 2:
        tp, fp, fn = cm[1, 1].item(), cm[0, 1].item(), cm[1, 0].item()
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    t, p = cm.sum(1), cm.sum(0)  # gold / predicted counts per class
    num = correct * n - (t * p).sum().item()
    den = math.sqrt((n * n - (p * p).sum().item()) * (n * n - (t * t).sum().item()))
    out["matthews"] = num / den if den else 0.0
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (what Spearman needs)."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, len(x)
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt((x * x).sum().item() * (y * y).sum().item())
    return (x * y).sum().item() / den if den else 0.0


def regression_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    p, y = preds.double().flatten(), labels.double().flatten()
    return {"pearson": _pearson(p, y), "spearman": _pearson(_ranks(p), _ranks(y)),
            "mse": ((p - y) ** 2).mean().item()}


def compute_metrics(task: str, preds, labels) -> dict:
    """preds: class ids (classification) or scores (regression), labels alike."""
    spec = get_task(task)
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    if spec.labels is None:
        return regression_metrics(preds, labels)
    return metrics_from_confusion(confusion(preds, labels, spec.num_labels))
