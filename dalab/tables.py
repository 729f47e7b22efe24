"""Model selection and paper tables, computed from run records only.

Selection rules live in :mod:`dalab.selection` (one registry: name, description, whether it reads
target labels); every table names its rule, and the oracle rule is always labelled as the oracle.
The same rule picks among hyperparameter trials: the trial with the best mean selection score
over seeds (for ``last``: the best mean source-validation accuracy at the last checkpoint).
Reported numbers are always target-TEST accuracy at the selected checkpoint.

Each table (one per rule) shows, per method row and pair, mean ± std over seeds, whether the cell
differs from the baseline (source-only) beyond seed noise (dalab.stats: paired t-test over seeds),
the average over pairs, its gain Δ over the baseline under the same rule, and the average rank;
across pairs a Friedman test with a Nemenyi post-hoc (critical-difference diagram, dalab.plots).
Names come from dalab.display; rendering from dalab.render (the one renderer of every table).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dalab import convergence, display
from dalab.display import pair_name, setting  # noqa: F401 -- record keys, re-exported
from dalab.render import Cell, Table
from dalab.selection import CHANCE_MARK, CHANCE_NOTE, RULES, n_at_chance, select, selection_score
from dalab.evaluation import REJECT_RULE
from dalab.tasks import HEADLINE, SPLIT_NAMES, headline, headline_split, metric_names, score, setting_of
from dalab.utils import atomic_write_text

__all__ = ["RULE_TEXT", "aggregate", "build_table", "explain", "load_records", "pair_name", "run_command",
           "runs_csv", "select", "selection_score", "setting", "to_csv", "to_latex", "to_markdown", "write_tables"]

RULE_TEXT = {name: r.text for name, r in RULES.items()}
BASELINE = "source_only"
TEX_PREAMBLE_NOTE = "% needs \\usepackage{booktabs,graphicx} in the preamble; \\input{} this file where the table goes\n"

# What each file of a table folder shows (written by write_tables, or by dalab bench next to them);
# read by dalab.results_index for results/README.md.
OUTPUTS = {
    "table.md": "one table per selection rule: target test accuracy mean ± std over seeds per method and pair, "
                "average, Δ vs source-only, paired t-test marks, average rank, Friedman test",
    "table_RULE.tex": "one selection rule's table in LaTeX (booktabs), one file per table to \\input in a paper",
    "table.csv": "long form of the tables: per rule, method and pair the mean, std, seeds, Δ vs source-only, "
                 "p-value and the run ids behind the cell",
    "runs.csv": "one row per run: run id, config, status, speed, checkpoint and accuracy chosen by each rule, "
                "and the dalab run command that reproduces it",
    "accuracy.png": "bars of target test accuracy per pair and method (first selection rule), seed std as error bars",
    "cd_RULE.png": "critical-difference diagram for one selection rule (Friedman + Nemenyi over pairs)",
    "cd_RULE.pdf": "critical-difference diagram for one selection rule (Friedman + Nemenyi over pairs), PDF",
    "budget_curve.png": "target accuracy vs target labels per class",
    "budget_curve.pdf": "target accuracy vs target labels per class, PDF",
    "timing.json": "where the grid's time went: training, evaluation, set-up and orchestration seconds",
}


def load_records(runs_dir: str | Path) -> list[dict]:
    """Every finished run's record under ``runs_dir`` (dalab.runs owns the run folder; records it
    cannot read are left out and counted in a warning line), with the scores of rules that read other
    runs attached (dalab.selection.attach_held_out)."""
    from dalab.runs import load_records as load
    from dalab.selection import attach_held_out

    return attach_held_out(load(runs_dir))


def method_setting(rec: dict) -> dict[str, Any]:
    """The method's resolved hyperparameters and those of the source model it starts from (None
    when it starts from scratch): runs that differ here are different rows, never one cell."""
    c = rec["config"]
    return {"hparams": c.get("hparams") or {}, "source_hparams": c.get("source_hparams")}


@dataclass(frozen=True)
class RowGroup:
    """What a benchmark spec says about a run's row (filled by ``dalab.bench.expand(spec, groups=...)``): ``search`` names
    the declared search (``trials:``) whose runs are pooled into one row, each cell taking the trial
    the selection rule prefers; ``name`` is the row's name given in the spec."""

    search: str | None = None
    name: str | None = None


