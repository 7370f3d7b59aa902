"""The SST-2 study's plan: which models are trained, with what settings, in which order.

Data, not logic: the rows of the report (GROUPS), the teacher's settings, the published numbers
the report compares against, and `make_plan`, which expands the command line (seeds,
temperatures, epochs) into one `Job` per training run. `train_argv` turns a job into the
`python -m tkd_core.train` command line that trains it; the trainer alone builds the model.
"""
import dataclasses
import os
from typing import List

PUBLISHED = [  # SST-2 dev accuracy (%), pretrained models
    ("BERT-base (Devlin et al. 2019)", 92.7),
    ("DistilBERT (Sanh et al. 2019)", 91.3),
    ("TinyBERT-4 (Jiao et al. 2020)", 92.6),
]


# The study's teacher: cpu-teacher (12 layers, pre-LN: post-LN 12-layer models stay at chance
# for the few epochs a CPU run affords) widened to 128, so that the 2-layer width-64 student
# (cpu-student-2) has >= 5x fewer parameters with the 8000-word vocabulary (3.44M vs 0.62M);
# mean pooling and hidden dropout 0.3, the best of the short SST-2 teacher runs we tried
# (docs/results/sst2/teacher_search.md). Trained from scratch it peaks after about one pass
# over SST-2's 67k phrases and overfits after: 1 epoch. The students peak by epoch 2-3 of the
# paper's 10: 3 epochs.
TEACHER_SET = ("hidden_size=128", "ffn_size=512", "pooling=mean", "hidden_dropout=0.3")


PAPER_CLAIM = 98.32     # the TKD-NLP paper's reported accuracy


TFIDF_PUBLISHED = 82.0  # TF-IDF + logistic regression, SST-2 dev, as the issue states


@dataclasses.dataclass
class Job:
    name: str                  # run directory under --out
    group: str                 # rows of the report average over a group's seeds
    mode: str                  # teacher | student | distill (tkd_core.train) | tfidf
    arch: str = "transformer"
    preset: str = ""
    epochs: float = 1.0
    lr: float = 1e-3
    seed: int = 0
    temperature: float = 1.0
    overrides: tuple = ()      # ("key=value", ...): the trainer's --set on top of the preset
    int8: bool = False         # also measure this run's INT8 form (the report's INT8 row)
    extra: tuple = ()          # more trainer flags (--init, --student-init, --augment, ...)
    study_vocab: bool = True   # the study's WordPiece (--vocab); False: the teacher's / folder's
    logits: str = "train_logits.pt"  # the teacher-logits file under teacher/ ("" for none)

    @property
    def needs_teacher(self) -> bool:  # the teacher's checkpoint: as teacher, or as the init
        return self.mode == "distill" or "--student-init" in self.extra


GROUPS = {  # group -> (label in the report, what it is)
    "teacher": ("Teacher", "12-layer Transformer, hard labels"),
    "tkd": ("TKD-NLP", "2-layer Transformer distilled from the teacher (kd_loss)"),
    "tnlp": ("T-NLP", "the same 2-layer Transformer, hard labels only"),
    "kd-bilstm": ("KD-NLP (BiLSTM)", "BiLSTM (Tang et al. 2019) distilled from the teacher"),
    "rnn": ("RNN", "Elman RNN, hard labels"),
    "lstm": ("LSTM", "LSTM, hard labels"),
    "cnn": ("CNN (Kim 2014)", "CNN, filter widths 3/4/5, hard labels"),
    "tfidf": ("TF-IDF + LR", "word 1-2-gram TF-IDF, logistic regression (scikit-learn)"),
    "int8": ("TKD-NLP INT8", "the T=1 seed-0 TKD-NLP student after quantize_model"),
    # the pretrained study (--pretrained)
    "tkd-small": ("TKD-NLP-small", "a narrow random-init Transformer, logits KD + transfer set"),
    "tkd-noaug": ("TKD-NLP, no transfer set", "ablation: logits KD on the labelled set only"),
    "tkd-logits": ("TKD-NLP, logits only", "ablation: logits KD + transfer set, no layer-wise "
                   "term"),
    "tkd-hidden": ("TKD-NLP + hidden MSE", "ablation: + hidden-state MSE (uniform layer map)"),
    "tkd-attn": ("TKD-NLP + hidden + attention", "ablation: + hidden MSE + attention KL"),
}

