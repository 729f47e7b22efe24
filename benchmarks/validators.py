"""Which validator to trust: every label-free selection rule scored against target accuracy on a
checkpoint pool built on the TUNING pairs (issue 28).

    python -m dalab.benchmarks.validators [RUNS_DIR] [--out results/validators.md]   (make validators)

The pool (benchmarks/validators.yaml, ``make validators`` trains it): several methods, source-only
included, random hyperparameter trials, and EVERY evaluation point of every finished run, on the
digits-extra pairs only (the main table's pairs never choose anything). For each validator (each
rule of :data:`dalab.selection.RULES` that scores a point; ``last`` is not a score) and each pair:

- the weighted Spearman correlation between its score and target-test accuracy over the pair's
  checkpoints (Musgrave et al. 2022): the Pearson correlation of the two rankings, each checkpoint
  weighted by (its accuracy rank / N)^2, so the order among the good checkpoints counts most;
- the target-test accuracy of the checkpoint it picks (its highest score) and the gap to the
  oracle's pick (highest target-VALIDATION accuracy, reported on target test);

then the mean over the pairs. Validators read target TRAIN inputs and SOURCE validation data only,
the oracle reads target VAL labels, every reported number is target TEST (tests/test_validators.py
checks that no label-free rule can read a target label). Generated from the pool's run records,
never typed: ``results/validators.md`` and ``results/validators.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

RUNS, OUT = "results/validators/runs", "results/validators.md"
WEIGHT_POWER = 2  # Musgrave et al. 2022's weighted Spearman: weight = (accuracy rank / N) ** 2


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N (ties share their mean rank)."""
    from scipy.stats import rankdata

    return rankdata(x)


def weighted_spearman(score: np.ndarray, acc: np.ndarray, power: float = WEIGHT_POWER) -> float:
    """Weighted Pearson correlation of the ranks of ``score`` and ``acc``, weights (rank(acc) / N)^power."""
    rs, ra = _ranks(score), _ranks(acc)
    w = (ra / len(ra)) ** power
    w = w / w.sum()
    ms, ma = (w * rs).sum(), (w * ra).sum()
    cov = (w * (rs - ms) * (ra - ma)).sum()
    den = math.sqrt((w * (rs - ms) ** 2).sum() * (w * (ra - ma) ** 2).sum())
    return float(cov / den) if den > 0 else float("nan")


def validators() -> list[str]:
    """Every rule that scores an evaluation point (``last`` picks by position, not by a score)."""
    from dalab.selection import RULES

    return [name for name, rule in RULES.items() if not rule.at_last and not rule.other_runs]


def pool(records: list[dict]) -> dict[str, list[dict]]:
    """pair -> checkpoints: {run, method, step, acc (target test), val (target val), scores}."""
    from dalab.selection import selection_score

    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") != "done":
            continue
        pair = f"{r['config']['source']}→{r['config']['target']}"
        for ev in r.get("evals") or []:
            scores = {}
            for v in validators():
                try:
                    s = selection_score(ev, v, "acc")
                except (KeyError, TypeError):
                    s = float("nan")
                scores[v] = float(s) if s is not None else float("nan")
            out.setdefault(pair, []).append({"run": r["run_id"], "method": r["method"]["name"], "step": ev["step"],
                                             "acc": ev["tgt_test"]["acc"] * 100, "val": ev["tgt_val"]["acc"] * 100,
                                             "scores": scores})
    return out


