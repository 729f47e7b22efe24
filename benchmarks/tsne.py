"""t-SNE of source/target features before (source only) and after adaptation, for one pair.

    python -m dalab.benchmarks.tsne [--spec benchmarks/digits.yaml] [--pair mnist5k:ucidigits] [--method dann]
                                     [--seed 0] [--runs-dir results/runs] [--out results/digits/tsne.png]

Steps, evaluation interval, backbone and each method's overrides come from the benchmark spec
(so the runs are the grid's).

Uses the trained weights (``model.pt``) of the ``source_only`` run and of the adapted run with the
same config as the benchmark grid; a run finished without saved weights is retrained through the
same trainer into ``<runs-dir>/_weights`` (same config, same seed, so the same network on CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dalab.datasets import load_domain
from dalab.methods.nets import build_classifier
from dalab import display
from dalab.plots import tsne_before_after
from dalab.trainer import RunConfig, train


def weights(cfg: RunConfig, runs_dir: Path) -> dict:
    for d in (runs_dir, runs_dir / "_weights"):
        f = d / cfg.run_id() / "model.pt"
        if f.is_file() and (d / cfg.run_id() / "done").is_file():
            return torch.load(f, map_location="cpu", weights_only=True)
    train(cfg, runs_dir / "_weights", progress=False, tensorboard=False, save_model=True)
    return torch.load(runs_dir / "_weights" / cfg.run_id() / "model.pt", map_location="cpu", weights_only=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="mnist5k:ucidigits")
    ap.add_argument("--method", default="dann")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spec", default="benchmarks/digits.yaml", help="take steps/eval_every/backbone from it")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--runs-dir", default="results/runs")
    ap.add_argument("--out", default="results/digits/tsne.png")
    args = ap.parse_args(argv)
    from dalab.bench import BenchSpec, trial_hparams
    spec = BenchSpec.from_yaml(args.spec) if args.spec and Path(args.spec).is_file() else BenchSpec()
    args.steps = args.steps or spec.steps
    args.eval_every = args.eval_every or spec.eval_every
    args.backbone = args.backbone or spec.backbone
    src, tgt = args.pair.split(":")
    nets = {}
    for m in ("source_only", args.method):
        cfg = RunConfig(m, src, tgt, seed=args.seed, steps=args.steps, eval_every=args.eval_every,
                        backbone=args.backbone, hparams=trial_hparams(m, 0, spec))  # the spec's overrides too
        net = build_classifier(args.backbone, 10)
        net.load_state_dict(weights(cfg, Path(args.runs_dir)))
        nets[f"{display.method(m)} ({'before' if m == 'source_only' else 'after'} adaptation)"] = net
    s, t = load_domain(src), load_domain(tgt)
    cmd = "python -m dalab.benchmarks.tsne " + " ".join(sys.argv[1:] if argv is None else argv)
    out = tsne_before_after(nets, s.test, t.test, args.out, command=cmd.strip(),
                            title=f"{display.pair(src, tgt)}, backbone features, test images, seed {args.seed}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
