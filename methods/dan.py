"""DAN: multi-kernel MMD on the task-specific layers (a preset of ``joint``)."""

from __future__ import annotations

from .base import HParam, TargetData, register
from .joint import Joint


@register("dan")
class DAN(Joint):
    """Deep Adaptation Network (Long et al., ICML 2015): ``joint`` with alignment = "mmd" on
    layers = "head" (every hidden layer of the label predictor and the logits, the analogue of the
    paper's fc6-fc8), trade_off lambda = 1:

        loss = CE(C(G(x_s)), y_s) + lambda * sum_{l in head} MK-MMD^2(z_s^l, z_t^l)

    Deviations (see ``joint``): equal kernel weights, quadratic unbiased estimate; the conv
    layers are trained too (the paper freezes conv1-3 of an ImageNet AlexNet; our LeNet starts
    from scratch).
    Unsupervised, as the paper; ``joint`` adds target labels.
    """

    paper = "Long et al., Learning Transferable Features with Deep Adaptation Networks, ICML 2015. https://arxiv.org/abs/1502.02791"
    family = "discrepancy"
    display = "DAN"
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)  # the paper is unsupervised; label budgets are joint's
    hparams = {**Joint.hparams,
               "alignment": HParam("mmd", ("choice", ("mmd",)), "the alignment term A (fixed: MK-MMD)"),
               "layers": HParam("head", ("choice", ("features", "logits", "head")), "where MMD is applied")}
