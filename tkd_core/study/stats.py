"""Statistics of the study's runs: per-group means and seed noise, comparisons against that noise,
and the issue's targets, each met or not with its numbers."""
import statistics
from typing import List, Optional

from .plan import TFIDF_PUBLISHED

def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: List[dict]) -> dict:
    """group -> mean/std of accuracy and F1 over its seeds, and the efficiency numbers."""
    out = {}
    for r in runs:
        out.setdefault(r["group"], []).append(r)
    groups = {}
    for g, rs in out.items():
        ok = [r for r in rs if r.get("metrics")]
        acc, acc_sd = _mean_std([r["metrics"]["accuracy"] for r in ok])
        f1, _ = _mean_std([r["metrics"]["f1"] for r in ok])
        first = ok[0] if ok else rs[0]
        groups[g] = dict(
            label=first["label"], runs=[r["name"] for r in rs], n=len(ok),
            accuracy=acc, accuracy_std=acc_sd, accuracies=[r["metrics"]["accuracy"] for r in ok],
            f1=f1, params=first.get("params"), size_fp32=first.get("size_fp32"),
            size_int8=first.get("size_int8"), latency_ms=first.get("latency_ms"),
            throughput=first.get("throughput"),
            train_wall_s=_mean_std([r.get("train_wall_s") for r in ok])[0],
            failed=[r["name"] for r in rs if not r.get("metrics")])
    return groups


def compare(groups, a: str, b: str) -> Optional[dict]:
    """Difference of mean accuracy a - b against the run-to-run noise (seed std)."""
    ga, gb = groups.get(a), groups.get(b)
    if not ga or not gb or ga["accuracy"] is None or gb["accuracy"] is None:
        return None
    diff = ga["accuracy"] - gb["accuracy"]
    # the noise comes from the group(s) with 2+ seeds: a one-seed ablation is judged against
    # the seed noise of the row it is compared with; two one-seed groups get no verdict (None)
    noisy = [g for g in (ga, gb) if g["n"] >= 2]
    noise = max((g["accuracy_std"] or 0.0 for g in noisy), default=0.0)
    spread = max((max(g["accuracies"]) - min(g["accuracies"]) for g in noisy), default=0.0)
    return dict(a=a, b=b, diff=diff, noise_std=noise, seed_spread=spread,
                beyond_noise=(abs(diff) > 2 * noise and abs(diff) > spread) if noisy else None,
                seeds=max((g["n"] for g in noisy), default=min(ga["n"], gb["n"])))


def targets(groups) -> List[dict]:
    """The issue's four targets, each met or not, with the numbers."""
    out = []

    def add(name, met, detail):
        out.append(dict(target=name, met=met, detail=detail))

    t, tf, s, q = (groups.get(k) for k in ("teacher", "tfidf", "tkd", "int8"))
    acc = lambda g: g["accuracy"] if g and g["accuracy"] is not None else None  # noqa: E731
    if acc(t) is not None and acc(tf) is not None:
        add("teacher beats TF-IDF + logistic regression", acc(t) > acc(tf),
            f"teacher {100 * acc(t):.2f}% vs TF-IDF+LR {100 * acc(tf):.2f}% "
            f"(issue's reference ~{TFIDF_PUBLISHED:.0f}%)")
    else:
        add("teacher beats TF-IDF + logistic regression", None, "missing runs")
    if acc(t) is not None and acc(s) is not None:
        ratio, shrink = acc(s) / acc(t), t["params"] / s["params"]
        add("TKD-NLP >= 98% of teacher accuracy with >= 5x fewer parameters",
            ratio >= 0.98 and shrink >= 5,
            f"{100 * ratio:.1f}% of the teacher's accuracy (mean of {s['n']} seeds, T=1), "
            f"{shrink:.1f}x fewer parameters ({t['params']:,} vs {s['params']:,})")
    else:
        add("TKD-NLP >= 98% of teacher accuracy with >= 5x fewer parameters", None,
            "missing runs")
    if q and acc(q) is not None and q.get("fp32_accuracy") is not None and t:
        drop = 100 * (q["fp32_accuracy"] - acc(q))
        speed = t["latency_ms"][1] / q["latency_ms"][1]
        add("INT8 student loses <= 0.5 points and is >= 8x faster than the teacher at batch 1",
            drop <= 0.5 and speed >= 8,
            f"{drop:+.2f} points lost vs its fp32 self ({100 * q['fp32_accuracy']:.2f}% -> "
            f"{100 * acc(q):.2f}%); batch-1 latency {q['latency_ms'][1]:.2f} ms vs teacher "
            f"{t['latency_ms'][1]:.2f} ms = {speed:.1f}x")
    else:
        add("INT8 student loses <= 0.5 points and is >= 8x faster than the teacher at batch 1",
            None, (q or {}).get("note", "INT8 student missing"))
    c1, c2 = compare(groups, "tkd", "tnlp"), compare(groups, "tkd", "kd-bilstm")
    if c1 and c2:
        both = c1["diff"] > 0 and c2["diff"] > 0 and c1["beyond_noise"] and c2["beyond_noise"]
        add("ablation: Transformer + KD beats Transformer alone and KD alone (beyond noise)",
            both, f"TKD - T-NLP = {100 * c1['diff']:+.2f} points, TKD - KD-BiLSTM = "
            f"{100 * c2['diff']:+.2f} points; seed std up to "
            f"{100 * max(c1['noise_std'], c2['noise_std']):.2f} points ({c1['seeds']} seeds)")
    else:
        add("ablation: Transformer + KD beats Transformer alone and KD alone (beyond noise)",
            None, "missing runs")
    return out