PRETRAINED_GROUPS = {  # labels that differ in the pretrained study
    "teacher": ("Teacher (MiniLM-L6, fine-tuned)", "the pretrained encoder fine-tuned (--init)"),
    "tkd": ("TKD-NLP (2L)", "2 teacher layers, distilled: logits KD + transfer set "
            "(+ the study's --hidden-loss)"),
    "tnlp": ("T-NLP (2L)", "the same 2 teacher layers, hard labels only"),
    "kd-bilstm": ("KD-NLP (BiLSTM)", "BiLSTM distilled with the transfer set (Tang et al.)"),
    "int8": ("TKD-NLP INT8", "the seed-0 TKD-NLP student after quantize_model"),
}


def tkd_group(t: float) -> str:
    return "tkd" if t == 1 else f"tkd-T{t:g}"


def make_plan(a) -> List[Job]:
    """The study's jobs in launch order (the teacher first: the distilled students wait on it)."""
    if getattr(a, "pretrained", None):
        return make_pretrained_plan(a)
    s, b = a.student_epochs, a.baseline_epochs
    jobs = [Job("teacher", "teacher", "teacher", preset=a.teacher_preset,
                epochs=a.teacher_epochs, lr=a.teacher_lr, overrides=tuple(a.teacher_set))]
    st = tuple(a.student_set)
    jobs.append(Job("tfidf", "tfidf", "tfidf"))
    for seed in a.seeds:
        jobs.append(Job(f"tnlp_s{seed}", "tnlp", "student", preset=a.student_preset, epochs=s,
                        seed=seed, overrides=st))
    for arch in ("rnn", "lstm", "cnn"):
        for seed in a.seeds[:a.baseline_seeds]:
            jobs.append(Job(f"{arch}_s{seed}", arch, "student", arch=arch,
                            preset=f"{a.baseline_prefix}-{arch}", epochs=b, seed=seed))
    for t in a.temperatures:
        for seed in a.seeds:
            jobs.append(Job(f"tkd_T{t:g}_s{seed}", tkd_group(t), "distill",
                            preset=a.student_preset, epochs=s, seed=seed, temperature=t,
                            overrides=st, int8=t == 1 and seed == a.seeds[0]))
    for seed in a.seeds:
        jobs.append(Job(f"kd_bilstm_s{seed}", "kd-bilstm", "distill", arch="bilstm",
                        preset=f"{a.baseline_prefix}-bilstm", epochs=s, seed=seed))
    return jobs


# The pretrained study's ablations: the distillation terms of each (the TKD-NLP row is one of
# these recipes, chosen by --hidden-loss; an ablation is another rung of the ladder)
ABLATIONS = {"noaug": "logits KD on the labelled set only",
             "logits": "logits KD + transfer set",
             "hidden": "logits KD + transfer set + hidden-state MSE",
             "attn": "logits KD + transfer set + hidden-state MSE + attention KL"}


def parse_ablations(specs, hidden_loss: str, n_seeds: int) -> dict:
    """--ablations NAME[:SEEDS] ... -> {name: seeds}, in the ladder's order (1 seed unless
    given). Raises ValueError on an unknown name, a bad seed count, or the TKD-NLP row's own
    recipe (it would train the same runs twice)."""
    main = "logits" if hidden_loss == "none" else "hidden" if hidden_loss == "mse" else None
    out = {}
    for spec in specs:
        name, _, n = spec.partition(":")
        if name not in ABLATIONS:
            raise ValueError(f"--ablations {spec}: the name must be one of {list(ABLATIONS)}")
        if not (n.isdigit() and 1 <= int(n) <= n_seeds) and n:
            raise ValueError(f"--ablations {spec}: SEEDS must be an integer in [1, {n_seeds}] "
                             "(the number of --seeds)")
        if name == main:
            raise ValueError(f"--ablations {spec}: '{name}' ({ABLATIONS[name]}) is the TKD-NLP "
                             f"row's own recipe with --hidden-loss {hidden_loss}")
        out[name] = int(n or 1)
    return {k: out[k] for k in ABLATIONS if k in out}


