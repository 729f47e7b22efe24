"""Hard shifts: the methods against source-only where the source model is near chance, with the
measured reason for every method that falls below it (issue 29 item 6).

    python -m dalab.benchmarks.hard_report [results/digits_hard/runs] [--out results/digits_hard/report.md]

Reads the records of benchmarks/digits_hard.yaml (never trains). Every number is from the records at
the checkpoint the spec's first selection rule picks (no target labels), mean over seeds:

* per pair, the source model: its target-TEST accuracy and its transductive accuracy on target
  TRAIN (``tgt_train``: the pseudo-labels a self-training method starts from);
* every method's accuracy and its difference to source-only on each pair;
* for each (method, pair) more than :data:`BELOW` points under source-only, the measured reason, the
  first of :data:`REASONS` whose test holds on the seed means: the method diverged; it gave up the
  source task; it grew confident on wrong target labels; its target accuracy fell while training;
  else none of these, said as such.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

RUNS, OUT = "results/digits_hard/runs", "results/digits_hard/report.md"
BELOW = 1.0            # points under source-only (seed means) that count as "below"
SOURCE_LOST = 10.0     # points of source-validation accuracy under source-only's: the source task is given up
SHARPER = 0.10         # nats of mean prediction entropy under source-only's: the method is more confident
FALLS = 1.0           # points target-train accuracy loses from the first checkpoint to the last: adaptation hurts
REASONS = ("diverged", "source task given up", "confident on wrong labels", "target accuracy falls while training",
           "none of the measured causes")


def _spec():
    from dalab.bench import BenchSpec

    return BenchSpec.from_yaml(Path(__file__).resolve().parent / "digits_hard.yaml")


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.mean(xs) if xs else float("nan")


def measures(records: list[dict], rule: str) -> dict[tuple[str, str], dict]:
    """(method, pair key) -> seed means at the rule's checkpoint: ``acc`` (target test, %), ``src``
    (source val, %), ``train_first`` / ``train_last`` (target-train accuracy at the first and the
    last checkpoint, %; records before tgt_train was scored give NaN), ``entropy`` (mean prediction
    entropy on target train, nats), ``n`` finished seeds, ``diverged`` seeds."""
    from dalab.selection import select
    from dalab.tasks import score

    acc: dict[tuple[str, str], dict[str, list]] = {}
    for r in records:
        c = r["config"]
        m = acc.setdefault((r["method"]["name"], f"{c['source']}→{c['target']}"),
                           {k: [] for k in ("acc", "src", "train_first", "train_last", "entropy", "diverged")})
        p = select(r, rule)
        if p is None:
            m["diverged"].append(r.get("status") == "diverged")
            continue
        evals = r["evals"]
        m["acc"].append(100 * score(r, p))
        m["src"].append(100 * p["src_val"]["acc"])
        m["train_first"].append(100 * evals[0].get("tgt_train", {}).get("acc", float("nan")))
        m["train_last"].append(100 * evals[-1].get("tgt_train", {}).get("acc", float("nan")))
        neg_entropy = p.get("tgt_train_unsup", {}).get("entropy")  # recorded negated (higher is better)
        m["entropy"].append(-neg_entropy if neg_entropy is not None else float("nan"))
    return {k: {**{f: _mean(v[f]) for f in ("acc", "src", "train_first", "train_last", "entropy")},
                "n": len(v["acc"]), "diverged": sum(v["diverged"])} for k, v in acc.items()}


def reason(m: dict, so: dict, uses_source: bool = True) -> tuple[str, str]:
    """(reason, its evidence) of a method ``m`` below source-only ``so`` (:func:`measures` rows). A
    source-free method (``uses_source`` False) never trains on the source, so its source accuracy
    is not a cause."""
    if m["diverged"]:
        return REASONS[0], f"{m['diverged']} seed(s) diverged"
    if uses_source and m["src"] < so["src"] - SOURCE_LOST:
        return REASONS[1], f"source val {m['src']:.1f}% vs source-only {so['src']:.1f}%"
    trend = f"target-train acc {m['train_first']:.1f}% -> {m['train_last']:.1f}% over training"
    if m["entropy"] < so["entropy"] - SHARPER:
        return REASONS[2], (f"mean prediction entropy {m['entropy']:.2f} vs source-only {so['entropy']:.2f} nats; "
                            f"{trend}")
    kept = (f"source val {m['src']:.1f}% (source-only {so['src']:.1f}%), entropy {m['entropy']:.2f} vs "
            f"{so['entropy']:.2f} nats; {trend}")
    if m["train_last"] < m["train_first"] - FALLS:
        return REASONS[3], kept
    return REASONS[4], kept


def report(records: list[dict], command: str) -> str:
    from dalab import display
    from dalab.methods import METHODS
    from dalab.render import Table
    from dalab.selection import RULES

    spec = _spec()
    rule = spec.selection[0]
    meas = measures(records, rule)
    pairs = [f"{s}→{t}" for s, t in spec.pairs]
    methods = sorted({meth for meth, _ in meas}, key=lambda x: (x != "source_only", x))
    so = {p: meas.get(("source_only", p)) for p in pairs}

    src = Table(["Pair", "Source-only target test", "Source model on target train (transductive)", "Source val"])
    for p in pairs:
        s = so[p]
        if s:
            src.add(display.pair_key(p), f"{s['acc']:.1f}", f"{s['train_last']:.1f}", f"{s['src']:.1f}")

    main = Table(["Method", *[display.pair_key(p) for p in pairs], "Avg", "Δ vs source-only"])
    below = Table(["Method", "Pair", "Acc (source-only)", "Reason", "Evidence"])
    for meth in methods:
        cells, deltas = [], []
        for p in pairs:
            m = meas.get((meth, p))
            if not m or not m["n"]:
                cells.append("†" if m and m["diverged"] else "—")
                continue
            cells.append(f"{m['acc']:.1f}" + (f" (n={m['n']})" if m["n"] < len(spec.seeds) else ""))
            if so[p]:
                deltas.append(m["acc"] - so[p]["acc"])
                if meth != "source_only" and m["acc"] < so[p]["acc"] - BELOW:
                    why, evidence = reason(m, so[p], METHODS[meth].uses_source)
                    below.add(display.method(meth), display.pair_key(p), f"{m['acc']:.1f} ({so[p]['acc']:.1f})", why,
                              evidence)
        accs = [meas[(meth, p)]["acc"] for p in pairs if meas.get((meth, p)) and meas[(meth, p)]["n"]]
        avg = f"{statistics.mean(accs):.1f}" if len(accs) == len(pairs) else "—"
        delta = f"{statistics.mean(deltas):+.1f}" if len(deltas) == len(pairs) and meth != "source_only" else ""
        main.add(display.method(meth), *cells, avg, delta)
    for meth in methods:  # a method with every seed diverged on a pair has no accuracy: its reason still shows
        for p in pairs:
            m = meas.get((meth, p))
            if m and not m["n"] and m["diverged"] and so[p]:
                below.add(display.method(meth), display.pair_key(p), f"† ({so[p]['acc']:.1f})",
                          *reason(m, so[p], METHODS[meth].uses_source))
    rules = (f"A method counts as below source-only when its seed mean is more than {BELOW:g} point under source-only's "
             f"on the pair. Its reason is the first that holds: **{REASONS[0]}** (a seed's loss went non-finite); "
             f"**{REASONS[1]}** (source validation more than {SOURCE_LOST:g} points under source-only's: the "
             f"adaptation term outweighs the classifier; not tested for a source-free method, which never trains on "
             f"the source); **{REASONS[2]}** (mean prediction entropy on target train "
             f"more than {SHARPER:g} nats under source-only's while accuracy is lower: the objective sharpens the "
             f"source model's mistakes); **{REASONS[3]}** (the source task kept, no sharper, but target-train accuracy "
             f"more than {FALLS:g} point lower at the last checkpoint than at the first: the adaptation term moves "
             f"target features toward the wrong classes); else **{REASONS[4]}**, with the same measures shown.")
    return (f"<!-- generated by: {command} -->\n# Hard shifts: where the source model is near chance\n\n"
            f"Pairs: {', '.join(display.pair_key(p) for p in pairs)}; {len(spec.seeds)} seeds; every method at the main "
            f"job's settings (benchmarks/digits.yaml), nothing tuned on these pairs. Accuracy: target test (%), mean "
            f"over seeds at the checkpoint {RULES[rule].label} picks (no target labels); † = diverged.\n\n"
            f"## The source model\n\nTransductive accuracy: the source-only run's last checkpoint on target TRAIN "
            f"(labels used only to score it), the quality of the pseudo-labels a self-training method starts "
            f"from.\n\n" + src.markdown() + "\n## Every method\n\n" + main.markdown()
            + "\n## Below source-only, and why (measured)\n\n" + rules + "\n\n"
            + (below.markdown() if below.rows else "No method is below source-only.\n"))


def main(argv=None) -> int:
    from dalab.benchmarks import report_main
    from dalab.tables import load_records

    return report_main(argv, __doc__, "dalab.benchmarks.hard_report", RUNS, OUT,
                       lambda runs, command: report(load_records(runs), command))


if __name__ == "__main__":
    sys.exit(main())
