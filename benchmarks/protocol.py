"""The protocol study (issue 13): how the defaults were chosen, and whether the budget has converged.

    python -m dalab.benchmarks.protocol [--cached-only] [--runs-dir results/protocol/runs] [--out results/protocol.md]

Everything here runs on the TUNING pairs (the ``digits-extra`` benchmark: mnist5k->mnist5k_rot,
mnist5k->mnist5k_color, syndigits->ucidigits, mnistm5k->mnist5k), never on the main table's four
default pairs, whose target labels choose nothing. Two parts:

1. **Tuning grid** (:data:`CANDIDATES`): per method, the candidate settings that were compared;
   the default is the candidate with the highest mean target-test accuracy at the last
   checkpoint over the 4 tuning pairs x 3 seeds at the main job's budget (:data:`RULE`).
2. **Budget and backbone study** (:data:`STUDY`): each unsupervised method at its chosen default,
   target-test accuracy vs step budget and backbone, the seed spread, and the plateau measure
   |acc(last checkpoint) - acc(checkpoint halfway)| averaged over pairs and seeds.

Runs are ordinary run records: a run that is already done under ``--runs-dir`` is read, not
retrained (``dalab.bench.run_or_load``), and a record whose resolved hyperparameters equal the
wanted ones is reused even when it was launched with different (but equivalent) overrides.
Every evaluated setting passes its tuned hyperparameters explicitly, so a later change of a
default never makes an old record stand for the new setting.

Three parts that read on their own: :mod:`~dalab.benchmarks.protocol_grid` (what is compared: the
candidates, the study's cells, the main job's setting), :mod:`~dalab.benchmarks.protocol_runs` (the
runs, the measures, the rule, the two stages) and :mod:`~dalab.benchmarks.protocol_report` (the
report). This module is the command.
"""

from __future__ import annotations

import argparse
import sys

from dalab.benchmarks.protocol_grid import (BENCHMARK, CANDIDATES, EVAL_POINTS, HOW, MAIN_SPEC, MAIN_STEPS, RULE, SEEDS,
                                            STUDY, VALIDATORS, WHY_NOT, candidate, is_default, is_main_setting,
                                            main_overrides, main_source_key, matches, setting, source_overrides)
from dalab.benchmarks.protocol_report import (ADVERSARIAL, budget_reading, cell, curve_name, fmt, fmt_plateau,
                                              main_job_check, plot, render)
from dalab.benchmarks.protocol_runs import (Grid, Records, Tuned, get_run, last_acc, plan, plateau, rule_pick, study,
                                            summarize, tune)
from dalab.convergence import PLATEAU_POINTS, drift, mean_drift
from dalab.utils import write_report

__all__ = ["ADVERSARIAL", "BENCHMARK", "CANDIDATES", "EVAL_POINTS", "HOW", "MAIN_SPEC", "MAIN_STEPS", "PLATEAU_POINTS",
           "RULE", "SEEDS", "STUDY", "VALIDATORS", "WHY_NOT", "Grid", "Records", "Tuned", "budget_reading",
           "candidate", "cell", "curve_name", "drift", "fmt", "fmt_plateau", "get_run", "is_default",
           "is_main_setting", "last_acc", "main", "main_job_check", "main_overrides", "main_source_key",
           "matches", "mean_drift", "plateau", "plot", "render", "rule_pick", "setting", "source_overrides",
           "study", "summarize", "tune"]


def main(argv=None) -> int:
    from pathlib import Path

    from dalab.datasets import BENCHMARKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="results/protocol/runs")
    ap.add_argument("--out", default="results/protocol.md")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cached-only", action="store_true",
                    help="only read the committed records; train nothing (what `make tables` runs)")
    ap.add_argument("--main-runs-dir", default=None,
                    help="also report the plateau of the main job's runs found here (benchmarks/digits.yaml)")
    ap.add_argument("--skip-study", action="store_true", help="tuning grid only")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train the missing runs first, in N worker processes (as `dalab bench --jobs N`); "
                         "then report")
    args = ap.parse_args(argv)
    pairs = [tuple(p) for p in BENCHMARKS[BENCHMARK]]
    if not args.cached_only:
        train_missing(args.runs_dir, pairs, args.device, not args.skip_study, args.jobs)
    records = Records(args.runs_dir)
    missing = len(plan(records, pairs, args.device, not args.skip_study))
    if missing:  # a report from part of the study would pick defaults from part of the evidence
        print(f"error: {missing} of the protocol study's runs have no record under {args.runs_dir}; nothing "
              f"written (`make protocol` trains them, resumably, then writes {args.out})", file=sys.stderr)
        return 1
    grid = Grid(records, pairs, True, args.device)
    base, tuned = tune(grid)
    cells = None if args.skip_study else study(grid)
    text = render(pairs, base, tuned, cells, Path(args.out).with_suffix(".png"), args.main_runs_dir)
    print(text)
    write_report(args.out, "dalab.benchmarks.protocol", rederive_argv(args), text)
    return 0


def rederive_argv(args) -> list[str]:
    """The arguments that re-derive the report from the records alone (its header names them,
    whatever trained the runs: no worker count, no device, no training)."""
    return ["--cached-only", "--runs-dir", args.runs_dir,
            *(["--main-runs-dir", args.main_runs_dir] if args.main_runs_dir else []),
            *(["--skip-study"] if args.skip_study else []), "--out", args.out]


def train_missing(runs_dir: str, pairs: list[tuple[str, str]], device: str, with_study: bool, jobs: int) -> None:
    """Every run the study wants and the runs dir lacks, trained by the bench's launcher (``jobs``
    worker processes, resumable: an interrupted study continues where it stopped)."""
    from dalab.bench import BenchSpec, launch
    from dalab.runs import RunOptions

    cfgs = plan(Records(runs_dir), pairs, device, with_study)
    print(f"protocol study: {len(cfgs)} runs to train under {runs_dir}", flush=True)
    if cfgs:
        spec = BenchSpec(name="protocol", runs_dir=str(runs_dir))
        launch(spec, [(c, None) for c in cfgs], jobs=jobs, progress=True,
               opts=RunOptions(device=device, tensorboard=False, progress=False, validators=VALIDATORS))


if __name__ == "__main__":
    raise SystemExit(main())
