"""BNM: batch nuclear-norm maximisation of target predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, HParam, Method, TargetData, register


@register("bnm")
class BNM(Method):
    """Batch Nuclear-norm Maximization (Cui et al., CVPR 2020):

        loss = CE(C(G(x_s)), y_s) - trade_off * ||softmax(C(G(x_t)))||_* / B

    maximising the nuclear norm of the B x K target prediction matrix raises both discriminability
    (low entropy) and diversity (rank). pytorch-adapt's BNMLoss (= -||A||_* / B, as the paper).
    trade_off = 1 (the paper's UDA setting).
    """

    family = "regularization"
    paper = "Cui et al., Towards Discriminability and Diversity: Batch Nuclear-norm Maximization under Label Insufficient Situations, CVPR 2020. https://arxiv.org/abs/2003.12237"
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    hparams = {"trade_off": HParam(1.0, ("log", 0.1, 10.0), "weight of the BNM loss", low=0.0)}

    def build(self):
        from pytorch_adapt.layers import BNMLoss
        self.bnm = BNMLoss()

    def update(self, batch: Batch, step: int):
        n = len(batch.x_src)
        logits = self.predict(torch.cat([batch.x_src, batch.x_tgt]))
        cls_loss = F.cross_entropy(logits[:n], batch.y_src)
        transfer_loss = self.bnm(logits[n:])
        loss = cls_loss + self.hp.trade_off * transfer_loss
        self.optimize(loss)
        return {"loss": loss, "cls_loss": cls_loss, "bnm_loss": transfer_loss}
