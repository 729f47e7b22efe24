"""IRM: invariant risk minimisation (IRMv1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, register
from .domains import DomainGeneralization, annealed_objective, annealed_penalty_hparams, annealed_weight, per_domain


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
    divided by lambda once it exceeds 1 (``rescale``, the paper's code). Defaults: DomainBed's
    (``irm_lambda`` 100, anneal 500 of 5000 steps = 0.1). Deviation: the squared gradient of the
    whole domain batch (the paper's code), not DomainBed's unbiased product of two half-batch
    gradients; no optimizer reset at the anneal (DomainBed resets Adam; we divide instead, as the
    paper's code). The division is harmless under Adam, which is scale-free, and shrinks an SGD step
    on the risk 100-fold: the digits protocol runs the paper's Adam at lr 1e-3, the pick on tuning
    tasks over SGD at ERM's setting (benchmarks/multisource_tuning.yaml: 56.1 vs 45.6 on average);
    without the division SGD diverges at the anneal.
    """

    display = "IRM"
    known_failure = {"closed": (
        "below ERM under dalab's 500-step protocol (results/dg: 54.5 vs 71.3 on average, 3 seeds; source "
        "validation 68% at the end against ERM's 96%). Measured so far: the SGD step shrunk 100-fold by the "
        "division after the anneal was one cause (24.6 with SGD; the paper's Adam, chosen on tuning tasks, gives "
        "54.5); what is left is the penalty itself, weight 100 from step 50 (anneal_frac 0.1 of 500 steps; "
        "DomainBed warms up for 500 of 5000), which keeps the network from fitting its sources. A longer "
        "warm-up was not tried yet (a candidate for the tuning tasks)")}
    paper = "Arjovsky et al., Invariant Risk Minimization, arXiv 2019. https://arxiv.org/abs/1907.02893"
    hparams = annealed_penalty_hparams(100.0, "lambda", "the IRMv1 penalty")

    def update(self, batch: Batch, step: int):
        logits = self.predict(batch.x_src)
        k = self.num_sources
        pairs = [(lg, y) for lg, y in zip(per_domain(logits, batch.d_src, k), per_domain(batch.y_src, batch.d_src, k))
                 if len(y)]
        risk = torch.stack([F.cross_entropy(lg, y) for lg, y in pairs]).mean()
        penalty = torch.stack([irm_penalty(lg, y) for lg, y in pairs]).mean()
        lam = annealed_weight(step, self.total_steps, self.hp.penalty, self.hp.anneal_frac)
        loss = annealed_objective(risk, penalty, lam, self.hp.rescale)
        self.step(loss)
        return {"loss": loss, "cls_loss": risk, "irm_penalty": penalty, "lambda": lam}
