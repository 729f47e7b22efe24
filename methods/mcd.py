"""MCD: maximum classifier discrepancy, three optimizer updates (2 + num_k steps) per batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, HParam, Method, TargetData, register
from .nets import fresh_copy


def discrepancy(a: Tensor, b: Tensor) -> Tensor:
    """d(p1, p2) = mean over samples and classes of |softmax(a) - softmax(b)| (the paper's Eq. 1 with
    1/K, averaged over the batch; = pytorch-adapt's MCDLoss with L1Loss)."""
    return (torch.softmax(a, 1) - torch.softmax(b, 1)).abs().mean()


@register("mcd")
class MCD(Method):
    """Maximum Classifier Discrepancy (Saito et al., CVPR 2018).

    Generator G = the backbone; two classifiers C1 = the network's head, C2 = a freshly initialised
    copy of it (the paper's digits nets: G = the conv layers, C = the fully connected layers). With
    d(p1, p2) = 1/K sum_k |p1k - p2k| averaged over the target batch, per batch:

        A (G, C1, C2):  min  CE(C1(G(x_s)), y_s) + CE(C2(G(x_s)), y_s)
        B (C1, C2):     min  CE(C1(G(x_s)), y_s) + CE(C2(G(x_s)), y_s) - d(C1(G(x_t)), C2(G(x_t)))
        C (G), num_k times:  min  d(C1(G(x_t)), C2(G(x_t)))

    so 2 + num_k optimizer steps (optimizers "G" and "C"); the trainer sets their LR once per training
    step. In B the features are computed without gradient (only C is stepped; as pytorch-adapt,
    which detaches them), source and target through :meth:`features_st` (shared ``bn_mode``); A uses
    source only and C target only (one forward each, as the official code's digits ``train``).
    ``predict`` is the ensemble, the mean of C1's and C2's logits: the paper does not say which
    classifier its tables use; the official code prints C1, C2 and their ensemble (sum of logits),
    pytorch-adapt's ``mcd_fn`` returns the sum (same argmax as our mean).

    Protocol (paper, digits): Adam lr 2e-4, batch 128, num_k = 4 (the official code also uses weight
    decay 5e-4). Deviations: the shared optimizer/schedule (SGD momentum 0.9, the DANN annealing,
    lr 0.01, batch 64 per domain) by default -- ``optimizer=adam lr=2e-4 lr_schedule=constant`` gives
    the paper's; our lenet/lenet_bn backbone and 100-100-C head instead of the paper's digit nets
    (which have BatchNorm and dropout in C). pytorch-adapt averages the terms of each step (A: (CE1 +
    CE2) / 2, B: (CE1 + CE2 - d) / 3) where the paper and official code sum them: same direction,
    smaller SGD steps there.
    """

    family = "adversarial"
    display = "MCD"
    paper = ("Saito et al., Maximum Classifier Discrepancy for Unsupervised Domain Adaptation, CVPR 2018. "
             "https://arxiv.org/abs/1712.02560")
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    hparams = {
        "num_k": HParam(4, ("int", 1, 4), "generator (step C) updates per batch; paper: 4 for digits",
                        low=1, high=16),
    }

    def build(self):
        self.head2 = fresh_copy(self.net.head)

    def optimizers(self):
        heads = [p for m in (self.net.head, self.head2) for p in m.parameters() if p.requires_grad]
        return {"G": [{"params": [p for p in self.net.backbone.parameters() if p.requires_grad],
                       "lr_mult": self.hp.backbone_lr_mult}],
                "C": [{"params": heads, "lr_mult": 1.0}]}

    def predict(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return 0.5 * (self.net.head(f) + self.head2(f))

    def source_ce(self, f_s: Tensor, y_s: Tensor) -> Tensor:
        return F.cross_entropy(self.net.head(f_s), y_s) + F.cross_entropy(self.head2(f_s), y_s)

    def target_discrepancy(self, f_t: Tensor) -> Tensor:
        return discrepancy(self.net.head(f_t), self.head2(f_t))

    def update(self, batch: Batch, step: int):
        # A: G + C1 + C2 on source
        loss_a = self.source_ce(self.features(batch.x_src), batch.y_src)
        self.step(loss_a, "G", "C")
        # B: C1 + C2 only: source CE minus their discrepancy on target (G fixed)
        with torch.no_grad():
            f_s, f_t = self.features_st(batch.x_src, batch.x_tgt)
        cls_b, disc_b = self.source_ce(f_s, batch.y_src), self.target_discrepancy(f_t)
        self.step(cls_b - disc_b, "C")
        # C: G only, minimise the discrepancy, num_k times
        for _ in range(self.hp.num_k):
            disc_c = self.target_discrepancy(self.features(batch.x_tgt))
            self.step(disc_c, "G")
        return {"loss": loss_a, "cls_loss": loss_a, "discrepancy_max": disc_b, "discrepancy_min": disc_c}
