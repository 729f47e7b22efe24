"""Does the main job's 500-step budget rank the methods as 2000 steps do? (issue 29 item 4)

    python -m dalab.benchmarks.long_report [results/digits_long/runs] [--out results/digits_long/agreement.md]

Reads the committed records of the main job (benchmarks/digits.yaml, 500 steps) and of the long-budget
grid (benchmarks/digits_long.yaml, 2000 steps, the same pairs, seeds and settings); trains nothing.
Per method: the average over the pairs at both budgets (target test at the checkpoint the first
selection rule picks, no target labels), and the plateau and trend at each budget (dalab.convergence:
|acc(last) - acc(halfway)|, mean over the pairs' seeds). Then Kendall's tau between the two rankings,
over the average and on each pair, among the methods whose long-budget runs have all finished: a
grid still in progress gives the agreement of its finished part and says how many runs are missing.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
import sys
from pathlib import Path
from typing import Any

RUNS, OUT = "results/digits_long/runs", "results/digits_long/agreement.md"
ROOT = Path(__file__).resolve().parent.parent


def _grid(spec_name: str, runs_dir: str | None = None):
    from dalab.bench import BenchSpec, expand, grid_records

    spec = BenchSpec.from_yaml(ROOT / "benchmarks" / spec_name)
    spec.runs_dir = runs_dir or str(ROOT / spec.runs_dir)
    grid = expand(spec)
    return spec, grid, grid_records(spec, grid)


def cells(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(method, pair key) -> the finished budget-0 records of that cell."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        c = r["config"]
        if str(c.get("budget", "0")) == "0":
            out.setdefault((r["method"]["name"], f"{c['source']}→{c['target']}"), []).append(r)
    return out


def cell_acc(recs: list[dict], rule: str) -> float | None:
    """Mean target-test accuracy (%) over a cell's runs at the rule's checkpoint (None: none selectable)."""
    from dalab.selection import select
    from dalab.tasks import score

    accs = [100 * score(r, p) for r in recs if (p := select(r, rule)) is not None]
    return statistics.mean(accs) if accs else None


def kendall(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists over the same items (scipy)."""
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


@dataclass
class Comparison:
    """The long grid beside the main job, loaded once: the pairs in the spec's order, each budget's
    cells, the methods whose long runs have all finished, and the rules compared (the tables' rule,
    and ``last``: what "more steps" means)."""

    spec: Any
    main_spec: Any
    grid: list
    long_recs: list[dict]
    pairs: list[str]
    cells: dict[int, dict[tuple[str, str], list[dict]]]  # steps -> (method, pair) -> records
    complete: list[str]
    rules: list[str]

    def average(self, method: str, rule: str, steps: int) -> float | None:
        """The method's average over the pairs at ``steps`` under ``rule`` (None: a pair has no number)."""
        accs = [cell_acc(self.cells[steps].get((method, p), []), rule) for p in self.pairs]
        return statistics.mean(accs) if all(a is not None for a in accs) else None

    def tau(self, rule: str, pair: str | None = None) -> float | None:
        """Kendall's tau of the finished methods' 500- vs 2000-step ranking, of their averages or on one pair."""
        def score(m: str, n: int) -> float | None:
            return self.average(m, rule, n) if pair is None else cell_acc(self.cells[n].get((m, pair), []), rule)

        a, b = ([score(m, n) for m in self.complete] for n in (self.main_spec.steps, self.spec.steps))
        return kendall(a, b) if len(self.complete) >= 3 and None not in a + b else None


def compare(long_runs: str | None = None) -> Comparison:
    spec, grid, long_recs = _grid("digits_long.yaml", long_runs)
    main_spec, _, main_recs = _grid("digits.yaml")
    pairs = list(dict.fromkeys(f"{c.source}→{c.target}" for c, _ in grid))  # the spec's order
    long_c = cells(long_recs)
    complete = [m for m in spec.methods if all(len(long_c.get((m, p), [])) == len(spec.seeds) for p in pairs)]
    return Comparison(spec, main_spec, grid, long_recs, pairs, {main_spec.steps: cells(main_recs), spec.steps: long_c},
                      complete, list(dict.fromkeys([spec.selection[0], "last"])))


