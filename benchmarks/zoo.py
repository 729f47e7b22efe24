"""Every registered method on one offline digits pair, over seeds: the method-zoo table.

    python -m dalab.benchmarks.zoo [--pair mnist5k:ucidigits] [--seeds 0 1 2] [--steps 2000] [--k 10]
                                   [--only NAME ...]

Each method runs at its natural target-label budget: 0 for methods that can adapt without target
labels, k per class (default 10) for methods that need labels; the oracle ``target_only`` also
runs with all target labels. Runs go through the normal trainer into --runs-dir as ordinary run
records (seed-major order, so an interrupted benchmark still has every method for the first
seeds); finished runs are reused, so the benchmark resumes. Methods that start from the source
model reuse the ``source_only`` runs of the same seeds (dalab.pretrain).

Selection rule: last step of a fixed step budget (no target labels used for selection);
reported: target TEST accuracy, mean +- std over seeds, and per seed.
"""

from __future__ import annotations

import argparse
import statistics

from dalab import display
from dalab.bench import run_or_load
from dalab.methods import METHODS
from dalab.render import Table
from dalab.selection import RULES
from dalab.trainer import RunConfig
from dalab.utils import write_report


def natural_budgets(name: str, k: int) -> list[str]:
    """The budgets a method is benchmarked at: 0 when it supports it, else k; the oracle also at all."""
    budgets = METHODS[name].label_budgets
    out = ["0"] if "0" in budgets else [str(k)]
    if name == "target_only":
        out.append("all")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="mnist5k:ucidigits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--backbone", default="lenet")
    ap.add_argument("--k", type=int, default=10, help="labels per class for label-using methods")
    ap.add_argument("--only", nargs="+", default=None, help="methods to run (default: the registry)")
    ap.add_argument("--runs-dir", default="results/runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="also write the table (Markdown) to this file")
    ap.add_argument("--cached-only", action="store_true", help="train nothing: table of the finished runs")
    args = ap.parse_args(argv)
    src, tgt = args.pair.split(":")
    names = ["source_only"] + sorted(n for n in (args.only or METHODS) if n != "source_only")
    rows = [(n, b) for n in names for b in natural_budgets(n, args.k)]
    recs: dict[tuple[str, str], list[dict]] = {r: [] for r in rows}
    for s in args.seeds:
        for n, b in rows:
            rec = run_or_load(RunConfig(n, src, tgt, seed=s, budget=b, steps=args.steps, backbone=args.backbone), args.runs_dir,
                              cached_only=args.cached_only, device=args.device, tensorboard=False)
            if rec is None:
                continue
            recs[(n, b)].append(rec)
            acc = rec["final"]["tgt_test"]["acc"] * 100 if rec["final"] else float("nan")
            print(f"{n} b{b} s{s}: {acc:.1f}", flush=True)

    text = table(recs, src, tgt, args.backbone, args.steps, args.seeds).markdown()
    print("\n" + text)
    if args.out:
        write_report(args.out, "dalab.benchmarks.zoo", argv, "\n" + text)
    return 0


def table(recs: dict[tuple[str, str], list[dict]], src: str, tgt: str, backbone: str, steps: int,
          seeds: list[int]) -> Table:
    """One row per (method, budget): target test accuracy over seeds at the last step, the gain
    over source-only, source-val accuracy and speed (dalab.render, display names)."""
    base = [r["final"]["tgt_test"]["acc"] * 100 for r in recs.get(("source_only", "0"), []) if r["final"]]
    base_mean = statistics.mean(base) if base else float("nan")
    tab = Table(["Method", "Family", "Target labels / class", "Target test acc", "Per seed", "Δ vs Source only",
                 "Source val acc", "Steps/s"],
                caption=f"{display.pair(src, tgt)}, backbone {backbone}, {steps} steps, seeds "
                        f"{', '.join(map(str, seeds))}; selection rule `last` ({RULES['last'].text}); target test "
                        f"accuracy (%); labels / class = target labels used in training (0: none; all: the oracle).")
    for (n, b), rs in recs.items():
        ok = [r for r in rs if r["final"]]
        accs = [r["final"]["tgt_test"]["acc"] * 100 for r in ok]
        name, fam = display.method(n), display.family(METHODS[n].family if n in METHODS else "?")
        if not accs:
            tab.add(name, fam, b, "diverged" if rs else "not run", "", "", "", "")
            continue
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sv = statistics.mean(r["final"]["src_val"]["acc"] * 100 for r in ok)
        sps = statistics.mean(r["train"]["steps_per_s"] for r in rs)
        div = len(rs) - len(ok)
        per_seed = (", ".join(f"{a:.1f}" for a in accs) + (f" ({div} diverged)" if div else "")
                    + (f" (only {len(rs)} of {len(seeds)} seeds)" if len(rs) < len(seeds) else ""))
        delta = "" if n == "source_only" else f"{statistics.mean(accs) - base_mean:+.1f}"
        tab.add(name, fam, b, f"{statistics.mean(accs):.1f} ± {sd:.1f}", per_seed, delta, f"{sv:.1f}", f"{sps:.1f}")
    return tab


if __name__ == "__main__":
    raise SystemExit(main())
