"""Peer equivalence: dalab's update against pytorch-adapt 0.0.83's, from the same weights and batches.

    python -m dalab.benchmarks.peer_equivalence          # -> results/peer_equivalence.md

For every method pytorch-adapt also implements, dalab's method and pytorch-adapt's adapter (or its
hooks, where the library has no adapter) are built over identical networks (deep copies of the
dalab method's backbone, head, discriminator, random map), fed the same source and target batches,
and trained with plain SGD (momentum 0, weight decay 0, constant LR 0.01, float32). After 1 and 10
updates the largest absolute difference over every parameter and BatchNorm buffer is reported.

pytorch-adapt is configured to dalab's protocol wherever the two differ only in set-up: loss
weights (its default MeanWeighter divides the sum of the task and alignment losses by their count;
a SumWeighter with dalab's trade-offs replaces it), the gradient-reversal coefficient (dalab's
lambda_p schedule, written into pytorch-adapt's GradientReversal buffers before each step), one SGD
optimizer per model (identical to dalab's single optimizer when there is no momentum or weight
decay), and the domain labels in the batch dict (dalab's convention: source = 1). Where dalab
deliberately differs (its default ``bn_mode=joint`` on a BatchNorm backbone, HAFN instead of SAFN,
a different loss normalisation), the row says so and a second comparison with that one option
switched shows the difference is exactly that option.

``tests/test_peer_equivalence.py`` asserts the same comparisons; they are written once, in four
parts that read on their own: :mod:`~dalab.benchmarks.peer_cases` (what is compared, and where the
methods without a pytorch-adapt counterpart are checked by hand), :mod:`~dalab.benchmarks.peer_adapters`
(the peer side), :mod:`~dalab.benchmarks.peer_compare` (the run and its measure) and
:mod:`~dalab.benchmarks.peer_report` (results/peer_equivalence.md). This module runs them all.
"""

from __future__ import annotations

import argparse

import torch

from dalab.benchmarks.peer_adapters import Peer, _walk, peer_batch
from dalab.benchmarks.peer_cases import CASES, HAND_CHECKED, Case
from dalab.benchmarks.peer_compare import (BACKBONES, HAS_BN_MODE, LR, REL_TOL, Result, bn_mode_cases, build_method,
                                           buffer_diff, compare, make_batches, param_diff, verdict)
from dalab.benchmarks.peer_report import NOTES, render

__all__ = ["BACKBONES", "CASES", "HAND_CHECKED", "HAS_BN_MODE", "LR", "NOTES", "REL_TOL", "Case", "Peer", "Result",
           "_walk", "bn_mode_cases", "buffer_diff", "build_method", "compare", "main", "make_batches", "param_diff",
           "peer_batch", "render", "run_all", "verdict"]


def run_all(steps: int = 10) -> list[Result]:
    out = []
    for case in CASES:
        for backbone in case.backbones:
            settings = bn_mode_cases() if backbone == "lenet_bn" and case.bn_mode_applies else [("-", {})]
            for _, extra in settings:
                out.append(compare(case, backbone, extra, steps, control=True))
    return out


def main(argv=None) -> None:
    from dalab.utils import write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/peer_equivalence.md")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = run_all(args.steps)
    write_report(args.out, "dalab.benchmarks.peer_equivalence", argv, render(results, args.steps))
    for r in results:
        print(f"{r.case.method:12s} {r.case.label:34s} {r.backbone:8s} {r.bn:5s} "
              f"{r.diff(1):.1e} {r.diff(args.steps):.1e}  {verdict(r)[:60]}")


if __name__ == "__main__":
    main()
