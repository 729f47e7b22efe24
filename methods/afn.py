"""AFN: stepwise adaptive feature norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, HParam, Method, TargetData, register


@register("afn")
class AFN(Method):
    """Stepwise Adaptive Feature Norm, SAFN (Xu et al., ICCV 2019): features with larger norms
    transfer better, so each step pushes every sample's norm Delta_r beyond its current value:

        loss = CE(C(G(x_s)), y_s) + trade_off * mean_{x in S u T} (||h(x)|| - (||h(x)||_detached + Delta_r))^2

    h = G(x), the LeNet features (conv -> BatchNorm -> ReLU -> pool): their BatchNorm plays the
    role of the BatchNorm in the paper's bottleneck, which lets the norm grow through its scale.
    pytorch-adapt's AdaptiveFeatureNorm. trade_off = 0.05, Delta_r = 1 (the paper's values).
    Deviations: the paper applies it to a bottleneck (Linear-BN-ReLU-dropout) before the last
    layer; on our head's BN-free 100-d hidden layer it drove every ReLU dead in 250 steps (3/3
    seeds at chance), so it acts on the backbone output. No L2-preserved dropout (no dropout here).
    """

    family = "regularization"
    paper = "Xu et al., Larger Norm More Transferable: An Adaptive Feature Norm Approach for Unsupervised Domain Adaptation, ICCV 2019. https://arxiv.org/abs/1811.07456"
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    hparams = {
        "trade_off": HParam(0.05, ("log", 0.005, 0.5), "weight of the feature-norm loss", low=0.0),
        "delta_r": HParam(1.0, ("uniform", 0.1, 2.0), "norm increase per step", low=0.0),
    }

    def build(self):
        from pytorch_adapt.layers import AdaptiveFeatureNorm
        self.afn = AdaptiveFeatureNorm(step_size=self.hp.delta_r)

    def update(self, batch: Batch, step: int):
        n = len(batch.x_src)
        h = self.features(torch.cat([batch.x_src, batch.x_tgt]))
        cls_loss = F.cross_entropy(self.net.head(h[:n]), batch.y_src)
        transfer_loss = self.afn(h)
        loss = cls_loss + self.hp.trade_off * transfer_loss
        self.optimize(loss)
        return {"loss": loss, "cls_loss": cls_loss, "afn_loss": transfer_loss}
