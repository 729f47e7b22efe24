"""BNM: batch nuclear-norm maximisation of target predictions."""

from __future__ import annotations

from .base import HParam, TargetRegularized, register


@register("bnm")
class BNM(TargetRegularized):
    """Batch Nuclear-norm Maximization (Cui et al., CVPR 2020):

        loss = CE(C(G(x_s)), y_s) - trade_off * ||softmax(C(G(x_t)))||_* / B

    maximising the nuclear norm of the B x K target prediction matrix raises both discriminability
    (low entropy) and diversity (rank). pytorch-adapt's BNMLoss (= -||A||_* / B, as the paper).
    trade_off = 1 (the paper's UDA setting).
    """

    family = "regularization"
    display = "BNM"
    paper = "Cui et al., Towards Discriminability and Diversity: Batch Nuclear-norm Maximization under Label Insufficient Situations, CVPR 2020. https://arxiv.org/abs/2003.12237"
    hparams = {"trade_off": HParam(1.0, ("log", 0.1, 10.0), "weight of the BNM loss", low=0.0)}

    def build(self):
        from pytorch_adapt.layers import BNMLoss
        self.bnm = BNMLoss()

    def target_loss(self, logits_t):
        bnm = self.bnm(logits_t)
        return bnm, {"bnm_loss": bnm}
