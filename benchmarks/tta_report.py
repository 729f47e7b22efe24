"""The test-time methods' FINAL models beside the offline UDA methods, and the continual stream per domain.

    python -m dalab.benchmarks.tta_report [RUNS_DIR] [--uda-runs results/digits/runs] [--out results/tta/final.md]

A test-time run's headline is its online accuracy (results/tta/table.md). The first table here
reports what its model is after one pass of the stream, scored on target TEST (data the stream
never showed), next to the main job's unsupervised methods (their last checkpoint, same pairs and
seeds): where a stream-adapted model stands among models adapted offline on all of target train.
The second gives the continual stream's online accuracy on each of its domains. Generated from
committed records (``make tables`` regenerates it), never typed.
"""

from __future__ import annotations

import argparse
import sys

TTA_RUNS, UDA_RUNS, OUT = "results/tta/runs", "results/digits/runs", "results/tta/final.md"


def _continual(r: dict) -> bool:
    return "online_domains" in ((r.get("final") or {}))


def final_table(tta: list[dict], uda: list[dict], command: str) -> str:
    from dalab.tables import build_table, to_markdown

    tta = [r for r in tta if not _continual(r)]
    pairs = list(dict.fromkeys(f"{r['config']['source']}→{r['config']['target']}" for r in tta))
    uda = [r for r in uda if r["method"]["budget"] == "0" and f"{r['config']['source']}→{r['config']['target']}" in pairs]
    t = build_table(uda + tta, "last", pairs, baseline="no_adapt", split="tgt_test")
    caption = ("Target test accuracy (%) of the final model, mean ± std over seeds: the test-time methods after one "
               "pass of their stream (results/tta; Δ against the same source models not adapted, no_adapt) beside the "
               "main job's offline UDA methods at their last checkpoint (results/digits). The main job's Source-only "
               "row and no_adapt's source models have the same configuration and run ids but were trained with 1 and "
               "2 CPU threads: the float reduction order differs, so their numbers differ per seed. Last checkpoint "
               "(no target labels).")
    return to_markdown(t, command, caption_text=caption)


def continual_table(tta: list[dict]) -> str:
    """Online accuracy per domain of the continual stream, and the final model on the first domain's test."""
    from dalab import display
    from dalab.render import Table
    from dalab.tables import mean_spread as cell

    runs = [r for r in tta if _continual(r) and r["status"] == "done"]
    if not runs:
        return ""
    domains = list(runs[0]["final"]["online_domains"])
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"]["name"], []).append(r)
    tab = Table(["Method", *[f"online: {display.domain(d)}" for d in domains], "online: whole stream",
                 f"final model: {display.domain(domains[0])} test", "seeds"])

    order = sorted(by_method, key=lambda m: (m != "no_adapt", display.method(m)))
    for m in order:
        rs = by_method[m]
        tab.add(display.method(m), *[cell([100 * r["final"]["online_domains"][d]["acc"] for r in rs]) for d in domains],
                cell([100 * r["final"]["online"]["acc"] for r in rs]), cell([100 * r["final"]["tgt_test"]["acc"] for r in rs]),
                str(len(rs)))
    first = runs[0]
    stream = " → ".join(display.domain(d) for d in domains)
    return (f"\n### Continual stream: {display.domain(first['config']['source'])} source model, {stream}\n\n"
            "Online accuracy (%) on each domain of the stream (each batch predicted before the method adapted on it), "
            "mean ± std over seeds, and the final model on the first domain's test split after the whole stream "
            "(results/tta_continual has the table with significance marks).\n\n" + tab.markdown())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir", nargs="?", default=TTA_RUNS)
    p.add_argument("--uda-runs", default=UDA_RUNS)
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    cmd = f"python -m dalab.benchmarks.tta_report {a.runs_dir} --uda-runs {a.uda_runs} --out {a.out}"
    from dalab.tables import load_records
    from dalab.utils import atomic_write_text

    tta = [r for r in load_records(a.runs_dir) if r["method"]["name"] != "source_only"]
    atomic_write_text(a.out, final_table(tta, load_records(a.uda_runs), cmd) + continual_table(tta))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