def make_pretrained_plan(a) -> List[Job]:
    """--pretrained FOLDER: the teacher is the folder fine-tuned on the task (--init); the
    2-layer students start from two of its layers (--student-layers); the narrow and BiLSTM
    students and the transfer set (--augment) follow Tang et al. and TinyBERT. TKD-NLP adds
    --hidden-loss to logits KD. Students share the teacher's tokenizer; RNN / LSTM / CNN and
    TF-IDF are the from-scratch baselines."""
    s, b, seeds = a.student_epochs, a.baseline_epochs, a.seeds
    init = ("--student-init", a.student_layers)
    aug = ("--augment", str(a.augment)) if a.augment else ()
    aug_logits = f"train_logits_aug{a.augment}.pt"
    # each recipe's trainer flags and cached-logits file ("": layer-wise terms need the
    # teacher's forward at every step, which gives the logits too)
    hidden = init + aug + ("--hidden-loss", "mse")
    recipes = {"noaug": (init, "train_logits.pt"), "logits": (init + aug, aug_logits),
               "hidden": (hidden, ""), "attn": (hidden + ("--attention-loss",), "")}
    tkd_extra, tkd_logits = ((init + aug, aug_logits) if a.hidden_loss == "none" else
                             (init + aug + ("--hidden-loss", a.hidden_loss), ""))
    ablations = parse_ablations(a.ablations, a.hidden_loss, len(seeds))
    jobs = [Job("teacher", "teacher", "teacher", epochs=a.teacher_epochs, lr=a.teacher_lr,
                extra=("--init", a.pretrained), study_vocab=False),
            Job("tfidf", "tfidf", "tfidf")]
    # seed-major order: every row's first seed before any second seed, so that a study stopped
    # early (a CPU budget) has one complete set of rows to report
    for k, seed in enumerate(seeds):
        jobs.append(Job(f"tnlp_s{seed}", "tnlp", "student", epochs=s, lr=a.student_lr,
                        seed=seed, extra=init, study_vocab=False))
        jobs.append(Job(f"tkd_s{seed}", "tkd", "distill", epochs=s, lr=a.student_lr, seed=seed,
                        extra=tkd_extra, study_vocab=False, logits=tkd_logits, int8=k == 0))
        if k < a.baseline_seeds:
            jobs += [Job(f"{arch}_s{seed}", arch, "student", arch=arch,
                         preset=f"{a.baseline_prefix}-{arch}", epochs=b, seed=seed)
                     for arch in ("rnn", "lstm", "cnn")]
        jobs.append(Job(f"kd_bilstm_s{seed}", "kd-bilstm", "distill", arch="bilstm",
                        preset=f"{a.baseline_prefix}-bilstm", epochs=b, seed=seed, extra=aug,
                        study_vocab=False, logits=aug_logits))
        jobs.append(Job(f"tkd_small_s{seed}", "tkd-small", "distill", preset=a.small_preset,
                        epochs=b, seed=seed, extra=aug, study_vocab=False, logits=aug_logits))
        for name, n in ablations.items():  # what the transfer set and each term add
            if k < n:
                extra, logits = recipes[name]
                jobs.append(Job(f"tkd_{name}_s{seed}", f"tkd-{name}", "distill", epochs=s,
                                lr=a.student_lr, seed=seed, extra=extra, study_vocab=False,
                                logits=logits))
    return jobs


def train_argv(job: Job, a, tokenizer: str) -> List[str]:
    """The `python -m tkd_core.train` arguments of one job (resume flag excluded)."""
    argv = ["--mode", job.mode, "--task", a.task]
    if job.preset:  # (an --init or --student-init job takes its architecture from its source)
        argv += ["--arch", job.arch, "--preset", job.preset]
    if job.study_vocab:
        argv += ["--vocab", tokenizer]
    argv += ["--max-len", str(a.max_len), "--epochs", f"{job.epochs:g}",
            "--batch-size", str(a.batch_size), "--lr", f"{job.lr:g}", "--alpha", f"{a.alpha:g}",
            "--temperature", f"{job.temperature:g}", "--seed", str(job.seed),
            "--threads", str(a.threads), "--save-every", str(a.save_every),
            "--out", os.path.join(a.out, job.name), "--no-progress"]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir]
    for kv in job.overrides:
        argv += ["--set", kv]
    if job.needs_teacher:
        argv += ["--teacher", os.path.join(a.out, "teacher", "checkpoint.pt")]
    if job.mode in ("teacher", "distill") and job.logits:  # the teacher's logits, computed once
        argv += ["--teacher-logits", os.path.join(a.out, "teacher", job.logits)]
    argv += list(job.extra)
    if a.group_by_length:
        argv.append("--group-by-length")
    if a.max_train_examples:
        argv += ["--max-train-examples", str(a.max_train_examples)]
    if a.max_dev_examples:
        argv += ["--max-dev-examples", str(a.max_dev_examples)]
    return argv
