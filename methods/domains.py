"""Pieces shared by the methods that train on several domains at once (multi-source adaptation and
domain generalization, issue 25): the per-domain split of a balanced batch (``Batch.d_src``, in
the task's source order: dalab.tasks), per-domain risks, the penalty anneal of IRM and VREx, and
the base class of domain-generalization methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import HParam, Method, TargetData


def per_domain(x: Tensor, d: Tensor, k: int) -> list[Tensor]:
    """The rows of ``x`` of each domain 0..k-1 (``d``: each row's domain), in domain order."""
    return [x[d == i] for i in range(k)]


def domain_risks(logits: Tensor, y: Tensor, d: Tensor, k: int) -> Tensor:
    """The k per-domain mean cross-entropies R_e (a domain absent from the batch is left out)."""
    return torch.stack([F.cross_entropy(lg, yy) for lg, yy in zip(per_domain(logits, d, k), per_domain(y, d, k))
                        if len(yy)])


def annealed_weight(step: int, total_steps: int, weight: float, anneal_frac: float) -> float:
    """A penalty's weight: 1 during the first ``anneal_frac`` of training, ``weight`` after (IRM's and
    VREx's anneal; DomainBed's 500 of its 5000 steps is ``anneal_frac = 0.1``)."""
    return weight if step > anneal_frac * total_steps else 1.0


# What happens to the loss when the penalty's weight jumps from 1 to its full value at the anneal (IRM, VREx).
# The papers' code divides the loss by the weight, which keeps the step of a scale-free optimizer sane but
# shrinks an SGD step on the risk by the same factor; DomainBed resets Adam there instead. Declared once,
# read by both methods; no tuning task chose "none" (benchmarks/multisource_tuning.yaml: VREx diverged).
RESCALE = HParam("divide", ("choice", ("divide", "none")),
                 "after the anneal: divide the loss by the penalty weight (the papers' code) or leave it (none)",
                 keyed_at_default=False)


def annealed_penalty_hparams(weight: float, symbol: str, what: str) -> dict[str, HParam]:
    """The hyperparameters of a penalty annealed in (IRM, VREx): its full weight, the anneal's length
    and :data:`RESCALE`, declared once; ``symbol`` is the paper's name of the weight."""
    return {
        "penalty": HParam(weight, ("log", 1e-1, 1e5), f"{symbol}, the weight of {what} after the anneal", low=0.0),
        "anneal_frac": HParam(0.1, ("uniform", 0.0, 0.5), f"fraction of training with {symbol} = 1 (DomainBed: "
                              "500/5000)", low=0.0, high=1.0),
        "rescale": RESCALE,
    }


def annealed_objective(risk: Tensor, penalty: Tensor, weight: float, rescale: str) -> Tensor:
    """risk + weight * penalty, divided by the weight once it exceeds 1 when ``rescale == "divide"``."""
    loss = risk + weight * penalty
    return loss / weight if rescale == "divide" and weight > 1.0 else loss


class DomainGeneralization(Method):
    """Base of the domain-generalization methods: several labeled source domains, NO target data in
    any batch or hook (the trainer asserts it: dalab.trainer.Streams), evaluated on the held-out
    target. ``source_only`` on a multi-source task is their ERM baseline (DomainBed's ERM: the
    pooled per-domain balanced batch), so there is no separate ``erm`` method."""

    family = "domain generalization"
    target_data = TargetData.NONE
    label_budgets = ("0",)
    domain_generalization = True
    min_sources = 2
    settings = ("closed",)

    def logits_and_risks(self, batch) -> tuple[Tensor, Tensor]:
        """The source logits and the per-domain risks R_e of this step's balanced batch."""
        logits = self.predict(batch.x_src)
        return logits, domain_risks(logits, batch.y_src, batch.d_src, self.num_sources)
