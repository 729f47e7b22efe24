"""GroupDRO: minimise the worst domain's risk by an online mixture over domains."""

from __future__ import annotations

import torch

from .base import Batch, HParam, register
from .domains import DomainGeneralization, domain_risks


@register("groupdro")
class GroupDRO(DomainGeneralization):
    """Group DRO (Sagawa et al., ICLR 2020, Algorithm 1), the groups being the k source domains:

        q_e <- q_e * exp(eta * R_e)  (then normalised),    loss = sum_e q_e R_e

    the weights q (a buffer: checkpoints keep it) start uniform and move toward the domains with
    the highest risk. Default eta = 0.01 (DomainBed's ``groupdro_eta``). Deviation: none in the
    update; the paper's group-adjusted risks (its C/sqrt(n_g) term) are not used (DomainBed neither).
    """

    display = "GroupDRO"
    paper = "Sagawa et al., Distributionally Robust Neural Networks for Group Shifts, ICLR 2020. https://arxiv.org/abs/1911.08731"
    hparams = {"eta": HParam(0.01, ("log", 1e-3, 1e-1), "step size of the exponentiated-gradient update of q", low=0.0)}

    def build(self):
        self.register_buffer("q", torch.full((self.num_sources,), 1.0 / self.num_sources))

    def update(self, batch: Batch, step: int):
        risks = domain_risks(self.predict(batch.x_src), batch.y_src, batch.d_src, self.num_sources)
        with torch.no_grad():
            q = self.q * torch.exp(self.hp.eta * risks.detach())
            self.q.copy_(q / q.sum())
        loss = (self.q * risks).sum()
        self.step(loss)
        return {"loss": loss, "cls_loss": risks.mean(), "q_max": self.q.max()}
