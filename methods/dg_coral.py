"""CORAL for domain generalization: align the source domains' feature statistics pairwise."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, HParam, register
from .domains import DomainGeneralization, per_domain


def coral_penalty(f_i: Tensor, f_j: Tensor) -> Tensor:
    """Mean squared difference of the two domains' feature means plus that of their covariances
    (unbiased, 1/(n-1)): DomainBed's form of the CORAL distance (Sun & Saenko 2016)."""
    def cov(f):
        c = f - f.mean(0, keepdim=True)
        return c.T @ c / max(len(f) - 1, 1)
    return (f_i.mean(0) - f_j.mean(0)).pow(2).mean() + (cov(f_i) - cov(f_j)).pow(2).mean()


@register("dg_coral")
class DGCORAL(DomainGeneralization):
    """Deep CORAL for domain generalization, as DomainBed runs it (Sun & Saenko, ECCV-W 2016):

        loss = CE(C(G(x)), y) + gamma * mean_{i<j} [ ||mu_i - mu_j||^2 / d + ||C_i - C_j||_F^2 / d^2 ]

    over every pair of the k source domains' backbone features (no target data). Default gamma = 1
    (DomainBed's ``mmd_gamma``). The classification term is the pooled batch's mean, which on
    balanced batches is DomainBed's mean of the per-domain means.
    """

    display = "CORAL (DG)"
    paper = "Sun & Saenko, Deep CORAL: Correlation Alignment for Deep Domain Adaptation, ECCV-W 2016. https://arxiv.org/abs/1607.01719"
    hparams = {"gamma": HParam(1.0, ("log", 1e-1, 1e1), "weight of the pairwise CORAL penalty", low=0.0)}

    def update(self, batch: Batch, step: int):
        f = self.features(batch.x_src)
        cls_loss = F.cross_entropy(self.net.head(f), batch.y_src)
        parts = [p for p in per_domain(f, batch.d_src, self.num_sources) if len(p) > 1]
        pens = [coral_penalty(a, b) for a, b in itertools.combinations(parts, 2)]
        penalty = torch.stack(pens).mean() if pens else f.sum() * 0.0
        loss = cls_loss + self.hp.gamma * penalty
        self.step(loss)
        return {"loss": loss, "cls_loss": cls_loss, "coral": penalty}