def targets_pretrained(groups) -> List[dict]:
    """The pretrained study's targets, each met or not (None: runs missing), with numbers."""
    out = []
    g = groups.get
    acc = lambda x: x["accuracy"] if x and x["accuracy"] is not None else None  # noqa: E731

    def add(name, ok, detail, *need):
        missing = any(v is None for v in need)
        out.append(dict(target=name, met=None if missing else ok,
                        detail="missing runs" if missing else detail))

    t, s = acc(g("teacher")), acc(g("tkd"))
    add("Teacher >= 90.0% dev (published MiniLM-L6-H384: 91.5)", t is not None and t >= 0.90,
        f"teacher {100 * (t or 0):.2f}%", t)
    add("TKD-NLP (2 layers) >= 97% of the teacher", s is not None and t and s / t >= 0.97,
        f"{100 * (s or 0):.2f}% = {100 * (s or 0) / (t or 1):.1f}% of the teacher", t, s)
    for a, b, name in (("tkd", "tnlp", "TKD-NLP beats T-NLP beyond the noise"),
                       ("kd-bilstm", "lstm", "KD-NLP (BiLSTM + transfer set) beats the hard-label "
                                             "LSTM beyond the noise")):
        c = compare(groups, a, b)
        one_seed = bool(c) and c["beyond_noise"] is None
        add(name, None if one_seed else bool(c) and c["diff"] > 0 and bool(c["beyond_noise"]),
            (f"{100 * c['diff']:+.2f} points with one seed: no noise estimate, no verdict"
             if one_seed else f"{100 * c['diff']:+.2f} points; seed std up to "
             f"{100 * c['noise_std']:.2f}, spread up to {100 * c['seed_spread']:.2f} "
             f"({c['seeds']} seeds)") if c else "", c)
    q, tg = g("int8"), g("teacher")
    ok = q and acc(q) is not None and q.get("fp32_accuracy") is not None and tg and \
        tg.get("latency_ms") and q.get("latency_ms") and tg.get("size_fp32")
    if ok:
        drop = 100 * (q["fp32_accuracy"] - acc(q))
        speed = tg["latency_ms"][1] / q["latency_ms"][1]
        frac = q["size_int8"] / tg["size_fp32"]
    add("TKD-NLP INT8 loses <= 0.5 points vs its fp32 self", ok and drop <= 0.5,
        f"{drop:+.2f} points ({100 * q['fp32_accuracy']:.2f}% -> {100 * acc(q):.2f}%)"
        if ok else "", ok or None)
    add("TKD-NLP INT8 >= 4x faster than the fp32 teacher at batch 1", ok and speed >= 4,
        f"{q['latency_ms'][1]:.2f} ms vs {tg['latency_ms'][1]:.2f} ms = {speed:.1f}x"
        if ok else "", ok or None)
    add("TKD-NLP INT8 <= 1/4 of the fp32 teacher's bytes", ok and frac <= 0.25,
        f"{q['size_int8'] / 2**20:.1f} MB vs {tg['size_fp32'] / 2**20:.1f} MB = {frac:.2f}"
        if ok else "", ok or None)
    return out
