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
import sys
from pathlib import Path

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


def average_tau(long_runs: str | None = None) -> tuple[list[str], dict[str, float], int, int]:
    """(methods whose long runs have all finished, Kendall tau of the 500- vs 2000-step ranking of
    their averages per rule -- the tables' rule and ``last`` --, finished long runs, all long runs):
    the line the README's headline states."""
    spec, grid, long_recs = _grid("digits_long.yaml", long_runs)
    _, _, main_recs = _grid("digits.yaml")
    pairs = list(dict.fromkeys(f"{c.source}→{c.target}" for c, _ in grid))
    long_c, main_c = cells(long_recs), cells(main_recs)
    complete = [m for m in spec.methods if all(len(long_c.get((m, p), [])) == len(spec.seeds) for p in pairs)]
    taus = {}
    for r in dict.fromkeys([spec.selection[0], "last"]):
        a = [statistics.mean(cell_acc(main_c.get((m, p), []), r) for p in pairs) for m in complete]
        b = [statistics.mean(cell_acc(long_c.get((m, p), []), r) for p in pairs) for m in complete]
        if len(complete) >= 3:
            taus[r] = kendall(a, b)
    return complete, taus, len(long_recs), len(grid)


def report(long_runs: str, command: str) -> str:
    from dalab import display
    from dalab.convergence import of_runs
    from dalab.render import Table
    from dalab.selection import RULES

    spec, grid, long_recs = _grid("digits_long.yaml", long_runs)
    main_spec, _, main_recs = _grid("digits.yaml")
    rule = spec.selection[0]
    pairs = list(dict.fromkeys(f"{c.source}→{c.target}" for c, _ in grid))  # the spec's order
    per_cell = len(spec.seeds)
    long_c, main_c = cells(long_recs), cells(main_recs)
    methods = list(spec.methods)
    complete = [m for m in methods if all(len(long_c.get((m, p), [])) == per_cell for p in pairs)]

    rules = list(dict.fromkeys([rule, "last"]))  # the tables' rule, and the last checkpoint (what "more steps" means)
    t = Table(["Method", *[f"{n} steps, {r}" for n in (main_spec.steps, spec.steps) for r in rules],
               f"plateau (trend) at {main_spec.steps}", f"at {spec.steps}", "long runs"])
    avg: dict[tuple[str, str, int], float | None] = {}
    for m in methods:
        accs_row, conv_row = [], []
        for n, c in ((main_spec.steps, main_c), (spec.steps, long_c)):
            for r in rules:
                accs = [cell_acc(c.get((m, p), []), r) for p in pairs]
                ok = all(a is not None for a in accs) and (n == main_spec.steps or m in complete)
                avg[(m, r, n)] = statistics.mean(accs) if ok else None
                accs_row.append(f"{avg[(m, r, n)]:.1f}" if ok else "—")
            conv = of_runs([x for p in pairs for x in c.get((m, p), [])])
            conv_row.append(f"{conv.plateau:.1f} ({conv.trend:+.1f})" if conv.plateau is not None else "—")
        t.add(display.method(m), *accs_row, *conv_row,
              f"{sum(len(long_c.get((m, p), [])) for p in pairs)}/{per_cell * len(pairs)}")

    agree = Table(["Ranking over", *[f"Kendall τ, {r}" for r in rules], "methods"])
    if len(complete) >= 3:
        agree.add("the average", *[f"{kendall([avg[(m, r, main_spec.steps)] for m in complete], [avg[(m, r, spec.steps)] for m in complete]):.2f}"
                                   for r in rules], str(len(complete)))
        for p in pairs:
            taus = []
            for r in rules:
                a = [cell_acc(main_c.get((m, p), []), r) for m in complete]
                b = [cell_acc(long_c.get((m, p), []), r) for m in complete]
                taus.append(f"{kendall(a, b):.2f}" if all(x is not None for x in a + b) else "—")
            agree.add(display.pair_key(p), *taus, str(len(complete)))
    missing = len(grid) - len(long_recs)
    status = (f"All {len(grid)} long-budget runs are finished." if not missing else
              f"**In progress:** {len(long_recs)} of {len(grid)} long-budget runs finished; `make bench-long` trains the "
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
