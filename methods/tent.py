"""TENT: test-time entropy minimisation of the BatchNorm affine parameters."""

from __future__ import annotations

from .base import register
from .layers import entropy
from .test_time import TestTimeMethod


@register("tent")
class Tent(TestTimeMethod):
    """TENT (Wang et al., ICLR 2021): BatchNorm normalises with the test batch's statistics, and
    on each stream batch the BatchNorm affine parameters (gamma, beta) -- and nothing else --
    take one gradient step on the mean prediction entropy of that batch,

        min_{gamma, beta}  E_{x in batch} H(softmax(f(x))),   H(p) = -sum_k p_k log p_k.

    The prediction recorded for the batch is the one before this step (the paper's code returns
    the outputs of the forward that the step then uses). Defaults: the authors' CIFAR config --
    Adam, lr 1e-3, no weight decay, one step per batch, batch 64 here (their 128; the stream's
    ``batch_size``), not episodic (``stream_reset=episodic`` is the paper's episodic variant).
    The adapted parameters are declared through ``optimizers()`` (:meth:`TestTimeMethod.adapted`);
    every other weight stays bitwise the source model's (tests/test_test_time.py)."""

    display = "TENT"
    needs_batchnorm = "it adapts the BatchNorm affine parameters, normalising with test-batch statistics"
    paper = ("Wang, Shelhamer, Liu, Olshausen & Darrell, Tent: Fully Test-Time Adaptation by Entropy "
             "Minimization, ICLR 2021. https://arxiv.org/abs/2006.10726")
    known_failure = {"closed": ("class-sorted streams: below the source model (55.7 vs 58.8 at batch 64, "
                                 "results/tta), as BN adapt (56.0), which takes no gradient step: the one-class "
                                 "batches' BatchNorm statistics are the cause, the entropy steps add little "
                                 "either way")}

    def update(self, batch, step: int):
        loss = entropy(self.predict(batch.x_tgt)).mean()
        self.step(loss)
        return {"loss": loss, "entropy": loss}
