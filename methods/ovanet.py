"""OVANet: a closed-set classifier plus one-vs-all heads that decide "unknown", adapted by open-set entropy minimisation."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalab.utils import Unsupported

from .base import SHARED_HPARAMS, Batch, HParam, Method, TargetData, register
from .osbp import check_no_label_mixup

# OVA logits are (N, 2, K): [:, 0, j] "not class j" (negative), [:, 1, j] "class j" (positive), the authors' layout


def ova_loss(ova_logits: Tensor, y: Tensor) -> Tensor:
    """OVANet's source loss with hard-negative mining (Eq. 2), averaged over the batch:

        L_ova = -log p^{y}(positive | x) - min_{j != y} log p^{j}(negative | x),

    the positive term of the sample's own class plus the hardest negative class (the one whose
    head is most sure the sample is its class)."""
    log_p = torch.log_softmax(ova_logits, 1)
    pos = -log_p[:, 1].gather(1, y[:, None]).squeeze(1)
    neg = (-log_p[:, 0]).scatter(1, y[:, None], float("-inf")).max(1).values
    return (pos + neg).mean()


def open_entropy(ova_logits: Tensor) -> Tensor:
    """Open-set entropy (Eq. 4): the entropy of each OVA head's binary output, averaged over the K
    heads and the batch (as the authors' code)."""
    log_p = torch.log_softmax(ova_logits, 1)
    return -(log_p.exp() * log_p).sum(1).mean()


def ovanet_scores(closed_logits: Tensor, ova_logits: Tensor) -> Tensor:
    """K + 1 scores whose argmax is OVANet's decision: k* = argmax of the closed classifier, and
    "unknown" (column K) when the OVA head of k* says negative, p^{k*}(negative) > 0.5 (the
    authors' test code; = positive < 0.5). Columns 0..K-1 are the closed softmax p; the unknown
    column is p_max * p^{k*}(negative) / 0.5, which exceeds p_max exactly when p^{k*}(negative)
    > 0.5 (x 2 is exact in floating point; a tie at 0.5 goes to k*, the first maximum)."""
    p = torch.softmax(closed_logits, 1)
    p_max, k = p.max(1)
    p_neg = torch.softmax(ova_logits, 1)[:, 0].gather(1, k[:, None]).squeeze(1)
    return torch.cat([p, (p_max * (2.0 * p_neg))[:, None]], 1)


@register("ovanet")
class OVANet(Method):
    """OVANet: One-vs-All Network for Universal Domain Adaptation (Saito & Saenko, ICCV 2021).

    G (the backbone and the head's hidden layers), a closed-set classifier C (the head's last
    layer, K outputs) and K one-vs-all binary classifiers O_j (one linear layer, 2K outputs) on the
    same feature z = G(x). Objective (Eq. 5):

        loss = E_s[ CE(C(z_s), y_s) + ova_weight * L_ova(O(z_s), y_s) ] + trade_off * E_t L_ent(O(z_t)),
        L_ova = -log p^{y}(positive | x) - min_{j != y} log p^{j}(negative | x)   (hard-negative mining),
        L_ent = -(1/K) sum_j [ p^j log p^j + (1 - p^j) log(1 - p^j) ],  p^j = p^j(positive | x_t)

    (:func:`ova_loss`, :func:`open_entropy`). The entropy term pushes each target sample's OVA
    outputs towards confident known or confident unknown. Decision: k* = argmax C(z); unknown
    when p^{k*}(positive | x) < 0.5. ``predict`` returns K + 1 scores (:func:`ovanet_scores`:
    the closed softmax and an unknown column) whose argmax is exactly that decision -- scores, not
    logits.

    Defaults: trade_off = 0.1 (lambda; the paper and the authors' ``--multi``), ova_weight = 0.5
    (the authors' code: ``loss_open = 0.5 * (pos + neg)``; the paper's Eq. 5 writes 1),
    ``bn_mode = split`` (the authors' code runs G on the source and the target batch separately).
    The authors' SGD (lr 0.01, momentum 0.9, weight decay 5e-4, inverse decay) is close to the
    shared protocol, which is used as is. Not tuned on our data.

    Deviations: G includes our head's hidden layers (the DANN paper's 100-100 MLP on LeNet, the
    256-d bottleneck on ResNets) -- the paper's C and O_j are linear layers on the ResNet feature;
    O is a plain linear layer with bias (the authors' has no bias and renormalises its weight rows
    to unit norm before every step). Mixup is refused (K-class soft labels; see
    :func:`~methods.osbp.check_no_label_mixup`), and VAT too (it reads ``predict`` as logits).
    """

    family = "regularization"
    display = "OVANet"
    paper = ("Saito & Saenko, OVANet: One-vs-All Network for Universal Domain Adaptation, ICCV 2021. "
             "https://arxiv.org/abs/2104.03344")
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    settings = ("openset", "universal")
    open_set = True
    hparams = {
        "trade_off": HParam(0.1, ("log", 0.01, 1.0), "lambda, weight of the target open-set entropy (the paper: 0.1)",
                            low=0.0),
        "ova_weight": HParam(0.5, ("choice", (0.5, 1.0)), "weight of the source OVA loss (the authors' code: 0.5; "
                             "the paper's Eq. 5: 1)", low=0.0),
        "bn_mode": replace(SHARED_HPARAMS["bn_mode"], default="split"),  # the authors' code: one G call per domain
    }

    @classmethod
    def check_run(cls, cfg, hp) -> None:
        super().check_run(cfg, hp)
        check_no_label_mixup(cls, hp)
        if hp["vat"] > 0:
            raise Unsupported(f"method {cls.name!r} does not support vat (its predict returns scores, not logits); "
                              "use vat=0")

    def build(self):
        self.ova = nn.Linear(self.net.head[-1].in_features, 2 * self.num_classes)

    def heads(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Closed-set logits (N, K) and OVA logits (N, 2, K) of backbone features ``f``."""
        z = self.net.head[:-1](f)
        return self.net.head[-1](z), self.ova(z).view(len(z), 2, self.num_classes)

    def predict(self, x: Tensor) -> Tensor:
        """The log of :func:`ovanet_scores`: logit-like K + 1 outputs (their softmax is the scores
        normalised), so the label-free validators that read predictions as logits (IM, entropy,
        SND) see a distribution; the argmax, OVANet's decision, is the scores'."""
        return torch.log(ovanet_scores(*self.heads(self.features(x))).clamp_min(1e-30))

    def update(self, batch: Batch, step: int):
        n = len(batch.x_src)
        closed, ova = self.heads(self.features_cat(batch.x_src, batch.x_tgt))
        cls_loss = F.cross_entropy(closed[:n], batch.y_src)
        src_ova = ova_loss(ova[:n], batch.y_src)
        ent = open_entropy(ova[n:])
        loss = cls_loss + self.hp.ova_weight * src_ova + self.hp.trade_off * ent
        self.step(loss)
        with torch.no_grad():
            unknown_rate = (ovanet_scores(closed[n:], ova[n:]).argmax(1) == self.num_classes).float().mean()
        return {"loss": loss, "cls_loss": cls_loss, "ova_loss": src_ova, "open_entropy": ent,
                "tgt_unknown_rate": unknown_rate}
