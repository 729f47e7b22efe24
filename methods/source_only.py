"""Source only: the lower bound every adaptation method must beat."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Batch, Method, TargetData, register


@register("source_only")
class SourceOnly(Method):
    """Empirical risk on labeled source data only:  min_theta  E_(x,y)~S  CE(C(G(x)), y).

    Trained with the same optimizer protocol as the adaptation methods (SGD, momentum 0.9,
    DANN lr annealing), so that differences in a table come from the adaptation term alone.
    """

    family = "baseline"
    display = "Source only"
    paper = "Lower bound (no adaptation)."
    target_data = TargetData.NONE
    label_budgets = ("0",)

    def update(self, batch: Batch, step: int):
        loss = F.cross_entropy(self.predict(batch.x_src), batch.y_src)
        self.step(loss)
        return {"loss": loss, "cls_loss": loss}
