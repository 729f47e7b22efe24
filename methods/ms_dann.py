"""Multi-source DANN: one domain classifier over the k sources and the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, Method, TargetData, register
from .dann import DANN
from .layers import dann_lambda, grad_reverse
from .nets import discriminator_bn, domain_discriminator

# DANN's declarations (same defaults, spaces and help), read from methods/dann.py rather than copied;
# disc_bn_stats is left out: the (k+1)-way classifier is always called once per domain
ADVERSARIAL_HPARAMS = {k: DANN.hparams[k] for k in ("trade_off", "gamma", "disc_hidden", "disc_depth", "disc_bn")}


class MultiDomainAdversarial(Method):
    """The shape shared by multi-source DANN and DANN-DG: a ``n_domains``-way domain classifier D
    behind a gradient reversal layer with DANN's lambda_p schedule,

        loss = CE(C(G(x_s)), y_s) + trade_off * CE(D(R_lambda(G(x))), domain(x)),

    D called once per domain (per-domain BatchNorm statistics, dann's ``disc_bn_stats=split``)."""

    hparams = ADVERSARIAL_HPARAMS

    def n_domains(self) -> int:
        raise NotImplementedError

    def build(self):
        self.disc = domain_discriminator(self.net.backbone.out_dim, self.hp.disc_hidden, self.hp.disc_depth,
                                         discriminator_bn(self.hp.disc_bn, self.net.backbone), self.n_domains())

    def domain_loss(self, groups: list[Tensor], lam: float) -> tuple[Tensor, Tensor]:
        """Cross-entropy of D over the domains' features ``groups`` (domain i = groups[i]), mean over
        domains, and D's accuracy."""
        losses, hits = [], []
        for i, f in enumerate(groups):
            if not len(f):
                continue
            logits = self.disc(grad_reverse(f, lam))
            target = torch.full((len(f),), i, dtype=torch.long, device=f.device)
            losses.append(F.cross_entropy(logits, target))
            hits.append((logits.argmax(1) == target).float().mean())
        return torch.stack(losses).mean(), torch.stack(hits).mean()


@register("ms_dann")
class MultiSourceDANN(MultiDomainAdversarial):
    """Multi-source DANN with ONE (k+1)-way domain classifier (the k sources and the target), the
    direct extension of DANN (Ganin et al., JMLR 2016) used as the multi-source adversarial baseline;
    MDAN (Zhao et al., NeurIPS 2018; ``mdan``) uses one binary source-vs-target classifier per source
    instead. Everything else as ``dann``: GRL, lambda_p = 2 / (1 + exp(-10 p)) - 1, trade_off 1,
    a 100-unit classifier with per-domain BatchNorm on BatchNorm backbones; the domain loss is the mean
    over the k + 1 domains' cross-entropies.
    """

    family = "adversarial"
    display = "MS-DANN"
    known_failure = {"closed": (
        "below the merged-sources source-only baseline on average (results/multisource: 69.9 vs 71.3, 3 seeds, "
        "DANN's main-job setting), all of it on two targets: UCI digits -7.3 and MNIST-5k -1.3 (paired t-test "
        "p < 0.05 on both), while it gains +4.2 on MNIST-M-style. DANN on the merged sources also loses on UCI "
        "digits (-3.5) and gains more elsewhere (72.8 on average): on that target the adversarial term costs "
        "accuracy in both forms, and MS-DANN's extra source-vs-source discrimination (one (k+1)-way classifier) "
        "costs 3.8 points more there. With one binary source-vs-target classifier per source instead (``mdan``, "
        "same table) the average is 71.7, above the baseline, and UCI digits 76.6 (+2.6 over MS-DANN, not "
        "significant over 3 seeds): the (k+1)-way classifier's source-vs-source term accounts for part of the loss")}
    paper = "Ganin et al., Domain-Adversarial Training of Neural Networks, JMLR 2016. https://arxiv.org/abs/1505.07818"
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    min_sources = 2
    settings = ("closed",)

    def n_domains(self) -> int:
        return self.num_sources + 1

    def update(self, batch: Batch, step: int):
        lam = dann_lambda(self.progress(step), self.hp.gamma)
        f_s, f_t = self.features_st(batch.x_src, batch.x_tgt)
        cls_loss = F.cross_entropy(self.net.head(f_s), batch.y_src)
        groups = [f_s[batch.d_src == i] for i in range(self.num_sources)] + [f_t]
        domain_loss, domain_acc = self.domain_loss(groups, lam)
        loss = cls_loss + self.hp.trade_off * domain_loss
        self.step(loss)
        return {"loss": loss, "cls_loss": cls_loss, "domain_loss": domain_loss, "domain_acc": domain_acc,
                "lambda": lam}
