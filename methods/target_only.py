"""Target only: the oracle upper bound, trained on target labels."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Batch, Method, TargetData, register


@register("target_only")
class TargetOnly(Method):
    """Empirical risk on labeled TARGET data only:  min_theta  E_(x,y)~T_lab  CE(C(G(x)), y).

    With budget "all" this is the oracle (an upper bound no unsupervised method can use); with
    budget k it is the "just label a few target images" baseline. Same network and optimizer
    protocol as source_only, trained from scratch; it never sees a source image.
    """

    family = "oracle"
    display = "Target only (oracle)"
    paper = "Upper bound (supervised on target labels)."
    target_data = TargetData.LABELED
    label_budgets = ("k", "all")
    uses_source = False  # its batches carry no source data (the trainer builds no source stream)

    def update(self, batch: Batch, step: int):
        loss = F.cross_entropy(self.predict(batch.x_tgt_lab), batch.y_tgt_lab)
        self.step(loss)
        return {"loss": loss, "cls_loss": loss}
