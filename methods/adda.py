"""ADDA: a target encoder, initialised from the source one, trained against a domain discriminator."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, HParam, Method, TargetData, register
from .layers import domain_accuracy, domain_bce
from .nets import domain_discriminator, freeze


@register("adda")
class ADDA(Method):
    """Adversarial Discriminative Domain Adaptation (Tzeng et al., CVPR 2017).

    Start: the shared source pretraining (``init_from_source``: the ``source_only`` run, dalab.pretrain)
    gives the source encoder M_s and classifier C. ``build`` keeps a frozen copy of M_s (eval mode,
    no optimizer); the target encoder M_t (``net.backbone``) starts from it; C (``net.head``) is
    frozen. Then, per batch, with the discriminator D (logit; source = 1, target = 0):

        D ("D"):    min  L_advD = -E_s log D(M_s(x_s)) - E_t log(1 - D(M_t(x_t)))
        M_t ("T"):  min  L_advM = -E_t log D(M_t(x_t))          (the inverted-label GAN loss)

    D first, then M_t against the updated D. Prediction: C(M_t(x)) -- for every split, so source
    accuracies (src_val) are those of the target encoder too.

    Protocol (paper, digits): LeNet encoder, D with two 500-unit ReLU layers (500-500-1), Adam lr 2e-4,
    beta1 0.5, no LR schedule: these are this method's defaults (``optimizer``, ``lr``,
    ``lr_schedule``, ``adam_beta1`` override the shared SGD ones; ``weight_decay`` 0 as the paper
    names none). Deviations: D reads our 768-d backbone features (768-500-500-1) instead of LeNet's
    500-d fc output; our head is the 100-100-C MLP, so C is more than one linear layer; L_advD is
    the mean of the two domain terms (as the official code's mean over the joint batch and
    pytorch-adapt; the paper's sum is twice it -- the same under Adam up to eps); 500-800 steps of
    batch 64 + 64 instead of 10000 iterations. pytorch-adapt's ADDAHook updates M_t only when D's
    accuracy on the batch exceeds 0.6 (``threshold``), not in the paper: ``d_threshold`` (default 0,
    off) reproduces it. With lenet_bn the frozen M_s keeps the source BatchNorm statistics, M_t
    re-estimates them on target batches (train mode). The run's extra data-option terms (VAT, cross
    mixup) join the first loss stepped, D's, so they do not train M_t: do not combine them with ADDA.
    """

    family = "adversarial"
    display = "ADDA"
    paper = ("Tzeng et al., Adversarial Discriminative Domain Adaptation, CVPR 2017. "
             "https://arxiv.org/abs/1702.05464")
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    init_from_source = True
    hparams = {
        "optimizer": HParam("adam", ("choice", ("sgd", "adam")), "optimizer of T and D (paper: Adam)"),
        "lr": HParam(2e-4, ("log", 5e-5, 2e-3), "learning rate of T and D (paper: 2e-4)", low=1e-8, high=10.0),
        "lr_schedule": HParam("constant", ("choice", ("dann", "constant", "cosine")),
                              "LR schedule (paper: constant)"),
        "weight_decay": HParam(0.0, ("choice", (0.0, 5e-4)), "L2 weight decay (paper: none)", low=0.0, high=1.0),
        "adam_beta1": HParam(0.5, ("choice", (0.5, 0.9)), "Adam beta1 of T and D (paper: 0.5)", low=0.0, high=0.999),
        "disc_hidden": HParam(500, ("choice", (500, 1024)), "discriminator width (paper: 500)", low=1, high=8192),
        "disc_depth": HParam(2, ("int", 1, 3), "discriminator hidden layers (paper: 2)", low=1, high=8),
        "d_threshold": HParam(0.0, None, "update T only when D's batch accuracy exceeds this "
                              "(pytorch-adapt: 0.6; paper: none = 0)", low=0.0, high=1.0),
    }

    def build(self):
        self.src_encoder = copy.deepcopy(self.net.backbone)
        freeze(self.src_encoder)
        freeze(self.net.head)
        self.disc = domain_discriminator(self.net.backbone.out_dim, self.hp.disc_hidden, self.hp.disc_depth)
        self.src_encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.src_encoder.eval()  # source BatchNorm statistics stay frozen too
        return self

    def frozen(self):
        return self.frozen_names(self.src_encoder, self.net.head)  # M_s and the source classifier C

    def optimizers(self):
        extra = {"betas": (self.hp.adam_beta1, 0.999)} if self.hp.optimizer == "adam" else {}
        return {"T": [{"params": list(self.net.backbone.parameters()), "lr_mult": self.hp.backbone_lr_mult, **extra}],
                "D": [{"params": list(self.disc.parameters()), "lr_mult": 1.0, **extra}]}

    def source_features(self, x: Tensor) -> Tensor:
        """M_s(x), float32, no gradient (the frozen source encoder at the run's precision)."""
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16,
                                             enabled=self.precision == "bf16"):
            return self.src_encoder(x).float()

    def update(self, batch: Batch, step: int):
        f_s, f_t = self.source_features(batch.x_src), self.features(batch.x_tgt)
        d_s, d_t = self.disc(f_s).squeeze(1), self.disc(f_t.detach()).squeeze(1)
        d_loss = domain_bce(d_s, d_t)
        self.step(d_loss, "D")
        # M_t against the updated D (pytorch-adapt's order; the official code steps both at once)
        d_t = self.disc(f_t).squeeze(1)
        g_loss = F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t))
        with torch.no_grad():  # D's accuracy on this batch, as pytorch-adapt's StrongDHook
            d_acc = domain_accuracy(self.disc(f_s).squeeze(1), d_t)
        if self.hp.d_threshold == 0 or float(d_acc) > self.hp.d_threshold:
            self.step(g_loss, "T")
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, "d_acc": d_acc}