def study(points: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """validator -> pair -> {spearman, picked, gap, n}; plus "mean" over the pairs."""
    res: dict[str, dict[str, dict]] = {}
    for v in validators():
        res[v] = {}
        for pair, pts in points.items():
            ok = [p for p in pts if math.isfinite(p["scores"][v])]
            if len(ok) < 3:
                res[v][pair] = {"spearman": float("nan"), "picked": float("nan"), "gap": float("nan"), "n": len(ok)}
                continue
            s = np.array([p["scores"][v] for p in ok])
            a = np.array([p["acc"] for p in ok])
            oracle = max(pts, key=lambda p: p["val"])["acc"]
            picked = ok[int(np.argmax(s))]["acc"]
            res[v][pair] = {"spearman": weighted_spearman(s, a), "picked": picked, "gap": picked - oracle, "n": len(ok)}
        cells = list(res[v].values())
        res[v]["mean"] = {k: statistics.mean(c[k] for c in cells) if all(math.isfinite(c[k]) for c in cells)
                          else float("nan") for k in ("spearman", "picked", "gap")}
    return res


def _f(x: float, signed: bool = False, digits: int = 2) -> str:
    return "—" if not math.isfinite(x) else (f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}")


def main_table_note(best: str, main_runs: str | Path = "results/digits/runs") -> str:
    """What the study means for the main table (issue 28 item 3), from the main spec and the main
    job's own records: whether its first rule is the study's best, and whether its records carry
    that rule's score at every point (then the rule can lead the table without a re-run)."""
    from dalab.bench import BenchSpec
    from dalab.selection import selection_score
    from dalab.tables import load_records

    spec = BenchSpec.from_yaml(Path(__file__).resolve().parent / "digits.yaml")
    recs = load_records(main_runs) if Path(main_runs).is_dir() else []

    def carries(r: dict) -> bool:
        try:
            return all(math.isfinite(selection_score(ev, best, "acc")) for ev in r.get("evals") or [])
        except (KeyError, TypeError):
            return False

    n = sum(carries(r) for r in recs)
    first = spec.selection[0]
    if first == best:
        return (f"The main table (benchmarks/digits.yaml) puts `{best}` first, as this study ranks it "
                f"({n} of its {len(recs)} committed records carry its score).")
    return (f"The main table (benchmarks/digits.yaml) puts `{first}` first; {n} of its {len(recs)} committed "
            f"records carry `{best}`'s score" + ("." if n == len(recs) else ", so it can lead only after a re-run "
                                                 "of the main job (`make bench`)."))


def runner_up_note(res: dict, best: str) -> str:
    """How robust the winner is: the runner-up, the margin, and on how many pairs the winner is ahead."""
    from dalab.selection import RULES

    free = sorted((v for v in res if not RULES[v].needs_target_labels and math.isfinite(res[v]["mean"]["spearman"])),
                  key=lambda v: -res[v]["mean"]["spearman"])
    if len(free) < 2:
        return ""
    second = free[1]
    pairs = [p for p in res[best] if p != "mean"]
    ahead = sum(res[best][p]["spearman"] > res[second][p]["spearman"] for p in pairs)
    return (f"Runner-up `{second}` ({res[second]['mean']['spearman']:.2f}): a margin of "
            f"{res[best]['mean']['spearman'] - res[second]['mean']['spearman']:.2f}, with `{best}` ahead on {ahead} of "
            f"{len(pairs)} pairs, one seed per trial -- "
            + ("not a robust winner." if ahead * 2 <= len(pairs) else "ahead on most pairs."))


def best_validator(res: dict) -> str:
    """The label-free validator with the highest mean weighted Spearman (the oracle is excluded)."""
    from dalab.selection import RULES

    free = [v for v in res if not RULES[v].needs_target_labels and math.isfinite(res[v]["mean"]["spearman"])]
    return max(free, key=lambda v: res[v]["mean"]["spearman"])


def report(records: list[dict], points: dict, res: dict, command: str, timing: dict | None) -> str:
    from dalab import display
    from dalab.render import Table
    from dalab.selection import RULES

    from dalab.tables import _pair_order

    pairs = _pair_order(points)
    order = sorted(res, key=lambda v: (RULES[v].needs_target_labels, -np.nan_to_num(res[v]["mean"]["spearman"], nan=-9)))
    done = [r for r in records if r.get("status") == "done"]
    methods = sorted({r["method"]["name"] for r in records})
    n_points = sum(len(p) for p in points.values())
    lines = [f"<!-- generated by: {command} -->", "# Which validator to trust (issue 28)", "",
             f"Checkpoint pool on the TUNING pairs ({', '.join(display.pair_key(p) for p in pairs)}; never the main "
             f"table's): {len(records)} runs ({len(done)} finished, {len(records) - len(done)} diverged or unfinished "
             f"and left out) of {', '.join(display.method(m) for m in methods)} with random hyperparameter trials "
             f"(benchmarks/validators.yaml), every evaluation point: {n_points} checkpoints, "
             + ", ".join(f"{len(points[p])} on {display.pair_key(p)}" for p in pairs) + "."]
    if timing:
        lines.append(f"Pool trained in {timing['wall_s'] / 60:.0f} min with {timing['workers']} workers on "
                     f"{timing.get('cpu_cores', '?')} CPU cores; evaluation (every validator at every point) took "
                     f"{100 * timing['eval_s'] / max(timing['wall_s'] * timing['workers'], 1e-9):.0f}% of worker time.")
    lines += ["", "Validators read target TRAIN inputs (never labels) and SOURCE validation data; the oracle reads "
              "target VAL labels; every accuracy here is target TEST (%).", ""]
    best = best_validator(res)
    lines += [f"**Best label-free validator on the tuning pairs: `{best}`** ({RULES[best].description}), mean "
              f"weighted Spearman {res[best]['mean']['spearman']:.2f}, picked accuracy "
              f"{res[best]['mean']['picked']:.1f} ({res[best]['mean']['gap']:+.1f} vs the oracle's pick). "
              + runner_up_note(res, best) + " " + main_table_note(best), ""]
    t = Table(["Validator", "Target labels", *[display.pair_key(p) for p in pairs], "Mean"])
    for v in order:
        t.add(f"`{v}`", "**yes: oracle**" if RULES[v].needs_target_labels else "no",
              *[_f(res[v][p]["spearman"]) for p in pairs], _f(res[v]["mean"]["spearman"]))
    lines += ["## Weighted Spearman correlation with target accuracy", "",
              f"Pearson correlation of the validator's and the accuracy's rankings of a pair's checkpoints, each "
              f"weighted by (accuracy rank / N)^{WEIGHT_POWER} (Musgrave et al. 2022); 1 = ranks the good checkpoints "
              f"exactly as target accuracy does, 0 = no better than chance.", "", t.markdown(), ""]
    t = Table(["Validator", *[display.pair_key(p) for p in pairs], "Mean", "Gap to oracle (mean)"])
    for v in order:
        t.add(f"`{v}`", *[_f(res[v][p]["picked"], digits=1) for p in pairs], _f(res[v]["mean"]["picked"], digits=1),
              _f(res[v]["mean"]["gap"], signed=True, digits=1))
    best_acc = {p: max(q["acc"] for q in points[p]) for p in pairs}
    t.add("*best checkpoint in the pool*", *[_f(best_acc[p], digits=1) for p in pairs],
          _f(statistics.mean(best_acc.values()), digits=1), "")
    lines += ["## Accuracy of the checkpoint each validator picks", "",
              "Target-test accuracy (%) of the pool's checkpoint with the validator's highest score, per pair; the gap "
              "is to the checkpoint the oracle picks (highest target-validation accuracy).", "", t.markdown(), "",
              "Figure: results/validators.png (each validator's score, ranked within its pair, against target "
              "accuracy; one colour per pair).", ""]
    return "\n".join(lines)


def figure(points: dict, res: dict, out: Path, command: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dalab import display

    vs = list(res)
    cols = 4
    rows = math.ceil(len(vs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, v in zip(axes.flat, vs):
        for pair, pts in points.items():
            ok = [p for p in pts if math.isfinite(p["scores"][v])]
            if len(ok) < 3:
                continue
            r = _ranks(np.array([p["scores"][v] for p in ok])) / len(ok)
            ax.scatter(r, [p["acc"] for p in ok], s=5, alpha=0.5, label=display.pair_key(pair))
        ax.set_title(f"{v}: weighted ρ {_f(res[v]['mean']['spearman'])}", fontsize=9)
        ax.set_xlabel("score rank within pair", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("target test accuracy (%)", fontsize=8)
    for ax in list(axes.flat)[len(vs):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    from dalab.plots import _save

    return _save(fig, out, what="Each validator's score (ranked within its pair) against target test accuracy, "
                 "every checkpoint of the pool on the tuning pairs", command=command)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir", nargs="?", default=RUNS)
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    from dalab.tables import load_records
    from dalab.utils import DalabError, atomic_write_text

    records = load_records(a.runs_dir)
    if not records:
        raise DalabError(f"no run records under {a.runs_dir}; run `make validators` to train the checkpoint pool")
    points = pool(records)
    res = study(points)
    timing_file = Path(a.runs_dir).parent / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else None
    cmd = f"python -m dalab.benchmarks.validators {a.runs_dir} --out {a.out}"
    atomic_write_text(a.out, report(records, points, res, cmd, timing))
    fig = figure(points, res, Path(a.out).with_suffix(".png"), cmd)
    print(f"wrote {a.out} and {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
