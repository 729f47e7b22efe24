"""Deep CORAL: correlation alignment of the last layer (a preset of ``joint``)."""

from __future__ import annotations

from .base import HParam, TargetData, register
from .joint import Joint


@register("deep_coral")
class DeepCORAL(Joint):
    """Deep CORAL (Sun & Saenko, ECCV 2016 workshops): ``joint`` with alignment = "coral" on
    layers = "logits" (the paper aligns the last fully connected layer, fc8):

        loss = CE(C(G(x_s)), y_s) + lambda * ||C_s - C_t||_F^2 / (4 d^2)

    with C the feature covariance, d the layer width. The paper sets lambda so that the two terms
    are about equal at the end of training; we keep lambda = 1 (no target labels to tune it with).
    """

    paper = "Sun & Saenko, Deep CORAL: Correlation Alignment for Deep Domain Adaptation, ECCV-W 2016. https://arxiv.org/abs/1607.01719"
    family = "discrepancy"
    display = "Deep CORAL"
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)  # the paper is unsupervised; label budgets are joint's
    hparams = {**Joint.hparams,
               "alignment": HParam("coral", ("choice", ("coral",)), "the alignment term A (fixed: CORAL)"),
               "layers": HParam("logits", ("choice", ("features", "logits", "head")), "where CORAL is applied")}
