"""Model selection and paper tables, computed from run records only.

Selection rules (each table names its rule):

- ``last``     the final checkpoint of the fixed step budget (no selection at all);
- ``src_val``  the checkpoint with the best source-validation accuracy;
- ``im``, ``entropy``, ``snd``  the checkpoint with the best label-free pytorch-adapt validator
  score on target-train predictions (information maximisation, negative entropy, soft
  neighbourhood density);
- ``oracle``   the checkpoint with the best TARGET-validation accuracy. It uses target labels, so it
  is an upper bound for model selection, never a UDA result; its tables say so.

The same rule picks among hyperparameter trials: the trial with the best mean selection score
over seeds (for ``last``: the best mean source-validation accuracy at the last checkpoint).
Reported numbers are always target-TEST accuracy at the selected checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from dalab.utils import atomic_write_text

RULE_TEXT = {
    "last": "last checkpoint of the fixed step budget (no target labels)",
    "src_val": "best source-validation accuracy (no target labels)",
    "im": "best information-maximisation score on unlabeled target train (no target labels)",
    "entropy": "lowest prediction entropy on unlabeled target train (no target labels)",
    "snd": "best soft-neighbourhood density on unlabeled target train (no target labels)",
    "oracle": "ORACLE: best target-validation accuracy -- uses target labels, an upper bound, not a UDA result",
}


def load_records(runs_dir: str | Path) -> list[dict]:
    """Every finished run (``done`` marker + readable record) under ``runs_dir``; partial runs are ignored."""
    out = []
    for d in sorted(Path(runs_dir).iterdir()) if Path(runs_dir).is_dir() else []:
        if d.is_dir() and (d / "done").is_file() and (d / "record.json").is_file():
            try:
                out.append(json.loads((d / "record.json").read_text()))
            except ValueError:
                continue
    return out


def selection_score(ev: dict, rule: str) -> float:
    if rule in ("last", "src_val"):
        return ev["src_val"]["acc"]
    if rule == "oracle":
        return ev["tgt_val"]["acc"]
    return ev["tgt_train_unsup"][rule]


def select(record: dict, rule: str) -> dict | None:
    """The evaluation point a rule picks in one run, or None (a diverged run under ``last``, or no
    evaluation at all). Ties go to the later checkpoint."""
    evals = record.get("evals") or []
    if rule == "last":
        return record["evals"][-1] if record.get("status") == "done" and evals else None
    finite = [e for e in evals if math.isfinite(selection_score(e, rule))]
    if not finite:
        return None
    return max(reversed(finite), key=lambda e: selection_score(e, rule))


def pair_name(rec: dict) -> str:
    return f"{rec['config']['source']}→{rec['config']['target']}"


def setting(rec: dict) -> str:
    """What must never be pooled into one cell besides the method: backbone, pretrained weights,
    step budget and data split (hyperparameters differing within a setting are trials)."""
    c = rec["config"]
    s = f"{c.get('backbone', '?')}, {c.get('steps', '?')} steps"
    if c.get("pretrained"):
        s += f", pretrained {c['pretrained']}"
    if c.get("split_seed", 0):
        s += f", split {c['split_seed']}"
    prec = rec.get("train", {}).get("precision")
    if prec and prec != "fp32":
        s += f", {prec}"
    from dalab.methods.base import DATA_HPARAMS
    hp = rec.get("hparams", {})
    opts = [f"{k}={hp[k]}" for k in DATA_HPARAMS if k in hp and hp[k] != DATA_HPARAMS[k].default]
    return s + (", " + ", ".join(opts) if opts else "")


def row_key(rec: dict) -> tuple[str, str, str, str]:
    return rec["method"]["family"], rec["method"]["budget"], rec["method"]["name"], setting(rec)


def _trial_key(rec: dict) -> str:
    return json.dumps(rec["config"]["hparams"], sort_keys=True)


def aggregate(records: Iterable[dict], rule: str) -> dict[tuple, dict[str, dict]]:
    """{row_key: {pair: {"accs": [...], "n_failed": int, "hparams": {...}}}} under ``rule``."""
    groups: dict[tuple, dict[str, dict[str, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        groups[row_key(r)][pair_name(r)][_trial_key(r)].append(r)
    out: dict[tuple, dict[str, dict]] = {}
    for rk, by_pair in groups.items():
        out[rk] = {}
        for pair, trials in by_pair.items():
            def trial_score(recs):
                pts = [select(r, rule) for r in recs]
                vals = [selection_score(p, rule) for p in pts if p is not None]
                return statistics.mean(vals) if vals else -math.inf
            best = max(sorted(trials), key=lambda k: trial_score(trials[k]))
            pts = [select(r, rule) for r in trials[best]]
            accs = [p["tgt_test"]["acc"] * 100 for p in pts if p is not None]
            out[rk][pair] = {"accs": accs, "n_failed": sum(p is None for p in pts), "hparams": json.loads(best),
                             "n_trials": len(trials)}
    return out


def _fmt(accs: list[float]) -> str:
    if not accs:
        return "—"
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.1f} ± {sd:.1f}"


def build_table(records: list[dict], rule: str, pairs: list[str] | None = None) -> dict[str, Any]:
    """Rows grouped by label budget then family, columns = pairs + average + average rank.
    Best and second-best are marked within each label-budget group (rows that see the same target
    labels compete with each other)."""
    agg = aggregate(records, rule)
    pairs = pairs or sorted({p for v in agg.values() for p in v})
    budget_order = lambda b: (b != "0", b == "all", int(b) if b.isdigit() else 0)  # noqa: E731
    # within a method, the plainest setting (defaults) first, then its variants
    rows = sorted(agg, key=lambda rk: (budget_order(rk[1]), rk[0] != "baseline", rk[0], rk[2], len(rk[3]), rk[3]))
    table = []
    for rk in rows:
        cells = {p: agg[rk].get(p, {"accs": [], "n_failed": 0}) for p in pairs}
        means = {p: statistics.mean(c["accs"]) if c["accs"] else None for p, c in cells.items()}
        complete = all(m is not None for m in means.values())
        avg = statistics.mean(means.values()) if complete and means else None
        table.append({"family": rk[0], "budget": rk[1], "method": rk[2], "setting": rk[3], "cells": cells,
                      "means": means, "avg": avg})
    for budget in {r["budget"] for r in table}:
        group = [r for r in table if r["budget"] == budget]
        for col in pairs + ["avg"]:
            vals = sorted({(r["means"][col] if col != "avg" else r["avg"]) for r in group} - {None}, reverse=True)
            for r in group:
                v = r["means"][col] if col != "avg" else r["avg"]
                r.setdefault("mark", {})[col] = ("best" if vals and v == vals[0] else
                                                 "second" if len(vals) > 1 and v == vals[1] else "")
        for p in pairs:  # rank within the budget group (1 = best; ties share their average rank)
            vals = sorted((r["means"][p] for r in group if r["means"][p] is not None), reverse=True)
            for r in group:
                if r["means"][p] is not None:
                    pos = [i + 1 for i, v in enumerate(vals) if v == r["means"][p]]
                    r.setdefault("ranks", []).append(statistics.mean(pos))
    for r in table:
        r["rank"] = statistics.mean(r["ranks"]) if len(r.get("ranks", [])) == len(pairs) else None
    nmax = max((len(c["accs"]) for r in table for c in r["cells"].values()), default=0)
    settings = sorted({r["setting"] for r in table})
    if len(settings) > 1:  # several settings in one folder: name each row's, never pool them
        for r in table:
            r["method"] = f"{r['method']} ({r['setting']})"
    return {"rule": rule, "pairs": pairs, "rows": table, "n": nmax, "settings": settings}


def _budget_label(b: str) -> str:
    return "no target labels" if b == "0" else ("all target labels" if b == "all" else f"{b} target labels per class")


def _cell_text(c: dict, nmax: int) -> str:
    s = _fmt(c["accs"])
    if c["accs"] and len(c["accs"]) < nmax:
        s += f" (n={len(c['accs'])})"
    if c.get("n_failed"):
        s += f" †{c['n_failed']}"
    return s


def to_markdown(t: dict, command: str = "") -> str:
    head = ["method", "family"] + t["pairs"] + ["avg", "avg rank"]
    lines = [f"### Selection rule: `{t['rule']}` — {RULE_TEXT[t['rule']]}", ""]
    if command:
        lines.append(f"<!-- generated by: {command} -->")
    lines.append(f"Target test accuracy (%), mean ± std over {t['n']} seeds"
                 + (f" ({t['settings'][0]})" if len(t.get("settings", [])) == 1 else "")
                 + ". Best per label-budget group in "
                 "**bold**, second _italic_. † = runs that diverged or have no checkpoint under this rule.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    budget = None
    for r in t["rows"]:
        if r["budget"] != budget:
            budget = r["budget"]
            lines.append(f"| *{_budget_label(budget)}* |" + " |" * (len(head) - 1))
        cells = []
        for p in t["pairs"] + ["avg"]:
            s = _cell_text(r["cells"][p], t["n"]) if p != "avg" else (f"{r['avg']:.1f}" if r["avg"] is not None else "—")
            mark = r["mark"][p]
            cells.append(f"**{s}**" if mark == "best" else f"_{s}_" if mark == "second" else s)
        rank = f"{r['rank']:.1f}" if r["rank"] is not None else "—"
        lines.append(f"| {r['method']} | {r['family']} | " + " | ".join(cells) + f" | {rank} |")
    return "\n".join(lines) + "\n"


def _tex_escape(s: str) -> str:
    return s.replace("_", r"\_").replace("→", r"$\to$").replace("%", r"\%").replace("&", r"\&")


def to_latex(t: dict, command: str = "") -> str:
    cols = t["pairs"] + ["Avg"]
    out = []
    if command:
        out.append(f"% generated by: {command}")
    out += [r"\begin{table}[t]", r"\centering", r"\small",
            r"\caption{Target test accuracy (\%), mean $\pm$ std over " + str(t["n"]) + r" seeds. Model selection: "
            + _tex_escape(RULE_TEXT[t["rule"]]) + r". Best per label-budget group in bold, second underlined.}",
            rf"\label{{tab:{t['rule']}}}",
            r"\begin{tabular}{l" + "c" * (len(cols) + 1) + "}", r"\toprule",
            "Method & " + " & ".join(_tex_escape(c) for c in cols) + r" & Rank \\", r"\midrule"]
    budget = None
    for r in t["rows"]:
        if r["budget"] != budget:
            if budget is not None:
                out.append(r"\midrule")
            budget = r["budget"]
            out.append(rf"\multicolumn{{{len(cols) + 2}}}{{l}}{{\emph{{{_budget_label(budget)}}}}} \\")
        cells = []
        for p in t["pairs"] + ["avg"]:
            if p == "avg":
                s = f"{r['avg']:.1f}" if r["avg"] is not None else "--"
            else:
                s = _cell_text(r["cells"][p], t["n"]).replace(" ± ", r" $\pm$ ").replace("—", "--").replace("†", r"$^\dagger$")
            mark = r["mark"][p]
            cells.append(rf"\textbf{{{s}}}" if mark == "best" else rf"\underline{{{s}}}" if mark == "second" else s)
        rank = f"{r['rank']:.1f}" if r["rank"] is not None else "--"
        out.append(f"{_tex_escape(r['method'])} & " + " & ".join(cells) + rf" & {rank} \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def to_csv(tables: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rule", "method", "family", "budget", "pair", "mean", "std", "n", "n_failed", "accs"])
    for t in tables:
        for r in t["rows"]:
            for p in t["pairs"]:
                c = r["cells"][p]
                a = c["accs"]
                w.writerow([t["rule"], r["method"], r["family"], r["budget"], p,
                            f"{statistics.mean(a):.2f}" if a else "", f"{statistics.stdev(a):.2f}" if len(a) > 1 else "",
                            len(a), c.get("n_failed", 0), ";".join(f"{x:.2f}" for x in a)])
    return buf.getvalue()


def runs_csv(records: list[dict], rules: Iterable[str]) -> str:
    """One row per run: identity, status, speed, and the checkpoint + target-test accuracy per rule."""
    rules = list(rules)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run_id", "method", "family", "target_data", "budget", "source", "target", "seed", "status", "steps",
                "wall_time_s", "steps_per_s", "hparams"] + [f"{r}_{k}" for r in rules for k in ("step", "tgt_test_acc")])
    for rec in sorted(records, key=lambda r: r["run_id"]):
        row = [rec["run_id"], rec["method"]["name"], rec["method"]["family"], rec["method"]["target_data"],
               rec["method"]["budget"], rec["config"]["source"], rec["config"]["target"], rec["config"]["seed"],
               rec["status"], rec["train"]["steps"], f"{rec['train']['wall_time_s']:.1f}",
               f"{rec['train']['steps_per_s']:.1f}", json.dumps(rec["config"]["hparams"], sort_keys=True)]
        for rule in rules:
            p = select(rec, rule)
            row += [p["step"], f"{p['tgt_test']['acc'] * 100:.2f}"] if p else ["", ""]
        w.writerow(row)
    return buf.getvalue()


def write_tables(records: list[dict], out_dir: str | Path, rules: Iterable[str], command: str = "",
                 pairs: list[str] | None = None, plots: bool = True) -> list[Path]:
    """Write table.md, table.tex, table.csv, runs.csv (and accuracy.png) for ``records``."""
    out = Path(out_dir)
    rules = list(rules)
    tables = [build_table(records, r, pairs) for r in rules]
    header = f"<!-- generated by: {command} -->\n" if command else ""
    md = header + "".join(to_markdown(t) + "\n" for t in tables)
    written = [out / "table.md", out / "table.tex", out / "table.csv", out / "runs.csv"]
    atomic_write_text(written[0], md)
    atomic_write_text(written[1], (f"% generated by: {command}\n" if command else "") + "\n".join(to_latex(t) for t in tables))
    atomic_write_text(written[2], to_csv(tables))
    atomic_write_text(written[3], runs_csv(records, rules))
    if plots and records:
        from dalab.plots import accuracy_bars
        written.append(accuracy_bars(tables[0], out / "accuracy.png"))
    return written
