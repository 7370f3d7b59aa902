"""The study's report: report.md (tables filled from the measured results) and the two plots."""
import math
import os
from typing import List

from .. import data as gdata
from ..measure import SEQ_LEN
from .plan import PAPER_CLAIM, PUBLISHED, tkd_group
from .stats import compare

def _pct(x, sd=None):
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}" + (f" ± {100 * sd:.2f}" if sd else "")


def _num(x):
    return "n/a" if x is None else f"{x:.2f}"


def _mb(b):
    return "n/a" if b is None else f"{b / 2**20:.2f}"


def _g(x):
    return "n/a" if x is None else f"{x:g}"


def _ms(lat, b):
    return "n/a" if not lat or lat.get(b) is None else f"{lat[b]:.2f}"


ROW_ORDER = ["teacher", "tkd", "tkd-T2", "tkd-T4", "tkd-noaug", "tkd-logits", "tkd-hidden",
             "tkd-attn", "tkd-small", "tnlp", "kd-bilstm", "rnn", "lstm", "cnn", "tfidf", "int8"]
# Published SST-2 dev accuracy (%) of pretrained students, for the pretrained study
PUBLISHED_PRETRAINED = [
    ("MiniLM-L6-H384, fine-tuned (Wang et al. 2020)", "91.5"),
    ("DistilBERT, 6 layers (Sanh et al. 2019)", "91.3"),
    ("TinyBERT-6 (Jiao et al. 2020)", "93.0"),
    ("BiLSTM distilled from BERT with a transfer set (Tang et al. 2019)", "90.7 (test)"),
]


def results_table(groups) -> str:
    head = ("| model | runs | dev acc % (mean ± std) | dev F1 % | params | fp32 MB | INT8 MB "
            "| CPU ms b=1 | CPU ms b=32 | ex/s b=32 | train wall s |")
    lines = [head, "|" + "---|" * 11]
    for g in [k for k in ROW_ORDER if k in groups] + sorted(set(groups) - set(ROW_ORDER)):
        r = groups[g]
        tp, wall = r.get("throughput"), r["train_wall_s"]
        lines.append(
            f"| {r['label']} | {r['n']} | {_pct(r['accuracy'], r['accuracy_std'])} | "
            f"{_pct(r['f1'])} | {r['params']:,} | {_mb(r['size_fp32'])} | "
            f"{_mb(r['size_int8'])} | {_ms(r['latency_ms'], 1)} | {_ms(r['latency_ms'], 32)} | "
            f"{'n/a' if tp is None else format(tp, ',.0f')} | "
            f"{'n/a' if wall is None else format(wall, ',.0f')} |"
            if r["params"] is not None else
            f"| {r['label']} | 0 | {r.get('note') or 'failed: ' + ', '.join(r['failed'])} |")
    return "\n".join(lines)


def _passes(res: dict) -> str:
    """' (train_logits.pt: 301 s; ...)': the charged logit passes, by cache file."""
    seen = {}
    for r in res.get("runs", []):
        f = (r.get("train_args") or {}).get("teacher_logits")
        if f and r.get("mode") == "distill":
            seen[os.path.basename(f)] = r.get("teacher_logits_s")
    if not seen:
        return ""
    return " (" + "; ".join(f"`{k}`: " + ("not recorded" if v is None else f"{v:.0f} s")
                            for k, v in sorted(seen.items())) + ")"


def _noise_from(g, a, b) -> str:
    ns = [g[k] for k in (a, b) if g[k]["n"] >= 2]
    return ("seeds " + " and ".join(f"{x['n']} ({x['label']})" for x in ns)) if ns else \
        "one seed each"


def _seeds_note(g, cfg, n_seeds: int) -> str:
    """The rows with fewer finished runs than their planned seeds (a study stopped early or a
    failed job; the issue allows 2 seeds for a row whose single run exceeds 15 minutes), with
    the length of one of their runs. Groups planned with one run (the teacher, the ablations)
    are not short of seeds."""
    fewer = [r for k, r in g.items() if k in cfg["models"] and r.get("train_wall_s")
             is not None and r["n"] < len(cfg["models"][k]["seeds"])]
    if not fewer:
        return f"Seeds: {n_seeds} for every student row but the one-seed ablations."
    return (f"Seeds: {n_seeds} for every student row but the one-seed ablations and " +
            ", ".join(f"{r['label']} ({r['n']}: one run takes {r['train_wall_s'] / 60:.0f} min "
                      "of training wall time)" for r in fewer) + ".")


