"""IRM: invariant risk minimisation (IRMv1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, HParam, register
from .domains import DomainGeneralization, annealed_weight, per_domain


def irm_penalty(logits: Tensor, y: Tensor) -> Tensor:
    """IRMv1's penalty of one domain: || d/dw R(w * logits) at w = 1 ||^2, with a dummy scalar
    classifier w (Arjovsky et al. 2019, eq. IRMv1 and its Appendix D code)."""
    w = torch.ones((), device=logits.device, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits * w, y), [w], create_graph=True)
    return grad ** 2


@register("irm")
class IRM(DomainGeneralization):
    """IRMv1 (Arjovsky et al., 2019) over the k source domains:

        loss = mean_e R_e + lambda * mean_e || grad_{w|w=1} R_e(w * f) ||^2

    with lambda = 1 during the first ``anneal_frac`` of training and ``penalty`` after, and the loss
    divided by lambda once it exceeds 1 (the paper's code). Defaults: DomainBed's (``irm_lambda``
    100, anneal 500 of 5000 steps = 0.1). Deviation: the squared gradient of the whole domain batch
    (the paper's code), not DomainBed's unbiased product of two half-batch gradients; no optimizer
    reset at the anneal (DomainBed resets Adam; we divide instead, as the paper's code).
    """

    display = "IRM"
    known_failure = {"closed": (
        "never learns the source task under dalab's 500-step SGD protocol (results/dg: source "
        "validation about 20% at the end, every run). Cause, measured: after the anneal (step 50, "
        "10% of 500) the loss is divided by lambda = 100, as the paper's code does, so SGD's step "
        "on the cross-entropy shrinks 100-fold (logged loss 0.02 with cross-entropy 2.0); "
        "DomainBed instead resets Adam there, which is scale-free. Not fixed yet: drop the "
        "division under SGD (or use Adam as DomainBed), chosen on tuning pairs")}
    paper = "Arjovsky et al., Invariant Risk Minimization, arXiv 2019. https://arxiv.org/abs/1907.02893"
    hparams = {
        "penalty": HParam(100.0, ("log", 1e-1, 1e5), "lambda, the weight of the IRMv1 penalty after the anneal", low=0.0),
        "anneal_frac": HParam(0.1, ("uniform", 0.0, 0.5), "fraction of training with lambda = 1 (DomainBed: 500/5000)",
                              low=0.0, high=1.0),
    }

    def update(self, batch: Batch, step: int):
        logits = self.predict(batch.x_src)
        k = self.num_sources
        pairs = [(lg, y) for lg, y in zip(per_domain(logits, batch.d_src, k), per_domain(batch.y_src, batch.d_src, k))
                 if len(y)]
        risk = torch.stack([F.cross_entropy(lg, y) for lg, y in pairs]).mean()
        penalty = torch.stack([irm_penalty(lg, y) for lg, y in pairs]).mean()
        lam = annealed_weight(step, self.total_steps, self.hp.penalty, self.hp.anneal_frac)
        loss = risk + lam * penalty
        if lam > 1.0:
            loss = loss / lam
        self.step(loss)
        return {"loss": loss, "cls_loss": risk, "irm_penalty": penalty, "lambda": lam}
