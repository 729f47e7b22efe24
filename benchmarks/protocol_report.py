"""The protocol study, its report: results/protocol.md (and its figure) from the stages' results
(:mod:`dalab.benchmarks.protocol_runs`): the tuning grid with each method's default and the rule's
pick, how each default was chosen, the budget and backbone table with its reading and curves, and
the main job's own runs against the issue's criteria.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dalab.benchmarks.protocol_grid import (BENCHMARK, CANDIDATES, EVAL_POINTS, HOW, LR, MAIN_STEPS, RULE, SEEDS,
                                            STUDY, TIE_POINTS, WHY_NOT, is_default, is_main_setting, is_tie)
from dalab.benchmarks.protocol_runs import Tuned, last_acc, study_methods
from dalab.convergence import PLATEAU_POINTS, drift, mean_drift


def fmt(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def fmt_plateau(plateau: float | None, trend: float | None) -> str:
    """``plateau (trend)``, e.g. ``4.5 (+0.9)``: mostly swings; ``3.7 (+3.7)``: still rising."""
    return "—" if plateau is None else f"{plateau:.1f} ({trend:+.1f})"


def cell(accs: list[float]) -> str:
    if not accs:
        return "—"
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.1f} ± {sd:.1f}" + ("" if len(accs) == len(SEEDS) else f" (n={len(accs)})")


# --------------------------------------------------------------------------- the report

def render(pairs: list[tuple[str, str]], base: dict[str, Any], tuned: list[Tuned],
           cells: dict[str, dict[str, dict]] | None, png: Path, main_runs_dir: str | Path | None) -> str:
    """The whole report: the intro and rule, the tuning grid, the budget and backbone study (when
    ``cells`` is given; its curves drawn to ``png``) and the main job's runs (``main_runs_dir``)."""
    lines = intro(pairs) + tuning_lines(pairs, base, tuned)
    if cells is not None:
        lines += study_lines(cells, png)
    if main_runs_dir:
        lines += main_job_check(main_runs_dir)
    return "\n".join(lines) + "\n"


def intro(pairs: list[tuple[str, str]]) -> list[str]:
    """The title, what the accuracy and plateau columns mean, and the rule."""
    pair_names = [f"{s}→{t}" for s, t in pairs]
    return ["# Protocol study: defaults and budget, chosen on the tuning pairs", "",
             f"Tuning pairs ({BENCHMARK}): {', '.join(pair_names)}; seeds {list(SEEDS)}. The main table's "
             f"four default pairs are not used here: their target labels choose nothing. Accuracy: target "
             f"TEST accuracy (%) at the last checkpoint (`last` rule), mean ± std over seeds. "
             f"Plateau: |acc(last) − acc(halfway)| in points, averaged over pairs and seeds "
             f"({EVAL_POINTS} evaluation points per run); in brackets the trend, the same difference "
             f"with its sign: a trend as large as the plateau means the method is still rising at the "
             f"budget, a trend near 0 under a large plateau means its checkpoints swing.", "",
             f"**Rule that chose each default:** {RULE}.", ""]


def tuning_lines(pairs: list[tuple[str, str]], base: dict[str, Any], tuned: list[Tuned]) -> list[str]:
    """The tuning grid: one row per candidate that has runs, the default and the rule's pick marked;
    where they differ; how the grid reads; how each default was chosen."""
    pair_names = [f"{s}→{t}" for s, t in pairs]
    lines = [f"## Tuning grid (lenet_bn, {MAIN_STEPS} steps)", "",
             "Source only at its default for reference: "
             + ", ".join(f"{s}→{t} {cell(base['cells'][(s, t)])}" for s, t in pairs)
             + f"; average {fmt(base['avg'])}.", "",
             "| method | setting | " + " | ".join(pair_names) + " | avg | mean seed std | plateau (trend) |",
             "|---|---|" + "---|" * (len(pairs) + 3)]
    picks = []
    for t in tuned:
        for label, ov, s in t.rows:
            if not any(s["cells"].values()):
                continue  # a candidate never run is not shown
            mark = (" **(default)**" if is_default(t.method, ov) else "") + (" *(rule's pick)*" if label == t.best else "")
            lines.append(f"| {t.method} | {label}{mark} | " + " | ".join(cell(s["cells"][p]) for p in pairs)
                         + f" | {fmt(s['avg'])} | {fmt(s['std'])} | {fmt_plateau(s['plateau'], s['trend'])} |")
        default = next((label for label, ov, _ in t.rows if is_default(t.method, ov)), None)
        if t.best and default != t.best:
            summaries = {label: s for label, _, s in t.rows}
            picks.append(f"- **{t.method}**: the rule picks *{t.best}*, the default is *{default}*"
                         + (f": {pick_margin(pairs, summaries[t.best], summaries[default])}" if default else "")
                         + (f" ({WHY_NOT[t.method]})" if t.method in WHY_NOT else "") + ".")
    lines.append("")
    if picks:
        lines += ["Where the default is not the rule's pick:", ""] + picks + [""]
    lines += grid_reading(pairs, tuned)
    lines += ["How each default was chosen:", ""]
    lines += [f"- **{m}**: {HOW.get(m, 'rule')}" for m in CANDIDATES] + [""]
    return lines