def row_key(rec: dict, groups: dict[str, RowGroup] | None = None) -> tuple[str, str, str, str, str]:
    """(family, budget, method, data setting, method setting): one table row each. Runs of one
    declared search share the last element, so only they are pooled."""
    g = (groups or {}).get(rec["run_id"], RowGroup())
    ident = f"search {g.search}" if g.search is not None else json.dumps(method_setting(rec), sort_keys=True)
    return rec["method"]["family"], rec["method"]["budget"], rec["method"]["name"], setting(rec), ident


def _trial_key(rec: dict) -> str:
    return json.dumps(method_setting(rec), sort_keys=True)


def aggregate(records: Iterable[dict], rule: str, groups: dict[str, RowGroup] | None = None,
              split: str | None = None) -> dict[tuple, dict[str, dict]]:
    """{row_key: {pair: cell}} under ``rule``; a cell is {"accs", "seeds", "runs" (run_id, seed,
    step, acc, record per run of the chosen trial), "n_failed", "hparams", "n_trials", "trials"}.
    A row holds one setting; only the runs of a search declared in ``groups`` hold several
    (trials), and each cell takes the trial the rule prefers. ``split``: the split the cells report
    (default: each record's headline split, :func:`dalab.tasks.headline_split`)."""
    by_row: dict[tuple, dict[str, dict[str, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        by_row[row_key(r, groups)][pair_name(r)][_trial_key(r)].append(r)
    out: dict[tuple, dict[str, dict]] = {}
    for rk, by_pair in by_row.items():
        out[rk] = {}
        for pair, trials in by_pair.items():
            def trial_score(recs):
                pts = [select(r, rule) for r in recs]
                vals = [selection_score(p, rule, headline(r)) for p, r in zip(pts, recs) if p is not None]
                return statistics.mean(vals) if vals else -math.inf
            best = max(sorted(trials), key=lambda k: trial_score(trials[k]))
            recs = sorted(trials[best], key=lambda r: r["config"]["seed"])
            runs = []
            for r in recs:
                p = select(r, rule)
                runs.append({"run_id": r["run_id"], "seed": r["config"]["seed"], "status": r.get("status"),
                             "step": p["step"] if p else None, "acc": score(r, p, split) * 100 if p else None,
                             "record": r})
            ok = [x for x in runs if x["acc"] is not None]
            chosen = json.loads(best)  # the trial's method setting
            conv = convergence.of_runs([x["record"] for x in ok])
            out[rk][pair] = {"convergence": conv, "accs": [x["acc"] for x in ok], "seeds": [x["seed"] for x in ok], "runs": runs,
                             "n_failed": len(runs) - len(ok), "hparams": chosen["hparams"], "setting": chosen, "n_trials": len(trials), "trials": sorted(trials)}
    return out


def _pair_order(keys) -> list[str]:
    """Pairs in the order the benchmarks list them (datasets.PAIRS: the default digits pairs first),
    then any others alphabetically."""
    from dalab.datasets import PAIRS

    known = {f"{s}→{t}": i for i, (s, t) in reversed(list(enumerate(PAIRS)))}
    return sorted(keys, key=lambda k: (known.get(k, len(known)), k))


def _empty_cell() -> dict:
    return {"convergence": convergence.Convergence(None, None), "accs": [], "seeds": [], "runs": [], "n_failed": 0, "hparams": {}, "setting": {}, "n_trials": 0,
            "trials": []}


# the spread a table shows after each mean: the seeds' standard deviation, or the standard error of
# the mean (std / sqrt(n), DomainBed's); a spec's `spread:` picks one
SPREADS = {"std": "std", "se": "standard error"}


def mean_spread(accs: list[float], spread: str = "std") -> str:
    """``mean ± std`` (or ± standard error) of a cell's accuracies, one decimal; one value alone."""
    if not accs:
        return "—"
    if len(accs) == 1:  # one seed: no spread to show
        return f"{accs[0]:.1f}"
    sd = statistics.stdev(accs)
    return f"{statistics.mean(accs):.1f} ± {sd / math.sqrt(len(accs)) if spread == 'se' else sd:.1f}"


def _csv_list(items: str | Iterable[str] | None) -> list[str] | None:
    if items is None:
        return None
    if isinstance(items, str):
        items = items.split(",")
    return [i.strip() for i in items if i.strip()]


def _short(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def setting_labels(rows: list[dict]) -> None:
    """Name each row of a method that appears with several settings: what differs between them
    (``trade_off=0.1``; ``source lr=0.01`` for the source model a method starts from), a search's
    ``best of N trials by RULE``, or the name a spec gave. One row per method keeps the plain name."""
    by_method: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[(r["budget"], r["method"], r["setting"])].append(r)
    for same in by_method.values():
        plain = [r for r in same if r["search"] is None]
        flat = [{**r["method_setting"]["hparams"],
                 **{f"source {k}": v for k, v in (r["method_setting"]["source_hparams"] or {}).items()}} for r in plain]
        differ = sorted(k for k in set().union(*flat) if len({_short(f.get(k, "—")) for f in flat}) > 1) if flat else []
        for r, f in zip(plain, flat):
            r["label"] = ", ".join(f"{k}={_short(f.get(k, '—'))}" for k in differ)
        for r in same:
            if r["search"] is not None:
                r["label"] = f"best of {r['n_trials']} trials by {r['rule']}"
            if r["name"]:
                r["display"] = r["name"]
            elif r["label"]:
                r["display"] = f"{r['display']} ({r['label']})"


def _mark_and_rank(table: list[dict], pairs: list[str]) -> None:
    """Within each label-budget group of ``table``'s rows (rows that see the same target labels
    compete with each other): ``mark[col]`` = best / second / "" per pair and the average, and
    ``rank`` = the row's mean rank over the pairs (1 = best; ties share their average rank; None
    unless the row has every pair)."""
    for budget in sorted({r["budget"] for r in table}):
        group = [r for r in table if r["budget"] == budget]
        for col in pairs + ["avg"]:
            vals = sorted({(r["means"][col] if col != "avg" else r["avg"]) for r in group} - {None}, reverse=True)
            for r in group:
                v = r["means"][col] if col != "avg" else r["avg"]
                r.setdefault("mark", {})[col] = ("best" if vals and v == vals[0] else
                                                 "second" if len(vals) > 1 and v == vals[1] else "")
        for p in pairs:
            vals = sorted((r["means"][p] for r in group if r["means"][p] is not None), reverse=True)
            for r in group:
                if r["means"][p] is not None:
                    pos = [i + 1 for i, v in enumerate(vals) if v == r["means"][p]]
                    r.setdefault("ranks", []).append(statistics.mean(pos))
    for r in table:
        r["rank"] = statistics.mean(r["ranks"]) if len(r.get("ranks", [])) == len(pairs) else None


def build_table(records: list[dict], rule: str, pairs: list[str] | None = None, baseline: str = BASELINE,
                methods: Iterable[str] | None = None, budgets: Iterable[str] | None = None,
                groups: dict[str, RowGroup] | None = None, split: str | None = None) -> dict[str, Any]:
    """Rows grouped by label budget then family, columns = pairs + average + Δ + average rank.
    One row per method and setting (``setting_labels`` names what differs); only the runs of a
    search a spec declares (``groups``) are pooled into one row. Best and second-best are marked
    within each label-budget group (rows that see the same target labels compete with each other).
    ``methods``/``budgets`` keep only those rows; the baseline (same data setting, its lowest
    budget) still defines Δ and the significance marks."""
    from dalab.stats import MIN_SEEDS, friedman, paired_test

    agg = aggregate(records, rule, groups, split)
    pairs = pairs or _pair_order({p for v in agg.values() for p in v})
    budget_order = lambda b: (b != "0", b == "all", int(b) if b.isdigit() else 0)  # noqa: E731
    # within a budget: the baseline first, then by family; within a method the plainest setting first
    rows = sorted(agg, key=lambda rk: (budget_order(rk[1]), rk[2] != baseline, rk[0] != "baseline", rk[0], rk[2],
                                       len(rk[3]), rk[3], rk[4]))
    table = []
    for rk in rows:
        cells = {p: agg[rk].get(p, _empty_cell()) for p in pairs}
        means = {p: statistics.mean(c["accs"]) if c["accs"] else None for p, c in cells.items()}
        complete = all(m is not None for m in means.values())
        avg = statistics.mean(means.values()) if complete and means else None
        first = next(x["record"] for c in agg[rk].values() for x in c["runs"])
        group = (groups or {}).get(first["run_id"], RowGroup())
        table.append({"family": rk[0], "budget": rk[1], "method": rk[2], "setting": rk[3], "cells": cells,
                      "means": means, "avg": avg, "display": display.method(rk[2]), "rule": rule,
                      "search": group.search, "name": group.name, "method_setting": method_setting(first),
                      "n_trials": max(len(c["trials"]) for c in agg[rk].values()), "label": ""})
    setting_labels(table)
    # the baseline row of each setting (its lowest label budget)
    base_rows = {}
    for r in table:
        if r["method"] == baseline and r["setting"] not in base_rows:
            base_rows[r["setting"]] = r
    for r in table:
        b = base_rows.get(r["setting"])
        r["is_baseline"] = b is r
        for p in pairs:
            c = r["cells"][p]
            c["delta"] = c["p"] = None
            c["sig"] = ""
            if b is None or b is r or not c["accs"] or not b["cells"][p]["accs"]:
                continue
            c["delta"] = r["means"][p] - b["means"][p]
            c["p"], c["sig"] = paired_test(dict(zip(c["seeds"], c["accs"])),
                                           dict(zip(b["cells"][p]["seeds"], b["cells"][p]["accs"])))
            if len(c["accs"]) < MIN_SEEDS:  # the p-value stays in table.csv; no mark on too few seeds
                c["sig"] = ""
        r["delta"] = (r["avg"] - b["avg"]) if b is not None and b is not r and r["avg"] is not None \
            and b["avg"] is not None else None
    keep_m, keep_b = _csv_list(methods), _csv_list(budgets)
    if keep_m is not None:
        table = [r for r in table if r["method"] in keep_m or r["display"] in keep_m]
    if keep_b is not None:
        table = [r for r in table if r["budget"] in keep_b]
    _mark_and_rank(table, pairs)
    nmax = max((len(c["accs"]) for r in table for c in r["cells"].values()), default=0)
    settings = sorted({r["setting"] for r in table})
    if len(settings) > 1:  # several settings in one folder: name each row's (what differs), never pool them
        common = setting_common(settings)
        for r in table:
            if rest := ", ".join(x for x in r["setting"].split(", ") if x not in common):
                r["display"] = f"{r['display']} ({rest})"
    # across pairs: Friedman + Nemenyi over the rows without target labels that have every pair
    unsup = [r for r in table if r["budget"] == "0" and r["avg"] is not None]
    fr = friedman({r["display"]: [r["means"][p] for p in pairs] for r in unsup}) if len(pairs) >= 2 else None
    label_sets = sorted({setting_of(x["record"]) for r in table for c in r["cells"].values() for x in c["runs"]})
    splits = {split} if split else {headline_split(x["record"]) for r in table for c in r["cells"].values()
                                    for x in c["runs"]}
    return {"rule": rule, "pairs": pairs, "rows": table, "n": nmax, "settings": settings, "baseline": baseline,
            "label_sets": label_sets, "split": splits.pop() if len(splits) == 1 else "tgt_test",
            "baseline_display": next(iter(base_rows.values()))["display"] if len(base_rows) == 1 else display.method(baseline),
            "has_baseline": bool(base_rows), "friedman": fr}


def setting_common(settings: list[str]) -> list[str]:
    """The parts (comma-separated, :func:`dalab.display.setting`) every one of ``settings`` has, in
    order: said once in the caption; each row names only the rest of its setting."""
    parts = [s.split(", ") for s in settings]
    return [x for x in parts[0] if all(x in p for p in parts[1:])] if parts else []


def _cell_text(c: dict, nmax: int, spread: str = "std") -> str:
    s = mean_spread(c["accs"], spread)
    if c.get("sig"):
        s += f" {c['sig']}"
    if c["convergence"].mark:
        s += f" {c['convergence'].mark}"
    if c["accs"] and len(c["accs"]) < nmax:
        s += f" (n={len(c['accs'])})"
    if c.get("n_failed"):
        s += f" †{c['n_failed']}"
    if n := n_at_chance(x["record"] for x in c["runs"] if x["acc"] is not None):
        s += f" {CHANCE_MARK}{n}"
    return s


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def friedman_note(t: dict, cd_file: str = "") -> str:
    from dalab.stats import MIN_BLOCKS

    fr = t.get("friedman")
    if not fr:
        return (f"No Friedman test across pairs: it needs ≥ {MIN_BLOCKS} pairs and ≥ 3 methods without target "
                f"labels with results on every pair.")
    verdict = "the methods' ranks differ" if fr["p"] < fr["alpha"] else "no rank difference detected"
    return (f"Friedman test across {_plural(fr['n_blocks'], 'pair')}, {fr['n_methods']} methods without target "
            f"labels: χ² = {fr['statistic']:.2f}, p = {fr['p']:.3g} ({verdict} at α = {fr['alpha']}); Nemenyi "
            f"post-hoc" + (f": critical-difference diagram {cd_file}" if cd_file else "") + ".")


def caption(t: dict) -> str:
    """The short caption of a rule's table: metric, seeds, setting, selection rule."""
    rule = RULES[t["rule"]]
    settings = t.get("settings", [])
    metric = metric_names(t.get("label_sets", ["closed"]))[0]
    return (f"{SPLIT_NAMES[t.get('split', 'tgt_test')]} {metric} (%), mean ± {SPREADS[t.get('spread', 'std')]} over {_plural(t['n'], 'seed')}"
            + (f" ({', '.join(setting_common(settings))})" if settings and setting_common(settings) else "")
            + f"; checkpoint: {rule.label}" + ("" if rule.needs_target_labels else " (no target labels)") + ".")


def table_notes(t: dict, cd_file: str = "") -> list[str]:
    """What the marks mean and the tests say: one short line each, only for what the table shows."""
    from dalab.stats import CELL_TEST_SHORT, MIN_SEEDS

    rows, base, n = t["rows"], t["baseline_display"], t["n"]
    cells = [c for r in rows for c in r["cells"].values()]
    notes = []
    if t.get("has_baseline"):
        notes.append(f"Δ: gain of the average over {base} under the same rule.")
        if n >= MIN_SEEDS:
            notes.append(f"↑/↓: differs from {base} on that pair ({CELL_TEST_SHORT}; with {_plural(n, 'seed')} an "
                         f"unmarked cell is no evidence of equality).")
        else:
            notes.append(f"No significance marks: the paired test needs ≥ {MIN_SEEDS} seeds per cell "
                         f"(here {n}).")
    if any(HEADLINE[s][0] == "h_score" for s in t.get("label_sets", [])):
        from dalab.methods import METHODS
        own = ", ".join(display.method(n) for n, c in METHODS.items() if c.open_set)
        notes.append(f"Unknown target classes: methods built for them ({own}) decide 'unknown' themselves; {REJECT_RULE}.")
    if any(c["convergence"].mark for c in cells):
        notes.append(convergence.RULE_TEXT + ".")
    if any(c.get("n_failed") for c in cells):
        notes.append("†: runs that diverged or have no checkpoint under this rule.")
    if n_at_chance(x["record"] for c in cells for x in c["runs"] if x["acc"] is not None):
        notes.append(CHANCE_NOTE)
    if any(c["accs"] and len(c["accs"]) < n for c in cells):
        notes.append("(n=k): cells with fewer seeds.")
    notes.append(friedman_note(t, cd_file))
    failures = {m: text for m in dict.fromkeys(r["method"] for r in rows)
                if (text := display.failure(m, t.get("label_sets", ["closed"])))}
    for name, text in sorted(failures.items(), key=lambda kv: display.method(kv[0])):
        notes.append(f"‡ {display.method(name)}: {text}")
    return notes


def to_table(t: dict, cd_file: str = "", caption_text: str | None = None, label: str = "") -> Table:
    """The rule's table as display text (rendered by dalab.render). ``caption_text`` replaces the
    generated short caption (``{rule}`` in it becomes the rule's name); ``label`` is the LaTeX
    label (default ``tab:<rule>``)."""
    rule = RULES[t["rule"]]
    n = t["n"]
    cap = caption_text.replace("{rule}", rule.name) if caption_text else caption(t)
    tab = Table(["Method", "Family"] + [display.pair_key(p) for p in t["pairs"]] + ["Avg", "Δ", "Rank"],
                title=f"Selection rule: `{rule.name}` — {rule.text}", caption=cap, notes=table_notes(t, cd_file),
                label=label or f"tab:{rule.name}", marks_note="per label-budget group")
    budget = None
    failures = {m for m in dict.fromkeys(r["method"] for r in t["rows"])
                if display.failure(m, t.get("label_sets", ["closed"]))}
    for r in t["rows"]:
        if r["budget"] != budget:
            budget = r["budget"]
            tab.add_group(display.budget(budget))
        cells: list[str | Cell] = [r["display"] + (" ‡" if r["method"] in failures else ""), display.family(r["family"])]
        for p in t["pairs"]:
            cells.append(Cell(_cell_text(r["cells"][p], n, t.get("spread", "std")), r["mark"][p]))
        cells.append(Cell(f"{r['avg']:.1f}" if r["avg"] is not None else "—", r["mark"]["avg"]))
        cells.append(f"{r['delta']:+.1f}" if r["delta"] is not None else "—")
        cells.append(f"{r['rank']:.1f}" if r["rank"] is not None else "—")
        tab.add(*cells)
    return tab


def to_markdown(t: dict, command: str = "", cd_file: str = "", caption_text: str | None = None) -> str:
    return to_table(t, cd_file, caption_text).markdown(command)


def to_latex(t: dict, command: str = "", cd_file: str = "", caption_text: str | None = None, label: str = "") -> str:
    return to_table(t, cd_file, caption_text, label).latex(command)


def to_csv(tables: list[dict]) -> str:
    """Long form: one row per rule, method row and pair, with Δ and the significance test per pair
    and the run ids behind each cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rule", "method", "display", "family", "budget", "setting", "pair", "pair_display", "mean", "std", "n",
                "n_failed", "accs", "seeds", "delta", "p_value", "sig", "run_ids", "hparams", "n_trials",
                "plateau", "trend", "convergence"])
    for t in tables:
        for r in t["rows"]:
            for p in t["pairs"]:
                c = r["cells"][p]
                a = c["accs"]
                w.writerow([t["rule"], r["method"], r["display"], r["family"], r["budget"], r["setting"], p,
                            display.pair_key(p), f"{statistics.mean(a):.2f}" if a else "",
                            f"{statistics.stdev(a):.2f}" if len(a) > 1 else "", len(a), c.get("n_failed", 0),
                            ";".join(f"{x:.2f}" for x in a), ";".join(str(s) for s in c["seeds"]),
                            f"{c['delta']:+.2f}" if c.get("delta") is not None else "",
                            f"{c['p']:.4g}" if c.get("p") is not None else "", c.get("sig", ""),
                            ";".join(x["run_id"] for x in c["runs"]),
                            # the setting behind the cell; a search's cell: the trial the rule took, and how many
                            json.dumps(c["setting"], sort_keys=True) if c["runs"] else "", c["n_trials"],
                            # dalab.convergence: |last - halfway| and its sign over the cell's runs
                            *(f"{v:.2f}" if v is not None else "" for v in (c["convergence"].plateau,
                                                                             c["convergence"].trend)),
                            c["convergence"].state])
    return buf.getvalue()


def run_command(rec: dict, runs_dir: str | Path | None = None) -> str:
    """The ``dalab run`` command that reproduces a run, hence its run id: its config, with the
    hyperparameters that differ from the method's defaults as ``--set`` and those of the source
    model a two-phase method starts from as ``--source-set``, writing into ``runs_dir`` (given: the
    folder the record was read from, so the source model found there is reused)."""
    c = rec["config"]
    from dalab.tasks import source_domains

    srcs = source_domains(c["source"])
    side = ["--source", c["source"]] if len(srcs) == 1 else ["--sources", ",".join(srcs)]
    parts = ["dalab", "run", "--method", c["method"], *side, "--target", c["target"],
             "--seed", str(c["seed"]), "--budget", str(c["budget"]), "--steps", str(c["steps"]),
             "--eval-every", str(c["eval_every"]), "--backbone", c["backbone"]]
    if c.get("pretrained"):
        parts += ["--pretrained", c["pretrained"]]
    if c.get("precision", "auto") != "auto":
        parts += ["--precision", c["precision"]]
    if c.get("classes"):  # a label-set task: its split, as --classes takes it
        from dalab.tasks import of_config
        parts += ["--classes", of_config(c).text()]
    if runs_dir is not None:
        parts += ["--runs-dir", str(runs_dir)]
    hp, src = dict(c.get("hparams") or {}), dict(c.get("source_hparams") or {})
    from dalab.methods import METHODS, resolve_hparams
    if c["method"] in METHODS:  # records store every resolved value: only what differs from the defaults
        base = resolve_hparams(METHODS[c["method"]], {})
        hp = {k: v for k, v in hp.items() if k not in base or base[k] != v}
        base = resolve_hparams(METHODS["source_only"], {})
        src = {k: v for k, v in src.items() if k != "standardize" and (k not in base or base[k] != v)}
    for opt, values in (("--set", hp), ("--source-set", src)):
        for k, v in sorted(values.items()):
            parts += [opt, f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    cmd = " ".join(shlex.quote(p) for p in parts)
    if c.get("split_seed", 0):
        cmd += f"  # split_seed {c['split_seed']}: set it in a bench spec (dalab run has no option for it)"
    return cmd


def _csv_metric(records: list[dict]) -> str:
    """The metric column name of runs.csv: the records' headline split and metric (``tgt_test_acc``
    for closed-set, ``online_acc`` for test-time runs), or ``headline`` where they mix."""
    splits, metrics = {headline_split(r) for r in records} or {"tgt_test"}, {headline(r) for r in records} or {"acc"}
    return f"{splits.pop() if len(splits) == 1 else 'headline'}_{metrics.pop() if len(metrics) == 1 else 'headline'}"


def runs_csv(records: list[dict], rules: Iterable[str]) -> str:
    """One row per run: identity, status, speed, the checkpoint + target-test accuracy per rule, and
    the command that reproduces it."""
    rules, metric = list(rules), _csv_metric(records)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run_id", "method", "display", "family", "target_data", "budget", "source", "target", "seed", "status",
                "steps", "wall_time_s", "steps_per_s", "hparams"]
               + [f"{r}_{k}" for r in rules for k in ("step", metric)] + ["command"])
    for rec in sorted(records, key=lambda r: r["run_id"]):
        row = [rec["run_id"], rec["method"]["name"], display.method(rec["method"]["name"]), rec["method"]["family"],
               rec["method"]["target_data"], rec["method"]["budget"], rec["config"]["source"], rec["config"]["target"],
               rec["config"]["seed"], rec["status"], rec["train"]["steps"], f"{rec['train']['wall_time_s']:.1f}",
               f"{rec['train']['steps_per_s']:.1f}", json.dumps(rec["config"]["hparams"], sort_keys=True)]
        for rule in rules:
            p = select(rec, rule)
            row += [p["step"], f"{score(rec, p) * 100:.2f}"] if p else ["", ""]
        w.writerow(row + [run_command(rec)])
    return buf.getvalue()


def tex_label(out_dir: str | Path, rule: str) -> str:
    """The default LaTeX label of a rule's table: ``tab:<folder>-<rule>``, so two folders' tables of
    one rule never clash in a paper."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(out_dir).resolve().name).strip("-") or "dalab"
    return f"tab:{slug}-{rule}"


def write_tables(records: list[dict], out_dir: str | Path, rules: Iterable[str], command: str = "",
                 pairs: list[str] | None = None, plots: bool = True, baseline: str = BASELINE,
                 methods: Iterable[str] | None = None, budgets: Iterable[str] | None = None,
                 groups: dict[str, RowGroup] | None = None, caption_text: str | None = None,
                 label: str | None = None, spread: str = "std") -> list[Path]:
    """Write table.md (every rule), table_<rule>.tex (one LaTeX table per file), table.csv, runs.csv
    (and accuracy.png, cd_<rule>.png/.pdf, and budget_curve.png/.pdf when the records hold three or
    more label budgets) for ``records``; ``groups``: the spec's searches and row names
    (:func:`build_table`); ``caption_text`` replaces the short caption (``{rule}`` = the rule's
    name); ``label`` the LaTeX label prefix (``{label}-<rule>``; default :func:`tex_label`)."""
    out = Path(out_dir)
    rules = list(rules)
    tables = [{**build_table(records, r, pairs, baseline, methods, budgets, groups), "spread": spread} for r in rules]
    cd_files = {t["rule"]: (f"cd_{t['rule']}.png / .pdf" if plots and t["friedman"] else "") for t in tables}
    header = f"<!-- generated by: {command} -->\n" if command else ""
    md = header + "".join(to_markdown(t, cd_file=cd_files[t["rule"]], caption_text=caption_text) + "\n"
                          for t in tables)
    written = [out / "table.md", out / "table.csv", out / "runs.csv"]
    atomic_write_text(written[0], md)
    atomic_write_text(written[1], to_csv(tables))
    atomic_write_text(written[2], runs_csv(records, rules))
    for t in tables:
        path = out / f"table_{t['rule']}.tex"
        atomic_write_text(path, (f"% generated by: {command}\n" if command else "") + TEX_PREAMBLE_NOTE
                          + to_latex(t, cd_file=cd_files[t["rule"]], caption_text=caption_text,
                                     label=f"{label}-{t['rule']}" if label else tex_label(out, t["rule"])))
        written.append(path)
    (out / "table.tex").unlink(missing_ok=True)  # the one-file-for-every-rule LaTeX of earlier versions
    if plots and records:
        from dalab import plots as P
        written.append(P.accuracy_bars(tables[0], out / "accuracy.png", command=command))
        for t in tables:
            if t["friedman"]:
                written += P.cd_diagram(t, out / f"cd_{t['rule']}", command=command)
        if len({r["method"]["budget"] for r in records}) >= 3:
            written += P.budget_curve(records, out / "budget_curve", rule=rules[0], baseline=baseline, command=command)
    return written


# --------------------------------------------------------------------------- filters and traceability

def parse_pair(text: str) -> str:
    """A pair given as ``source:target``, ``source->target``, ``source→target`` (registry or
    display names) -> the table key ``source→target``."""
    from dalab.datasets import DOMAINS
    from dalab.utils import DalabError

    for sep in ("→", "->", ":"):
        if sep in text:
            s, t = (x.strip() for x in text.split(sep, 1))
            break
    else:
        raise DalabError(f"bad pair {text!r}: use SOURCE:TARGET, e.g. mnist5k:ucidigits")
    from dalab.tasks import join_sources

    by_display = {d.display: n for n, d in DOMAINS.items()}
    sources = [by_display.get(x.strip(), x.strip()) for x in s.split("+")]  # several sources: a+b (dalab.tasks)
    return f"{join_sources(sources)}→{by_display.get(t, t)}"


def parse_method(text: str) -> str:
    """A method's registry name from its registry or display name (unknown names pass through)."""
    from dalab.methods import METHODS

    by_display = {c.display: n for n, c in METHODS.items()}
    return by_display.get(text.strip(), text.strip())


def explain(records: list[dict], method: str, pair: str, rule: str = "last", baseline: str = BASELINE,
            budgets: Iterable[str] | None = None, groups: dict[str, RowGroup] | None = None,
            runs_dir: str | Path | None = None) -> str:
    """The runs behind one table cell: for each matching row (label budget, setting) the chosen
    trial, and per run its id, seed, status, the checkpoint step the rule picked, its target-test
    accuracy there, and the ``dalab run`` command that reproduces it (in ``runs_dir``)."""
    from dalab.selection import get_rule
    from dalab.utils import DalabError

    r_ = get_rule(rule)
    name, key = parse_method(method), parse_pair(pair)
    t = build_table(records, rule, baseline=baseline, budgets=budgets, groups=groups)
    rows = [r for r in t["rows"] if r["method"] == name and r["cells"].get(key, {}).get("runs")]
    if not rows:
        have = sorted({(r["method"]["name"], pair_name(r)) for r in records})
        raise DalabError(f"no runs of {name!r} on {key!r} in these records; present: "
                         + ", ".join(f"{m} {p}" for m, p in have[:20]) + (" ..." if len(have) > 20 else ""))
    out = []
    for r in rows:
        c = r["cells"][key]
        out.append(f"{r['display']} ({name}) on {display.pair_key(key)} ({key}), {display.budget(r['budget'])}; "
                   f"selection rule `{rule}`: {r_.text}")
        out.append(f"  setting: {r['setting']}; hparams {json.dumps(c['hparams'], sort_keys=True)}"
                   + (f"; source model {json.dumps(c['setting']['source_hparams'], sort_keys=True)}"
                      if c["setting"].get("source_hparams") else "")
                   + (f" (the trial the rule picked among {c['n_trials']} of search {r['search']!r})"
                      if r["search"] is not None else ""))
        line = f"  cell: {mean_spread(c['accs'])} over {len(c['accs'])} seeds"
        if c.get("delta") is not None:
            line += (f"; vs {t['baseline_display']}: {c['delta']:+.1f}, paired t-test p = "
                     + (f"{c['p']:.3g}" if c.get("p") is not None else "n/a") + (f" {c['sig']}" if c["sig"] else ""))
        if c["n_failed"]:
            line += f"; {c['n_failed']} run(s) without a checkpoint under this rule (†)"
        out.append(line)
        metric = f"{headline_split(c['runs'][0]['record'])} {headline(c['runs'][0]['record'])}"
        out.append(f"  {'run id':<48} {'seed':>4} {'status':<8} {'step':>6} {metric:>12}")
        for x in c["runs"]:
            acc = f"{x['acc']:.2f}" if x["acc"] is not None else "—"
            step = str(x["step"]) if x["step"] is not None else "—"
            out.append(f"  {x['run_id']:<48} {x['seed']:>4} {x['status'] or '?':<8} {step:>6} {acc:>12}")
            out.append(f"    reproduce: {run_command(x['record'], runs_dir)}")
        out.append("")
    return "\n".join(out)