def average_tau(long_runs: str | None = None) -> tuple[list[str], dict[str, float], int, int]:
    """(methods whose long runs have all finished, Kendall tau of the 500- vs 2000-step ranking of
    their averages per rule -- the tables' rule and ``last`` --, finished long runs, all long runs):
    the line the README's headline states."""
    c = compare(long_runs)
    taus = {r: t for r in c.rules if (t := c.tau(r)) is not None}
    return c.complete, taus, len(c.long_recs), len(c.grid)


def report(long_runs: str, command: str) -> str:
    from dalab import display
    from dalab.convergence import of_runs
    from dalab.render import Table
    from dalab.selection import RULES

    c = compare(long_runs)
    spec, main_spec, pairs, complete, rules = c.spec, c.main_spec, c.pairs, c.complete, c.rules
    rule, per_cell = rules[0], len(spec.seeds)
    t = Table(["Method", *[f"{n} steps, {r}" for n in (main_spec.steps, spec.steps) for r in rules],
               f"plateau (trend) at {main_spec.steps}", f"at {spec.steps}", "long runs"])
    for m in spec.methods:
        accs_row, conv_row = [], []
        for n in (main_spec.steps, spec.steps):
            for r in rules:
                a = c.average(m, r, n) if (n == main_spec.steps or m in complete) else None
                accs_row.append(f"{a:.1f}" if a is not None else "—")
            conv = of_runs([x for p in pairs for x in c.cells[n].get((m, p), [])])
            conv_row.append(f"{conv.plateau:.1f} ({conv.trend:+.1f})" if conv.plateau is not None else "—")
        t.add(display.method(m), *accs_row, *conv_row,
              f"{sum(len(c.cells[spec.steps].get((m, p), [])) for p in pairs)}/{per_cell * len(pairs)}")

    agree = Table(["Ranking over", *[f"Kendall τ, {r}" for r in rules], "methods"])
    if len(complete) >= 3:
        for p in [None, *pairs]:
            taus = [c.tau(r, p) for r in rules]
            agree.add("the average" if p is None else display.pair_key(p),
                      *[f"{x:.2f}" if x is not None else "—" for x in taus], str(len(complete)))
    missing = len(c.grid) - len(c.long_recs)
    status = (f"All {len(c.grid)} long-budget runs are finished." if not missing else
              f"**In progress:** {len(c.long_recs)} of {len(c.grid)} long-budget runs finished; `make bench-long` trains the "
              f"other {missing} (resumable) and `make tables` regenerates this page. Long-budget averages and the "
              f"agreement are over the {len(complete)} methods whose {per_cell * len(pairs)} runs have all finished"
              + (f" ({', '.join(display.method(m) for m in complete)})." if complete else "."))
    return (f"<!-- generated by: {command} -->\n# The 500-step main table against {spec.steps} steps\n\n"
            f"Target test accuracy (%), average over the {len(pairs)} main pairs of the mean over {per_cell} seeds, at the "
            f"checkpoint {RULES[rule].label} picks (`{rule}`, no target labels; the tables' rule) and at the last one "
            f"(`last`); the same methods, settings, pairs and seeds at both budgets (benchmarks/digits.yaml, "
            f"benchmarks/digits_long.yaml). Plateau (trend): |acc(last) − acc(halfway)| (the signed mean), points, over "
            f"every run of the method (dalab.convergence); a plateau above 2 points means the budget still moves the "
            f"number. A method whose `{rule}` number falls with more steps while its `last` number does not has lost "
            f"nothing to training: the rule picked an earlier, less adapted checkpoint among the long run's "
            f"{spec.steps // spec.eval_every}.\n\n{status}\n\n" + t.markdown()
            + "\n## Do the two budgets rank the methods alike?\n\nKendall's τ between the methods' rankings at "
              f"{main_spec.steps} and at {spec.steps} steps (1: the same order, 0: unrelated, −1: reversed).\n\n"
            + (agree.markdown() if agree.rows else "Fewer than 3 methods have finished every long-budget run.\n"))


def main(argv=None) -> int:
    from dalab.benchmarks import report_main

    return report_main(argv, __doc__, "dalab.benchmarks.long_report", RUNS, OUT, report)


if __name__ == "__main__":
    sys.exit(main())
