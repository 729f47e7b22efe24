"""OSBP: open-set domain adaptation by backpropagation -- a K+1-way classifier that learns "unknown" adversarially."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalab.utils import Unsupported

from .base import SHARED_HPARAMS, Batch, HParam, Method, TargetData, register
from .layers import grad_reverse


def osbp_adversarial_loss(logits_t: Tensor, t: float = 0.5) -> Tensor:
    """OSBP's L_adv on target logits (N, K+1), the last column "unknown": the binary cross-entropy
    between p(y = K+1 | x_t) and the boundary t, averaged over the batch,

        L_adv = -t log p(y = K+1 | x_t) - (1 - t) log(1 - p(y = K+1 | x_t)),

    in log space: log(1 - p_unknown) = log sum_{k <= K} p_k (no epsilon needed)."""
    log_p = torch.log_softmax(logits_t, 1)
    log_unknown, log_known = log_p[:, -1], torch.logsumexp(log_p[:, :-1], 1)
    return -(t * log_unknown + (1.0 - t) * log_known).mean()


def check_no_label_mixup(cls: type[Method], hp) -> None:
    """Open-set methods train on K source classes but score K + 1: mixup's K-class soft labels fit
    neither their classifier nor their pseudo-labels, so a run asking for it stops with one line."""
    if hp["mixup"] != "none":
        raise Unsupported(f"method {cls.name!r} does not support mixup={hp['mixup']} (its classifier scores the "
                          f"K source classes plus 'unknown'); use mixup=none")


@register("osbp")
class OSBP(Method):
    """Open Set Domain Adaptation by Backpropagation (Saito, Yamamoto, Ushiku & Harada, ECCV 2018).

    The classifier C has K + 1 outputs, the last one "unknown" (the head's last layer is replaced
    by one with K + 1 outputs). Source samples (labels 0..K-1) train it by cross-entropy; on target
    samples C is trained to put p(unknown | x_t) on the boundary t = 0.5 while the generator G (the
    backbone) is trained to move it away from t -- towards known (aligning the sample with the
    source) or towards unknown (rejecting it):

        min_C  L_s + L_adv,    min_G  L_s - L_adv,
        L_s   = CE(C(G(x_s)), y_s)   over the K + 1 outputs,
        L_adv = -t log p(y = K+1 | x_t) - (1 - t) log(1 - p(y = K+1 | x_t)).

    As in the paper, one minimisation with a gradient reversal layer between G and C on the target
    path realises both:

        loss = CE(C(G(x_s)), y_s) + trade_off * L_adv(C(R(G(x_t)))),

    R the identity forward and -grl_coeff x the gradient backward. ``predict`` returns the K + 1
    logits; the argmax is OSBP's decision (K = unknown).

    Defaults: t = 0.5 (the paper), trade_off = 1 (the paper's plain sum), grl_coeff = 1 constant
    (the authors' code: ``C.set_lambda(1.0)``, no schedule), ``bn_mode = split`` (the authors'
    code runs G on the source and the target batch separately: per-domain BatchNorm statistics).
    Not tuned on our data.

    Deviations: the shared SGD protocol (lr 0.01, momentum 0.9, the DANN schedule) instead of the
    paper's Adam / SGD settings per benchmark; C is our head (the DANN paper's 100-100 MLP on
    LeNet, a 256-d bottleneck on ResNets) with K + 1 outputs; the source and target losses are
    summed into one backward (the authors' code does two backwards before one optimizer step: the
    same gradient). Mixup is refused (see :func:`check_no_label_mixup`).
    """

    family = "adversarial"
    display = "OSBP"
    known_failure = {"openset": (
        "on UCI digits → MNIST-5k (the smallest source, 8x8 digits upscaled) its adversarial boundary sends the "
        "known target classes to 'unknown' and does so more with training: OS* 15.7% at step 250, 13.2% at the "
        "last checkpoint, against source-only's 51.5% (means of 3 seeds, results/openset/runs); the paper's "
        "defaults, not tuned on these tasks"),
        "universal": (
        "below source-only on average (41.7 vs 43.7 H-score); as on the open-set tasks it sends UCI digits -> "
        "MNIST-5k's known classes to 'unknown' (OS* 19.8% vs source-only's 39.1%), and on SynDigits -> MNIST-5k "
        "UNK falls from 45.0% at step 250 to 22.1% (means of 3 seeds, results/universal/runs): OSBP has no "
        "notion of source-private classes, which OVANet, the setting's method, handles")}
    paper = ("Saito et al., Open Set Domain Adaptation by Backpropagation, ECCV 2018. "
             "https://arxiv.org/abs/1804.10427")
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    settings = ("openset", "universal")
    open_set = True
    hparams = {
        "t": HParam(0.5, ("choice", (0.3, 0.5, 0.7)), "the boundary C is trained to put p(unknown | x_t) on "
                    "(the paper: 0.5)", low=0.0, high=1.0),
        "trade_off": HParam(1.0, ("log", 0.1, 3.0), "weight of the adversarial target term (the paper: 1)", low=0.0),
        "grl_coeff": HParam(1.0, ("log", 0.1, 3.0), "gradient reversal coefficient, constant (the authors' code: 1)",
                            low=0.0),
        "bn_mode": replace(SHARED_HPARAMS["bn_mode"], default="split"),  # the authors' code: one G call per domain
    }

    @classmethod
    def check_run(cls, cfg, hp) -> None:
        super().check_run(cfg, hp)
        check_no_label_mixup(cls, hp)

    def build(self):
        last = self.net.head[-1]
        self.net.head[-1] = nn.Linear(last.in_features, self.num_classes + 1)  # C: K known classes + unknown

    def update(self, batch: Batch, step: int):
        f_s, f_t = self.features_st(batch.x_src, batch.x_tgt)
        cls_loss = F.cross_entropy(self.net.head(f_s), batch.y_src)
        logits_t = self.net.head(grad_reverse(f_t, self.hp.grl_coeff))
        adv_loss = osbp_adversarial_loss(logits_t, self.hp.t)
        loss = cls_loss + self.hp.trade_off * adv_loss
        self.step(loss)
        unknown_rate = (logits_t.detach().argmax(1) == self.num_classes).float().mean()
        return {"loss": loss, "cls_loss": cls_loss, "adv_loss": adv_loss, "tgt_unknown_rate": unknown_rate}
