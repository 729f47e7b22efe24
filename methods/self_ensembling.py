"""Self-ensembling: a mean-teacher consistency loss on augmented target views (French et al., 2018)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from dalab.augment import InputViews

from .base import Batch, HParam, Method, TargetData, register


def self_ensembling_loss(p_stu: Tensor, p_tea: Tensor, threshold: float, cls_balance: float) -> tuple[Tensor, dict]:
    """The unsupervised term on target softmax outputs (student with gradient, teacher without),
    as in the reference code's ``compute_aug_loss`` (confidence thresholding, no ramp-up):

        mask_i = [max_k p_tea_ik > threshold]
        L_con  = mean_i( mask_i * mean_k (p_stu_ik - p_tea_ik)^2 )
        L_bal  = mean(mask) * K * mean_k BCE(mean_i p_stu_ik, 1/K)
        L      = L_con + cls_balance * L_bal
    """
    k = p_stu.shape[1]
    mask = (p_tea.max(1).values > threshold).float()
    con = (((p_stu - p_tea) ** 2).mean(1) * mask).mean()
    avg = p_stu.mean(0).clamp(1e-7, 1 - 1e-7)
    bal = F.binary_cross_entropy(avg, torch.full_like(avg, 1.0 / k)) * k * mask.mean()
    return con + cls_balance * bal, {"consistency_loss": con, "balance_loss": bal, "mask_rate": mask.mean()}


@register("self_ensembling")
class SelfEnsembling(Method):
    """Self-ensembling for visual domain adaptation (French, Mackiewicz & Fisher, ICLR 2018).

    Student f (the network, trained) and teacher g (an exponential moving average of the student's
    weights, never trained by gradient). Two augmented views of each target batch, x_t' and x_t'':

        loss = CE(f(x_s), y_s) + unsup_weight * ( L_con(f(x_t'), g(x_t'')) + cls_balance * L_bal )

    with L_con the squared difference of the student's and teacher's softmax outputs, masked to
    the target samples whose teacher confidence exceeds ``conf_threshold`` (0.968), and L_bal the
    binary cross-entropy between the student's mean target prediction and the uniform 1/K, scaled
    by the mask rate (:func:`self_ensembling_loss`). After every step the teacher's parameters move
    to alpha * teacher + (1 - alpha) * student, alpha = 0.99 (``after_step``); its BatchNorm
    statistics come from its own train-mode forwards on target views, as in the reference code
    (which averages parameters only) -- so in eval mode the teacher normalises with target
    statistics, on source-val too (source-val selection sees that model). Defaults are the paper's/reference code's (weight 3,
    balance 0.005, threshold 0.96837722, alpha 0.99). ``predict``/``features`` are the STUDENT while
    training (so the run's extra terms train it) and the TEACHER in eval mode: evaluation,
    validators and tables see the teacher, the model the reference code keeps and saves (it logs
    both; its best-model state is the teacher's).

    Deviations: the shared SGD protocol (lr 0.01, DANN schedule, wd 5e-4) instead of Adam 1e-3,
    500-800 steps instead of ~200 epochs; views are dalab's ``light`` augmentation (random affine:
    +-10 deg, +-10% shift, 0.9-1.1 scale, :mod:`dalab.augment`) of the standardised batch instead of
    the paper's small affine + 2 px translation + Gaussian noise 0.1 (no flips on digits); the source
    batch is not augmented beyond the run's ``augment`` option; source and target share one student
    forward under ``bn_mode`` (``split`` = the paper's separate per-domain batches; ``joint``
    pools BN statistics, dalab's default). No best-teacher selection by mask rate: the run's
    selection rules apply.
    """

    family = "self-training"
    display = "Self-ens."
    paper = ("French et al., Self-ensembling for visual domain adaptation, ICLR 2018. "
             "https://arxiv.org/abs/1706.05208")
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    hparams = {
        "unsup_weight": HParam(3.0, ("log", 0.3, 10.0), "weight of the unsupervised (consistency) loss", low=0.0),
        "cls_balance": HParam(0.005, ("log", 1e-3, 0.1), "weight of the class-balance loss", low=0.0),
        "conf_threshold": HParam(0.96837722, ("uniform", 0.8, 0.99), "teacher confidence needed for consistency",
                                 low=0.0, high=1.0),
        "teacher_alpha": HParam(0.99, ("choice", (0.99, 0.999)), "EMA decay of the teacher", low=0.0, high=1.0),
    }

    def build(self):
        self.teacher = copy.deepcopy(self.net)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.views = InputViews()

    def _teacher_features(self, x: Tensor) -> Tensor:
        if self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.teacher.backbone(x).float()
        return self.teacher.backbone(x)

    def _teacher_logits(self, x: Tensor) -> Tensor:
        return self.teacher.head(self._teacher_features(x))

    def features(self, x: Tensor) -> Tensor:
        return super().features(x) if self.training else self._teacher_features(x)

    def predict(self, x: Tensor) -> Tensor:
        return super().predict(x) if self.training else self._teacher_logits(x)

    def update(self, batch: Batch, step: int):
        self.views.begin(step, batch.x_tgt.device)
        stats = self.input_stats["target"]
        x_stu, x_tea = self.views(batch.x_tgt, "light", stats), self.views(batch.x_tgt, "light", stats)
        f_s, f_t = self.features_st(batch.x_src, x_stu)
        cls_loss = F.cross_entropy(self.net.head(f_s), batch.y_src)
        with torch.no_grad():
            p_tea = torch.softmax(self._teacher_logits(x_tea), 1)  # teacher in train mode: target batch statistics
        unsup, logs = self_ensembling_loss(torch.softmax(self.net.head(f_t), 1), p_tea,
                                           self.hp.conf_threshold, self.hp.cls_balance)
        loss = cls_loss + self.hp.unsup_weight * unsup
        self.step(loss)
        return {"loss": loss, "cls_loss": cls_loss, **logs}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """teacher <- alpha * teacher + (1 - alpha) * student (parameters only)."""
        a = self.hp.teacher_alpha
        tea, stu = list(self.teacher.parameters()), list(self.net.parameters())
        torch._foreach_mul_(tea, a)
        torch._foreach_add_(tea, stu, alpha=1.0 - a)
