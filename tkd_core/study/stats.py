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
    noise = max(ga["accuracy_std"] or 0.0, gb["accuracy_std"] or 0.0)
    spread = max(max(g["accuracies"]) - min(g["accuracies"]) for g in (ga, gb))
    return dict(a=a, b=b, diff=diff, noise_std=noise, seed_spread=spread,
                beyond_noise=abs(diff) > 2 * noise and abs(diff) > spread,
                seeds=min(ga["n"], gb["n"]))


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
