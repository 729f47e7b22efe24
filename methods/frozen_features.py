"""Fixed feature extraction: a frozen source-trained backbone and a new head on target labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, HParam, Method, TargetData, register
from .nets import freeze, mlp


@register("frozen_features")
class FrozenFeatures(Method):
    """Fixed feature extraction (Donahue et al., DeCAF, ICML 2014): features G are taken from the
    network trained on the source domain and frozen (weights AND BatchNorm statistics); a new head
    C' is fit on the labeled target budget:  min_C'  E_(x,y)~T_lab  CE(C'(G(x)), y).

    ``head``: "linear" (a linear probe trained by the shared SGD protocol), "mlp" (the 100-100-C
    head of the backbone, re-initialised), or "logreg": the SGD-trained linear probe is replaced at
    the end by scikit-learn's L2 logistic regression (L-BFGS, strength 1/C) on the frozen features
    of every labeled target image -- the closed-form probe of DeCAF-style transfer.

    ``features`` = "source" (default): the backbone comes from the shared source-pretraining step
    (the cached source_only run, trained once per pair/seed/backbone; for ResNets it starts from
    the ImageNet weights on disk and is fine-tuned on source). "backbone_init": the backbone as
    built, i.e. the ImageNet weights of ``--pretrained`` frozen as they are, no source training
    (with LeNet that is a random-features control).
    """

    family = "fine-tuning"
    display = "Frozen features"
    paper = "Donahue et al., DeCAF: A Deep Convolutional Activation Feature for Generic Visual Recognition, ICML 2014. https://arxiv.org/abs/1310.1531"
    target_data = TargetData.LABELED
    label_budgets = ("k", "all")
    init_from_source = True
    hparams = {
        "features": HParam("source", ("choice", ("source", "backbone_init")),
                           "source: the source-trained backbone; backbone_init: the backbone as built "
                           "(ImageNet weights from --pretrained for ResNets)"),
        "head": HParam("linear", ("choice", ("linear", "mlp", "logreg")), "the new head on frozen features"),
        "C": HParam(1.0, ("log", 0.01, 100.0), "inverse L2 strength of the logreg probe", low=1e-8),
    }

    @classmethod
    def starts_from_source(cls, hp):
        return hp["features"] == "source"

    def build(self):
        freeze(self.net.backbone)
        d, c = self.net.backbone.out_dim, self.num_classes
        self.net.head = mlp([d, 100, 100, c]) if self.hp.head == "mlp" else nn.Linear(d, c)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.backbone.eval()  # frozen BatchNorm statistics too
        return self

    def frozen(self):
        return self.frozen_names(self.net.backbone)

    def update(self, batch: Batch, step: int):
        with torch.no_grad():
            f = self.features(batch.x_tgt_lab)
        loss = F.cross_entropy(self.net.head(f), batch.y_tgt_lab)
        self.step(loss)
        return {"loss": loss, "cls_loss": loss}

    @torch.no_grad()
    def on_train_end(self, x_tgt, labeled):
        if self.hp.head != "logreg" or labeled is None:
            return
        from sklearn.linear_model import LogisticRegression

        self.net.backbone.eval()
        pairs = [(self.features(x).cpu(), y.cpu()) for x, y in labeled]
        f, y = torch.cat([p[0] for p in pairs]).numpy(), torch.cat([p[1] for p in pairs]).numpy()
        probe = LogisticRegression(C=self.hp.C, max_iter=2000).fit(f, y)
        coef, bias = torch.as_tensor(probe.coef_), torch.as_tensor(probe.intercept_)
        if len(probe.classes_) == 2:  # sklearn's binary form: one logit for the second class
            coef, bias = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(bias), bias])
        w = torch.zeros_like(self.net.head.weight)
        b = torch.full_like(self.net.head.bias, -1e4)  # classes without labels are never predicted
        cls = torch.as_tensor(probe.classes_, device=w.device)
        w[cls], b[cls] = coef.to(w), bias.to(b)
        self.net.head.weight.copy_(w)
        self.net.head.bias.copy_(b)
