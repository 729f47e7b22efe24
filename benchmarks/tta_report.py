"""The test-time methods' FINAL models beside the offline UDA methods, on the same pairs.

    python -m dalab.benchmarks.tta_report [RUNS_DIR] [--uda-runs results/digits/runs] [--out results/tta/final.md]

A test-time run's headline is its online accuracy (results/tta/table.md). This table reports what
its model is after one pass of the stream, scored on target TEST (data the stream never showed),
next to the main job's unsupervised methods (their last checkpoint, the same source models, pairs
and seeds): where a stream-adapted model stands among models adapted offline on all of target
train. Generated from committed records (``make tables`` regenerates it), never typed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TTA_RUNS, UDA_RUNS, OUT = "results/tta/runs", "results/digits/runs", "results/tta/final.md"


def final_table(tta_runs: str | Path, uda_runs: str | Path, command: str) -> str:
    from dalab.tables import build_table, load_records, to_markdown

    tta = [r for r in load_records(tta_runs) if r["method"]["name"] != "source_only"]
    pairs = list(dict.fromkeys(f"{r['config']['source']}→{r['config']['target']}" for r in tta))
    uda = [r for r in load_records(uda_runs) if r["method"]["budget"] == "0"
           and f"{r['config']['source']}→{r['config']['target']}" in pairs]
    t = build_table(uda + tta, "last", pairs, baseline="source_only", split="tgt_test")
    caption = ("Target test accuracy (%) of the final model, mean ± std over seeds: test-time methods after one "
               "pass of their stream (results/tta) beside the main job's offline UDA methods at their last "
               "checkpoint (results/digits); Δ against source-only (the source model all of them start from "
               "or, for the offline methods, train like). Last checkpoint (no target labels).")
    return to_markdown(t, command, caption_text=caption)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir", nargs="?", default=TTA_RUNS)
    p.add_argument("--uda-runs", default=UDA_RUNS)
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    cmd = f"python -m dalab.benchmarks.tta_report {a.runs_dir} --uda-runs {a.uda_runs} --out {a.out}"
    from dalab.utils import atomic_write_text

    atomic_write_text(a.out, final_table(a.runs_dir, a.uda_runs, cmd))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