def write_report(path: str, res: dict) -> None:
    g, hw, cfg = res["groups"], res["hardware"], res["config"]
    pre = bool(cfg.get("pretrained"))
    task = gdata.get_task(res["task"]).dirname or res["task"]
    L = [f"# TKD-NLP with a pretrained teacher on {task}" if pre else
         f"# TKD-NLP reproduction on {task}", ""]
    if pre:
        L += [f"The teacher is `{cfg['pretrained']}` fine-tuned on the task; the 2-layer students "
              f"start from its layers ({cfg['student_layers']}); the transfer set has "
              f"{cfg['augment']} augmented copy per training example. TKD-NLP is distilled "
              "with logits KD and the transfer set" + (
                  f" plus hidden-state {cfg['hidden_loss'].upper()} (uniform layer map)"
                  if cfg.get("hidden_loss", "none") != "none" else "") + ". The from-scratch study "
              "(no pretraining) is the ablation of pretraining: "
              "[../sst2/report.md](../sst2/report.md).", ""]
    L += ["Command:", "", "```bash", res["command"], "```", "",
          f"Wall time of the whole study: **{res['total_wall_s'] / 60:.1f} min** "
          f"({res['total_wall_s']:.0f} s over {len(res['invocations'])} invocation(s) of the "
          f"command, a killed one counted up to its last finished job; the last one: "
          f"{res['wall_s']:.0f} s). "
          f"Training set: {res['n_train']:,} examples, dev: {res['n_dev']:,}.", ""]
    L += ["## Hardware", "",
          f"- CPU: {hw['cpu']}, {hw['cores']} cores, torch ISA level {hw['isa']}; "
          f"GPU: {hw['gpu'] or 'none'}",
          f"- torch {hw['torch']}, Python {hw['python']}; tkd ops backend on CPU: "
          f"`{hw['ops_backend']}`",
          "- training: " + (f"{hw['parallel_jobs']} job(s) at a time (subprocesses)"
                            if hw["parallel_jobs"] else "one job at a time, in-process") +
          f", {hw['train_threads_per_job']} thread(s) each; latency: "
          f"`torch.set_num_threads({hw['latency_threads']})`, "
          f"nothing else of the study running, median of {cfg.get('latency_rounds', 1)} "
          f"rounds (interleaved over the models) of the median of {cfg['latency_reps']} forwards "
          f"(after 2 warm-ups) of random tokens, batch 1 and 32, sequence length {SEQ_LEN}, "
          "no padding. Throughput = 32 / (batch-32 latency). 1-minute load average when the "
          f"latency runs started: {_num(hw['load_average_at_latency'])} (above ~0.5, other "
          "processes shared the cores and the latencies are pessimistic).", ""]
    L += ["## Results (dev set)", "", results_table(g), "",
          "Accuracy and F1 are means over the seeds (std over seeds after ±); every other column "
          "is of one run of the group. Size = bytes of the saved state_dict (`torch.save`; TF-IDF: "
          "the pickled pipeline); INT8 = the same model after `quantize_model` (every Linear but "
          "the pooler and classifier; the recurrent and convolution weights stay fp32" +
          ("; every embedding table in int8 with per-row scales, `quantize_embeddings`"
           if pre else "") + "). TF-IDF "
          "latency is vectorize + predict of raw dev sentences (no token length). Train wall = "
          "seconds this study spent in the job, summed over its attempts, with the teacher's "
          "logit passes moved from the job that ran them to every row that reads them: each "
          "distilled row is charged the whole pass over its training items (the teacher's "
          "forwards, as timed by the job that ran them)" +
          _passes(res) + ".", ""]
    temps = [] if pre else [(t, g.get(tkd_group(t))) for t in cfg["temperatures"]]
    temps = [(t, r) for t, r in temps if r and r["accuracy"] is not None]
    if temps:
        L += ["## Temperature", "", "| T | seeds | dev acc % | per seed |", "|---|---|---|---|"]
        L += [f"| {t:g} | {r['n']} | {_pct(r['accuracy'], r['accuracy_std'])} | "
              f"{', '.join(f'{100 * x:.2f}' for x in r['accuracies'])} |" for t, r in temps]
        means = [r["accuracy"] for _, r in temps]
        noise = max(r["accuracy_std"] or 0.0 for _, r in temps)
        rng = max(means) - min(means)
        L += ["", f"Range of the means: {100 * rng:.2f} points; largest seed std: "
              f"{100 * noise:.2f} points. " + (
                  "The temperature matters here beyond the seed noise." if rng > 2 * noise and
                  len(temps) > 1 else "The temperature does not matter beyond the seed noise "
                  "here."), ""]
    L += ["## Ablation", ""]
    pairs = (("tkd", "tnlp"), ("kd-bilstm", "lstm"), ("tkd", "tkd-noaug"), ("tkd", "tkd-logits"),
             ("tkd-hidden", "tkd"), ("tkd-attn", "tkd"), ("tkd", "tkd-small")) if pre else \
        (("tkd", "tnlp"), ("tkd", "kd-bilstm"), ("tnlp", "kd-bilstm"))
    for a, b in pairs:
        c = compare(g, a, b)
        if c:
            L.append(f"- {g[a]['label']} - {g[b]['label']}: {100 * c['diff']:+.2f} points; "
                     f"seed std up to {100 * c['noise_std']:.2f}, seed spread up to "
                     f"{100 * c['seed_spread']:.2f} points ({_noise_from(g, a, b)}): "
                     + ("one seed: no noise estimate, no verdict." if c["beyond_noise"] is None
                        else "**beyond** the run-to-run noise." if c["beyond_noise"] else
                        "**within** the run-to-run noise."))
    n_seeds = max((len(m["seeds"]) for m in cfg["models"].values()), default=1)
    L += ["", f"{n_seeds} seeds per group give a rough noise estimate only; a difference is "
          "called beyond the noise when it exceeds both twice the larger seed std and the larger "
          "seed spread (of the groups with 2+ seeds: a one-seed ablation is judged against the "
          "seed noise of the row it is compared with).", ""]
    L += [_seeds_note(g, cfg, n_seeds), ""]
    L += ["## Targets", "", "| target | met | numbers |", "|---|---|---|"]
    for t in res["targets"]:
        met = {True: "met", False: "**NOT met**", None: "not measured"}[t["met"]]
        L.append(f"| {t['target']} | {met} | {t['detail']} |")
    L += _published_pretrained(g, cfg) if pre else _published_scratch(g, hw, cfg)
    L += ["## Configurations", "", "| job group | mode | arch | preset (+ overrides) | layers | "
          "hidden (E) | FFN / state (H) | epochs | lr | T | alpha | seeds |", "|" + "---|" * 12]
    for gname, m in cfg["models"].items():
        preset = m["preset"] + "".join(f" `{kv}`" for kv in m["overrides"]) + (
            " (pre-LN)" if m["pre_ln"] else "")
        L.append(f"| {gname} | {m['mode']} | {m['arch']} | {preset} | {m['num_layers']} | "
                 f"{m['hidden_size']} | {m['ffn_size']} | {_g(m['epochs'])} | {_g(m['lr'])} | "
                 f"{m['temperature']} | {cfg['alpha'] if m['mode'] == 'distill' else '-'} | "
                 f"{m['seeds']} |")
    vocab = (f"the teacher's own WordPiece vocabulary for the teacher and the students "
             f"distilled from it, and a shared WordPiece vocabulary of {cfg['vocab_size']:,} "
             "learnt on the training split (`tokenizer/`) for the RNN / LSTM / CNN" if pre else
             f"a shared WordPiece vocabulary of {cfg['vocab_size']:,} learnt on the training "
             "split (`tokenizer/`)")
    L += ["", f"All neural jobs: `python -m tkd_core.train`, AdamW (weight decay 0.01, linear "
          f"warm-up 10% then linear decay), batch {cfg['batch_size']}, max length "
          f"{cfg['max_len']}, fp32, {vocab}. Deviations from the paper's recipe "
          "(KD weight 0.5, T=1, batch 64, 10 epochs, AdamW, FP16 on CUDA): fewer epochs and fp32 "
          "on CPU, as above. Batches are grouped by length (`--group-by-length`: less padding, "
          "the order still seeded-random per epoch) and the teacher's logits on the training "
          "set" + (" and the transfer set" if pre else "") + " are computed once and shared by "
          "the distilled students (`--teacher-logits`). Each job's exact command line is in "
          "results.json.", ""]
    L += (["The teacher's epochs and learning rate (`--teacher-epochs`, `--teacher-lr`) were "
           "chosen after earlier teachers' dev accuracy (GLUE's test labels are hidden, so dev "
           "served both for that choice and for the numbers above).", ""] if pre else
          ["The epochs and the teacher's pooling and dropout were chosen from short SST-2 runs "
           "judged on dev accuracy, recorded in `teacher_search.md` beside this report when it "
           "is published (GLUE's test labels are hidden, so dev served both for these choices "
           "and for the numbers above).", ""])
    if res.get("failed"):
        L += ["## Failed jobs", "", *[f"- {n}: see {n}/train.log" for n in res["failed"]], ""]
    L += ["Plots: `accuracy_vs_latency.png`, `accuracy_vs_size.png`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def _published_scratch(g, hw, cfg) -> list:
    L = []
    L += ["", "## Against published numbers", "",
          "| model | SST-2 dev acc % |", "|---|---|"]
    L += [f"| {n} (published, pretrained) | {v} |" for n, v in PUBLISHED]
    L += [f"| TKD-NLP paper's claim | {PAPER_CLAIM} |"]
    for k in ("teacher", "tkd", "int8"):
        if k in g and g[k]["accuracy"] is not None:
            L.append(f"| {g[k]['label']} (ours) | {100 * g[k]['accuracy']:.2f} |")
    tm, sm = cfg["models"].get("teacher", {}), cfg["models"].get("tkd", {})
    L += ["", "Why ours differ:", "",
          "- **No pretraining.** BERT-base, DistilBERT and TinyBERT start from language models "
          "pretrained on billions of words (TinyBERT also distills with augmented data); ours "
          "start from random weights and see only the 67k SST-2 training phrases, with a "
          "WordPiece vocabulary learnt on them. Trained from scratch on a small corpus, a "
          "Transformer has no head start over recurrent, convolutional or bag-of-n-gram "
          "models (compare the teacher with the TF-IDF row).",
          f"- **CPU-sized models and schedule.** The teacher is {_g(tm.get('num_layers'))} "
          f"layers of width {_g(tm.get('hidden_size'))} (BERT-base: 12 x 768) trained for "
          f"{_g(tm.get('epochs'))} epoch(s), the students for {_g(sm.get('epochs'))}, against "
          f"the paper's 10, in fp32 on {hw['cores']} CPU core(s) ({hw['cpu']}; GPU: "
          f"{hw['gpu'] or 'none'}).",
          f"- **The paper's {PAPER_CLAIM}%** is far above every published SST-2 dev result "
          "(humans are estimated at about 97.8% on SST-2 by GLUE); with no code, "
          "split or protocol to check it against, we cannot reproduce it and do not expect to.",
          ""]
    return L


def _published_pretrained(g, cfg) -> list:
    L = ["", "## Against published numbers", "", "| model | SST-2 dev acc % |", "|---|---|"]
    L += [f"| {n} (published) | {v} |" for n, v in PUBLISHED_PRETRAINED]
    for k in ("teacher", "tkd", "tkd-small", "kd-bilstm", "int8"):
        if k in g and g[k]["accuracy"] is not None:
            L.append(f"| {g[k]['label']} (ours) | {100 * g[k]['accuracy']:.2f} |")
    epochs = [m["epochs"] for m in cfg["models"].values() if m.get("epochs")] or [0]
    lo, hi = min(epochs), max(epochs)
    L += ["", "Sources: the papers' SST-2 dev tables (Tang et al. report the test set). Ours are "
          f"CPU-sized schedules ({_g(lo)} to {_g(hi)} epochs, fp32, max length {cfg['max_len']}: "
          "each row's epochs are in the configurations below).", ""]
    return L


def write_plots(out: str, groups, other=None) -> List[str]:
    """accuracy_vs_latency.png and accuracy_vs_size.png; `other`: another study's groups (the
    from-scratch one, beside the pretrained), drawn as grey squares labelled "(scratch)"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    rows = [(r["label"], r["accuracy"], r) for r in groups.values() if r["accuracy"] is not None]
    for k, r in (other or {}).items():
        if r.get("accuracy") is not None and k != "tfidf":
            r = dict(r, other=True, latency_ms={int(b): v for b, v in
                                                (r.get("latency_ms") or {}).items()})
            rows.append((f"{r['label']} (scratch)", r["accuracy"], r))
    for key, xlabel, fname, xof in [
            ("latency", "CPU latency, batch 1, seq 64 (ms, log)", "accuracy_vs_latency.png",
             lambda r: (r["latency_ms"] or {}).get(1)),
            ("size", "size on disk (MB, log; INT8 row: its INT8 size)", "accuracy_vs_size.png",
             lambda r: (r["size_int8"] if r.get("group", r.get("label")) == "int8" or
                        r is groups.get("int8") else r["size_fp32"] or 0) / 2**20)]:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        placed = []  # label positions so far: models at the same x stack their labels apart
        for label, acc, r in sorted(rows, key=lambda t: -t[1]):
            x = xof(r)
            if x is None or x <= 0:
                continue
            yerr = 100 * r["accuracy_std"] if r["accuracy_std"] else None
            ax.errorbar([x], [100 * acc], yerr=yerr, capsize=3,
                        **(dict(fmt="s", color="0.6") if r.get("other") else dict(fmt="o")))
            near = sum(abs(math.log(x / px)) < 0.08 and abs(100 * acc - py) < 0.25
                       for px, py in placed)
            placed.append((x, 100 * acc))
            ax.annotate(label, (x, 100 * acc), textcoords="offset points",
                        xytext=(6, 4 - 10 * near), fontsize=8)
        ax.set_xscale("log")
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(f"accuracy vs {key}")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
