"""M3SDA: moment matching across all pairs of the k sources and the target."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, HParam, Method, TargetData, register
from .domains import per_domain


def _moment(x: Tensor, m: int, about: str) -> Tensor:
    """E(X^m) per feature; for m >= 2 about the batch mean when ``about == "mean"``."""
    if m > 1 and about == "mean":
        x = x - x.mean(0)
    return x.pow(m).mean(0)


def moment_distance(sources: list[Tensor], target: Tensor, moments: int = 2, about: str = "mean") -> Tensor:
    """M3SDA's MD^2 (Peng et al. 2019, eq. 1) of feature batches, k = len(sources):

        sum_{m=1..moments} [ 1/k sum_i ||E(X_i^m) - E(X_T^m)||_2 + C(k,2)^-1 sum_{i<j} ||E(X_i^m) - E(X_j^m)||_2 ]

    For m = 1 the means. For m >= 2, ``about="mean"`` takes the central moments, each domain's
    features centred by its own mean (the authors' code; m = 2: the variances, as Dassl), and
    ``about="origin"`` the raw moments E(X^m) of the equation as printed."""
    total = target.new_zeros(())
    for m in range(1, moments + 1):
        mu_s = [_moment(s, m, about) for s in sources]
        mu_t = _moment(target, m, about)
        total = total + torch.stack([(mu - mu_t).norm() for mu in mu_s]).mean()
        pairs = [(a - b).norm() for a, b in itertools.combinations(mu_s, 2)]
        if pairs:
            total = total + torch.stack(pairs).mean()
    return total


@register("m3sda")
class M3SDA(Method):
    """Moment Matching for Multi-Source Domain Adaptation (Peng et al., ICCV 2019):

        loss = CE(C(G(x_s)), y_s) + trade_off * MD^2(G(x_1), ..., G(x_k), G(x_t))

    aligning the first and second moments of the backbone features across all k + 1 domains: every
    source with the target, and every pair of sources (:func:`moment_distance`). Deviations: one
    classifier shared by the sources (the paper trains one per source and weights their
    predictions; M3SDA-beta adds MCD-style classifier pairs on top); trade_off = 0.5, the Dassl
    toolbox's M3SDA default (the paper states none). Moments of order 2 and up are taken about each
    domain's mean (``moments_about``: the authors' code; Dassl matches means and variances): about
    the origin, as the equation is printed, the second moments of lenet_bn's raw features put the
    distance at ~140 at initialisation and the network zeroed its features. Even so, at 0.5 the
    distance outweighs the cross-entropy on digits (features zeroed again, on the tuning tasks): the
    digits protocol runs trade_off 0.005, the pick on tuning tasks among 0.5, 0.05 and 0.005
    (benchmarks/multisource_tuning.yaml).
    """

    family = "discrepancy"
    display = "M3SDA"
    paper = "Peng et al., Moment Matching for Multi-Source Domain Adaptation, ICCV 2019. https://arxiv.org/abs/1812.01754"
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    min_sources = 2
    settings = ("closed",)
    hparams = {
        "trade_off": HParam(0.5, ("log", 0.05, 5.0), "weight of the moment distance", low=0.0),
        "moments": HParam(2, ("choice", (1, 2)), "highest moment matched (the paper: 2)", low=1, high=5),
        "moments_about": HParam("mean", ("choice", ("mean", "origin")),
                                "moments of order >= 2 about each domain's mean (the authors' code, Dassl) or "
                                "about the origin (the equation as printed)"),
    }

    def update(self, batch: Batch, step: int):
        f_s, f_t = self.features_st(batch.x_src, batch.x_tgt)
        cls_loss = F.cross_entropy(self.net.head(f_s), batch.y_src)
        parts = [p for p in per_domain(f_s, batch.d_src, self.num_sources) if len(p)]
        md = moment_distance(parts, f_t, self.hp.moments, self.hp.moments_about)
        loss = cls_loss + self.hp.trade_off * md
        self.step(loss)
        return {"loss": loss, "cls_loss": cls_loss, "moment_distance": md}