def pick_margin(pairs: list[tuple[str, str]], best: dict[str, Any], default: dict[str, Any]) -> str:
    """How far the rule's pick is ahead of the default: the 4-pair average's difference, a paired
    t-test over the (pair, seed) runs both have (:func:`dalab.stats.paired_test`), and whether the
    default stays (a tie, :func:`~dalab.benchmarks.protocol_grid.is_tie`) or breaks the rule."""
    from dalab.stats import paired_test

    if best["avg"] is None or default["avg"] is None:
        return "not comparable yet (a candidate lacks runs)"
    # a cell's list is in seed order; only cells with every seed are paired position by position
    a, b = ({(p, i): x for p in pairs if len(s["cells"][p]) == len(SEEDS) for i, x in enumerate(s["cells"][p])}
            for s in (best, default))
    common = set(a) & set(b)
    pval, mark = paired_test({k: a[k] for k in common}, {k: b[k] for k in common})
    test = ("" if pval is None else f"; paired t-test over the {len(common)} (pair, seed) runs p = {pval:.2f}, "
            + ("significant" if mark else "not significant"))
    margin = best["avg"] - default["avg"]
    verdict = (f"within the tie margin of {TIE_POINTS:g} points: the default stays" if is_tie(margin)
               else f"**beyond the tie margin of {TIE_POINTS:g} points: the default breaks the rule**")
    return f"{margin:+.1f} points on the 4-pair average{test}; {verdict}"


