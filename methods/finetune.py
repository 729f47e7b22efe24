"""Fine-tuning the source-trained network on target labels."""

from __future__ import annotations

import torch.nn.functional as F

from dalab.utils import DalabError

from .base import Batch, HParam, Method, TargetData, register
from .nets import BACKBONE_BLOCKS, backbone_blocks, freeze


@register("finetune")
class Finetune(Method):
    """Fine-tuning (Yosinski et al., NeurIPS 2014) of the source-trained network on target labels,
    with discriminative learning rates (backbone at 0.1 x the head's) and optional L2-SP
    (Li et al., ICML 2018) pulling the weights toward their source values w0:

        min_w  E_T_lab CE(C(G(x)), y)  +  alpha / 2 * ||w - w0||^2

    ``blocks`` = -1 fine-tunes the whole backbone, k > 0 only its last k blocks (the others are
    frozen, BatchNorm statistics included). The head is kept from the source network (same classes).
    With L2-SP on, the trained weights get no plain weight decay (L2-SP replaces it, as in the paper).
    The start is the shared source-pretraining run (``init_from_source``).
    """

    family = "fine-tuning"
    display = "Fine-tuning"
    paper = "Li et al., Explicit Inductive Bias for Transfer Learning with Convolutional Networks (L2-SP), ICML 2018. https://arxiv.org/abs/1802.01483"
    target_data = TargetData.LABELED
    label_budgets = ("k", "all")
    init_from_source = True
    hparams = {
        "backbone_lr_mult": HParam(0.1, ("choice", (0.1, 1.0)), "lr multiplier of the backbone", low=0.0, high=10.0),
        "blocks": HParam(-1, ("choice", (-1, 1, 2)), "fine-tune the last k backbone blocks (-1: all)", low=-1),
        "l2sp_alpha": HParam(0.0, ("log", 1e-3, 1.0), "L2-SP strength toward source weights (0: off)", low=0.0),
    }

    @classmethod
    def check_run(cls, cfg, hp):
        super().check_run(cfg, hp)
        n = BACKBONE_BLOCKS[cfg.backbone]
        if hp["blocks"] > n:  # it would silently fine-tune the whole backbone
            raise DalabError(f"finetune blocks={hp['blocks']} but backbone {cfg.backbone!r} has {n} blocks; "
                             f"use blocks between 0 and {n} (the last k blocks), or -1 for all of them")

    def build(self):
        blocks = backbone_blocks(self.net.backbone)
        self.frozen_blocks = blocks[: max(len(blocks) - self.hp.blocks, 0)] if self.hp.blocks >= 0 else []
        for b in self.frozen_blocks:
            freeze(b)
        self.trained = [p for p in self.net.parameters() if p.requires_grad]
        for i, p in enumerate(self.trained):  # buffers: they move with .to(device) and checkpoint
            self.register_buffer(f"w0_{i}", p.detach().clone())

    def param_groups(self):
        groups = super().param_groups()
        if self.hp.l2sp_alpha > 0:
            for g in groups:
                g["weight_decay"] = 0.0
        return groups

    def train(self, mode: bool = True):
        super().train(mode)
        for b in self.frozen_blocks:
            b.eval()
        return self

    def frozen(self):
        return self.frozen_names(*self.frozen_blocks)

    def update(self, batch: Batch, step: int):
        cls_loss = F.cross_entropy(self.predict(batch.x_tgt_lab), batch.y_tgt_lab)
        loss, out = cls_loss, {"cls_loss": cls_loss}
        if self.hp.l2sp_alpha > 0:
            out["l2sp"] = sum(((p - getattr(self, f"w0_{i}")) ** 2).sum() for i, p in enumerate(self.trained))
            loss = loss + 0.5 * self.hp.l2sp_alpha * out["l2sp"]
        self.step(loss)
        return {"loss": loss, **out}
