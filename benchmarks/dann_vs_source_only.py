"""Source-only vs DANN target accuracy on an offline digits pair, over seeds.

    python -m dalab.benchmarks.dann_vs_source_only [--pair mnist5k:ucidigits] [--seeds 0 1 2] [--steps 2000]

Runs go through the normal trainer and land in --runs-dir as ordinary run records; the table is
computed from those records (selection rule: last checkpoint of a fixed step budget, no target
labels used). Finished runs are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dalab.trainer import RunConfig, train


def run_or_load(cfg: RunConfig, runs_dir: Path, device: str) -> dict:
    d = runs_dir / cfg.run_id()
    if (d / "done").is_file() and (d / "record.json").is_file():
        return json.loads((d / "record.json").read_text())
    return train(cfg, runs_dir, device=device, progress=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="mnist5k:ucidigits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--methods", nargs="+", default=["source_only", "dann"])
    ap.add_argument("--runs-dir", default="results/runs")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    src, tgt = args.pair.split(":")
    rows = {}
    for m in args.methods:
        recs = [run_or_load(RunConfig(m, src, tgt, seed=s, steps=args.steps), Path(args.runs_dir), args.device)
                for s in args.seeds]
        rows[m] = recs
        accs = [r["final"]["tgt_test"]["acc"] * 100 if r["final"] else float("nan") for r in recs]
        print(f"{m}: " + "  ".join(f"s{s}={a:.1f}" for s, a in zip(args.seeds, accs)), flush=True)
    print(f"\n{src} -> {tgt}, {args.steps} steps, {len(args.seeds)} seeds; selection rule: last step "
          f"(fixed budget, no target labels); target test accuracy (%)\n")
    print("| method | tgt_test acc | per seed | src_val acc | steps/s |")
    print("|---|---|---|---|---|")
    for m, recs in rows.items():
        ok = [r for r in recs if r["final"]]
        accs = [r["final"]["tgt_test"]["acc"] * 100 for r in ok]
        sv = [r["final"]["src_val"]["acc"] * 100 for r in ok]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sps = statistics.mean(r["train"]["steps_per_s"] for r in recs)
        diverged = len(recs) - len(ok)
        print(f"| {m} | {statistics.mean(accs):.1f} ± {sd:.1f} | {', '.join(f'{a:.1f}' for a in accs)}"
              f"{f' ({diverged} diverged)' if diverged else ''} | {statistics.mean(sv):.1f} | {sps:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