def contrasts(t: Tuned, key: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(summary, summary) of every two candidates of ``t`` that have runs and differ in ``key`` only,
    ordered by the candidates' value of ``key`` as the grid lists them (first value first)."""
    rows = [(ov, s) for _, ov, s in t.rows if s["avg"] is not None]
    order = list(dict.fromkeys(ov.get(key) for _, ov, _ in t.rows))
    out = []
    for i, (a, sa) in enumerate(rows):
        for b, sb in rows[i + 1:]:
            if (key in a and a.keys() == b.keys() and a[key] != b[key]
                    and all(a[k] == b[k] for k in a if k != key)):
                out.append((sa, sb) if order.index(a[key]) < order.index(b[key]) else (sb, sa))
    return out


def contrast_phrase(pairs: list[tuple[str, str]], method: str, found: list[tuple[dict, dict]]) -> str:
    """``method`` +x.x (s→t a → b): the mean change of the 4-pair average over the contrasts, and the
    pair where one contrast changes most, with its two means."""
    delta = statistics.mean(b["avg"] - a["avg"] for a, b in found)
    a, b, p = max(((a, b, p) for a, b in found for p in pairs if a["cells"][p] and b["cells"][p]),
                  key=lambda x: abs(statistics.mean(x[1]["cells"][x[2]]) - statistics.mean(x[0]["cells"][x[2]])))
    return (f"{method} {delta:+.1f} ({p[0]}→{p[1]} {statistics.mean(a['cells'][p]):.1f} → "
            f"{statistics.mean(b['cells'][p]):.1f})")


def contrast_bullet(pairs: list[tuple[str, str]], tuned: list[Tuned], key: str, what: str, better: str) -> str:
    """One reading of the grid: every method's contrast in ``key`` (:func:`contrast_phrase`) and for
    how many the second value is better on the 4-pair average."""
    found = {t.method: c for t in tuned if (c := contrasts(t, key))}
    if not found:
        return f"- {what}: no two candidates with runs differ in `{key}` only yet."
    up = [m for m, c in found.items() if statistics.mean(b["avg"] - a["avg"] for a, b in c) > 0]
    return (f"- {what}: " + ", ".join(contrast_phrase(pairs, m, c) for m, c in found.items())
            + f". {better} for {len(up)} of {len(found)} methods" + (f" ({', '.join(up)})" if up else "") + ".")


def grid_reading(pairs: list[tuple[str, str]], tuned: list[Tuned]) -> list[str]:
    """What the tuning grid says, computed from its rows: per contrast (candidates that differ in one
    key only) the change of each method's 4-pair average, and the pair where it changes most."""
    out = ["Reading the grid (computed from its rows: for two candidates that differ in one setting only, "
           "the change of the 4-pair average, and in brackets the pair where it changes most):", ""]
    dann = next((t for t in tuned if t.method == "dann"), None)
    if dann is not None:
        def sees_shift(ov: dict[str, Any]) -> bool:  # BatchNorm called on the joint batch, or none
            return ov.get("disc_bn_stats") == "joint" or ov.get("disc_bn") == "false"

        rows = [(ov, s) for _, ov, s in dann.rows if s["avg"] is not None and not ov.get("weight_ema")]
        strong = [s["avg"] for ov, s in rows if sees_shift(ov) and ov.get("trade_off") == 1.0]
        weak = [s["avg"] for ov, s in rows if not sees_shift(ov) and ov.get("trade_off") == 1.0]
        low = [s["avg"] for ov, s in rows if ov.get("trade_off") != 1.0]
        if strong and weak:
            out.append(f"- DANN's discriminator at trade-off 1: one that sees the domains' mean shift (its BatchNorm "
                       f"called once on the joint batch as TLlib's, or none as pytorch-adapt's) averages "
                       f"{min(strong):.1f}–{max(strong):.1f}; one whose BatchNorm is called per domain (so per-domain "
                       f"statistics hide the first-moment difference from it) {min(weak):.1f}–{max(weak):.1f}"
                       + (f"; at trade-off 0.3 {min(low):.1f}–{max(low):.1f}" if low else "") + ".")
        out.append(contrast_bullet(pairs, [dann], "trade_off", "DANN's trade-off (1 → 0.3)", "0.3 is better"))
    out += [contrast_bullet(pairs, tuned, "bn_mode", "`bn_mode` (pooled → per-domain BatchNorm statistics)",
                            "Per-domain statistics are better"),
            contrast_bullet(pairs, tuned, "lr", f"lr ({' → '.join(str(x) for x in LR)}: the DANN paper's mu0 and 3x; "
                            f"{MAIN_STEPS} steps are ~20x fewer than the papers' budgets; ADDA's lr is its own "
                            "Adam's, not tried)", f"{LR[-1]} is better"),
            contrast_bullet(pairs, tuned, "weight_ema", "Weight average (`weight_ema` 0 → 0.99 on each method's "
                            "setting before it: the moving average of the weights is evaluated and handed over)",
                            "The average is better"),
            "- Plateau: "
            + (", ".join(f"{t.method} {fmt(a['plateau'])} → {fmt(b['plateau'])}"
                         for t in tuned for a, b in contrasts(t, "weight_ema")[:1]) or "—")
            + " without → with the weight average (it lags the live weights: a method still rising with it "
              f"keeps a plateau above {PLATEAU_POINTS:g} points). A plateau above {PLATEAU_POINTS:g} points means "
              "the method still moves at the main budget: still rising when the trend is as large, swinging "
              "between checkpoints when the trend is near 0; the budget table below reads longer budgets and the "
              "same compute in smaller batches. The main job's budget is bounded by its CPU time (see the README), "
              "not chosen here.", ""]
    return out


def study_lines(cells: dict[str, dict[str, dict]], png: Path) -> list[str]:
    """The budget and backbone table (average [seed std; plateau (trend)] per cell), its reading, and
    the accuracy-vs-budget figure when at least one setting has two budgets."""
    lines = ["## Budget and backbone (the main job's setting, or the method's own defaults where a column says so)", "",
             "Average over the 4 tuning pairs of the `last` rule; in brackets the mean per-cell seed std "
             "and the plateau |last − halfway| (trend). Empty cells were not run (CPU; see STUDY in the module).", "",
             "| method | " + " | ".join(label for label, *_ in STUDY) + " |",
             "|---|" + "---|" * len(STUDY)]
    curves: dict[str, dict[tuple, float | None]] = {}
    for m in study_methods():
        row = []
        for label, _bb, st, *_ in STUDY:
            s = cells.get(label, {}).get(m)
            if s is None:
                row.append("")
                continue
            curves.setdefault(m, {})[(curve_name(label), st)] = s["avg"]
            few = min(len(a) for a in s["cells"].values())
            row.append(f"{fmt(s['avg'])} [{fmt(s['std'])}; {fmt_plateau(s['plateau'], s['trend'])}]"
                       + (f" (≥{few} seed{'s' if few != 1 else ''} per pair)" if 0 < few < len(SEEDS) else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("")
    lines += budget_reading(cells)
    if plot(curves, png):
        lines += [f"![target accuracy vs budget]({png.name})", ""]
    return lines


ADVERSARIAL = ("dann", "cdan", "mdd")   # the adversarial family (ADDA and MCD shown beside it)


def main_job_check(runs_dir: str | Path) -> list[str]:
    """The main job's own runs (benchmarks/digits.yaml: default pairs, lenet_bn, no target labels,
    the main job's settings) against the issue's criteria: per method the 4-pair average of the
    `last` rule, its gain over source-only, the pairs it wins, the mean per-cell seed std and the
    plateau. Reported only: these runs chose nothing."""
    from dalab import display
    from dalab.tables import load_records

    accs: dict[str, dict[tuple, list[float]]] = {}
    drifts: dict[str, list[float]] = {}
    for r in load_records(runs_dir):
        c = r["config"]
        if (c["steps"] == MAIN_STEPS and c["eval_every"] == MAIN_STEPS // EVAL_POINTS and c["backbone"] == "lenet_bn"
                and str(c["budget"]) == "0" and is_main_setting(c["method"], r["hparams"], c.get("source_hparams"))):
            a, d = last_acc(r), drift(r)
            if a is not None:
                accs.setdefault(c["method"], {}).setdefault((c["source"], c["target"]), []).append(a)
            if d is not None:
                drifts.setdefault(c["method"], []).append(d)
    base = accs.get("source_only")
    if not base:
        return []
    pairs = sorted(base)
    mean = {m: {p: statistics.mean(v) for p, v in cells.items()} for m, cells in accs.items()}
    avg = {m: statistics.mean(mv.values()) for m, mv in mean.items() if set(mv) == set(pairs)}

    def seed_std(m: str) -> float | None:
        sds = [statistics.stdev(v) for v in accs[m].values() if len(v) > 1]
        return statistics.mean(sds) if sds else None

    out = [f"## The main job's runs against the criteria ({runs_dir}; default pairs, {MAIN_STEPS} steps)", "",
           "Reported, not used to choose anything. `last` rule; wins: pairs where the method's mean over seeds is "
           "above source-only's; seed std: mean over the 4 cells of the std over seeds; plateau: |acc(last) − "
           "acc(halfway)| averaged over pairs and seeds (trend: signed); ‡: the method declares a known failure (table footnote).", "",
           "| method | runs | 4-pair avg | Δ vs source only | pairs won | seed std | plateau (trend) |", "|---|---|---|---|---|---|---|"]
    for m in sorted(accs, key=lambda m: (m != "source_only", m)):
        n = sum(len(v) for v in accs[m].values())
        wins = sum(mean[m].get(p, -1) > mean["source_only"][p] for p in pairs)
        flag = " ‡" if display.failure(m) else ""
        out.append(f"| {m}{flag} | {n} | {fmt(avg.get(m))} | "
                   + (f"{avg[m] - avg['source_only']:+.1f}" if m in avg and m != "source_only" else "—")
                   + f" | {wins if m != 'source_only' else '—'}/{len(pairs)} | {fmt(seed_std(m))} | "
                   + f"{fmt_plateau(*mean_drift(drifts.get(m)))} |")
    fam = [s for s in (seed_std(m) for m in ADVERSARIAL if m in accs) if s is not None]
    wide = [s for s in (seed_std(m) for m in (*ADVERSARIAL, "adda", "mcd") if m in accs) if s is not None]
    below = [m for m in avg if m != "source_only" and avg[m] < avg["source_only"]]
    out += ["", f"- Adversarial family ({', '.join(ADVERSARIAL)}): mean per-cell seed std "
                f"{fmt(statistics.mean(fam)) if fam else '—'}; with ADDA and MCD {fmt(statistics.mean(wide)) if wide else '—'}.",
            f"- Below source-only on the 4-pair average: {', '.join(below) if below else 'none'}"
            + ("" if not below else f" (footnoted: {', '.join(m for m in below if display.failure(m)) or 'none'})") + ".",
            f"- Plateau above {PLATEAU_POINTS:g} points: "
            f"{', '.join(m for m in sorted(drifts) if mean_drift(drifts[m])[0] > PLATEAU_POINTS) or 'none'}.",
            ""]
    return out


def budget_reading(cells: dict[str, dict[str, dict]]) -> list[str]:
    """What the longer budgets say about convergence, from the study's cells: per cell at another
    budget than the main one, the methods whose plateau is at most 2 points there, those still moving
    (with the trend), and the gain over the same setting at the main budget (the same backbone,
    defaults and overrides; a smaller batch spends the same compute on more steps)."""
    def same_setting(a: tuple, b: tuple) -> bool:
        (_, bb_a, _, over_a, own_a, _), (_, bb_b, _, over_b, own_b, _) = a, b
        strip = lambda o: {k: v for k, v in o.items() if k != "batch_size"}  # noqa: E731
        return bb_a == bb_b and own_a == own_b and strip(over_a) == strip(over_b)

    out = []
    for row in STUDY:
        label, _bb, st, over, _own, _ = row
        ref = next((r[0] for r in STUDY if r[2] == MAIN_STEPS and same_setting(r, row)), None)
        if st == MAIN_STEPS or ref is None:
            continue
        done = {m: s for m, s in cells.get(label, {}).items() if s["plateau"] is not None and s["avg"] is not None}
        if not done:
            continue
        flat = [m for m, s in done.items() if s["plateau"] <= PLATEAU_POINTS]
        moving = [f"{m} {s['plateau']:.1f} ({s['trend']:+.1f})" for m, s in done.items() if s["plateau"] > PLATEAU_POINTS]
        gain = [f"{m} {s['avg'] - cells[ref][m]['avg']:+.1f}" for m, s in done.items()
                if cells.get(ref, {}).get(m, {}).get("avg") is not None]
        out += [f"**{label}**: plateau at most {PLATEAU_POINTS:g} points for {', '.join(flat) or 'none'}; still "
                f"moving: {', '.join(moving) or 'none'}. 4-pair average vs *{ref}*: {', '.join(gain) or '—'}.", ""]
    return out


def curve_name(label: str) -> str:
    """A STUDY label without its budget: the cells of one setting at several budgets form a curve."""
    import re

    return re.sub(r", \d+ steps", "", label)


def plot(curves: dict[str, dict[tuple, float | None]], path: Path) -> bool:
    """4-pair average target accuracy vs step budget: one colour per method, one line style per
    setting; only settings measured at two budgets or more (a single point is not a curve)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dalab.plots import _save

    fig, ax = plt.subplots(figsize=(10, 5.5))
    colours = plt.get_cmap("tab20").colors
    styles: dict[str, str] = {}
    drawn = False
    for i, (m, pts) in enumerate(curves.items()):
        for name in sorted({b for b, _ in pts}):
            xy = sorted((st, v) for (b, st), v in pts.items() if b == name and v is not None)
            if len(xy) < 2:
                continue
            ls = styles.setdefault(name, ("-", "--", ":", "-.")[len(styles) % 4])
            ax.plot(*zip(*xy), marker="o", ls=ls, color=colours[i % len(colours)], label=f"{m} ({name})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("step budget")
    ax.set_ylabel("target test accuracy, 4 tuning pairs (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True
